"""`make demo`, scaled down by overrides, run exactly as a user runs it: the console script from a
temporary working directory, with the default relative ``output_dir: runs``. While it runs, every
socket that any of its processes (the embedded Ray cluster and the training workers included)
listens on is listed: all of them must be on loopback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from ipaddress import ip_address
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.profile=agedb-s", "model.tiny_vae_steps=0", "density.epochs=5", "train.steps=4", "train.log_every=2",
         "train.checkpoint_every=2", "sample.steps=3", "sample.images_per_id=2", "eval.recognizer_ids=8",
         "eval.recognizer_images_per_id=3", "eval.recognizer_steps=10"]


def listening(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of ``root`` and its descendants."""
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            found |= {(proc.name(), c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # ended between the listing and the query
            pass
    return found


def is_loopback(address: str) -> bool:
    ip = ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


@pytest.mark.slow
def test_demo_from_a_temporary_working_directory(tmp_path):
    shutil.copy(ROOT / "configs" / "demo.yaml", tmp_path / "demo.yaml")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "console.log"
    with open(log, "w") as console:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "pogdiff"), "demo", "demo.yaml", *SMALL],
                                cwd=tmp_path, env=env, stdout=console, stderr=subprocess.STDOUT, text=True)
        sockets: set[tuple[str, str, int]] = set()
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                sockets |= listening(psutil.Process(proc.pid))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.5)
        if proc.poll() is None:
            proc.kill()
    assert proc.wait() == 0, log.read_text()[-8000:]
    console_text, log_text = log.read_text(), (tmp_path / "runs" / "demo" / "pogdiff.log").read_text()
    # Ray's and the workers' chatter and Python's warnings are in the run's log file, not on the console
    for chatter in ("(RayTrainWorker", "(TrainController", "Started a local Ray instance", "FutureWarning"):
        assert chatter not in console_text and chatter in log_text, chatter
    assert console_text.count("train-dist demo-") >= 4  # the driver's bar for each method's training
    names = {name for name, _, _ in sockets}
    assert "gcs_server" in names and "raylet" in names, sockets  # the listing saw the cluster
    exposed = sorted(s for s in sockets if not is_loopback(s[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"
    run_dir = tmp_path / "runs" / "demo"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["methods"]) == ["vanilla", "cbdm", "t2h", "pogdiff"]
    for method, result in summary["methods"].items():
        assert result["steps"] == 4 and len(result["metrics"]) == 6, (method, result)
    dataset = Path(summary["dataset"])
    assert dataset.is_relative_to(tmp_path / "runs" / "datasets") and (dataset / "dataset.json").is_file()
    assert (run_dir / "report" / "report.md").is_file() and (run_dir / "pogdiff-full-seed0" / "metrics.json").is_file()
    assert not list(tmp_path.glob("**/ray_results")) and not (Path.home() / "ray_results" / "demo").exists()
