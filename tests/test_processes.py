"""No orphans: a killed `prepare` takes its worker processes with it, and a killed driver leaves no
process of its embedded Ray cluster (SIGKILL included). The embedded cluster's GCS does not grow
with the number of calls a job makes."""
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


CALLS = """
import json, time
import psutil, ray
from pogdiff.dist.cluster import session
@ray.remote
class Echo:
    def call(self, x):
        return x
def gcs_mb(port):
    gcs = [p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "gcs_server"
           and f"--gcs_server_port={port}" in " ".join(p.info["cmdline"] or [])]
    return gcs[0].memory_info().rss / 2**20
with session(num_cpus=1):
    port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    echo = Echo.remote()
    ray.get([echo.call.remote(i) for i in range(1000)])
    time.sleep(2)
    before = gcs_mb(port)
    for _ in range(15):
        ray.get([echo.call.remote(i) for i in range(1000)])
    time.sleep(2)  # task events reach the GCS every second
    print(json.dumps({"grew_mb": gcs_mb(port) - before}))
"""


@pytest.mark.parametrize("events", [None, "1000"])
def test_the_embedded_gcs_does_not_grow_with_calls(events, tmp_path):
    """Ray's task events (~2.5 KB a call in the GCS, up to 100,000 calls) are off unless the
    environment turns them on: 15,000 actor calls grow the GCS by ~40 MB with them, not at all
    without."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    env.pop("RAY_task_events_report_interval_ms", None)
    if events:
        env["RAY_task_events_report_interval_ms"] = events  # the user's setting wins
    out = subprocess.run([sys.executable, "-c", CALLS], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grew = json.loads(out.stdout.strip().splitlines()[-1])["grew_mb"]
    if events:
        assert grew > 20, grew
    else:
        assert grew < 8, grew
