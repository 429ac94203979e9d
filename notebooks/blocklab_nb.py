"""Shared helpers of the blocklab notebooks: where results are, where figures go.

BLOCKLAB_RESULTS names a directory of results (one run); without it, the newest
directory under results/ that holds the CSV is used, else results/example.
BLOCKLAB_FIGURES names the figure directory (default paper/figures).

load_hists and merged_percentile read the latency histograms an experiment keeps beside
its CSV (`<exp>-hist.csv`, HdrHistogram V2 deflate + base64 per configuration, repetition
and metric), so percentiles can be taken over repetitions merged.
"""
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from hdrh.histogram import HdrHistogram  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def results_dir(csv_name: str) -> Path:
    env = os.environ.get("BLOCKLAB_RESULTS")
    if env:
        d = Path(env)
        if not (d / csv_name).exists():
            raise FileNotFoundError(f"{d / csv_name} does not exist (BLOCKLAB_RESULTS={env})")
        return d
    runs = sorted(
        (p for p in (ROOT / "results").glob("*/") if (p / csv_name).exists() and p.name != "example"),
        key=lambda p: p.name,
    )
    if runs:
        return runs[-1]
    example = ROOT / "results" / "example"
    if (example / csv_name).exists():
        return example
    raise FileNotFoundError(f"no {csv_name} under {ROOT / 'results'}; run the experiment or scripts/reproduce")


def load(csv_name: str) -> pd.DataFrame:
    d = results_dir(csv_name)
    print(f"reading {d / csv_name}")
    return pd.read_csv(d / csv_name)


def figures_dir() -> Path:
    d = Path(os.environ.get("BLOCKLAB_FIGURES", ROOT / "paper" / "figures"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def save(fig, name: str) -> None:
    """Saves `fig` as NAME.pdf and NAME.png in the figure directory."""
    d = figures_dir()
    for ext in ("pdf", "png"):
        fig.savefig(d / f"{name}.{ext}", bbox_inches="tight", dpi=150)
    print(f"wrote {d / name}.pdf and .png")
    plt.close(fig)


def load_hists(results_dir, exp: str) -> pd.DataFrame:
    """`<exp>-hist.csv` of a run (e.g. exp="exp-commit"): the configuration columns of the
    experiment's CSV, `repetition`, `metric` (unit in the name) and `hdr`, plus `hist`: the
    decoded HdrHistogram."""
    df = pd.read_csv(Path(results_dir) / f"{exp}-hist.csv")
    df["hist"] = [HdrHistogram.decode(s) for s in df["hdr"]]
    return df


def merge(hists, highest=None) -> HdrHistogram:
    """One histogram holding every value of `hists` (HdrHistogram.add). All results made with
    the same `highest` trackable value share one layout, so adding them is fast."""
    hists = list(hists)
    top = max([h.highest_trackable_value for h in hists] + [highest or 2])
    digits = hists[0].significant_figures if hists else 3
    out = HdrHistogram(1, top, digits)
    for h in hists:
        out.add(h)
    return out


def merged_percentile(hists, q) -> float:
    """The q-th percentile (0..100) of `hists` merged (HdrHistogram.add, then
    value_at_percentile); NaN when they hold no value (an empty histogram is no sample,
    never a zero).

    The rank is ceil(q/100 * n), as the Rust side's value_at_quantile (and Java's
    HdrHistogram) take it, so one repetition's histogram gives exactly its CSV's p50/p99;
    Python's get_value_at_percentile would round the rank, one value lower in a sparse
    tail."""
    m = merge(hists)
    n = m.get_total_count()
    if n == 0:
        return math.nan
    rank = max(1, math.ceil(q / 100 * n))
    # get_value_at_percentile(p) walks to rank int(p/100 * n + 0.5): exactly `rank` here.
    return float(m.get_value_at_percentile(min(100.0, 100.0 * rank / n)))
