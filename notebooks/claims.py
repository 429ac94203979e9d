#!/usr/bin/env python3
"""Every claim of the paper, computed from one run's CSVs.

    python notebooks/claims.py RESULTS_DIR [--tex paper/generated] [--json FILE]

Prints a summary table (claim, measured figure, target, holds), writes
`claims.json` into RESULTS_DIR (or --json) and, with --tex, one LaTeX macro per claim
(`paper/generated/claims.tex`) and the claims table (`paper/generated/claims-table.tex`),
so the paper never carries a hand-typed number. A claim whose CSV is missing is reported
as "not run" and does not count as holding.
"""
import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd


@dataclass
class Claim:
    key: str  # LaTeX macro suffix: letters only
    text: str
    csv: str
    column: str
    figure: str
    unit: str
    target: str
    compute: Callable[[pd.DataFrame], float]
    holds: Callable[[float], bool]


def mean_ratio(df, num_filter, den_filter, col):
    a = df.loc[num_filter(df), col].mean()
    b = df.loc[den_filter(df), col].mean()
    return a / b if b else math.nan


def io_ratio(pattern, bs, qd, col):
    def f(df):
        sel = (df.pattern == pattern) & (df.block_size_bytes == bs) & (df.queue_depth == qd)
        return mean_ratio(df, lambda d: sel & (d.tool == "blocklab"), lambda d: sel & (d.tool == "fio"), col)
    return f


def init_at(df, nodes=3, dpn=8):
    """exp-init rows of one configuration: nodes x dpn, the smallest propose interval and
    device size present."""
    sel = df[(df.nodes == nodes) & (df.daemons_per_node == dpn)]
    sel = sel[sel.propose_interval_ms == sel.propose_interval_ms.min()]
    return sel[sel.device_size_bytes == sel.device_size_bytes.min()]


def init_speedup(df):
    d = init_at(df)
    return mean_ratio(d, lambda x: x.strategy == "sequential", lambda x: x.strategy == "parallel", "total_ms")


def init_over_bound(df):
    d = init_at(df)
    p = d[d.strategy == "parallel"]
    return (p.total_ms / p.bound_ms).mean() if len(p) else math.nan


def alloc_sel(df, strategy, processes):
    return (df.strategy == strategy) & (df.processes == processes) & (~df.with_io.astype(str).str.lower().eq("true"))


def alloc_ratio(other):
    def f(df):
        return mean_ratio(df, lambda d: alloc_sel(d, "shm", 2), lambda d: alloc_sel(d, other, 2), "ops_per_s")
    return f


def lunmap_p99_8gw(df):
    """Median over repetitions of propagation p99, 8 gateways; the worse editor count."""
    sel = df.loc[(df.backend == "zookeeper") & (df.gateways == 8)]
    return sel.groupby("editors")["propagation_p99_ms"].median().max()


def lunmap_lost_4_editors(df):
    return df.loc[df.backend.str.startswith("zookeeper") & (df.editors == 4), "lost_updates"].sum()


def lunmap_detect_excess(df):
    """Worst detect_dead_ms of the ZooKeeper backends minus the session timeout (2000 ms
    unless the run's meta says otherwise), in ms."""
    return df.loc[df.backend.str.startswith("zookeeper"), "detect_dead_ms"].max() - 2000.0


def failover_sel(df):
    return (df["mode"] == "vip_handoff") & (df.heartbeat_ms == 100) & (df.operation == "all")


def failover_p99(df):
    return df.loc[failover_sel(df), "delivery_after_kill_p99_ms"].max()


def failover_kills(df):
    """Kills per VIP backend (the smaller)."""
    return df.loc[failover_sel(df)].groupby("vip_backend")["kills"].sum().min()


def failover_bad(df):
    sel = df["mode"] == "vip_handoff"
    return df.loc[sel, "lost_results"].sum() + df.loc[sel, "duplicate_executions"].sum()


def commit_lag_ratio(other, workloads=("single", "bursty")):
    """Worst (over workloads and RTTs) ratio of idle's apply-lag p99 to another policy's,
    each the median over repetitions (one VM stall in one repetition does not decide)."""
    def f(df):
        worst = 0.0
        for (w, rtt), g in df[df.workload.isin(workloads)].groupby(["workload", "rtt_ms"]):
            idle = g.loc[g.policy == "idle", "apply_lag_p99_us"].median()
            base = g.loc[g.policy == other, "apply_lag_p99_us"].median()
            if base:
                worst = max(worst, idle / base)
        return worst
    return f


def commit_extra(policy):
    def f(df):
        return df.loc[(df.policy == policy) & (df.workload == "closed"), "extra_messages_per_write"].max()
    return f


