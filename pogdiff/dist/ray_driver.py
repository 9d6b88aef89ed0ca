"""The cluster training job: a Ray Train TorchTrainer of DeepSpeed workers (dist/worker.py).

    python -m pogdiff.dist.ray_driver CONFIG [key.path=value ...]   # the `ray job submit` entrypoint
    pogdiff train-dist CONFIG [key.path=value ...]                   # the same

The driver resolves the dataset (preparing it once if the source is not prepared) and builds the
method's artifacts (neighbours, density, psi) beside it, then ``dist.num_workers`` workers stream
its shards and train, checkpointing every ``train.checkpoint_every`` steps (and at the end) to
``<dist.storage_path>/<run_name>-<method tag>/step_XXXXXXXX``, keeping ``train.checkpoint_keep``.
A failed worker group restarts from the newest complete checkpoint on storage (``dist.max_failures``
times); running the driver again with the same run name continues from it too. At the end what was
trained (the EMA when ``train.ema``) is exported (pogdiff.models.export). ``RayJob`` is this job's
backend of pogdiff.train.assembly, which `pogdiff train` shares.

Ray: ``dist.ray_address``, else ``$RAY_ADDRESS`` (what `ray job submit` sets), else an embedded
local cluster. Exit status: 0 done, 1 training failed (the message says why), 2 bad config.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

from pogdiff import console
from pogdiff.config import Config, ConfigError
from pogdiff.dist.cluster import ray_run_name, storage_path
from pogdiff.runs import RunFiles
from pogdiff.train.loop import TrainResult

log = logging.getLogger("pogdiff.dist")


def preflight(cfg: Config) -> None:
    """What the config alone cannot say (the DeepSpeed JSON and the checkpoint it names), before any
    worker starts: a ConfigError in a worker would only be retried."""
    from pogdiff.dist.deepspeed_config import deepspeed_config
    from pogdiff.train.checkpoint import given_checkpoint

    deepspeed_config(cfg, cfg.dist.num_workers, cfg.dist.use_gpu)
    given_checkpoint(cfg.train)


def check_cluster(cfg: Config) -> None:
    """What the job asks for against what the cluster has: Ray would otherwise wait for the worker
    group forever ("worker group startup timed out", again and again)."""
    import ray

    dc = cfg.dist
    have = ray.cluster_resources()
    need_cpu = dc.num_workers * dc.cpus_per_worker
    problems = []
    if have.get("CPU", 0) < need_cpu:
        problems.append(f"dist.num_workers={dc.num_workers} x dist.cpus_per_worker={dc.cpus_per_worker} = {need_cpu} CPUs, "
                        f"but the Ray cluster has {have.get('CPU', 0):g}")
    if dc.use_gpu and have.get("GPU", 0) < dc.num_workers:
        problems.append(f"dist.use_gpu=true with dist.num_workers={dc.num_workers} needs {dc.num_workers} GPUs, "
                        f"but the Ray cluster has {have.get('GPU', 0):g}")
    if problems:
        embedded = "" if dc.ray_address or os.environ.get("RAY_ADDRESS") else \
            " (an embedded cluster has this machine's CPUs; dist.allow_oversubscribe=true shares them among more workers)"
        raise ConfigError("the job does not fit the cluster: " + "; ".join(problems) + ". Lower dist.num_workers / "
                          "dist.cpus_per_worker, or add nodes" + embedded)


@contextlib.contextmanager
def progress_from_metrics(cfg: Config, metrics_jsonl: Path, enabled: bool):
    """The driver's progress bar of a training job, from the steps rank 0 logs (its own bar goes to
    the log file with the rest of the workers' output)."""
    if not enabled:
        yield
        return
    from tqdm import tqdm

    from pogdiff.train.metrics import read_history

    stop = threading.Event()
    bar = tqdm(total=cfg.train.steps, desc=f"train-dist {ray_run_name(cfg)}", unit="step")

    def follow() -> None:
        while not stop.wait(1.0):
            try:
                history = read_history(metrics_jsonl)
            except ValueError:  # a line being written
                continue
            if history and history[-1]["step"] != bar.n:
                bar.n = history[-1]["step"]
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")

    from tqdm.contrib.logging import logging_redirect_tqdm

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        with logging_redirect_tqdm():  # a warning (the start watchdog's) on a line of its own, above the bar
            yield
    finally:
        stop.set()
        thread.join()
        bar.close()


class Stalled(RuntimeError):
    """The start watchdog stopped the job (its message names the rank and what it waited on)."""


