#!/usr/bin/env python3
"""Every claim of the paper, computed from one run's CSVs.

    python notebooks/claims.py RUN [--tex RUN/generated] [--json FILE]

Each claim is one value per repetition (a ratio is taken between the two arms of the
same repetition). Its estimate is the median over repetitions with a 95% percentile-
bootstrap interval (2,000 resamples of the repetitions, fixed seed); a count the claim says
is 0 (lost, leaked, duplicated) is summed over all repetitions and has no interval. A
latency percentile is taken from the repetitions' merged histograms (`<exp>-hist.csv`);
its interval resamples the repetitions, merging the chosen ones' histograms each time (a
ratio: the same repetitions for both arms). The
verdict comes from the interval: holds when all of it is on the target's side, does not
hold when all of it is on the other side, inconclusive when it straddles the target. A
claim without samples (no CSV, no histograms, no rows, a missing arm) does not hold. A
quick-profile run's verdicts are labelled indicative.

Prints the table (claim, estimate, interval, n, target, verdict), writes `claims.json`
into the run directory RUN (or --json) and, with --tex DIR, LaTeX macros per claim
(`DIR/claims.tex`: value, Interval, N, Status) and the claims table
(`DIR/claims-table.tex`), so the paper never carries a hand-typed number.

A run is paper-grade when every experiment ran the full profile from a clean tree (each
meta.json's `clean`, else a `git_revision` without `-dirty`): claims.json says so in
`paper_grade` (with the reasons in `not_paper_grade`), the printed table's last line says
`not paper-grade: <reasons>` otherwise, and the LaTeX macros carry a draft note.
"""
import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blocklab_nb import load_hists, merge, merged_percentile  # noqa: E402


# Bootstrap: resamples of the repetitions, and a fixed seed so a run's table is repeatable.
RESAMPLES = 2000
SEED = 20261207
# A claim whose interval is wider than this share of its estimate is marked: the full
# profile's repetitions were too few for it.
WIDE = 0.10


@dataclass
class Claim:
    key: str  # LaTeX macro suffix: letters only
    text: str
    csv: str
    column: str
    figure: str
    unit: str
    target: str  # ">= 0.95", "<= 100", "= 0"
    # One value per repetition (a Series indexed by repetition). For a ratio, the ratio of
    # the two arms of the same repetition (paired).
    per_rep: Callable[[pd.DataFrame], pd.Series]
    # "estimate": the median over repetitions with a bootstrap interval; "count": a count
    # the claim says is 0, summed over repetitions (exact, no interval); "merged": a
    # percentile of histograms merged over repetitions (`per_rep` then takes the
    # `<exp>-hist.csv` rows and returns a Merged; `column` names the metric).
    kind: str = "estimate"

    @property
    def hist_csv(self) -> str:
        return self.csv.removesuffix(".csv") + "-hist.csv"


@dataclass
class Merged:
    """A claim's value from histograms merged over a set of repetitions: `stat` takes a
    sorted tuple of repetitions (repeats allowed: a bootstrap resample) and returns the
    value. `reps` are the repetitions in which every arm of every group has samples."""
    reps: list
    stat: Callable[[tuple], float]


def merged_stat(hists, sel, metric, q, groups=(), ratio=None, scale=1.0, offset=0.0):
    """The q-th percentile of the `metric` histograms of the rows `sel` picks, merged over
    the chosen repetitions, separately for each combination of the `groups` columns; the
    worst (largest) over groups, times `scale` plus `offset`. With `ratio` = (num, den),
    two row selectors, the value of a group is the percentile of num's rows over den's,
    both merged over the same repetitions (paired)."""
    d = hists[(hists.metric == metric) & sel(hists)]
    arms = [lambda g: g.index == g.index] if ratio is None else list(ratio)
    by_group = list(d.groupby(list(groups))) if groups else [((), d)]
    gkeys = [gk for gk, _ in by_group]
    # One layout for every histogram of the claim, so merging in the bootstrap is fast.
    top = max([h.highest_trackable_value for h in d["hist"]] + [2])
    cells = {}  # (group, arm) -> {repetition: the histograms of its rows, merged}
    for gk, g in by_group:
        for i, arm in enumerate(arms):
            a = g[arm(g)]
            cells[(gk, i)] = {rep: merge(x["hist"], top) for rep, x in a.groupby("repetition")}
    def stat(chosen):
        worst = math.nan
        for gk in gkeys:
            v = [merged_percentile([cells[(gk, i)][r] for r in chosen], q) for i in range(len(arms))]
            if ratio is not None:
                v = [v[0] / v[1] if v[1] else math.nan]
            if math.isnan(v[0]):
                return math.nan  # a missing arm fails the value, never reads as 0
            worst = v[0] if math.isnan(worst) else max(worst, v[0])
        return worst * scale + offset

    # A repetition counts when every arm of every group has samples in it and its own value
    # is defined (a ratio's denominator not 0); then so is the value of any resample, since
    # a percentile of merged histograms is at least the smallest of theirs.
    reps = sorted(set(d.repetition)) if not d.empty else []
    reps = [r for r in reps if all(r in c and c[r].get_total_count() > 0 for c in cells.values())
            and not math.isnan(stat((r,)))]
    return Merged(reps, stat)


