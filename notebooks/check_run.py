#!/usr/bin/env python3
"""Checks one quick-profile run directory: python notebooks/check_run.py RUN [--skip EXP]...

Every CSV has exactly its documented columns and at least one row per configuration the
quick profile runs; beside each, its raw data: `<exp>-hist.csv` with a decodable histogram
per row and metric, and exp-io's fio JSON per fio row; every figure the paper cites exists
in RUN/figures (PDF and PNG), each notebook's executed copy in RUN/notebooks, the paper's
macros and table in RUN/generated; claims.json parses, says whether the run is paper-grade
and names every claim, each from at least one sample; claims.txt exists. `--skip EXP`
(e.g. exp-io, an experiment that could not run for lack of a package) leaves out EXP's
CSVs, figures, notebook and claims. Exits non-zero with one line per problem.
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import pandas as pd
from hdrh.histogram import HdrHistogram

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims  # noqa: E402

COLUMNS = {
    "exp-io.csv": "tool,pattern,block_size_bytes,queue_depth,repetition,iops,bandwidth_mib_s,lat_p50_us,lat_p99_us,device",
    "exp-init.csv": "backend,strategy,nodes,daemons_per_node,device_size_bytes,propose_interval_ms,repetition,total_ms,"
                    "bound_ms,daemon_p50_ms,daemon_p99_ms,daemon_max_ms,max_in_flight,monitor_proposals,bytes_written,"
                    "flushes,cpu_ms,peak_rss_kib",
    "exp-init-phases.csv": "backend,strategy,nodes,daemons_per_node,repetition,daemon_id,phase,ms,cpu_ms",
    "exp-commit.csv": "policy,param_ms,workload,rate_per_s,replicas,rtt_ms,backing,repetition,writes,achieved_per_s,"
                      "apply_lag_p50_us,apply_lag_p99_us,apply_lag_p999_us,apply_lag_max_us,commit_lag_p99_us,"
                      "empty_messages,empty_responses,extra_messages_per_write,log_flushes,write_p50_us,write_p99_us,"
                      "violations",
    "exp-commit-kills.csv": "scenario,policy,replicas,repetition,window_hit,applied_uncommitted,not_converged,diverged,"
                            "violations",
    "exp-alloc.csv": "strategy,processes,with_io,repetition,ops,ops_per_s,alloc_p50_ns,alloc_p99_ns,leaked_blocks,double_allocated",
    "exp-lunmap.csv": "backend,gateways,editors,changes,repetition,propagation_p50_ms,propagation_p99_ms,propagation_max_ms,"
                      "lost_updates,stale_reads,detect_dead_ms",
    "exp-failover.csv": "mode,vip_backend,heartbeat_ms,operation,repetition,kills,ops,delivery_after_kill_p50_ms,"
                        "delivery_after_kill_p99_ms,vip_move_p50_ms,lost_results,duplicate_executions,reexecuted_bytes",
}

# The configurations of the quick profile: column -> values; every combination must have a row.
CONFIGS = {
    "exp-io.csv": [{"tool": ["blocklab", "fio"], "pattern": ["randwrite", "randread"], "queue_depth": [1, 32]},
                   {"tool": ["blocklab", "fio"], "pattern": ["write", "read"], "queue_depth": [8]}],
    "exp-init.csv": [{"backend": ["blocklab"], "nodes": [3], "daemons_per_node": [1, 4, 8],
                      "strategy": ["sequential", "parallel_nodes", "parallel_daemons", "parallel", "parallel_nobatch"]},
                     {"backend": ["ceph"],
                      "strategy": ["sequential", "parallel_nodes", "parallel_daemons", "parallel", "parallel_nobatch"]}],
    "exp-commit.csv": [{"policy": ["piggyback", "periodic", "eager", "idle_ack", "idle_commit", "idle_delayed"],
                        "workload": ["poisson", "bursty", "closed"], "rtt_ms": [1.0]},
                       {"policy": ["etcd"], "workload": ["poisson"], "rtt_ms": [1.0]}],
    "exp-commit-kills.csv": [{"scenario": ["primary_before_notify", "primary_after_notify", "secondary_in_idle"],
                              "policy": ["idle_ack"], "violations": [0]}],
    "exp-alloc.csv": [{"strategy": ["shm", "mutex", "central"], "processes": [1, 2, 4, 8], "with_io": [False, True]}],
    "exp-lunmap.csv": [{"backend": ["zookeeper", "filesync"], "gateways": [1, 4, 8], "editors": [1, 4]}],
    "exp-failover.csv": [{"mode": ["vip_handoff", "client_retry"], "operation": ["create", "delete", "copy", "all"]}],
}

# `<exp>-hist.csv`: the configuration columns (the key of a row of the CSV), then metric and
# hdr; one row per metric for every row of the CSV (exp-io: its blocklab rows).
HISTS = {
    "exp-io.csv": ("tool,pattern,block_size_bytes,queue_depth,repetition", ["lat_ns"]),
    "exp-init.csv": ("backend,strategy,nodes,daemons_per_node,device_size_bytes,propose_interval_ms,repetition",
                     ["daemon_us"]),
    "exp-commit.csv": ("policy,param_ms,workload,rate_per_s,replicas,rtt_ms,backing,repetition",
                       ["apply_lag_us", "commit_lag_us", "write_us"]),
    "exp-alloc.csv": ("strategy,processes,with_io,repetition", ["alloc_ns"]),
    "exp-lunmap.csv": ("backend,gateways,editors,changes,repetition", ["propagation_us", "detect_dead_us"]),
    "exp-failover.csv": ("mode,vip_backend,heartbeat_ms,operation,repetition", ["delivery_after_kill_us", "vip_move_us"]),
}

FIGURES = ["exp-io.pdf", "exp-init.pdf", "exp-init-speedup.pdf", "exp-init-phases.pdf", "exp-init-ceph.pdf",
           "exp-init-ceph-phases.pdf", "exp-commit.pdf",
           "exp-commit-tradeoff.pdf", "exp-alloc.pdf", "exp-alloc-p50.pdf", "exp-lunmap.pdf", "exp-failover.pdf"]


def norm(v):
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def check_raw(results: Path, name: str, df: pd.DataFrame):
    """The raw data beside `name`: its histograms, and exp-io's fio JSON."""
    problems = []
    keys, metrics = HISTS[name]
    keys = keys.split(",")
    hname = name.replace(".csv", "-hist.csv")
    try:
        h = pd.read_csv(results / hname)
    except (OSError, ValueError) as e:
        return [f"{hname}: {e}"]
    if list(h.columns) != keys + ["metric", "hdr"]:
        return [f"{hname}: columns {','.join(h.columns)} != {','.join(keys + ['metric', 'hdr'])}"]
    rows = df[df.tool == "blocklab"] if name == "exp-io.csv" else df
    want = {tuple(norm(v) for v in r) + (m,) for r in rows[keys].itertuples(index=False) for m in metrics}
    have = {tuple(norm(v) for v in r) for r in h[keys + ["metric"]].itertuples(index=False)}
    for k in sorted(want - have, key=str)[:5]:
        problems.append(f"{hname}: no histogram for {dict(zip(keys + ['metric'], k))}")
    for i, text in enumerate(h.hdr):
        try:
            HdrHistogram.decode(text)
        except Exception as e:  # any decoding failure is the same problem
            problems.append(f"{hname}: row {i + 1}: histogram does not decode ({type(e).__name__}: {e})")
            break
    if name == "exp-io.csv":
        for r in df[df.tool == "fio"].itertuples(index=False):
            f = results / "exp-io-fio" / f"{r.pattern}-bs{r.block_size_bytes}-qd{r.queue_depth}-rep{r.repetition}.json"
            try:
                json.loads(f.read_text())
            except (OSError, ValueError) as e:
                problems.append(f"exp-io-fio: {f.name}: {e}")
    return problems


