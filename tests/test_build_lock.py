"""A killed DeepSpeed op build leaves torch's extension lock behind, and every later train-dist
start waits on it forever (issue 32): a stale lock is removed with a warning naming it, a live
build's is left alone, and each Python environment builds in a folder of its own."""
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pogdiff.dist.worker import STALE_BUILD_LOCK_S, clear_stale_build_locks, extension_dir


def _lock(root: Path, op: str, age_s: float) -> Path:
    folder = root / op
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_a_stale_lock_is_removed_naming_it_and_a_live_builds_lock_is_kept(tmp_path, caplog):
    stale = _lock(tmp_path, "deepspeed_shm_comm", STALE_BUILD_LOCK_S + 60)
    fresh = _lock(tmp_path, "fresh_op", 5)
    building = _lock(tmp_path, "building_op", STALE_BUILD_LOCK_S + 60)
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=building.parent)
    try:
        with caplog.at_level(logging.WARNING, logger="pogdiff.dist.worker"):
            assert clear_stale_build_locks(tmp_path) == [stale]
    finally:
        builder.kill()
        builder.wait()
    assert not stale.exists() and fresh.exists() and building.exists()
    assert str(stale) in caplog.text and "stale build lock" in caplog.text
    assert clear_stale_build_locks(tmp_path) == [building]  # its builder gone: stale now


def test_each_environment_builds_in_a_folder_of_its_own(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "-")  # recorded first, so the test leaves the variable as it found it
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert extension_dir() == Path(sys.prefix) / "torch_extensions" == Path(os.environ["TORCH_EXTENSIONS_DIR"])
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # the user's choice wins
    assert extension_dir() == tmp_path


def _watchdog(tmp_path, ranks=2, start=1.0, stop=3.0):
    from pogdiff.dist.ray_driver import StartWatchdog
    from pogdiff.runs import load_run_config

    cfg = load_run_config("configs/demo.yaml", [f"output_dir={tmp_path}", f"dist.num_workers={ranks}",
                                                f"dist.start_timeout={start}", f"dist.stop_timeout={stop}"])
    return StartWatchdog(cfg, tmp_path / "ranks", poll_s=0.1)


def test_the_start_watchdog_names_each_waiting_rank_once_and_what_it_waits_on(tmp_path, caplog):
    from pogdiff.dist.worker import RankPhase

    dog = _watchdog(tmp_path)
    t0 = time.time()
    with caplog.at_level(logging.WARNING, logger="pogdiff.dist"):
        assert dog.check(t0, t0 + 0.5) and not caplog.text  # within dist.start_timeout: quiet
        assert dog.check(t0, t0 + 1.5)
    assert caplog.text.count("to be placed and started by Ray") == 2  # neither rank has started
    caplog.clear()
    RankPhase(tmp_path / "ranks", 0).set("training")
    waiting = RankPhase(tmp_path / "ranks", 1)
    waiting.set("waiting for its first batch (the data stream)")
    waiting.since -= 2
    waiting.detail("")
    with caplog.at_level(logging.WARNING, logger="pogdiff.dist"):
        assert dog.check(t0, time.time()) and dog.check(t0, time.time())
    assert caplog.text.count("rank 1 (pid") == 1 and "waiting for its first batch" in caplog.text
    assert "rank 0" not in caplog.text and dog.stop_reason is None
    RankPhase(tmp_path / "ranks", 1).set("training")
    assert not dog.check(t0, time.time())  # every rank trains: the watch ends


def test_the_start_watchdog_stops_the_job_after_dist_stop_timeout_naming_the_rank(tmp_path):
    import pytest

    from pogdiff.dist.ray_driver import Stalled
    from pogdiff.dist.worker import RankPhase

    dog = _watchdog(tmp_path, ranks=1, start=0.5, stop=1.5)
    with pytest.raises(Stalled, match=r"rank 0 .* on: starting: its DeepSpeed engine.*the build lock /x/lock.*"
                                      r"stopped after dist.stop_timeout=1.5 s"):
        with dog.watching():
            phase = RankPhase(tmp_path / "ranks", 0)
            phase.set("starting: its DeepSpeed engine")
            phase.detail("the build lock /x/lock is 30 s old")
            time.sleep(30)  # the watchdog interrupts this


# ------------------------------------------------------------------- whole train-dist runs (slow)

ROOT = Path(__file__).resolve().parents[1]
POGDIFF = str(Path(sys.executable).parent / "pogdiff")
SMALL = ["output_dir=runs", "model.name=tiny", "model.tiny_vae_steps=0", "data.profile=custom", "data.majority_ids=2",
         "data.minority_ids=2", "data.majority_images=8", "data.heldout_images=1", "method.name=vanilla",
         "train.batch_size=2", "train.log_every=1", "train.checkpoint_every=0", "dist.num_workers=2"]


def pogdiff(cwd: Path, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([POGDIFF, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """(a working directory, its prepared dataset relative to it)."""
    import json

    cwd = tmp_path_factory.mktemp("start")
    done = pogdiff(cwd, "prepare", str(ROOT / "configs/demo.yaml"), *SMALL, "prepare.backend=serial")
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd, Path(json.loads(done.stdout.splitlines()[-1])["output"]).relative_to(cwd)


@pytest.mark.slow
def test_a_train_dist_with_a_planted_stale_lock_finishes_and_names_it(prepared):
    cwd, dataset = prepared
    lock = extension_dir() / "deepspeed_shm_comm" / "lock"  # where DeepSpeed's CPU op builds (or is built)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))  # a build killed an hour ago
    done = pogdiff(cwd, "train-dist", str(ROOT / "configs/demo.yaml"), *SMALL, f"data.source={dataset}",
                   "run_name=lock", "train.steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not lock.exists()
    log = (cwd / "runs" / "lock" / "pogdiff.log").read_text()
    assert f"removing a stale build lock {lock}" in log


@pytest.mark.slow
def test_ranks_stalled_at_their_first_batch_are_named_then_the_job_stops_in_one_line(prepared):
    """Every shard a FIFO that no one writes: each rank's first read blocks, as on a hung mount."""
    import shutil

    cwd, dataset = prepared
    stalled = cwd / "stalled"
    shutil.copytree(cwd / dataset, stalled)
    for shard in (stalled / "shards").glob("*.tar"):
        shard.unlink()
        os.mkfifo(shard)
    t0 = time.time()
    done = pogdiff(cwd, "train-dist", str(ROOT / "configs/demo.yaml"), *SMALL, "data.source=stalled",
                   "run_name=stall", "train.steps=50", "dist.start_timeout=60", "dist.stop_timeout=150")
    assert done.returncode == 1, done.stderr[-3000:]
    assert time.time() - t0 < 500
    lines = [line for line in done.stderr.splitlines() if line.strip() and "log in" not in line
             and not line.startswith("train-dist ")]  # the progress bar
    *warned, last = lines
    assert all(w.startswith("WARNING pogdiff.dist: rank ") and "dist.start_timeout=60 s" in w for w in warned), lines
    first_batch = {w.split()[3] for w in warned if "waiting for its first batch" in w}
    assert first_batch == {"0", "1"}, lines  # each stalled rank named, with what it waits on
    assert last.startswith("pogdiff train-dist: rank ") and "waiting for its first batch" in last, lines
    assert "stopped after dist.stop_timeout=150 s" in last and "rerun" in last.lower(), last
