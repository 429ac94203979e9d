#!/usr/bin/env python3
"""Tests of blocklab_nb's run selection: python notebooks/test_blocklab_nb.py (the notebooks' venv).

The newest run is the directory whose meta files record the latest end_utc; results/example
is a run like any other; figures go to RUN/figures unless BLOCKLAB_FIGURES says otherwise."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import blocklab_nb as nb  # noqa: E402
from testrun import run_tests  # noqa: E402


def run(root: Path, name: str, *ends):
    d = root / name
    d.mkdir(parents=True)
    for i, end in enumerate(ends):
        (d / f"exp-{i}.meta.json").write_text(json.dumps({} if end is None else {"end_utc": end}))
    return d


def test_latest_run_is_the_latest_end_utc():
    root = Path(tempfile.mkdtemp())
    try:
        nb.latest_run(root)
        raise AssertionError("an empty results directory has no newest run")
    except FileNotFoundError:
        pass
    run(root, "20990101T000000Z", "2026-01-01T00:00:00Z")  # a name says nothing; end_utc decides
    example = run(root, "example", "2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z")
    run(root, "no-meta")
    (root / "no-meta" / "exp-io.csv").write_text("tool\n")
    run(root, "no-end", None)
    assert nb.latest_run(root) == example
    newer = run(root, "b", "2026-03-01T00:00:01Z")
    assert nb.latest_run(root) == newer


def test_run_dir_and_figures_dir_follow_the_environment():
    root = Path(tempfile.mkdtemp())
    d = run(root, "r", "2026-01-01T00:00:00Z")
    old = {k: os.environ.get(k) for k in ("BLOCKLAB_RESULTS", "BLOCKLAB_FIGURES")}
    try:
        os.environ["BLOCKLAB_RESULTS"] = str(d)
        os.environ.pop("BLOCKLAB_FIGURES", None)
        assert nb.run_dir() == d
        assert nb.figures_dir() == d / "figures" and (d / "figures").is_dir()
        os.environ["BLOCKLAB_FIGURES"] = str(root / "elsewhere")
        assert nb.figures_dir() == root / "elsewhere"
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_latest_command_prints_the_run():
    root = Path(tempfile.mkdtemp())
    d = run(root, "r", "2026-01-01T00:00:00Z")
    cmd = [sys.executable, str(HERE / "blocklab_nb.py"), "latest", str(root)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == str(d), out
    out = subprocess.run(cmd[:-1] + [str(root / "none")], capture_output=True, text=True)
    assert out.returncode == 1 and "no run under" in out.stderr, out


if __name__ == "__main__":
    run_tests(globals())
