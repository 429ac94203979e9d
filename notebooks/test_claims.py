#!/usr/bin/env python3
"""Tests of claims.py's statistics: python notebooks/test_claims.py (the notebooks' venv).

Each claim must be able to fail: missing samples do not hold, a non-zero count does not
hold, an interval that straddles the target is inconclusive. Also check_run.py's --skip
(an experiment that could not run is left out, and nothing else)."""
import json
import math
import sys
import tempfile
from pathlib import Path

import pandas as pd
from hdrh.histogram import HdrHistogram

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import blocklab_nb  # noqa: E402
import check_run  # noqa: E402
import claims  # noqa: E402
from testrun import run_tests  # noqa: E402


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
    every = check_run.check(d)
    assert "exp-io.csv: missing" in every and "exp-init.csv: missing" in every
    assert any(p.startswith("claim ioRandWriteRatio: no samples") for p in every)
    left = check_run.check(d, ["exp-io"])
    assert not [p for p in left if "exp-io" in p or "ioRandWriteRatio" in p], left
    assert "exp-init.csv: missing" in left and any("exp-init-speedup.pdf" in p for p in left)
    assert len(left) < len(every)


def hdr(values):
    """A histogram of `values` as the hist CSVs carry it (V2 deflate, base64)."""
    h = HdrHistogram(1, 10**7, 3)
    for v in values:
        h.record_value(v)
    return h.encode().decode()


def test_rust_histogram_decodes_to_the_same_percentiles():
    # Written by the Rust side (experiments/src/stats.rs, the same fixture its test
    # decodes): 1..=1000, p50 500 and p99 990 there.
    text = (HERE / "testdata" / "hist-1-to-1000.txt").read_text().strip()
    h = HdrHistogram.decode(text)
    assert h.get_total_count() == 1000
    assert blocklab_nb.merged_percentile([h], 50) == 500
    assert blocklab_nb.merged_percentile([h], 99) == 990
    assert blocklab_nb.merged_percentile([h], 100) == 1000
    # Merged with a second copy: the same percentiles, twice the count.
    assert blocklab_nb.merged_percentile([h, HdrHistogram.decode(text)], 99) == 990
    assert blocklab_nb.merge([h, h]).get_total_count() == 2000
    # load_hists decodes the `hdr` column of a run's hist CSV.
    d = Path(tempfile.mkdtemp())
    pd.DataFrame([dict(strategy="shm", repetition=0, metric="alloc_ns", hdr=text)]).to_csv(
        d / "exp-alloc-hist.csv", index=False)
    df = blocklab_nb.load_hists(d, "exp-alloc")
    assert list(df.columns) == ["strategy", "repetition", "metric", "hdr", "hist"]
    assert df["hist"][0].get_value_at_percentile(100) == 1000
    # No values: no percentile (never a zero).
    assert math.isnan(blocklab_nb.merged_percentile([HdrHistogram(1, 1000, 3)], 50))
    assert math.isnan(blocklab_nb.merged_percentile([], 50))


def alloc_rows(reps):
    main = [dict(strategy="shm", processes=1, with_io=False, repetition=r, ops=1, ops_per_s=1.0, alloc_p50_ns=0,
                 alloc_p99_ns=0, leaked_blocks=0, double_allocated=0) for r in reps]
    return main


def test_merged_percentile_bootstrap():
    # Three repetitions of shm's allocation latency: 100 x 10 ns, 100 x 20 ns, 300 x 30 ns.
    # The median of the per-repetition p50s would be 20; merged, the p50 is 30.
    values = {0: [10] * 100, 1: [20] * 100, 2: [30] * 300}
    hist = [dict(strategy="shm", processes=1, with_io=False, repetition=r, metric="alloc_ns", hdr=hdr(v))
            for r, v in values.items()]
    csvs = {"exp-alloc.csv": alloc_rows(values), "exp-alloc-hist.csv": hist}
    r = run(csvs)["allocShmPfifty"]
    assert r["kind"] == "merged" and r["n"] == 3
    assert r["value"] == 30.0
    assert 10.0 <= r["low"] <= r["value"] <= r["high"] <= 30.0 and r["low"] < r["high"]
    assert r["status"] == "holds"  # target <= 100 ns
    assert run(csvs)["allocShmPfifty"] == r  # fixed seed: repeatable
    # Empty histograms (nothing measured) are no samples: does not hold, never a zero.
    empty = [dict(x, hdr=hdr([])) for x in hist]
    r = run({"exp-alloc.csv": alloc_rows(values), "exp-alloc-hist.csv": empty})["allocShmPfifty"]
    assert r["n"] == 0 and r["value"] is None and r["status"].startswith("does not hold")
    # An older run without the hist CSV: does not hold.
    r = run({"exp-alloc.csv": alloc_rows(values)})["allocShmPfifty"]
    assert r["n"] == 0 and r["status"].startswith("does not hold (no histograms")


def commit_hist(policy, rep, values, rate=10.0, rtt_ms=1.0):
    return dict(policy=policy, param_ms=0.0, workload="poisson", rate_per_s=rate, replicas=3, rtt_ms=rtt_ms,
                backing="disk", repetition=rep, metric="apply_lag_us", hdr=hdr(values))