def commit_flush_spread(df):
    """Largest relative spread of log_flushes across policies for the same workload, RTT and
    repetition (0 = equal)."""
    worst = 0.0
    for _, g in df.groupby(["workload", "rtt_ms", "repetition", "replicas"]):
        lo, hi = g.log_flushes.min(), g.log_flushes.max()
        if hi:
            worst = max(worst, (hi - lo) / hi)
    return worst


CLAIMS = [
    Claim("ioRandWriteRatio", "blocklab/fio IOPS, 4 KiB random write QD 32", "exp-io.csv", "iops", "exp-io.pdf",
          "x", ">= 0.95", io_ratio("randwrite", 4096, 32, "iops"), lambda v: v >= 0.95),
    Claim("ioSeqWriteRatio", "blocklab/fio bandwidth, 1 MiB sequential write QD 8", "exp-io.csv", "bandwidth_mib_s", "exp-io.pdf",
          "x", ">= 0.95", io_ratio("write", 1 << 20, 8, "bandwidth_mib_s"), lambda v: v >= 0.95),
    Claim("initSpeedup", "parallel init vs sequential, 3 nodes x 8 daemons (total time ratio)", "exp-init.csv", "total_ms",
          "exp-init-speedup.pdf", "x", ">= 10", init_speedup, lambda v: v >= 10),
    Claim("initOverBound", "parallel init total / physical bound, 3 nodes x 8 daemons", "exp-init.csv", "bound_ms",
          "exp-init.pdf", "x", "<= 1.5", init_over_bound, lambda v: v <= 1.5),
    Claim("allocShmPfifty", "shm allocation p50, 1 process", "exp-alloc.csv", "alloc_p50_ns", "exp-alloc-p50.pdf",
          "ns", "<= 100", lambda df: df.loc[alloc_sel(df, "shm", 1), "alloc_p50_ns"].median(), lambda v: v <= 100),
    Claim("allocShmOverMutex", "shm / mutex allocations per second, 2 processes", "exp-alloc.csv", "ops_per_s", "exp-alloc.pdf",
          "x", ">= 3", alloc_ratio("mutex"), lambda v: v >= 3),
    Claim("allocShmOverCentral", "shm / central allocations per second, 2 processes", "exp-alloc.csv", "ops_per_s", "exp-alloc.pdf",
          "x", ">= 20", alloc_ratio("central"), lambda v: v >= 20),
    Claim("allocLost", "leaked + double-allocated blocks, all runs", "exp-alloc.csv", "leaked_blocks,double_allocated", "exp-alloc.pdf",
          "", "= 0", lambda df: df.leaked_blocks.sum() + df.double_allocated.sum(), lambda v: v == 0),
    Claim("lunmapPropagation", "ZooKeeper map propagation p99, 8 gateways (median run, worse editor count)", "exp-lunmap.csv", "propagation_p99_ms",
          "exp-lunmap.pdf", "ms", "<= 20", lunmap_p99_8gw, lambda v: v <= 20),
    Claim("lunmapLost", "lost updates with 4 editors on ZooKeeper", "exp-lunmap.csv", "lost_updates", "exp-lunmap.pdf",
          "", "= 0", lunmap_lost_4_editors, lambda v: v == 0),
    Claim("lunmapDetect", "dead-gateway detection beyond the session timeout (worst)", "exp-lunmap.csv", "detect_dead_ms",
          "exp-lunmap.pdf", "ms", "<= 1000", lunmap_detect_excess, lambda v: v <= 1000),
    Claim("failoverDelivery", "result delivery after a kill, p99, VIP handoff, 100 ms heartbeat (worst backend)", "exp-failover.csv",
          "delivery_after_kill_p99_ms", "exp-failover.pdf", "ms", "<= 1000", failover_p99, lambda v: v <= 1000),
    Claim("failoverKills", "holder kills per VIP backend in the VIP-handoff runs", "exp-failover.csv", "kills", "exp-failover.pdf",
          "", ">= 20", failover_kills, lambda v: v >= 20),
    Claim("failoverLostDup", "lost results + duplicate executions with VIP handoff", "exp-failover.csv",
          "lost_results,duplicate_executions", "exp-failover.pdf", "", "= 0", failover_bad, lambda v: v == 0),
    Claim("commitIdleOverEager", "idle / eager apply-lag p99, single and bursty (worst case)", "exp-commit.csv",
          "apply_lag_p99_us", "exp-commit.pdf", "x", "<= 1.5", commit_lag_ratio("eager"), lambda v: v <= 1.5),
    Claim("commitIdleOverPiggyback", "idle / piggyback apply-lag p99, single and bursty (worst case)", "exp-commit.csv",
          "apply_lag_p99_us", "exp-commit.pdf", "x", "<= 0.1", commit_lag_ratio("piggyback"), lambda v: v <= 0.1),
    Claim("commitIdleExtra", "idle extra messages per write, closed loop", "exp-commit.csv", "extra_messages_per_write",
          "exp-commit-overhead.pdf", "", "<= 0.05", commit_extra("idle"), lambda v: v <= 0.05),
    Claim("commitEagerExtra", "eager extra messages per write, closed loop", "exp-commit.csv", "extra_messages_per_write",
          "exp-commit-overhead.pdf", "", ">= 0.5", commit_extra("eager"), lambda v: v >= 0.5),
    Claim("commitFlushSpread", "spread of log flushes across policies (same writes)", "exp-commit.csv", "log_flushes",
          "exp-commit.pdf", "", "= 0", commit_flush_spread, lambda v: v == 0),
]


