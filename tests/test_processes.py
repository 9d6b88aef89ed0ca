"""No orphans: a killed `prepare` takes its worker processes with it, and a killed driver leaves no
process of its embedded Ray cluster (SIGKILL included)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
POGDIFF = str(Path(sys.executable).parent / "pogdiff")
EMBEDDED = """
import json, os, sys, time
import psutil, ray
from pogdiff.dist.cluster import connect
connect(num_cpus=1)
@ray.remote
def pid():
    return os.getpid()
worker = ray.get(pid.remote())
me = psutil.Process()
print(json.dumps({"session": ray._private.worker._global_node.get_session_dir_path(), "worker": worker,
                  "tree": [p.pid for p in me.children(recursive=True)]}), flush=True)
try:
    time.sleep(600)
finally:
    ray.shutdown()
"""


def gone(pids: list[int], session: str, timeout: float = 30) -> list[str]:
    """What is still running of ``pids`` or names ``session``, after waiting up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if p.pid in pids or any(session in a for a in p.info["cmdline"] or []):
                left.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def start_embedded(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", EMBEDDED], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""})
    line = proc.stdout.readline()
    assert line, f"the embedded cluster did not start (exit {proc.poll()})"
    return proc, json.loads(line)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_killed_driver_leaves_no_ray_process(sig, tmp_path):
    proc, info = start_embedded(tmp_path)
    assert info["worker"] in info["tree"] or psutil.pid_exists(info["worker"])
    proc.send_signal(sig)
    proc.wait(60)
    left = gone(info["tree"] + [info["worker"]], info["session"])
    assert not left, f"still running after {sig.name}:\n" + "\n".join(left)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_killed_prepare_leaves_no_worker(sig, tmp_path):
    cmd = [POGDIFF, "prepare", str(ROOT / "configs/demo.yaml"), f"output_dir={tmp_path}", "data.profile=custom",
           "data.majority_ids=200", "data.majority_images=30", "model.tiny_vae_steps=0", "prepare.workers=2",
           "prepare.samples_per_shard=500"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while len(workers) < 2:  # the pipeline's two encoder actors (Ray workers of the embedded cluster)
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before its workers started"
        tree = parent.children(recursive=True)
        workers = [c.pid for c in tree if "ShardEncoder" in " ".join(c.cmdline())]
        time.sleep(0.2)
    time.sleep(1.0)  # the workers are encoding now
    tree = [c.pid for c in parent.children(recursive=True)]  # raylet, GCS, decode tasks, actors
    proc.send_signal(sig)
    proc.wait(120)
    left = gone(tree, "\0never\0", timeout=30)
    assert not left, f"prepare workers still running after {sig.name}:\n" + "\n".join(left)