def of_experiment(name: str, exp: str) -> bool:
    """Whether file `name` (a CSV or figure) belongs to experiment `exp`: exp-init.csv,
    exp-init-phases.csv and exp-init-speedup.pdf belong to exp-init."""
    stem = name.rsplit(".", 1)[0]
    return stem == exp or stem.startswith(exp + "-")


def check(results: Path, skip=()):
    def skipped(name):
        return any(of_experiment(name, e) for e in skip)

    problems = []
    figures = results / "figures"
    for name, cols in COLUMNS.items():
        if skipped(name):
            continue
        path = results / name
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        df = pd.read_csv(path)
        if list(df.columns) != cols.split(","):
            problems.append(f"{name}: columns {','.join(df.columns)} != documented {cols}")
            continue
        if df.empty:
            problems.append(f"{name}: no rows")
        if name in HISTS:
            problems += check_raw(results, name, df)
        for spec in CONFIGS.get(name, []):
            keys = list(spec)
            have = {tuple(norm(r[k]) for k in keys) for _, r in df[keys].iterrows()}
            for combo in itertools.product(*spec.values()):
                if tuple(norm(c) for c in combo) not in have:
                    problems.append(f"{name}: no row for {dict(zip(keys, combo))}")
        # One meta.json per experiment: exp-commit-kills.csv's is exp-commit.meta.json.
        meta = results / ("-".join(name.removesuffix(".csv").split("-")[:2]) + ".meta.json")
        if not meta.exists():
            problems.append(f"{meta.name}: missing")
        else:
            json.loads(meta.read_text())
    for f in sorted(set(FIGURES) | {c.figure for c in claims.CLAIMS}):
        for g in (f, f.removesuffix(".pdf") + ".png"):
            if not skipped(g) and not (figures / g).exists():
                problems.append(f"figure {g}: missing in {figures}")
    for nb in sorted((Path(__file__).resolve().parent).glob("exp-*.ipynb")):
        if not skipped(nb.name) and not (results / "notebooks" / nb.name).exists():
            problems.append(f"executed notebook {nb.name}: missing in {results / 'notebooks'}")
    for f in ("generated/claims.tex", "generated/claims-table.tex", "claims.txt"):
        if not (results / f).exists():
            problems.append(f"{f}: missing in {results}")
    cj = results / "claims.json"
    try:
        doc = json.loads(cj.read_text())
        if not isinstance(doc.get("paper_grade"), bool):
            problems.append("claims.json: no paper_grade")
        rows = doc["claims"]
        keys = {r["key"] for r in rows}
        missing = {c.key for c in claims.CLAIMS if not skipped(c.csv)} - keys
        if missing:
            problems.append(f"claims.json lacks {sorted(missing)}")
        for r in rows:
            if skipped(r["csv"]):
                continue
            # A claim whose inputs are empty fails the run (it would otherwise be a verdict
            # from nothing).
            if r["n"] == 0 or r["value"] is None:
                problems.append(f"claim {r['key']}: no samples ({r['status']})")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        problems.append(f"claims.json: {e}")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, metavar="RUN")
    ap.add_argument("--skip", action="append", default=[], metavar="EXP",
                    help="an experiment that did not run (repeatable)")
    a = ap.parse_args()
    unknown = [e for e in a.skip if not any(of_experiment(n, e) for n in COLUMNS)]
    if unknown:
        sys.exit(f"--skip: no such experiment: {', '.join(unknown)}")
    problems = check(a.results, a.skip)
    if a.skip:
        print(f"check_run: not checked (skipped): {', '.join(a.skip)}")
    for p in problems:
        print(p)
    print(f"check_run: {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