def evaluate(results: Path):
    out = []
    cache = {}
    for c in CLAIMS:
        path = results / c.csv
        value: Optional[float] = None
        status = "not run"
        if path.exists():
            if c.csv not in cache:
                cache[c.csv] = pd.read_csv(path)
            try:
                value = float(c.compute(cache[c.csv]))
            except Exception as e:  # a claim that cannot be computed is reported, not hidden
                status = f"error: {e}"
                value = None
            if value is not None:
                status = "holds" if (not math.isnan(value) and c.holds(value)) else "does not hold"
        out.append({
            "key": c.key, "claim": c.text, "csv": c.csv, "column": c.column, "figure": c.figure,
            "target": c.target, "unit": c.unit,
            "value": None if value is None or math.isnan(value) else value, "status": status,
        })
    return out


def fmt(v, unit):
    if v is None:
        return "n/a"
    if unit == "x":
        return f"{v:.2f}x"
    if abs(v) >= 100:
        return f"{v:.0f} {unit}".strip()
    return f"{v:.3g} {unit}".strip()


def tex_escape(s: str) -> str:
    return (s.replace("\\", "\\textbackslash{}").replace("&", "\\&").replace("%", "\\%")
             .replace("_", "\\_").replace("#", "\\#").replace(">=", "$\\geq$").replace("<=", "$\\leq$"))


def write_tex(rows, d: Path):
    d.mkdir(parents=True, exist_ok=True)
    macros = ["% generated by notebooks/claims.py; do not edit"]
    for r in rows:
        macros.append(f"\\newcommand{{\\claim{r['key']}}}{{{tex_escape(fmt(r['value'], r['unit']))}}}")
        macros.append(f"\\newcommand{{\\claim{r['key']}Status}}{{{tex_escape(r['status'])}}}")
    (d / "claims.tex").write_text("\n".join(macros) + "\n")
    lines = ["% generated by notebooks/claims.py; do not edit",
             "\\begin{tabular}{p{9.5cm}lll}", "\\toprule", "Claim & Target & Measured & Holds \\\\", "\\midrule"]
    for r in rows:
        lines.append(f"{tex_escape(r['claim'])} & {tex_escape(r['target'])} & {tex_escape(fmt(r['value'], r['unit']))} & {tex_escape(r['status'])} \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    (d / "claims-table.tex").write_text("\n".join(lines) + "\n")


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
             "| claim | command | CSV column | figure | target | measured | holds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cmd = r["csv"].removesuffix(".csv")
        cols = ", ".join(f"`{c}`" for c in r["column"].split(","))
        lines.append(f"| {r['claim']} | `{cmd}` | `{r['csv']}`: {cols} | `{r['figure']}` | {r['target']} | "
                     f"{fmt(r['value'], r['unit'])} | {r['status']} |")
    note = steal_line(steal_by_experiment(results))
    if note:
        lines += ["", note]
    return "\n".join(lines)


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
    (a.json or a.results / "claims.json").write_text(json.dumps(rows, indent=2) + "\n")
    if a.tex:
        write_tex(rows, a.tex)
    if a.readme:
        update_readme(a.readme, markdown(rows, a.results))
    w = max(len(r["claim"]) for r in rows)
    print(f"{'claim':<{w}}  {'measured':>12}  {'target':>10}  status")
    for r in rows:
        print(f"{r['claim']:<{w}}  {fmt(r['value'], r['unit']):>12}  {r['target']:>10}  {r['status']}")
    held = sum(r["status"] == "holds" for r in rows)
    print(f"{held} of {len(rows)} claims hold")
    note = steal_line(steal_by_experiment(a.results))
    if note:
        print(note)


if __name__ == "__main__":
    main()