def by_rep(df, f):
    """f(rows of one repetition) for each repetition, as a Series without NaNs."""
    if df.empty:
        return pd.Series(dtype=float)
    return df.groupby("repetition").apply(f, include_groups=False).astype(float).dropna()


def paired_ratio(df, num, den, col):
    """Per repetition: mean of `col` over the rows `num` selects / over the rows `den` selects."""
    def f(g):
        a, b = g.loc[num(g), col], g.loc[den(g), col]
        if a.empty or b.empty or b.mean() == 0:
            return math.nan
        return a.mean() / b.mean()
    return by_rep(df, f)


def io_ratio(pattern, bs, qd, col):
    def f(df):
        sel = df[(df.pattern == pattern) & (df.block_size_bytes == bs) & (df.queue_depth == qd)]
        return paired_ratio(sel, lambda d: d.tool == "blocklab", lambda d: d.tool == "fio", col)
    return f


def init_at(df, backend="blocklab", nodes=None, dpn=None):
    """exp-init rows of one backend and configuration: nodes x dpn (default: the backend's
    largest by daemons), the smallest propose interval and device size present. Rows of runs
    before the Ceph backend (no `backend` column) are blocklab's."""
    if "backend" in df.columns:
        df = df[df.backend == backend]
    elif backend != "blocklab":
        return df.iloc[0:0]
    if df.empty:
        return df
    if nodes is None:
        big = df[df.nodes * df.daemons_per_node == (df.nodes * df.daemons_per_node).max()]
        nodes, dpn = int(big.nodes.max()), int(big[big.nodes == big.nodes.max()].daemons_per_node.max())
    sel = df[(df.nodes == nodes) & (df.daemons_per_node == dpn)]
    sel = sel[sel.propose_interval_ms == sel.propose_interval_ms.min()]
    return sel[sel.device_size_bytes == sel.device_size_bytes.min()]


def init_ratio(backend, num, den, nodes=None, dpn=None):
    """Per repetition: total time of strategy `num` over strategy `den`."""
    return lambda df: paired_ratio(init_at(df, backend, nodes, dpn), lambda x: x.strategy == num,
                                   lambda x: x.strategy == den, "total_ms")


def init_over_bound(backend, nodes=None, dpn=None):
    def f(df):
        p = init_at(df, backend, nodes, dpn)
        p = p[p.strategy == "parallel"]
        return by_rep(p, lambda g: (g.total_ms / g.bound_ms).mean())
    return f


def alloc_sel(df, strategy, processes):
    return (df.strategy == strategy) & (df.processes == processes) & (~df.with_io.astype(str).str.lower().eq("true"))


def alloc_p50(hists):
    """p50 of shm's allocation latency at 1 process, allocation only, merged."""
    return merged_stat(hists, lambda d: alloc_sel(d, "shm", 1), "alloc_ns", 50)


def alloc_ratio(other):
    def f(df):
        return paired_ratio(df, lambda d: alloc_sel(d, "shm", 2), lambda d: alloc_sel(d, other, 2), "ops_per_s")
    return f


def count(cols, sel=lambda df: df.index == df.index):
    """Per repetition: the sum of the counters `cols` over the rows `sel` picks."""
    def f(df):
        d = df[sel(df)]
        return by_rep(d, lambda g: sum(g[c].sum() for c in cols))
    return f


def lunmap_p99_8gw(hists):
    """Propagation p99 (ms) to 8 gateways through ZooKeeper, merged per editor count; the
    worse editor count."""
    return merged_stat(hists, lambda d: (d.backend == "zookeeper") & (d.gateways == 8), "propagation_us", 99,
                       groups=["editors"], scale=1e-3)


def lunmap_detect_excess(hists):
    """The latest detection of a dead gateway (the maximum, ms) over the ZooKeeper
    backends' runs, minus the session timeout (2000 ms)."""
    return merged_stat(hists, lambda d: d.backend.str.startswith("zookeeper"), "detect_dead_us", 100,
                       scale=1e-3, offset=-2000.0)


def failover_sel(df):
    return (df["mode"] == "vip_handoff") & (df.heartbeat_ms == 100) & (df.operation == "all")


