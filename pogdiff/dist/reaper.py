"""Leaves no process of an embedded Ray cluster behind its driver.

``connect`` starts this watcher (a separate, detached process) when it starts an embedded cluster.
While the driver lives it records the driver's descendants (GCS, raylet, agents, workers) every
second; once the driver is gone, however it ended (SIGKILL included), it terminates every recorded
process still running and every process whose command line names the cluster's session directory,
then exits. A driver that shuts Ray down normally leaves it nothing to do.

    python -m pogdiff.dist.reaper DRIVER_PID SESSION_DIR
"""
from __future__ import annotations

import sys
import time

import psutil


def reap(driver_pid: int, session_dir: str, poll_s: float = 1.0, grace_s: float = 3.0) -> int:
    try:
        driver = psutil.Process(driver_pid)
        created = driver.create_time()
    except psutil.NoSuchProcess:
        return 0
    seen: dict[int, float] = {}
    while True:
        try:
            if not driver.is_running() or driver.create_time() != created or driver.status() == psutil.STATUS_ZOMBIE:
                break
            for child in driver.children(recursive=True):
                try:
                    seen[child.pid] = child.create_time()
                except psutil.Error:
                    pass
        except psutil.NoSuchProcess:
            break
        time.sleep(poll_s)
    victims = []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
        if proc.pid == psutil.Process().pid:
            continue
        recorded = seen.get(proc.pid) == proc.info["create_time"]
        named = session_dir and any(session_dir in arg for arg in proc.info["cmdline"] or [])
        if recorded or named:
            victims.append(proc)
    for proc in victims:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(victims, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return len(victims)


def start(driver_pid: int, session_dir: str) -> None:
    """Start the watcher detached from the driver's session, so that a signal to the driver's
    process group does not reach it first."""
    import subprocess

    subprocess.Popen([sys.executable, "-m", "pogdiff.dist.reaper", str(driver_pid), session_dir],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)


if __name__ == "__main__":
    sys.exit(0 if reap(int(sys.argv[1]), sys.argv[2]) >= 0 else 1)
