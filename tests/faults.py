"""SIGKILL from outside, for the fault tests: a thread watching this machine's processes."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

import psutil


def always() -> bool:
    return True


@contextlib.contextmanager
def killing(titles: dict[str, Callable[[], bool]], poll: float = 0.01) -> Iterator[dict[str, int]]:
    """SIGKILL, once per title, the first process whose command line holds it (Ray titles a worker
    ``ray::<task>`` or ``ray::<Actor>.<method>`` while it runs that call) once its condition holds.
    Yields {title: the PID killed}, filled in as they are."""
    killed: dict[str, int] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() and len(killed) < len(titles):
            for p in psutil.process_iter(["pid", "cmdline"]):
                line = " ".join(p.info["cmdline"] or [])
                for title, ready in titles.items():
                    if title in line and title not in killed and p.pid not in killed.values() and ready():
                        try:
                            p.send_signal(signal.SIGKILL)
                            killed[title] = p.pid
                        except psutil.NoSuchProcess:
                            pass
            stop.wait(poll)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        stop.set()
        thread.join()