def failover_p99(hists):
    """Result delivery after a kill, p99 (ms), merged per VIP backend; the worse backend."""
    return merged_stat(hists, failover_sel, "delivery_after_kill_us", 99, groups=["vip_backend"], scale=1e-3)


# exp-commit: the patent's policy (idle_ack) against the others, on the replicas'
# reference setting: 3 replicas, RTT 1 ms, logs on disk-backed devices.
SPARSE = 10.0  # writes per second, Poisson: a mean gap of 100 ms


def commit_base(d):
    return (d.replicas == 3) & (d.rtt_ms == 1.0) & (d.backing == "disk")


def commit_moderate_rate(d):
    """The smallest Poisson rate above sparse in the reference setting (full: 50/s)."""
    r = d[commit_base(d) & (d.workload == "poisson") & (d.rate_per_s > SPARSE)].rate_per_s
    return r.min() if not r.empty else math.nan


def commit_top_rate(d):
    r = d[commit_base(d) & (d.workload == "poisson")].rate_per_s
    return r.max() if not r.empty else math.nan


def commit_lag_ratio(other, rate):
    """idle_ack's apply-lag p99 over another policy's at a Poisson rate (`rate`: a number or
    a function of the histogram rows), each merged over the same repetitions."""
    def f(hists):
        r = rate(hists) if callable(rate) else rate
        return merged_stat(hists, lambda d: commit_base(d) & (d.workload == "poisson") & (d.rate_per_s == r),
                           "apply_lag_us", 99,
                           ratio=(lambda g: g.policy == "idle_ack", lambda g: g.policy == other))
    return f


def commit_extra_ratio(other, sel):
    """Per repetition: idle_ack's extra messages per write (empty appends and their
    answers) over another policy's, in the rows `sel(df)` picks."""
    def f(df):
        d = df[commit_base(df) & sel(df)]
        return paired_ratio(d, lambda x: x.policy == "idle_ack", lambda x: x.policy == other, "extra_messages_per_write")
    return f


def commit_flush_spread(df):
    """Per repetition: the largest relative spread of log_flushes across the replication
    policies for the same writes: workload, offered rate, RTT and replicas (0 = equal).
    The closed loop's rate is the achieved rate, which the policies change, so it is left
    out; etcd has no flush count."""
    df = df[(df.policy != "etcd") & (df.workload != "closed")]

    def f(g):
        worst = 0.0
        for _, c in g.groupby(["workload", "rate_per_s", "rtt_ms", "replicas", "backing"]):
            lo, hi = c.log_flushes.min(), c.log_flushes.max()
            if hi:
                worst = max(worst, (hi - lo) / hi)
        return worst
    return by_rep(df, f)


