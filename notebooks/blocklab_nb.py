"""Shared helpers of the blocklab notebooks: which run, where figures go, how they look.

A run directory holds one run's CSVs and `*.meta.json` files; its figures go to
RUN/figures/. The notebooks read BLOCKLAB_RESULTS (a run directory) or, without it, the
newest run under results/ (`latest_run`, the one rule for "newest"; results/example
counts like any other run). BLOCKLAB_FIGURES overrides the figure directory.

    python notebooks/blocklab_nb.py latest [RESULTS_ROOT]

prints the newest run under RESULTS_ROOT (default results/), for the shell scripts.

Figures are sized for one column of a two-column paper (3.3 in wide, fonts of 7-8 pt at
that size), show the spread over repetitions (the median with the min-max range), and
colour each strategy, policy, backend or mode the same in every figure (`PALETTE`).

load_hists and merged_percentile read the latency histograms an experiment keeps beside
its CSV (`<exp>-hist.csv`, HdrHistogram V2 deflate + base64 per configuration, repetition
and metric), so percentiles can be taken over repetitions merged.
"""
import json
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from hdrh.histogram import HdrHistogram  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"

# One column of the paper; figures are saved at exactly this width.
WIDTH = 3.3
HEIGHT = 2.2

plt.rcParams.update({
    "figure.figsize": (WIDTH, HEIGHT),
    "figure.constrained_layout.use": True,
    "savefig.dpi": 200,
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "figure.titlesize": 8,
    "figure.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "legend.frameon": False,
    "legend.handlelength": 1.6,
    "legend.columnspacing": 1.0,
    "legend.borderaxespad": 0.2,
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.5,
    "lines.linewidth": 1.0,
    "lines.markersize": 3.5,
    "errorbar.capsize": 2,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
})

# Okabe-Ito colours (distinguishable with colour-blindness and in greyscale print).
BLUE, VERMILLION, ORANGE, GREEN, SKY, PURPLE, GREY = (
    "#0072B2", "#D55E00", "#E69F00", "#009E73", "#56B4E9", "#CC79A7", "#7F7F7F")

# One colour per arm, keyed by the names the CSVs use, the same in every figure: the
# mechanism is blue, the main baseline vermillion.
PALETTE = {
    # exp-io (`tool`)
    "blocklab": BLUE, "fio": GREY,
    # exp-init (`strategy`)
    "parallel": BLUE, "sequential": VERMILLION, "parallel_nodes": ORANGE, "parallel_daemons": GREEN,
    "parallel_nobatch": SKY,
    # exp-commit (`policy`)
    "idle_ack": BLUE, "piggyback": VERMILLION, "periodic": ORANGE, "eager": GREEN, "idle_commit": SKY,
    "idle_delayed": "#000000",
    "etcd": PURPLE,
    # exp-alloc (`strategy`)
    "shm": BLUE, "mutex": VERMILLION, "central": ORANGE, "shm_crash_leader": PURPLE, "shm_crash_follower": SKY,
    # exp-lunmap (`backend`)
    "zookeeper": BLUE, "zookeeper_confirm": SKY, "filesync": VERMILLION,
    # exp-failover (`mode`, and `vip_backend` where backends are compared)
    "vip_handoff": BLUE, "client_retry": VERMILLION, "loopback": SKY, "netns": GREEN, "keepalived": PURPLE,
}
_SPARE = ["#000000", "#8C564B", "#BCBD22", "#17BECF"]
_assigned: dict = {}


def color(name: str) -> str:
    """The colour of an arm; a name missing from PALETTE gets a spare colour (and a note)."""
    if name in PALETTE:
        return PALETTE[name]
    if name not in _assigned:
        _assigned[name] = _SPARE[len(_assigned) % len(_SPARE)]
        print(f"note: {name!r} has no colour in blocklab_nb.PALETTE; using {_assigned[name]}", file=sys.stderr)
    return _assigned[name]


def order(names, preferred) -> list:
    """`names` (unique), the ones in `preferred` first in that order, then the rest sorted."""
    names = list(dict.fromkeys(names))
    return [n for n in preferred if n in names] + sorted(n for n in names if n not in preferred)


# ---- which run ---------------------------------------------------------------------------

def _end_utc(meta: Path) -> Optional[datetime]:
    try:
        v = json.loads(meta.read_text()).get("end_utc")
        if not isinstance(v, str):
            return None
        t = datetime.fromisoformat(v.replace("Z", "+00:00"))
        return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    except (OSError, ValueError, AttributeError):
        return None


