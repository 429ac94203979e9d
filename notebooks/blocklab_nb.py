"""Shared helpers of the blocklab notebooks: where results are, where figures go.

BLOCKLAB_RESULTS names a directory of results (one run); without it, the newest
directory under results/ that holds the CSV is used, else results/example.
BLOCKLAB_FIGURES names the figure directory (default paper/figures).
"""
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

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
