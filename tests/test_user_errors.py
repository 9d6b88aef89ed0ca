"""A user's mistake is one line and exit 2 from every verb and backend (issue 32, item 2): errors
raised inside Ray tasks and Ray Data stages reach the console as themselves, the model and every
data.* choice are checked in the driver before Ray starts, and a prepared dataset is only trained
with the model that made it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pogdiff.cli import failure
from pogdiff.data.prepare import PrepareError

POGDIFF = str(Path(sys.executable).parent / "pogdiff")
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.profile=custom", "data.majority_ids=1", "data.minority_ids=1", "data.majority_images=4",
         "data.minority_images=2", "data.heldout_images=1", "model.tiny_vae_steps=0", "model.name=tiny"]


def pogdiff(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([POGDIFF, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_errors_raised_in_a_ray_task_and_a_ray_data_stage_are_one_line_as_themselves(capsys):
    import ray
    import ray.data

    from pogdiff.dist.cluster import session

    def _raise_prepare_error(row):  # nested: Ray pickles it by value (the test module is not importable there)
        raise PrepareError("data.source 'rows.jsonl', line 3: caption is empty")

    with session(num_cpus=1, log_to_driver=False):
        task = ray.remote(_raise_prepare_error)
        with pytest.raises(Exception) as in_task:
            ray.get(task.remote(0))
        with pytest.raises(Exception) as in_stage:
            ray.data.from_items([{"x": 1}]).map(_raise_prepare_error).take_all()
    capsys.readouterr()  # Ray's own start-up lines
    for caught in (in_task.value, in_stage.value):
        assert len(str(caught).splitlines()) > 1  # Ray's wrapper: the remote traceback, not the error's line
        assert failure("prepare", caught) == 2
        err = capsys.readouterr().err.splitlines()
        assert err == ["pogdiff prepare: data.source 'rows.jsonl', line 3: caption is empty"]


def test_a_dead_ray_worker_is_one_line_and_exit_1_and_an_unexpected_error_keeps_its_traceback(capsys):
    from ray.exceptions import RayActorError

    assert failure("sample", RayActorError()) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "a Ray worker died" in err[0] and "rerun" in err[0]
    assert failure("sample", RuntimeError("a bug")) is None  # main re-raises it: the traceback is the report


@pytest.mark.parametrize("override, names", [
    ("model.name=./no-such-model", ["model directory './no-such-model' does not exist", "model.name"]),
    ("model.name=bogus", ["model directory 'bogus' does not exist", "hub id"]),
    ("data.profile=bogus", ["data.profile='bogus'", "agedb-m", "custom"]),
    ("data.image_encoder=./no-such-encoder", ["data.image_encoder='./no-such-encoder'", "pretrain-encoder"]),
])
def test_a_bad_model_or_data_choice_is_one_line_and_exit_2_before_ray_starts(tmp_path, override, names):
    """With prepare.backend=ray (the default) the same mistake used to end in a 68-line RayTaskError
    after ~40 s; now the driver says it before any worker starts."""
    done = pogdiff(tmp_path, "prepare", str(ROOT / "configs/demo.yaml"), "output_dir=runs", *SMALL, override)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if not line.startswith("pogdiff prepare: log in")]
    assert len(lines) == 1, done.stderr
    assert all(n in lines[0] for n in names), lines[0]
    assert not (tmp_path / "runs" / "datasets").exists() or not any((tmp_path / "runs" / "datasets").rglob("*.tar"))


def test_a_prepared_dataset_trains_only_with_the_model_that_made_it(tmp_path):
    made = pogdiff(tmp_path, "prepare", str(ROOT / "configs/demo.yaml"), "output_dir=runs", "prepare.backend=serial",
                   *SMALL)
    assert made.returncode == 0, made.stderr[-3000:]
    dataset = Path(json.loads(made.stdout.splitlines()[-1])["output"])
    other = pogdiff(tmp_path, "train", str(ROOT / "configs/demo.yaml"), "output_dir=runs", *SMALL,
                    f"data.source={dataset.relative_to(tmp_path)}", "model.name=tiny-base", "train.steps=1")
    assert other.returncode == 2, other.stderr[-3000:]
    line = other.stderr.splitlines()[-1]
    assert "model.name='" in line and "tiny_base" in line and "prepared with model tiny" in line, line
    assert not any((tmp_path / "runs").rglob("history.json"))  # nothing was trained
