"""Reliability (issue 21): a user's mistakes exit 2 with one line naming what to do, an OS fault exits 1
the same way (the traceback in the run's log), and a run directory has one writer."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

POGDIFF = str(Path(sys.executable).parent / "pogdiff")
ROOT = Path(__file__).resolve().parents[1]


def pogdiff(cwd: Path, *argv: str, timeout: float = 300, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0", **env_vars}
    return subprocess.run([POGDIFF, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_more_training_workers_than_this_machine_has_cpus_exit_2_before_anything_starts(tmp_path):
    """The embedded cluster used to advertise max(CPUs, what was asked) and run every rank on the
    same cores; a real cluster refuses the same job."""
    cpus = len(os.sched_getaffinity(0))
    args = ["train-dist", str(ROOT / "configs/demo.yaml"), "output_dir=runs", "train.steps=1",
            f"dist.num_workers={cpus + 1}"]
    refused = pogdiff(tmp_path, *args)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"dist.num_workers={cpus + 1}" in refused.stderr and f"has {cpus}" in refused.stderr, refused.stderr
    assert "dist.allow_oversubscribe=true" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("dataset.json")), \
        "data were prepared before the refusal"


def one_line_exit(proc: subprocess.CompletedProcess, code: int, *named: str) -> str:
    """The verb's own line (after 'log in ...'), no traceback."""
    err = proc.stderr
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and all(n in err for n in named), err
    return err


def test_an_output_dir_that_cannot_be_written_is_one_line_and_exit_2(tmp_path):
    """A path under a regular file (root ignores permission bits, and EROFS needs a read-only mount):
    every writing verb says which path and what to do, where it used to print a 21-line traceback."""
    (tmp_path / "afile").write_text("")
    for verb in ("prepare", "train", "train-dist"):
        proc = pogdiff(tmp_path, verb, str(ROOT / "configs/demo.yaml"), "output_dir=afile/runs")
        one_line_exit(proc, 2, str(tmp_path / "afile"), "Not a directory", "writable output_dir")


def test_an_os_error_inside_a_verb_and_the_non_finite_stop_are_one_line_with_the_traceback_in_the_log(tmp_path):
    from pogdiff.runs import RunFiles, load_run_config

    args = [str(ROOT / "configs/demo.yaml"), "output_dir=runs", "run_name=os", "data.profile=agedb-s", "model.name=tiny",
            "model.tiny_vae_steps=0", "prepare.backend=serial", "density.epochs=2", "method.name=vanilla",
            "train.batch_size=4", "train.steps=6", "train.log_every=1"]
    files = RunFiles(load_run_config(args[0], [a.replace("runs", str(tmp_path / "runs"), 1) for a in args[1:]]))
    files.method.parent.mkdir(parents=True)
    files.method.write_text("in the way")  # the method's folder is a file: training cannot write it
    proc = pogdiff(tmp_path, "train", *args)
    one_line_exit(proc, 2, str(files.method))
    log = (files.root / "pogdiff.log").read_text()
    assert "Traceback" in log and ("NotADirectoryError" in log or "FileExistsError" in log), log[-2000:]

    files.method.unlink()
    proc = pogdiff(tmp_path, "train", *args, "train.lr=1e30", "train.max_bad_steps=2", "train.resume=never")
    one_line_exit(proc, 1, "train.max_bad_steps=2", "non-finite")
    assert "FloatingPointError" in (files.root / "pogdiff.log").read_text()


HOLDER = """
import sys, time
from pathlib import Path
from pogdiff.runs import run_lease
with run_lease(Path(sys.argv[1]), float(sys.argv[2]), "holder", *sys.argv[3:]):
    print("held", flush=True)
    time.sleep(600)
"""


def hold(folder: Path, timeout: float, *name: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(timeout), *name], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held", proc.poll()
    return proc


def test_one_writer_per_run_a_second_exits_2_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    """Two `pogdiff train` of one run_name used to both write it (40 metric lines for 20 steps)."""
    import json
    import logging
    import signal

    from pogdiff.runs import LeaseHeld, RunFiles, load_run_config, run_lease

    args = [str(ROOT / "configs/demo.yaml"), "output_dir=runs", "run_name=busy", "train.steps=1"]
    method = RunFiles(load_run_config(args[0], [f"output_dir={tmp_path / 'runs'}", *args[2:]])).method
    holder = hold(method, 300)
    try:
        second = pogdiff(tmp_path, "train", *args)
        err = one_line_exit(second, 2, f"process {holder.pid}", str(method))
        assert not (method / "metrics.jsonl").exists() and not (method / "run_config.json").exists(), err
        with pytest.raises(LeaseHeld):  # a reader of the lease in this process: still held, renewed
            with run_lease(method, 300):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lease = json.loads((method / "lease.json").read_text())
    assert lease["pid"] == holder.pid  # SIGKILL: no release
    with caplog.at_level(logging.WARNING, logger="pogdiff.runs"):
        with run_lease(method, 300) as mine:  # its PID is gone on this host: taken over
            assert json.loads((method / "lease.json").read_text())["token"] == mine["token"]
    assert f"from process {holder.pid}" in caplog.text and "has exited" in caplog.text
    assert not (method / "lease.json").exists()  # released

    (method / "lease.json").write_text(json.dumps({"host": "other-node", "pid": 1, "renewed": 0, "started": "then"}))
    with pytest.raises(LeaseHeld, match="other-node"):  # another host, renewed within the timeout
        with run_lease(method, 1e12):
            pass
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pogdiff.runs"):
        with run_lease(method, 60):  # not renewed for longer than the timeout: taken over
            pass
    assert "not renewed for" in caplog.text