CLAIMS = [
    Claim("ioRandWriteRatio", "blocklab/fio IOPS, 4 KiB random write QD 32", "exp-io.csv", "iops", "exp-io.pdf",
          "x", ">= 0.95", io_ratio("randwrite", 4096, 32, "iops")),
    Claim("ioSeqWriteRatio", "blocklab/fio bandwidth, 1 MiB sequential write QD 8", "exp-io.csv", "bandwidth_mib_s", "exp-io.pdf",
          "x", ">= 0.95", io_ratio("write", 1 << 20, 8, "bandwidth_mib_s")),
    Claim("initSpeedup", "parallel init vs sequential, 3 nodes x 8 daemons (total time ratio)", "exp-init.csv", "total_ms",
          "exp-init-speedup.pdf", "x", ">= 10", init_ratio("blocklab", "sequential", "parallel", 3, 8)),
    Claim("initOverBound", "parallel init total / physical bound, 3 nodes x 8 daemons", "exp-init.csv", "bound_ms",
          "exp-init.pdf", "x", "<= 1.5", init_over_bound("blocklab", 3, 8)),
    Claim("initBatch", "parallel / parallel without the batch, 3 nodes x 8 daemons (total time ratio)",
          "exp-init.csv", "total_ms", "exp-init-speedup.pdf", "x", "<= 0.9",
          init_ratio("blocklab", "parallel", "parallel_nobatch", 3, 8)),
    Claim("initCephSpeedup", "Ceph: parallel OSD deployment vs sequential, largest shape (total time ratio)",
          "exp-init.csv", "total_ms", "exp-init-ceph.pdf", "x", ">= 5", init_ratio("ceph", "sequential", "parallel")),
    Claim("initCephBatch", "Ceph: parallel / parallel without the batch, largest shape (total time ratio)",
          "exp-init.csv", "total_ms", "exp-init-ceph.pdf", "x", "<= 0.9", init_ratio("ceph", "parallel", "parallel_nobatch")),
    Claim("initCephOverBound", "Ceph: parallel OSD deployment / measured bound, largest shape", "exp-init.csv", "bound_ms",
          "exp-init-ceph.pdf", "x", "<= 1.5", init_over_bound("ceph")),
    Claim("allocShmPfifty", "shm allocation p50, 1 process", "exp-alloc.csv", "alloc_ns", "exp-alloc-p50.pdf",
          "ns", "<= 100", alloc_p50, "merged"),
    Claim("allocShmOverMutex", "shm / mutex allocations per second, 2 processes", "exp-alloc.csv", "ops_per_s", "exp-alloc.pdf",
          "x", ">= 3", alloc_ratio("mutex")),
    Claim("allocShmOverCentral", "shm / central allocations per second, 2 processes", "exp-alloc.csv", "ops_per_s", "exp-alloc.pdf",
          "x", ">= 20", alloc_ratio("central")),
    Claim("allocLost", "leaked + double-allocated blocks, all runs", "exp-alloc.csv", "leaked_blocks,double_allocated", "exp-alloc.pdf",
          "", "= 0", count(["leaked_blocks", "double_allocated"]), "count"),
    Claim("lunmapPropagation", "ZooKeeper map propagation p99, 8 gateways (worse editor count)", "exp-lunmap.csv", "propagation_us",
          "exp-lunmap.pdf", "ms", "<= 20", lunmap_p99_8gw, "merged"),
    Claim("lunmapLost", "lost updates with 4 editors on ZooKeeper", "exp-lunmap.csv", "lost_updates", "exp-lunmap.pdf",
          "", "= 0", count(["lost_updates"], lambda d: d.backend.str.startswith("zookeeper") & (d.editors == 4)), "count"),
    Claim("lunmapDetect", "dead-gateway detection beyond the session timeout (worst gateway)", "exp-lunmap.csv", "detect_dead_us",
          "exp-lunmap.pdf", "ms", "<= 1000", lunmap_detect_excess, "merged"),
    Claim("failoverDelivery", "result delivery after a kill, p99, VIP handoff, 100 ms heartbeat (worse backend)", "exp-failover.csv",
          "delivery_after_kill_us", "exp-failover.pdf", "ms", "<= 1000", failover_p99, "merged"),
    Claim("failoverLostDup", "lost results + duplicate executions with VIP handoff", "exp-failover.csv",
          "lost_results,duplicate_executions", "exp-failover.pdf", "", "= 0",
          count(["lost_results", "duplicate_executions"], lambda d: d["mode"] == "vip_handoff"), "count"),
    Claim("commitAckOverPiggyback", "idle_ack / piggyback apply-lag p99, sparse writes (10/s), RTT 1 ms", "exp-commit.csv",
          "apply_lag_us", "exp-commit.pdf", "x", "<= 0.1", commit_lag_ratio("piggyback", SPARSE), "merged"),
    Claim("commitAckOverPeriodic", "idle_ack / periodic:50ms apply-lag p99, sparse writes (10/s), RTT 1 ms", "exp-commit.csv",
          "apply_lag_us", "exp-commit.pdf", "x", "<= 0.5", commit_lag_ratio("periodic", SPARSE), "merged"),
    Claim("commitAckOverEagerSparse", "idle_ack / eager apply-lag p99, sparse writes (10/s), RTT 1 ms", "exp-commit.csv",
          "apply_lag_us", "exp-commit.pdf", "x", "<= 1.5", commit_lag_ratio("eager", SPARSE), "merged"),
    Claim("commitAckOverEagerModerate", "idle_ack / eager apply-lag p99, moderate rate (full: 50/s), RTT 1 ms", "exp-commit.csv",
          "apply_lag_us", "exp-commit.pdf", "x", "<= 1.5", commit_lag_ratio("eager", commit_moderate_rate), "merged"),
    Claim("commitAckExtraTop", "idle_ack / eager extra messages per write, highest Poisson rate, RTT 1 ms", "exp-commit.csv",
          "extra_messages_per_write", "exp-commit-tradeoff.pdf", "x", "<= 0.5",
          commit_extra_ratio("eager", lambda d: (d.workload == "poisson") & (d.rate_per_s == commit_top_rate(d)))),
    Claim("commitAckExtraClosed", "idle_ack / eager extra messages per write, closed loop, RTT 1 ms", "exp-commit.csv",
          "extra_messages_per_write", "exp-commit-tradeoff.pdf", "x", "<= 0.5",
          commit_extra_ratio("eager", lambda d: d.workload == "closed")),
    Claim("commitFlushSpread", "spread of log flushes across policies (same writes)", "exp-commit.csv", "log_flushes",
          "exp-commit.pdf", "", "= 0", commit_flush_spread, "count"),
    Claim("commitViolations", "entries applied before their commit, every measured run", "exp-commit.csv", "violations",
          "exp-commit.pdf", "", "= 0", count(["violations"], lambda d: d.policy != "etcd"), "count"),
    Claim("commitKillViolations", "violations after kills in the idle window (applied uncommitted, diverged, not converged)",
          "exp-commit-kills.csv", "violations", "exp-commit.pdf", "", "= 0", count(["violations"]), "count"),
]


