#!/usr/bin/env python3
"""Tests of claims.py's statistics: python notebooks/test_claims.py (the notebooks' venv).

Each claim must be able to fail: missing samples do not hold, a non-zero count does not
hold, an interval that straddles the target is inconclusive. Also check_run.py's --skip
(an experiment that could not run is left out, and nothing else)."""
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_run  # noqa: E402
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


def test_paper_cites_every_claim_and_its_figure():
    import re
    tex = (Path(__file__).resolve().parent.parent / "paper" / "paper.tex").read_text()
    figures = set(re.findall(r"\\fig\{([^}]+)\}", tex))
    for c in claims.CLAIMS:
        assert c.figure in figures, f"{c.figure} (claim {c.key}) is not in the paper"
        assert f"{{{c.key}}}" in tex, f"claim {c.key} is not cited in the paper"


def test_verdict_codes_pick_the_outcome_sentence():
    assert claims.verdict_code("holds") == 0
    assert claims.verdict_code("inconclusive") == 1
    assert claims.verdict_code("does not hold") == 2
    assert claims.verdict_code("does not hold (no samples)") == 2


def test_check_run_leaves_out_only_the_skipped_experiment():
    assert check_run.of_experiment("exp-init-phases.csv", "exp-init")
    assert check_run.of_experiment("exp-init-speedup.pdf", "exp-init")
    assert not check_run.of_experiment("exp-io.pdf", "exp-init")
    assert not check_run.of_experiment("exp-init.csv", "exp-io")
    d = Path(tempfile.mkdtemp())
    (d / "figures").mkdir()
    (d / "claims.json").write_text(json.dumps({"claims": [
        {"key": "ioRandWriteRatio", "csv": "exp-io.csv", "n": 0, "value": None, "status": "does not hold"}]}))
    every = check_run.check(d, d / "figures")
    assert "exp-io.csv: missing" in every and "exp-init.csv: missing" in every
    assert any(p.startswith("claim ioRandWriteRatio: no samples") for p in every)
    left = check_run.check(d, d / "figures", ["exp-io"])
    assert not [p for p in left if "exp-io" in p or "ioRandWriteRatio" in p], left
    assert "exp-init.csv: missing" in left and any("exp-init-speedup.pdf" in p for p in left)
    assert len(left) < len(every)


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