def test_one_prepare_per_dataset_directory(tmp_path):
    """A second prepare of one dataset directory used to delete the first one's unfinished shard parts."""
    import signal

    args = [str(ROOT / "configs/demo.yaml"), "data.profile=custom", "data.majority_ids=2", "data.minority_ids=2",
            "data.majority_images=4", "data.heldout_images=0", "model.name=tiny", "model.tiny_vae_steps=0",
            "prepare.backend=serial", "output_dir=runs", "prepare.output=shared"]
    holder = hold(tmp_path / "shared", 300, ".lease.json")
    try:
        second = pogdiff(tmp_path, "prepare", *args)
        one_line_exit(second, 2, f"process {holder.pid}", str(tmp_path / "shared"), "another prepare.output")
        assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == [".lease.json"]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    done = pogdiff(tmp_path, "prepare", *args)  # the dead holder's lease is taken over
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "shared" / "dataset.json").is_file() and not (tmp_path / "shared" / ".lease.json").exists()


def test_a_held_lease_is_renewed(tmp_path):
    import json
    import time

    holder = hold(tmp_path / "run", 1.0)  # renewed every 0.1 s
    try:
        first = json.loads((tmp_path / "run" / "lease.json").read_text())["renewed"]
        time.sleep(1.5)
        assert json.loads((tmp_path / "run" / "lease.json").read_text())["renewed"] > first + 0.5
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_killed_prepare_driver_reruns_from_its_finished_shards_and_a_killed_worker_changes_nothing(tmp_path):
    """SIGKILL, from outside, to the `pogdiff prepare` driver once three shards are written; the
    rerun does only the shards not finished, and there SIGKILL to the encoder actor's process once
    a new shard is written: Ray Data restarts the actor and retries its task. The dataset is
    byte-identical to an uninterrupted prepare's: same shards, same checksums, same counts."""
    import json
    import re
    import signal
    import time

    import psutil

    common = [str(ROOT / "configs/demo.yaml"), "data.profile=custom", "data.majority_ids=2", "data.majority_images=10",
              "data.minority_ids=4", "data.minority_images=2", "data.heldout_images=0", "model.name=tiny",
              "model.tiny_vae_steps=0", "prepare.samples_per_shard=2", "output_dir=runs"]
    shards = tmp_path / "killed" / "shards"

    def start() -> subprocess.Popen:
        return subprocess.Popen([POGDIFF, "prepare", *common, "prepare.output=killed", "prepare.backend=ray",
                                 "prepare.workers=1"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"})

    driver = start()
    deadline = time.monotonic() + 240
    while len(list(shards.glob("shard-*.json"))) < 3 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    finished = len(list(shards.glob("shard-*.json")))
    cluster = psutil.Process(driver.pid).children(recursive=True)
    driver.send_signal(signal.SIGKILL)
    driver.communicate(timeout=60)
    assert driver.returncode == -signal.SIGKILL and 3 <= finished < 14, f"{finished} of 14 shards before the kill"
    psutil.wait_procs(cluster, timeout=60)  # the embedded cluster goes with its driver (pogdiff.dist.reaper)
    assert not [p for p in cluster if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    before = set(shards.glob("shard-*.json"))
    proc = start()
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        if set(shards.glob("shard-*.json")) - before:
            for p in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if "MapWorker" in " ".join(p.cmdline()):
                        p.send_signal(signal.SIGKILL)
                        killed = p.pid
                        break
                except psutil.NoSuchProcess:
                    pass
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert killed is not None, f"no encoder actor was killed (prepare ended first?): {err[-2000:]}"
    assert proc.returncode == 0, err[-3000:]
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    todo = re.findall(r"28 records in 14 shard tasks, (\d+) to do", (tmp_path / "runs" / "demo" / "pogdiff.log").read_text())
    assert len(todo) >= 2 and int(todo[-1]) <= 14 - len(before), todo  # the rerun did not redo finished shards

    # one torch thread, as in a Ray actor: the encoders' float sums then round alike to the last bit
    straight = pogdiff(tmp_path, "prepare", *common, "prepare.output=straight", "prepare.backend=serial", OMP_NUM_THREADS="1")
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "dataset.json").read_text()) for d in ("killed", "straight"))
    assert a["shards"] == b["shards"] and a["num_samples"] == b["num_samples"] == 28 and len(a["shards"]) == 14
    assert a["summary"] == b["summary"]
    files = [p.name for p in (tmp_path / "killed" / "shards").iterdir()]
    tars = sorted(n for n in files if n.endswith(".tar"))
    assert tars == sorted(Path(p["url"]).name for p in a["shards"]) and not [n for n in files if n.startswith(".")], \
        files  # nothing of the killed task's attempt left beside its redone shard
    for part in a["shards"]:
        assert (tmp_path / "killed" / part["url"]).read_bytes() == (tmp_path / "straight" / part["url"]).read_bytes()