def failover_kills(df):
    """Kills per VIP backend (the smaller) in the VIP-handoff runs: a setting of the run."""
    return df.loc[failover_sel(df)].groupby("vip_backend")["kills"].sum().min()


# Settings the run chose, printed with the claims but not claims (a run cannot fail them).
PARAMETERS = [
    ("failoverKills", "holder kills per VIP backend, VIP handoff", "exp-failover.csv", failover_kills),
]


def bootstrap_median(values, resamples=RESAMPLES, seed=SEED):
    """The median of `values` and a 95% percentile-bootstrap interval of it (resampling the
    repetitions with replacement)."""
    v = np.asarray(values, dtype=float)
    est = float(np.median(v))
    if len(v) < 2:
        return est, est, est
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(v, size=(resamples, len(v)), replace=True), axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return est, float(lo), float(hi)


def bootstrap_merged(m: Merged, resamples=RESAMPLES, seed=SEED):
    """The value of all of `m`'s repetitions merged, and a 95% percentile-bootstrap interval
    of it: each resample draws the repetitions with replacement (the same draw for both arms
    of a ratio), merges the drawn repetitions' histograms and takes the value. NaN without
    repetitions."""
    reps = list(m.reps)
    if not reps:
        return math.nan, math.nan, math.nan
    cache = {}

    def value(chosen):
        key = tuple(sorted(chosen))  # merging ignores order: one value per multiset
        if key not in cache:
            cache[key] = m.stat(key)
        return cache[key]
    est = value(reps)
    if len(reps) < 2:
        return est, est, est
    rng = np.random.default_rng(seed)
    draws = rng.choice(np.asarray(reps), size=(resamples, len(reps)), replace=True)
    vals = np.array([value(tuple(int(r) for r in row)) for row in draws])
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return est, float(lo), float(hi)


def verdict(target: str, lo: float, hi: float) -> str:
    """holds when the whole interval is on the target's side, does not hold when all of it
    is on the other side, inconclusive when it straddles the target."""
    op, t = target.split()
    t = float(t)
    if op == ">=":
        return "holds" if lo >= t else "does not hold" if hi < t else "inconclusive"
    if op == "<=":
        return "holds" if hi <= t else "does not hold" if lo > t else "inconclusive"
    if op == "=":
        return "holds" if lo == t and hi == t else "does not hold"
    raise ValueError(f"unknown target {target!r}")


def profile_of(results: Path, csv: str) -> Optional[str]:
    meta = results / (csv.removesuffix(".csv").split("-phases")[0] + ".meta.json")
    try:
        return json.loads(meta.read_text()).get("profile")
    except (OSError, ValueError):
        return None


def evaluate(results: Path):
    out = []
    cache = {}
    for c in CLAIMS:
        path = results / c.csv
        row = {"key": c.key, "claim": c.text, "csv": c.csv, "column": c.column, "figure": c.figure,
               "target": c.target, "unit": c.unit, "kind": c.kind, "value": None, "low": None, "high": None,
               "n": 0, "profile": profile_of(results, c.csv)}
        if not path.exists():
            row["status"] = "does not hold (not run)"
            out.append(row)
            continue
        if c.kind == "merged":
            # The histograms beside the CSV; an older run without them has no samples.
            path = results / c.hist_csv
            if not path.exists():
                row["status"] = f"does not hold (no histograms: {c.hist_csv} missing)"
                out.append(row)
                continue
        try:
            if path.name not in cache:
                cache[path.name] = load_hists(results, c.csv.removesuffix(".csv")) if c.kind == "merged" \
                    else pd.read_csv(path)
            if c.kind == "merged":
                m = c.per_rep(cache[path.name])
                est, lo, hi = bootstrap_merged(m)
                n = len(m.reps)
            else:
                reps = c.per_rep(cache[path.name])
                n = len(reps)
        except Exception as e:  # a claim that cannot be computed is reported, not hidden
            row["status"] = f"does not hold (error: {e})"
            out.append(row)
            continue
        row["n"] = int(n)
        if n == 0 or (c.kind == "merged" and math.isnan(est)):
            # Missing samples fail the claim; they never read as 0.
            row["n"] = 0
            row["status"] = "does not hold (no samples)"
        else:
            if c.kind == "count":
                est = lo = hi = float(reps.sum())
            elif c.kind == "estimate":
                est, lo, hi = bootstrap_median(reps.values)
            row.update(value=est, low=lo, high=hi, status=verdict(c.target, lo, hi))
            # An interval wider than 10% of the estimate asks for more repetitions.
            row["wide"] = c.kind != "count" and est != 0 and (hi - lo) > WIDE * abs(est)
        out.append(row)
    return out