def latest_run(root: Path = RESULTS) -> Path:
    """The newest run under `root`: among its directories holding at least one
    `*.meta.json`, the one whose meta files record the latest `end_utc` (ties: the later
    name). results/example is a run like any other. FileNotFoundError when there is none."""
    root = Path(root)
    best = None
    runs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for d in runs:
        ends = [e for e in map(_end_utc, d.glob("*.meta.json")) if e is not None]
        if ends and (best is None or max(ends) >= best[0]):
            best = (max(ends), d)
    if best is None:
        raise FileNotFoundError(f"no run under {root} (no directory with a *.meta.json recording end_utc); "
                                "run scripts/reproduce")
    return best[1]


def run_dir() -> Path:
    """The run the notebooks read: $BLOCKLAB_RESULTS, else `latest_run()`."""
    env = os.environ.get("BLOCKLAB_RESULTS")
    if env:
        d = Path(env)
        if not d.is_dir():
            raise FileNotFoundError(f"BLOCKLAB_RESULTS={env} is not a directory")
        return d
    return latest_run()


def _shown(path: Path) -> str:
    """`path` relative to the repository when it is inside it (executed notebooks are kept)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def load(csv_name: str, required: bool = True) -> Optional[pd.DataFrame]:
    """One CSV of the run; None when it is absent and not `required`."""
    path = run_dir() / csv_name
    if not path.exists():
        if required:
            raise FileNotFoundError(f"{path} does not exist; run its experiment (scripts/reproduce)")
        return None
    print(f"reading {_shown(path)}")
    return pd.read_csv(path)


def meta(experiment: str) -> dict:
    """The run's `<experiment>.meta.json`, or {} when it is absent."""
    path = run_dir() / f"{experiment}.meta.json"
    return json.loads(path.read_text()) if path.exists() else {}


def figures_dir() -> Path:
    """$BLOCKLAB_FIGURES, else RUN/figures of the run being plotted."""
    env = os.environ.get("BLOCKLAB_FIGURES")
    d = Path(env) if env else run_dir() / "figures"
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---- how figures look ----------------------------------------------------------------------

def subplots(nrows: int = 1, ncols: int = 1, height: float = HEIGHT, **kw):
    """plt.subplots at the column width; `height` in inches."""
    kw.setdefault("squeeze", False)
    return plt.subplots(nrows, ncols, figsize=(WIDTH, height), **kw)


def spread(df: pd.DataFrame, by, col: str) -> pd.DataFrame:
    """Per group `by`: the median of `col` over repetitions, its min and max, and n
    (columns median, lo, hi, n). Expects one row per (group, repetition)."""
    by = [by] if isinstance(by, str) else list(by)
    g = df.dropna(subset=[col]).groupby(by, dropna=False)[col]
    return g.agg(median="median", lo="min", hi="max", n="count").reset_index()


def yerr(s: pd.DataFrame):
    """Asymmetric error bars (median to min, median to max) for `spread`'s output."""
    return [(s["median"] - s["lo"]).clip(lower=0), (s["hi"] - s["median"]).clip(lower=0)]


def errorbar(ax, x, s: pd.DataFrame, name: str, label: Optional[str] = None, line: bool = True, **kw):
    """The median with min-max error bars, in `name`'s colour; `line=False` for a
    categorical x (markers only: no line joins points that are not one sweep)."""
    kw.setdefault("marker", "o")
    kw.setdefault("color", color(name))
    return ax.errorbar(x, s["median"], yerr=yerr(s), linestyle="-" if line else "none",
                       label=name if label is None else label, **kw)


def spread_note(n) -> str:
    """Axis-title suffix saying what the error bars are."""
    n = [int(v) for v in pd.Series(n).dropna().unique()]
    if not n:
        return ""
    reps = f"{min(n)}" if len(n) == 1 else f"{min(n)}-{max(n)}"
    return f"median, min-max over {reps} rep."


def save(fig, name: str) -> None:
    """Saves `fig` as NAME.pdf and NAME.png (200 dpi) in the figure directory, at its set size."""
    d = figures_dir()
    for ext in ("pdf", "png"):
        fig.savefig(d / f"{name}.{ext}")
    print(f"wrote {_shown(d / name)}.pdf and .png")
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


def main(argv) -> int:
    if len(argv) in (2, 3) and argv[1] == "latest":
        try:
            print(latest_run(Path(argv[2]) if len(argv) == 3 else RESULTS))
        except FileNotFoundError as e:
            print(e, file=sys.stderr)
            return 1
        return 0
    print("usage: python notebooks/blocklab_nb.py latest [RESULTS_ROOT]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
