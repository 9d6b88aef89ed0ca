"""A killed DeepSpeed op build leaves torch's extension lock behind, and every later train-dist
start waits on it forever (issue 32): a stale lock is removed with a warning naming it, a live
build's is left alone, and each Python environment builds in a folder of its own."""
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

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
