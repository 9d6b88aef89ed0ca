"""`make demo`, scaled down by overrides, run exactly as a user runs it: the console script from a
temporary working directory, with the default relative ``output_dir: runs``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.profile=agedb-s", "model.tiny_vae_steps=0", "density.epochs=5", "train.steps=4", "train.log_every=2",
         "train.checkpoint_every=2", "sample.steps=3", "sample.images_per_id=2", "eval.recognizer_ids=8",
         "eval.recognizer_images_per_id=3", "eval.recognizer_steps=10"]


def test_demo_from_a_temporary_working_directory(tmp_path):
    shutil.copy(ROOT / "configs" / "demo.yaml", tmp_path / "demo.yaml")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([str(Path(sys.executable).parent / "pogdiff"), "demo", "demo.yaml", *SMALL], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    run_dir = tmp_path / "runs" / "demo"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["methods"]) == ["vanilla", "cbdm", "t2h", "pogdiff"]
    for method, result in summary["methods"].items():
        assert result["steps"] == 4 and len(result["metrics"]) == 6, (method, result)
    dataset = Path(summary["dataset"])
    assert dataset.is_relative_to(tmp_path / "runs" / "datasets") and (dataset / "dataset.json").is_file()
    assert (run_dir / "report" / "report.md").is_file() and (run_dir / "pogdiff-full-seed0" / "metrics.json").is_file()
    assert not list(tmp_path.glob("**/ray_results")) and not (Path.home() / "ray_results" / "demo").exists()
