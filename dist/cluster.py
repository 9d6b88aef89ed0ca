"""The one Ray connection policy, and where a run's Ray files live.

``connect``: ``dist.ray_address``, else ``$RAY_ADDRESS`` (what `ray job submit` and the Slurm script
set), else an embedded local cluster bound to 127.0.0.1. Every Ray user in pogdiff (training,
prepare's ray backend, sampling tasks, the FAISS service) goes through it.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Optional

from pogdiff.config import Config
from pogdiff.runs import is_uri, method_tag

LOOPBACK = "127.0.0.1"


def connect(address: Optional[str] = None, num_cpus: Optional[int] = None, log_to_driver: bool = True) -> bool:
    """Join ``address`` / $RAY_ADDRESS, else start an embedded cluster on loopback (returns True then:
    the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return False
    # The embedded cluster's processes inherit RAY_ADDRESS, so that Ray's own helpers (Train's
    # placement-group cleaner) query this cluster even where other clusters run on the machine.
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
    env = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"{LOOPBACK}:{port}"}
    os.environ.update(env)
    try:
        ray.init(address="local", _node_ip_address=LOOPBACK, num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=log_to_driver)
    finally:
        for k in env:
            os.environ.pop(k, None)
    from pogdiff.dist import reaper

    reaper.start(os.getpid(), ray._private.worker._global_node.get_session_dir_path())
    return True


def connect_for(cfg: Config) -> bool:
    """``connect`` with the job's address and enough CPUs for its workers on an embedded cluster."""
    needed = cfg.dist.num_workers * cfg.dist.cpus_per_worker
    return connect(cfg.dist.ray_address, num_cpus=max(os.cpu_count() or 1, needed))


def drop_source_checkout_from_sys_path() -> None:
    """Ray puts the driver's working directory on every worker's sys.path. Run from a source
    checkout, that makes its ``kernels/`` and ``dist/`` folders importable as top-level ``kernels``
    and ``dist``, which transformers and bitsandbytes then import as PyPI's ``kernels``. Called
    first in every function Ray runs for pogdiff."""
    for entry in list(sys.path):
        root = Path(entry or os.getcwd())
        if (root / "kernels" / "__init__.py").is_file() and (root / "pogdiff" / "__init__.py").is_file():
            sys.path.remove(entry)
    for name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
        module = sys.modules[name]
        if getattr(module, "__file__", None) and Path(module.__file__).parent.parent.joinpath("pogdiff").is_dir():
            del sys.modules[name]


def ray_run_name(cfg: Config) -> str:
    return f"{cfg.run_name}-{method_tag(cfg)}"


def storage_path(cfg: Config) -> str:
    """Shared storage for Ray checkpoints: ``dist.storage_path`` (a URI such as ``s3://…`` is handed
    to Ray unchanged), else ``<output_dir>/ray``."""
    path = cfg.dist.storage_path or str(Path(cfg.output_dir) / "ray")
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def run_storage(cfg: Config) -> Optional[Path]:
    """The run's checkpoint folder when storage is a local (or mounted) path; None for URIs."""
    path = storage_path(cfg)
    return None if is_uri(path) else Path(path) / ray_run_name(cfg)