class StartWatchdog:
    """The driver's watch over each rank's start (pogdiff.dist.worker.RankPhase): a rank not yet
    training after ``dist.start_timeout`` seconds is named on the console with what it waits on
    (placement by Ray, its DeepSpeed engine, its first batch), once per phase; after
    ``dist.stop_timeout`` the main thread is interrupted and ``stop_reason`` says why."""

    def __init__(self, cfg: Config, folder: Path, poll_s: float = 2.0):
        self.ranks, self.folder, self.poll_s = cfg.dist.num_workers, folder, poll_s
        self.start_timeout, self.stop_timeout = cfg.dist.start_timeout, cfg.dist.stop_timeout
        self.stop_reason: str | None = None
        self._stop = threading.Event()
        self._warned: set = set()

    def phases(self, started: float) -> list[dict]:
        out = []
        for rank in range(self.ranks):
            try:
                out.append(json.loads((self.folder / f"rank{rank}.phase.json").read_text()))
            except (OSError, ValueError):  # not started yet (or being replaced)
                out.append({"rank": rank, "phase": "to be placed and started by Ray (`ray status` shows what the "
                                                    "cluster has free)", "detail": "", "since": started})
        return out

    def check(self, started: float, now: float) -> bool:
        """One look; False once every rank trains or the job is stopped."""
        phases = self.phases(started)
        if all(p["phase"] == "training" for p in phases):
            return False
        for p in phases:
            waited = now - p["since"]
            if p["phase"] == "training" or waited < self.start_timeout:
                continue
            where = f" (pid {p['pid']} on {p['host']})" if "pid" in p else ""
            what = f"rank {p['rank']}{where} has waited {waited:.0f} s on: {p['phase']}" + \
                (f"; {p['detail']}" if p["detail"] else "")
            if waited >= self.stop_timeout:
                self.stop_reason = f"{what}; stopped after dist.stop_timeout={self.stop_timeout:g} s"
                import _thread

                _thread.interrupt_main()
                return False
            seen = (p["rank"], p["phase"], re.sub(r"\d+", "#", p["detail"]))  # an age in the detail is no news
            if seen not in self._warned:
                self._warned.add(seen)
                log.warning("%s (dist.start_timeout=%g s; the job stops after dist.stop_timeout=%g s)", what,
                            self.start_timeout, self.stop_timeout)
        return True

    @contextlib.contextmanager
    def watching(self):
        for old in self.folder.glob("rank*.phase.json"):  # an earlier attempt's
            old.unlink(missing_ok=True)
        started = time.time()

        def watch() -> None:
            while not self._stop.wait(self.poll_s) and self.check(started, time.time()):
                pass

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        try:
            yield self
        except BaseException:  # the interrupt, or whatever Ray Train's own SIGINT handler made of it (its abort)
            if self.stop_reason is None:
                raise
        finally:
            self._stop.set()
            thread.join()
        if self.stop_reason is not None:
            raise Stalled(self.stop_reason)


class RayJob:
    """pogdiff.train.assembly's backend for the cluster: a Ray Train TorchTrainer of
    ``dist.num_workers`` DeepSpeed workers, checkpoints on ``dist.storage_path``."""

    verb = "pogdiff train-dist"

    def hold(self, cfg: Config, stack: contextlib.ExitStack) -> None:
        from pogdiff.dist.cluster import job_session
        from pogdiff.runs import is_uri, run_lease

        stack.enter_context(run_lease(RunFiles(cfg).method, cfg.train.lease_timeout, self.verb))
        if is_uri(storage_path(cfg)):  # a run of this name elsewhere, with another output_dir, shares its checkpoints
            stack.enter_context(run_lease(storage_path(cfg), cfg.train.lease_timeout, self.verb,
                                          name=f"{ray_run_name(cfg)}.lease.json"))
        preflight(cfg)
        stack.enter_context(job_session(cfg))
        check_cluster(cfg)  # before any preparing: a job that cannot fit is refused first

    def checkpoints(self, cfg: Config) -> list:
        from pogdiff.dist.cluster import run_checkpoints

        return run_checkpoints(cfg)

    def remove_checkpoints(self, cfg: Config) -> None:
        from pogdiff.dist.cluster import remove_checkpoints

        remove_checkpoints(cfg)

    def world_size(self, cfg: Config) -> int:
        return cfg.dist.num_workers

    def train(self, cfg: Config, ds, progress: bool) -> tuple[TrainResult, dict]:
        """Raises ray.train.TrainingFailedError on failure."""
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from safetensors.torch import load_file

        from pogdiff.dist.cluster import remove_checkpoints, torch_config
        from pogdiff.dist.worker import train_worker
        from pogdiff.train.metrics import read_history

        dc, files = cfg.dist, RunFiles(cfg)
        env = {"TOKENIZERS_PARALLELISM": "false"} | ({} if dc.use_gpu else {"DS_ACCELERATOR": "cpu"})
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"cfg": cfg, "dataset": ds.location},
            scaling_config=ScalingConfig(num_workers=dc.num_workers, use_gpu=dc.use_gpu,
                                         resources_per_worker={"CPU": dc.cpus_per_worker}),
            torch_config=torch_config(dc.use_gpu),
            run_config=RunConfig(
                name=ray_run_name(cfg), storage_path=storage_path(cfg),
                failure_config=FailureConfig(max_failures=dc.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoint_keep),
                worker_runtime_env={"env_vars": env},
            ),
        )
        t0 = time.perf_counter()
        with progress_from_metrics(cfg, files.method / "metrics.jsonl", enabled=progress and console.quiet()), \
                StartWatchdog(cfg, files.method / "ranks").watching():
            result = trainer.fit()
        seconds = time.perf_counter() - t0
        if result.checkpoint is None:
            raise RuntimeError(f"training of '{ray_run_name(cfg)}' ended without a checkpoint in {storage_path(cfg)}")
        with result.checkpoint.as_directory() as ckpt:
            ckpt = Path(ckpt)
            weights = load_file(str(ckpt / ("ema.safetensors" if cfg.train.ema else "unet.safetensors")))
            steps = json.loads((ckpt / "trainer.json").read_text())["step"]
        # Ray deletes the checkpoints it registered; one written just before a failure, which Ray
        # never registered but a restart resumed from, it does not know about
        remove_checkpoints(cfg, keep=cfg.train.checkpoint_keep)
        history = read_history(files.method / "metrics.jsonl")
        log.info("'%s' done at step %d; checkpoint %s", ray_run_name(cfg), steps, result.checkpoint.path)
        return TrainResult(steps=steps, losses=[h["loss"] for h in history], history=history, seconds=seconds), weights


