#!/usr/bin/env python3
"""Tests of claims.py's statistics: python notebooks/test_claims.py (the notebooks' venv).

Each claim must be able to fail: missing samples do not hold, a non-zero count does not
hold, an interval that straddles the target is inconclusive."""
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims  # noqa: E402


def test_verdicts_follow_the_interval():
    assert claims.verdict(">= 1", 1.0, 2.0) == "holds"
    assert claims.verdict(">= 1", 0.5, 0.9) == "does not hold"
    assert claims.verdict(">= 1", 0.9, 1.1) == "inconclusive"
    assert claims.verdict("<= 1", 0.2, 0.9) == "holds"
    assert claims.verdict("<= 1", 1.1, 1.5) == "does not hold"
    assert claims.verdict("<= 1", 0.9, 1.1) == "inconclusive"
    assert claims.verdict("= 0", 0, 0) == "holds"
    assert claims.verdict("= 0", 1, 1) == "does not hold"


def test_bootstrap_is_repeatable_and_brackets_the_median():
    v = [1.0, 2.0, 3.0, 4.0, 10.0]
    a, b = claims.bootstrap_median(v), claims.bootstrap_median(v)
    assert a == b
    est, lo, hi = a
    assert est == 3.0 and lo <= est <= hi and lo >= 1.0 and hi <= 10.0
    assert claims.bootstrap_median([5.0]) == (5.0, 5.0, 5.0)


def run(rows_by_csv):
    d = Path(tempfile.mkdtemp())
    for name, rows in rows_by_csv.items():
        pd.DataFrame(rows).to_csv(d / name, index=False)
    return {r["key"]: r for r in claims.evaluate(d)}


def test_missing_samples_and_counts_fail():
    io = [dict(tool=t, pattern="randwrite", block_size_bytes=4096, queue_depth=32, repetition=r,
               iops=v, bandwidth_mib_s=0.0) for r in range(3) for t, v in (("blocklab", 99.0), ("fio", 100.0))]
    # One arm missing: no samples, does not hold.
    got = run({"exp-io.csv": [x for x in io if x["tool"] != "fio"]})
    assert got["ioRandWriteRatio"]["n"] == 0
    assert got["ioRandWriteRatio"]["status"].startswith("does not hold")
    # A CSV that is not there: does not hold.
    assert got["initSpeedup"]["status"].startswith("does not hold")
    # Both arms: paired ratios 0.99 per repetition.
    r = run({"exp-io.csv": io})["ioRandWriteRatio"]
    assert r["n"] == 3 and abs(r["value"] - 0.99) < 1e-9 and r["status"] == "holds"
    # A count the claim says is 0, made non-zero on purpose.
    lun = [dict(backend="zookeeper", gateways=8, editors=4, changes=10, repetition=0, propagation_p50_ms=1.0,
                propagation_p99_ms=2.0, propagation_max_ms=3.0, lost_updates=lost, stale_reads=0,
                detect_dead_ms=2100.0) for lost in (0, 1)]
    r = run({"exp-lunmap.csv": lun})["lunmapLost"]
    assert r["value"] == 1 and r["status"] == "does not hold"


def test_paper_grade_needs_full_profile_and_clean_tree():
    def grade(*metas):
        d = Path(tempfile.mkdtemp())
        for i, m in enumerate(metas):
            (d / f"exp-{i}.meta.json").write_text(json.dumps(m))
        return claims.paper_grade(d)
    assert grade() == ["no meta.json in the run"]
    assert grade({"profile": "full", "clean": True}, {"profile": "full", "git_revision": "abc"}) == []
    # `clean` decides where the meta has it; the revision's -dirty suffix otherwise.
    r = grade({"profile": "full", "clean": False, "git_revision": "abc"})
    assert r == ["built from a tree with uncommitted changes"], r
    r = grade({"profile": "full", "git_revision": "abc-dirty"}, {"profile": "full", "clean": True})
    assert r == ["built from a tree with uncommitted changes in exp-0"], r
    r = grade({"profile": "quick", "clean": True})
    assert r == ["profile quick, not full"], r
    assert grade({"profile": "full"}) == ["git revision not recorded"]


def main():
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_")]
    failed = 0
    for name, f in tests:
        try:
            f()
            print(f"test {name} ... ok")
        except Exception as e:  # report every failure, not only the first
            failed += 1
            print(f"test {name} ... FAILED: {e!r}")
    print(f"{len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