def test_merged_ratio_resamples_paired_repetitions():
    main = [dict(policy="idle_ack", workload="poisson", repetition=r) for r in range(4)]
    # Each repetition's level differs, but within a repetition idle_ack = eager and
    # idle_ack = piggyback / 20: resampling the same repetitions for both arms gives
    # exactly those ratios, with no spread.
    hist = []
    for r in range(4):
        lat = [(r + 1) * 100 + i for i in range(100)]
        hist += [commit_hist("idle_ack", r, lat), commit_hist("eager", r, lat),
                 commit_hist("piggyback", r, [20 * v for v in lat])]
    got = run({"exp-commit.csv": main, "exp-commit-hist.csv": hist})
    r = got["commitAckOverEagerSparse"]
    assert r["n"] == 4 and abs(r["value"] - 1.0) < 0.01 and abs(r["high"] - r["low"]) < 0.01, r
    assert r["status"] == "holds"
    r = got["commitAckOverPiggyback"]
    assert r["n"] == 4 and abs(r["value"] - 0.05) < 0.001 and r["status"] == "holds", r
    # Only the reference setting counts: a slower idle_ack at RTT 10 ms does not enter.
    other = [commit_hist("idle_ack", r, [9000 + i for i in range(100)], rtt_ms=10.0) for r in range(4)]
    r = run({"exp-commit.csv": main, "exp-commit-hist.csv": hist + other})["commitAckOverEagerSparse"]
    assert abs(r["value"] - 1.0) < 0.01, r
    # idle_ack twice eager's p99 at the moderate rate: does not hold.
    slow = [commit_hist("idle_ack", r, [2 * ((r + 1) * 100 + i) for i in range(100)], rate=50.0) for r in range(4)]
    base = [commit_hist("eager", r, [(r + 1) * 100 + i for i in range(100)], rate=50.0) for r in range(4)]
    r = run({"exp-commit.csv": main, "exp-commit-hist.csv": hist + slow + base})["commitAckOverEagerModerate"]
    assert abs(r["value"] - 2.0) < 0.01 and r["status"] == "does not hold", r
    # An arm without samples in every repetition: no samples, does not hold.
    no_eager = [dict(x, hdr=hdr([])) if x["policy"] == "eager" else x for x in hist]
    r = run({"exp-commit.csv": main, "exp-commit-hist.csv": no_eager})["commitAckOverEagerSparse"]
    assert r["n"] == 0 and r["status"].startswith("does not hold"), r
    # ... and in one repetition only: that repetition is left out.
    one_empty = [dict(x, hdr=hdr([])) if x["policy"] == "eager" and x["repetition"] == 3 else x for x in hist]
    r = run({"exp-commit.csv": main, "exp-commit-hist.csv": one_empty})["commitAckOverEagerSparse"]
    assert r["n"] == 3, r
    # No moderate rate in the run: does not hold, never a zero.
    r = got["commitAckOverEagerModerate"]
    assert r["n"] == 0 and r["status"].startswith("does not hold"), r


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


def test_flush_spread_compares_policies_on_the_same_writes():
    # Two Poisson rates: fewer flushes at the lower rate is not a spread across policies;
    # closed's achieved rate differs by policy and must not split the comparison.
    def row(policy, workload, rate, flushes):
        return dict(policy=policy, workload=workload, rate_per_s=rate, replicas=3, rtt_ms=0.0, backing="disk",
                    repetition=0, log_flushes=flushes)
    rows = [row(p, "poisson", rate, 3 * rate) for p in ("idle_ack", "eager") for rate in (50.0, 1000.0)]
    rows += [row("idle_ack", "closed", 900.0, 6000), row("eager", "closed", 700.0, 5000)]
    r = run({"exp-commit.csv": rows})["commitFlushSpread"]
    assert r["value"] == 0 and r["status"] == "holds", r
    rows.append(row("piggyback", "poisson", 50.0, 3 * 50 + 15))
    r = run({"exp-commit.csv": rows})["commitFlushSpread"]
    assert abs(r["value"] - 15 / 165) < 1e-9 and r["status"] == "does not hold", r


def test_commit_extra_ratio_and_violation_counts():
    def row(policy, workload, rate, extra, rep, violations=0):
        return dict(policy=policy, workload=workload, rate_per_s=rate, replicas=3, rtt_ms=1.0, backing="disk",
                    repetition=rep, extra_messages_per_write=extra, violations=violations, log_flushes=10)
    rows = [row(p, "poisson", rate, e, rep) for rep in range(3)
            for (p, e) in (("idle_ack", 0.1), ("eager", 1.0)) for rate in (10.0, 500.0)]
    rows += [row("idle_ack", "closed", 900.0, 0.02, rep) for rep in range(3)]
    rows += [row("eager", "closed", 800.0, 0.5, rep) for rep in range(3)]
    got = run({"exp-commit.csv": rows})
    r = got["commitAckExtraTop"]
    assert abs(r["value"] - 0.1) < 1e-9 and r["status"] == "holds", r
    r = got["commitAckExtraClosed"]
    assert abs(r["value"] - 0.04) < 1e-9 and r["status"] == "holds", r
    assert got["commitViolations"]["value"] == 0 and got["commitViolations"]["status"] == "holds"
    # One violation anywhere fails the count.
    rows.append(row("idle_ack", "poisson", 50.0, 0.1, 0, violations=1))
    r = run({"exp-commit.csv": rows})["commitViolations"]
    assert r["value"] == 1 and r["status"] == "does not hold", r
    kills = [dict(scenario="primary_before_notify", policy="idle_ack", replicas=3, repetition=0, window_hit=True,
                  violations=v) for v in (0, 2)]
    r = run({"exp-commit-kills.csv": kills})["commitKillViolations"]
    assert r["value"] == 2 and r["status"] == "does not hold", r


if __name__ == "__main__":
    run_tests(globals())