def run(cfg: Config, progress: bool = True) -> TrainResult:
    """Prepare (once) and train on Ray, export, write history.json; raises
    ray.train.TrainingFailedError on failure. ``cfg``'s paths must be absolute (cli makes them so)."""
    from pogdiff.train.assembly import run_training

    return run_training(cfg, RayJob(), progress)


def worker_error(e: Exception) -> str:
    """The first worker's own error, one line: Ray wraps it in a WorkerGroupError whose message is
    every rank's traceback."""
    failures = getattr(e, "worker_failures", None) or {}
    if not failures:
        return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    rank, err = min(failures.items())
    err = getattr(err, "cause", None) or err
    lines = str(err).strip().splitlines()
    return f"rank {rank}: {type(err).__name__}: {lines[-1] if lines else ''}"


def train_dist(cfg: Config) -> int:
    """``pogdiff train-dist``: 0 done, 1 training failed or no cluster, 2 bad config (with a message)."""
    from ray.train import TrainingFailedError

    try:
        result = run(cfg)
    except ConfigError as e:
        print(f"pogdiff train-dist: {e}", file=sys.stderr)
        return 2
    except ConnectionError as e:
        print(f"pogdiff train-dist: cannot reach the Ray cluster (dist.ray_address / $RAY_ADDRESS): {e}", file=sys.stderr)
        return 1
    except Stalled as e:
        console.traceback_to_log(f"training '{ray_run_name(cfg)}' stalled")
        print(f"pogdiff train-dist: {e}. A rerun with the same run_name continues from the newest complete "
              f"checkpoint in {storage_path(cfg)}", file=sys.stderr)
        return 1
    except TrainingFailedError as e:
        console.traceback_to_log(f"training '{ray_run_name(cfg)}' failed")
        print(f"pogdiff train-dist: training '{ray_run_name(cfg)}' failed after dist.max_failures="
              f"{cfg.dist.max_failures} restarts: {worker_error(e)}. Checkpoints stay in {storage_path(cfg)} and a "
              f"rerun with the same run_name continues from the newest complete one (the traceback is in "
              f"{console.log_path() or 'the run log'})", file=sys.stderr)
        return 1
    print(json.dumps({"run": ray_run_name(cfg), "steps": result.steps,
                      "first_loss": result.losses[0] if result.losses else None,
                      "last_loss": result.losses[-1] if result.losses else None,
                      "seconds": round(result.seconds, 1), "export": str(RunFiles(cfg).method)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `ray job submit` entrypoint: ``pogdiff train-dist CONFIG [overrides]``."""
    from pogdiff.runs import load_run_config
    from pogdiff.storage import check_storage

    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m pogdiff.dist.ray_driver CONFIG [key.path=value ...]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_run_config(args[0], args[1:])
        check_storage(cfg)  # as the CLI does: every URI reachable before anything starts
    except ConfigError as e:
        print(f"pogdiff: {e}", file=sys.stderr)
        return 2
    return train_dist(cfg)


if __name__ == "__main__":
    sys.exit(main())
