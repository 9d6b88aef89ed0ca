"""The one Ray connection policy, and where a run's Ray files live.

``connect``: ``dist.ray_address``, else ``$RAY_ADDRESS`` (what `ray job submit` and the Slurm script
set), else an embedded local cluster bound to 127.0.0.1. Every Ray user in pogdiff (training,
prepare's ray backend, sampling tasks, the FAISS service) goes through it.
"""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Optional

from pogdiff.config import Config
from pogdiff.runs import is_uri, method_tag

LOOPBACK = "127.0.0.1"

# Ray's settings for the clusters pogdiff starts (the embedded one; the Slurm script exports the same),
# unless the environment sets them. Task events off: the GCS keeps ~2.5 KB per task and actor call
# up to 100,000 of them, so over a long job (prepare's batches, Ray Data's and Train's own actor
# calls) it grows ~250 MB; measured here, 72,000 calls grew it 45 -> 225 MB, and 240,000 calls with
# events off +2.5 MB. What is lost: `ray list tasks` and the dashboard's task timeline.
RAY_NODE_ENV = {"RAY_task_events_report_interval_ms": "0"}


@contextlib.contextmanager
def single_machine_mode(env: Optional[dict] = None):
    """Ray turns a loopback node IP into the host's routable one (and its servers then listen on
    every interface; a client looks for its cluster there) unless it runs in its single-machine
    mode, the one it uses on macOS: then GCS, raylet, workers, agents and metrics bind 127.0.0.1,
    and clients find them there. The flag is read at import (raylet and workers inherit the
    variable) and, in this process, at call time. ``env`` is set for the duration too."""
    from ray._private import ray_constants

    env = {**(env or {}), ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cluster_mode, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def is_loopback_address(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in (LOOPBACK, "localhost", "::1")


def connect(address: Optional[str] = None, num_cpus: Optional[int] = None, log_to_driver: bool = True) -> bool:
    """Join ``address`` / $RAY_ADDRESS, else start an embedded cluster on loopback (returns True then:
    the caller shuts it down). A loopback address joins such an embedded cluster."""
    import ray

    from pogdiff import console

    if ray.is_initialized():
        return False
    console.route_ray_logs()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        with single_machine_mode() if is_loopback_address(address) else contextlib.nullcontext():
            ray.init(address=address, log_to_driver=log_to_driver)
        console.route_ray_worker_output()
        return False
    # The embedded cluster's processes inherit RAY_ADDRESS, so that Ray's own helpers (Train's
    # placement-group cleaner) query this cluster even where other clusters run on the machine.
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
    node_env = {k: os.environ.get(k, v) for k, v in RAY_NODE_ENV.items()}
    with single_machine_mode({**node_env, "RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"{LOOPBACK}:{port}"}):
        ray.init(address="local", _node_ip_address=LOOPBACK, num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=log_to_driver)
    console.route_ray_worker_output()
    from pogdiff.dist import reaper

    reaper.start(os.getpid(), ray._private.worker._global_node.get_session_dir_path())
    return True


@contextlib.contextmanager
def session(address: Optional[str] = None, num_cpus: Optional[int] = None, log_to_driver: bool = True):
    """The one way into Ray: the block runs on ``address`` / $RAY_ADDRESS, else on an embedded
    cluster of at least this machine's CPUs (``num_cpus`` when more), which is shut down after it.
    Inside another session it just runs (the outer one owns the cluster)."""
    import ray

    started = connect(address, num_cpus=max(machine_cpus(), num_cpus or 0), log_to_driver=log_to_driver)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def job_session(cfg: Config):
    """``session`` for a training job: an embedded cluster has this machine's CPUs, or as many as
    the workers ask for with ``dist.allow_oversubscribe``."""
    needed = cfg.dist.num_workers * cfg.dist.cpus_per_worker
    return session(cfg.dist.ray_address, num_cpus=needed if cfg.dist.allow_oversubscribe else None)


def machine_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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


def _run_checkpoint_folder(cfg: Config):
    """(fsspec filesystem, the run's checkpoint folder in it), for a local path and a URI alike."""
    import fsspec

    from pogdiff.storage import filesystem

    folder = f"{storage_path(cfg)}/{ray_run_name(cfg)}"
    return filesystem(folder) if is_uri(folder) else (fsspec.filesystem("file"), folder)


def run_checkpoints(cfg: Config) -> list[str]:
    """The run's ``step_*`` checkpoints on its storage (local or a URI), oldest first."""
    fs, folder = _run_checkpoint_folder(cfg)
    return sorted(fs.glob(f"{folder}/step_*")) if fs.exists(folder) else []


def remove_checkpoints(cfg: Config, keep: int = 0) -> None:
    """Delete all but the newest ``keep`` checkpoints of the run; with ``keep`` 0 the run's whole
    storage folder (Ray's run state too), so that Ray starts the run afresh."""
    fs, folder = _run_checkpoint_folder(cfg)
    doomed = (run_checkpoints(cfg)[:-keep] if keep else [folder]) if fs.exists(folder) else []
    for path in doomed:
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:  # gone already (Ray deletes the checkpoints it registered)
            pass


_rendezvous_store = None  # rank 0's loopback TCPStore server, alive as long as its worker


def _serve_rendezvous_on_loopback() -> Optional[int]:
    """On rank 0 of an embedded cluster: start torch's TCPStore server on a socket bound to
    127.0.0.1 and return its port (None on a real cluster). TCPStore binds to every interface when
    it opens its own socket; handed a bound one, it listens where that is."""
    global _rendezvous_store
    import ray
    from torch.distributed import TCPStore

    if ray.util.get_node_ip_address() != LOOPBACK:
        return None
    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    # multi_tenant: init_process_group's own TCPStore(is_master=True) on this port reuses this server.
    _rendezvous_store = TCPStore(LOOPBACK, port, is_master=True, master_listen_fd=sock.detach(), multi_tenant=True,
                                 wait_for_workers=False)
    return port


def torch_config(use_gpu: bool):
    """Ray Train's TorchConfig (nccl on GPUs, else gloo) whose rendezvous stays on loopback on an
    embedded cluster."""
    from ray.train.torch import TorchConfig
    from ray.train.torch import config as ray_torch_config

    class LoopbackTorchBackend(ray_torch_config._TorchBackend):
        def on_start(self, worker_group, backend_config):
            port = worker_group.execute_single(0, _serve_rendezvous_on_loopback)
            if port is None or not hasattr(ray_torch_config, "get_address_and_port"):
                return super().on_start(worker_group, backend_config)
            # Ray picks rank 0's address and a fresh port through this module-level function; on
            # an embedded cluster it must name the server started above. Restored right after.
            pick = ray_torch_config.get_address_and_port
            ray_torch_config.get_address_and_port = lambda: (LOOPBACK, port)
            try:
                return super().on_start(worker_group, backend_config)
            finally:
                ray_torch_config.get_address_and_port = pick

    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return LoopbackTorchBackend

    return LoopbackTorchConfig(backend="nccl" if use_gpu else "gloo")


def ray_cause(e: BaseException) -> BaseException:
    """The error a Ray task, actor or Ray Data UDF raised, out of Ray's wrappers (a RayTaskError's
    message is the remote traceback; Ray Data wraps a UDF's error in UserCodeException); ``e``
    itself when it is not Ray's."""
    import ray.exceptions as rx

    outer, seen = e, set()
    while id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, rx.RayTaskError) and e.cause is not None:
            e = e.cause
        elif isinstance(e, rx.UserCodeException) and e.__cause__ is not None:
            e = e.__cause__
        else:
            break
    if isinstance(e, rx.RayError):  # the cause did not survive pickling (Ray Data's UserCodeException): its line did
        return _own_error_in(str(outer)) or e
    return e


def _own_error_in(text: str) -> Optional[BaseException]:
    """pogdiff's own error, rebuilt from the ``pogdiff.<module>.<Class>: message`` line a remote
    traceback ends with."""
    import importlib
    import re

    for line in reversed(text.splitlines()):
        if m := re.fullmatch(r"(pogdiff(?:\.\w+)+)\.(\w+): (.*)", line.strip()):
            try:
                cls = getattr(importlib.import_module(m[1]), m[2])
                return cls(m[3]) if isinstance(cls, type) and issubclass(cls, Exception) else None
            except (ImportError, AttributeError, TypeError):
                return None
    return None


def ray_actor_died(e: BaseException) -> Optional[str]:
    """One line for a Ray actor or worker that died (killed, out of memory), else None."""
    import ray.exceptions as rx

    if not isinstance(e, (rx.RayActorError, rx.WorkerCrashedError, rx.OutOfMemoryError)):
        return None
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return f"a Ray worker died ({type(e).__name__}: {lines[0] if lines else 'no reason given'})"