def parameters(results: Path):
    out = []
    for key, text, csv, f in PARAMETERS:
        path = results / csv
        v = None
        if path.exists():
            try:
                v = float(f(pd.read_csv(path)))
            except Exception:
                v = None
        out.append({"key": key, "text": text, "value": None if v is None or math.isnan(v) else v})
    return out


def fmt(v, unit):
    if v is None:
        return "n/a"
    if unit == "x":
        return f"{v:.2f}x"
    if abs(v) >= 100:
        return f"{v:.0f} {unit}".strip()
    return f"{v:.3g} {unit}".strip()


def fmt_interval(r) -> str:
    """`[low, high]` of an estimate; empty for a count or a claim without samples."""
    if r["kind"] == "count" or r["low"] is None:
        return ""
    return f"[{fmt(r['low'], r['unit'])}, {fmt(r['high'], r['unit'])}]"


def label(r) -> str:
    """The verdict, marked indicative when the run is a quick one, and marked when its
    interval is wider than 10% of the estimate (more repetitions would narrow it)."""
    s = r["status"]
    if r.get("wide"):
        s += " [interval > 10% of estimate]"
    if r.get("profile") == "quick":
        s += f" (indicative, n = {r['n']})"
    return s


def tex_escape(s: str) -> str:
    return (s.replace("\\", "\\textbackslash{}").replace("&", "\\&").replace("%", "\\%")
             .replace("_", "\\_").replace("#", "\\#").replace(">=", "$\\geq$").replace("<=", "$\\leq$"))


