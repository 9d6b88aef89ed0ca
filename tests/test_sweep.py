"""`pogdiff sweep`, run as a user runs it (another directory, relative paths), at a tiny size: the
points that change only PoGDiff's settings share their baseline runs, a point that changes the
data gets its own, a rerun trains nothing again, and the summary pairs each point with its
baselines by seed."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POGDIFF = str(Path(sys.executable).parent / "pogdiff")
TINY = ["data.profile=custom", "data.majority_ids=2", "data.majority_images=6", "data.minority_ids=3",
        "data.minority_images=2", "data.heldout_images=2", "density.epochs=3", "train.steps=3", "train.batch_size=4",
        "train.log_every=1", "sample.steps=2", "sample.images_per_id=2", "sample.batch_size=8", "eval.recognizer_ids=6",
        "eval.recognizer_images_per_id=3", "eval.recognizer_steps=5", "experiment.seeds=[0]", "output_dir=runs",
        "sweep.baselines=[vanilla]", "sweep.report_dir=out"]
POINTS = """
  points:
    paper: []
    a3x4: [method.a3=4]
    ssl: [data.image_encoder=tiny-ssl]
"""


def sweep(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """The shipped sweep config with the user's own points (a YAML of theirs: overrides merge into
    the file's points, they do not replace them)."""
    text = (ROOT / "configs/sweep.yaml").read_text()
    (cwd / "my-sweep.yaml").write_text(text[:text.index("  points:")] + POINTS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([POGDIFF, "sweep", "my-sweep.yaml", *TINY, *extra], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_sweep_shares_baselines_and_continues(tmp_path):
    proc = sweep(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip().splitlines()[-1]) == tmp_path / "out" / "sweep.md"
    runs = tmp_path / "runs"
    bases = sorted(p.name for p in runs.iterdir() if p.name.startswith("sweep-base"))
    assert len(bases) == 2  # paper and a3x4 share one; ssl (another dataset) has its own
    assert sorted(p.name for p in runs.iterdir() if p.name.startswith("sweep-") and "base" not in p.name) == \
        ["sweep-a3x4", "sweep-paper", "sweep-ssl"]
    rows = list(csv.DictReader((tmp_path / "out" / "sweep.csv").open()))
    assert {(r["point"], r["variant"]) for r in rows} == {(p, v) for p in ("paper", "a3x4", "ssl") for v in ("pogdiff", "vanilla")}
    by = {(r["point"], r["variant"]): r for r in rows}
    assert by[("paper", "vanilla")] == {**by[("a3x4", "vanilla")], "point": "paper"}  # the very same runs
    assert json.loads((runs / "sweep-a3x4" / "pogdiff-full-a3x4-lora-seed0" / "run_config.json").read_text())["method.a3"] == 4
    md = (tmp_path / "out" / "sweep.md").read_text()
    assert "| a3x4 | method.a3=4 |" in md and "| vanilla (beside paper, a3x4) |" in md
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0

    trained = {p: p.stat().st_mtime_ns for p in runs.glob("sweep-*/*/history.json")}
    assert len(trained) == 5
    again = sweep(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in runs.glob("sweep-*/*/history.json")} == trained  # nothing retrained


def test_a_bad_point_override_exits_2_before_anything_runs(tmp_path):
    proc = sweep(tmp_path, "sweep.points.typo=[method.a4=2]")
    assert proc.returncode == 2 and "method.a4" in proc.stderr, proc.stderr[-2000:]
    assert not list((tmp_path / "runs").glob("*/*-seed*")) and not (tmp_path / "runs" / "datasets").exists()


def test_the_points_are_the_files_own(tmp_path):
    """A file's points are all the points (nothing merged in from a default); none: the config as it is."""
    from pogdiff.experiment.sweep import point_configs
    from pogdiff.runs import load_run_config

    text = (ROOT / "configs/sweep.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(text[:text.index("  points:")] + "  points:\n    weak: [method.a3=8]\n")
    (tmp_path / "none.yaml").write_text(text[:text.index("  points:")] + "  points: {}\n")
    points = point_configs(load_run_config(tmp_path / "mine.yaml", [f"output_dir={tmp_path}"]))
    assert list(points) == ["weak"]
    point, base = points["weak"]
    assert point.method.a3 == 8 and base.method.a3 == 1 and point.run_name == "sweep-weak" and base.run_name == "sweep-base"
    assert list(point_configs(load_run_config(tmp_path / "none.yaml", [f"output_dir={tmp_path}"]))) == ["config"]
