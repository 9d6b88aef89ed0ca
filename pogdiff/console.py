"""What a `pogdiff` command shows on the console, and the run's log file that gets the rest.

The console gets one progress bar per stage, pogdiff's warnings, anyone's errors, and the verb's
closing summary. ``<output_dir>/<run_name>/pogdiff.log`` gets every log record at INFO and above,
Python warnings (deprecations included), Ray's own messages and the output Ray forwards from its
workers (``route_ray_worker_output``, called by the Ray connection).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, TextIO

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_log_file: Optional[TextIO] = None
_log_path: Optional[str] = None


class _ConsoleFilter(logging.Filter):
    """pogdiff's warnings and everyone's errors, but Ray Data's: the driver re-raises every error of a
    pipeline itself (Ray Data logs each one with its Ray stack first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("ray.data") or getattr(record, "log_file_only", False):
            return False
        return record.levelno >= logging.ERROR or (record.levelno >= logging.WARNING and record.name.startswith("pogdiff"))


def setup(log_path: Path) -> Path:
    """Console and log file for this process (the CLI calls it once the config is loaded)."""
    global _log_file, _log_path
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _log_path = str(log_path)
    _log_file = open(log_path, "a", buffering=1)
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    to_file = logging.StreamHandler(_log_file)
    to_file.setFormatter(logging.Formatter(FORMAT))
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    to_console.addFilter(_ConsoleFilter())
    root.addHandler(to_file)
    root.addHandler(to_console)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the file
    # Per-file loading bars of the HF libraries are not stages.
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    for name in ("transformers", "diffusers"):  # they log to their own stderr handlers
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
    return log_path


def route_ray_logs() -> None:
    """Ray's driver-side loggers write to their own stderr handlers: send them through ours. Call
    after ``import ray`` (and again after ``import ray.data``), before ``ray.init``."""
    if _log_file is None:
        return
    for name in ("ray", "ray.data"):  # each sets up its own stderr handler (Ray Data's at DEBUG)
        ray_logger = logging.getLogger(name)
        ray_logger.handlers.clear()
        ray_logger.propagate = True
        ray_logger.setLevel(logging.INFO)


def route_ray_worker_output() -> None:
    """After ``ray.init(log_to_driver=True)``: the workers' stdout/stderr, which Ray prints on the
    driver's console, go to the log file instead. Ray has no public switch for this: its
    dispatcher handler is replaced under the same name, which ``ray.shutdown`` removes."""
    if _log_file is None:
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        from ray._private.worker import print_worker_logs
    except ImportError:  # another Ray layout: the output stays on the console
        return
    if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        return  # log_to_driver=False: nothing is forwarded
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", lambda data: print_worker_logs(data, _log_file))


def traceback_to_log(what: str) -> None:
    """The current exception's traceback, to the run's log file only (the console gets one line)."""
    if _log_file is not None:
        logging.getLogger("pogdiff").error(what, exc_info=True, extra={"log_file_only": True})


def log_path() -> Optional[str]:
    """The log file of this process (for worker processes to share), or None."""
    return _log_path


def quiet() -> bool:
    """Whether worker output goes to the log file (so the driver should draw its own bars)."""
    return _log_file is not None