def write_tex(rows, params, d: Path, not_grade=()):
    d.mkdir(parents=True, exist_ok=True)
    macros = ["% generated by notebooks/claims.py; do not edit"]
    # A note under the title of a paper built from a run that is not paper-grade.
    note = f"Draft: built from a run that is not paper-grade ({'; '.join(not_grade)})." if not_grade else ""
    macros.append(f"\\newcommand{{\\claimsGradeNote}}{{{tex_escape(note)}}}")
    for r in rows:
        macros.append(f"\\newcommand{{\\claim{r['key']}}}{{{tex_escape(fmt(r['value'], r['unit']))}}}")
        macros.append(f"\\newcommand{{\\claim{r['key']}Interval}}{{{tex_escape(fmt_interval(r))}}}")
        macros.append(f"\\newcommand{{\\claim{r['key']}N}}{{{r['n']}}}")
        macros.append(f"\\newcommand{{\\claim{r['key']}Status}}{{{tex_escape(r['status'])}}}")
        # 0 holds, 1 inconclusive, 2 does not hold: the paper's \outcome{KEY}{...}{...}{...}
        # picks its sentence by it, so the prose cannot contradict the verdict.
        macros.append(f"\\newcommand{{\\claim{r['key']}VerdictCode}}{{{verdict_code(r['status'])}}}")
    for p in params:
        macros.append(f"\\newcommand{{\\claim{p['key']}}}{{{tex_escape(fmt(p['value'], ''))}}}")
    (d / "claims.tex").write_text("\n".join(macros) + "\n")
    lines = ["% generated by notebooks/claims.py; do not edit",
             "\\begin{tabular}{p{7cm}llrl}", "\\toprule",
             "Claim & Target & Estimate [95\\% CI] & $n$ & Verdict \\\\", "\\midrule"]
    for r in rows:
        est = f"{fmt(r['value'], r['unit'])} {fmt_interval(r)}".strip()
        lines.append(f"{tex_escape(r['claim'])} & {tex_escape(r['target'])} & {tex_escape(est)} & {r['n']} & "
                     f"{tex_escape(r['status'])} \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    (d / "claims-table.tex").write_text("\n".join(lines) + "\n")


def verdict_code(status: str) -> int:
    """0 holds, 1 inconclusive, 2 does not hold (missing samples and errors included)."""
    return 0 if status == "holds" else 1 if status == "inconclusive" else 2


def run_setup(results: Path) -> dict:
    """What the run ran on and how, from its meta.json files and CSVs: machine, versions,
    profile, and per experiment its repetitions, duration and CPU steal."""
    metas = {}
    for m in sorted(results.glob("*.meta.json")):
        try:
            metas[m.name.removesuffix(".meta.json")] = json.loads(m.read_text())
        except ValueError:
            continue
    first = next(iter(metas.values()), {})
    revs = sorted({m.get("git_revision", "unknown") for m in metas.values()})
    clean = all(m.get("clean", not str(m.get("git_revision", "")).endswith("-dirty")) for m in metas.values())
    exps = []
    for name, m in metas.items():
        reps = None
        csv = results / f"{name}.csv"
        if csv.exists():
            df = pd.read_csv(csv)
            if "repetition" in df.columns and not df.empty:
                reps = int(df["repetition"].nunique())
        secs = None
        try:
            t = [pd.Timestamp(m[k]) for k in ("start_utc", "end_utc")]
            secs = (t[1] - t[0]).total_seconds()
        except (KeyError, TypeError, ValueError):
            pass
        dev = m.get("devices") or {}
        if not isinstance(dev, dict):  # a list of device sets: count them
            dev = {"count": len(dev)}
        exps.append({"experiment": name, "repetitions": reps, "seconds": secs,
                     "steal_percent": m.get("cpu_steal_percent"), "devices": dev.get("count"),
                     "device_kind": dev.get("kind"), "device_bytes": dev.get("size_bytes")})
    return {"cpu_model": first.get("cpu_model"), "cpus": first.get("cpu_count"),
            "memory_bytes": first.get("memory_bytes"), "kernel": first.get("kernel"),
            "rustc": first.get("rustc"), "fio": first.get("fio"), "zookeeper": first.get("zookeeper"),
            "profiles": sorted({str(m.get("profile")) for m in metas.values()}),
            "revisions": revs, "clean": clean, "experiments": exps}


def write_setup_tex(setup: dict, d: Path):
    """generated/setup.tex: macros for the paper's setup section, and setup-table.tex: per
    experiment its repetitions, duration and CPU steal."""
    def v(x, unknown="unknown"):
        return tex_escape(str(x)) if x not in (None, "") else unknown
    mem = setup.get("memory_bytes")
    mem_text = f"{mem / 2**30:.0f}" + "\\,GiB" if mem else "unknown"
    macros = ["% generated by notebooks/claims.py; do not edit",
              f"\\newcommand{{\\setupCpuModel}}{{{v(setup['cpu_model'])}}}",
              f"\\newcommand{{\\setupCpus}}{{{v(setup['cpus'])}}}",
              f"\\newcommand{{\\setupMemory}}{{{mem_text}}}",
              f"\\newcommand{{\\setupKernel}}{{{v(setup['kernel'])}}}",
              f"\\newcommand{{\\setupRustc}}{{{v(setup['rustc'])}}}",
              f"\\newcommand{{\\setupFio}}{{{v(setup['fio'])}}}",
              f"\\newcommand{{\\setupZookeeper}}{{{v(setup['zookeeper'])}}}",
              f"\\newcommand{{\\setupProfile}}{{{v(', '.join(setup['profiles']))}}}",
              f"\\newcommand{{\\setupRevision}}{{\\texttt{{{v(', '.join(r[:12] + ('-dirty' if r.endswith('-dirty') else '') for r in setup['revisions']))}}}}}",
              f"\\newcommand{{\\setupClean}}{{{'clean' if setup['clean'] else 'with uncommitted changes'}}}"]
    (d / "setup.tex").write_text("\n".join(macros) + "\n")
    lines = ["% generated by notebooks/claims.py; do not edit",
             "\\begin{tabular}{lrrr}", "\\toprule", "Experiment & Reps & Minutes & Steal \\\\", "\\midrule"]
    for e in setup["experiments"]:
        mins = f"{e['seconds'] / 60:.1f}" if e["seconds"] is not None else "--"
        steal = f"{e['steal_percent']:.1f}\\%" if e["steal_percent"] is not None else "--"
        lines.append(f"{tex_escape(e['experiment'])} & {e['repetitions'] or '--'} & {mins} & {steal} \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    (d / "setup-table.tex").write_text("\n".join(lines) + "\n")


def steal_by_experiment(results: Path) -> dict:
    """CPU steal (percent of CPU time the hypervisor gave to others) during each experiment
    of the run, from its meta.json; absent where the meta predates the field."""
    out = {}
    for c in CLAIMS:
        exp = c.csv.removesuffix(".csv")
        meta = results / f"{exp}.meta.json"
        if exp in out or not meta.exists():
            continue
        v = json.loads(meta.read_text()).get("cpu_steal_percent")
        if v is not None:
            out[exp] = v
    return out


def steal_line(steal: dict) -> str:
    if not steal:
        return ""
    parts = ", ".join(f"{k} {v:.1f}%" for k, v in steal.items())
    return (f"CPU steal during the runs (share of CPU time the hypervisor gave to others): {parts}. "
            "Stalls of several ms come with it, and they decide tail latencies.")


def markdown(rows, results: Path) -> str:
    lines = [f"<!-- generated by notebooks/claims.py from {results}; do not edit by hand -->",
             "| claim | command | source | target | estimate [95% CI] | n | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cmd = r["csv"].removesuffix(".csv")
        cols = ", ".join(f"`{c}`" for c in r["column"].split(","))
        # A latency claim reads the metric's histograms, kept beside the CSV.
        src = f"{cmd}-hist.csv" if r["kind"] == "merged" else r["csv"]
        lines.append(f"| {r['claim']} | `{cmd}` | `{src}`: {cols} | {r['target']} | "
                     f"{fmt(r['value'], r['unit'])} {fmt_interval(r)} | {r['n']} | {label(r)} |")
    note = steal_line(steal_by_experiment(results))
    if note:
        lines += ["", note]
    return "\n".join(lines)


def paper_grade(results: Path):
    """The reasons the run in `results` is not paper-grade (none: it is). Paper-grade means
    every experiment's meta.json records the full profile and a clean tree: `clean` where
    the meta has it, else a `git_revision` that does not end in `-dirty`."""
    metas = sorted(results.glob("*.meta.json"))
    if not metas:
        return ["no meta.json in the run"]
    not_full, dirty, unknown, unreadable = [], [], [], []
    for m in metas:
        exp = m.name.removesuffix(".meta.json")
        try:
            meta = json.loads(m.read_text())
        except (OSError, ValueError):
            unreadable.append(exp)
            continue
        if meta.get("profile") != "full":
            not_full.append((exp, str(meta.get("profile", "not recorded"))))
        clean, rev = meta.get("clean"), meta.get("git_revision")
        if isinstance(clean, bool):
            if not clean:
                dirty.append(exp)
        elif not isinstance(rev, str) or rev in ("", "unknown"):
            unknown.append(exp)
        elif rev.endswith("-dirty"):
            dirty.append(exp)
    every = len(metas) - len(unreadable)

    def which(exps):
        return "" if len(exps) == every else " in " + ", ".join(exps)
    reasons = []
    if not_full and len(not_full) == every:
        reasons.append(f"profile {'/'.join(sorted({p for _, p in not_full}))}, not full")
    elif not_full:
        reasons.append("profile not full in " + ", ".join(f"{e} ({p})" for e, p in not_full))
    if dirty:
        reasons.append("built from a tree with uncommitted changes" + which(dirty))
    if unknown:
        reasons.append("git revision not recorded" + which(unknown))
    if unreadable:
        reasons.append("unreadable meta.json: " + ", ".join(unreadable))
    return reasons


def grade_line(not_grade) -> str:
    if not_grade:
        return "not paper-grade: " + "; ".join(not_grade)
    return "paper-grade: full profile, clean tree"


def update_readme(path: Path, table: str):
    text = path.read_text()
    begin, end = "<!-- claims:begin -->", "<!-- claims:end -->"
    if begin not in text or end not in text:
        sys.exit(f"{path}: no {begin} ... {end} block to replace")
    pre, rest = text.split(begin, 1)
    _, post = rest.split(end, 1)
    path.write_text(pre + begin + "\n" + table + "\n" + end + post)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path)
    ap.add_argument("--tex", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--readme", type=Path, help="replace the claims block of this README with the table")
    a = ap.parse_args()
    if not a.results.is_dir():
        sys.exit(f"{a.results}: not a directory")
    rows = evaluate(a.results)
    params = parameters(a.results)
    not_grade = paper_grade(a.results)
    (a.json or a.results / "claims.json").write_text(
        json.dumps({"claims": rows, "parameters": params, "resamples": RESAMPLES, "seed": SEED,
                    "paper_grade": not not_grade, "not_paper_grade": not_grade}, indent=2) + "\n")
    if a.tex:
        write_tex(rows, params, a.tex, not_grade)
        write_setup_tex(run_setup(a.results), a.tex)
    if a.readme:
        update_readme(a.readme, markdown(rows, a.results))
    w = max(len(r["claim"]) for r in rows)
    print(f"{'claim':<{w}}  {'estimate':>10}  {'95% interval':>22}  {'n':>3}  {'target':>9}  verdict")
    for r in rows:
        print(f"{r['claim']:<{w}}  {fmt(r['value'], r['unit']):>10}  {fmt_interval(r):>22}  {r['n']:>3}  "
              f"{r['target']:>9}  {label(r)}")
    held = sum(r["status"] == "holds" for r in rows)
    print(f"{held} of {len(rows)} claims hold", end="")
    if any(r.get("profile") == "quick" for r in rows):
        print(" (quick profile: indicative only)", end="")
    print()
    for p in params:
        print(f"run parameter: {p['text']}: {fmt(p['value'], '')}")
    note = steal_line(steal_by_experiment(a.results))
    if note:
        print(note)
    print(grade_line(not_grade))


if __name__ == "__main__":
    main()
