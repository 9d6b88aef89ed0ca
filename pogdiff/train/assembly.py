"""Training, assembled in one place for `train`, `train-dist`, `experiment` and the demo.

    run_training(cfg, OneMachine())     # the verb: lease, resume check, data, train, export, history
    run_training(cfg, RayJob())         # the same on a Ray cluster (pogdiff.dist.ray_driver)

    trainer = assemble(cfg, ds, device, make_engine, resume_from)   # one rank
    result = trainer.fit(save)

``assemble`` is the one place a rank builds what it trains: the dataset model's UNet, the adapter
(``train.adapter``), the strict load of a checkpoint's trainable weights, the engine (a
``LocalEngine``, or DeepSpeed on a Ray Train worker), the EMA, the data stream and the objective.
A backend says only where the ranks run: its leases, its checkpoint storage, its world size, and
how it runs ``assemble`` + ``fit`` and returns the weights to export.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch

from pogdiff.config import Config
from pogdiff.data.dataset import Dataset
from pogdiff.method.objectives import Objective
from pogdiff.train.ema import ShardedEMA
from pogdiff.train.loop import SkipCount, TrainResult

log = logging.getLogger("pogdiff.train")


@dataclass
class Assembled:
    """One rank's training, ready to ``fit``."""

    cfg: Config
    ds: Dataset
    engine: object  # the engine contract of pogdiff.train.loop
    ema: Optional[ShardedEMA]
    loader: object
    objective: Objective
    is_minority: torch.Tensor
    identities: object  # (N,) per dataset row, memory-mapped
    start: int  # the step it continues from
    out_dir: Path
    device: torch.device
    data_skipped: SkipCount  # the reader's skips in the batches trained on, the run's total before ``start`` on rank 0
    on_first_batch: Optional[Callable[[], None]] = None  # called once the stream's first batch is here

    def data_position(self, step: int) -> dict:
        """What a checkpoint records of the stream, with the skips of all ranks so far (collective)."""
        from pogdiff.train.loop import data_position

        return {**data_position(self.cfg, self.loader, step), "skipped": self.data_skipped.total(self.engine)}

    def fit(self, save: Optional[Callable[[int], None]], progress: bool = True) -> TrainResult:
        from pogdiff.train.loop import fit, stream_batches
        from pogdiff.train.validate import Validator, default_prompts

        tc = self.cfg.train
        validate = (Validator(self.cfg, self.engine, self.ema, self.ds.model_dir, self.out_dir,
                              default_prompts(self.cfg, self.ds.index)) if tc.validate_every else None)
        batches = stream_batches(self.loader, self.start * tc.grad_accum, self.device, self.engine.dtype)
        if self.on_first_batch is not None:
            batches = _calling_on_first(batches, self.on_first_batch)
        return fit(self.cfg, self.engine, self.objective, batches, self.start, self.out_dir, self.is_minority,
                   ema=self.ema, save=save, validate=validate, progress=progress, identities=self.identities,
                   data_skipped=self.data_skipped)

    def final_weights(self) -> dict[str, torch.Tensor]:
        """What is exported: the EMA when ``train.ema``, else the trained weights (collective)."""
        return self.ema.gather(self.engine.all_gather) if self.ema is not None else self.engine.full_weights()


def _calling_on_first(batches, first: Callable[[], None]):
    for i, batch in enumerate(batches):
        if i == 0:
            first()
        yield batch


def assemble(cfg: Config, ds: Dataset, device: torch.device, make_engine: Callable[[torch.nn.Module], object],
             resume_from: Optional[Path], out_dir: Path) -> Assembled:
    """One rank's model, adapter, engine, EMA, data stream and objective, resumed from the checkpoint
    ``resume_from`` (every rank loads the same weights before an engine partitions them)."""
    from pogdiff.models.adapters import apply_adapter, load_trained
    from pogdiff.train.checkpoint import load_unet_weights, restore_checkpoint
    from pogdiff.train.loop import (check_data_position, configure_backends, configure_unet, data_position,
                                    make_ema, make_loader, training_inputs)

    inputs = training_inputs(cfg, ds, device)
    unet = inputs.unet
    apply_adapter(unet, cfg.train)
    if resume_from is not None:
        load_trained(unet, load_unet_weights(resume_from), f"checkpoint '{resume_from}'")
    configure_unet(unet, cfg.model, device)
    configure_backends(cfg.train, device)
    unet.to(device).train()
    engine = make_engine(unet)
    ema = make_ema(cfg.train, engine)
    loader = make_loader(cfg, ds, engine.rank, engine.world_size)
    start, skipped_before = 0, 0
    if resume_from is not None:
        start, saved = restore_checkpoint(resume_from, engine, ema, cfg.train)
        check_data_position(saved.get("data"), data_position(cfg, loader, start))
        if engine.rank == 0:  # the total over ranks; the others count from 0
            skipped_before = int((saved.get("data") or {}).get("skipped", 0))
        log.info("rank %d resumed from %s at step %d", engine.rank, resume_from, start)
    return Assembled(cfg, ds, engine, ema, loader, inputs.objective, inputs.is_minority, inputs.identities, start,
                     out_dir, device, SkipCount(skipped_before))


class Backend(Protocol):
    """Where a training job's ranks run."""

    verb: str

    def hold(self, cfg: Config, stack: contextlib.ExitStack) -> None:
        """Leases and sessions for the job, checked before anything is prepared (ConfigError: exit 2)."""

    def checkpoints(self, cfg: Config) -> list: ...

    def remove_checkpoints(self, cfg: Config) -> None: ...

    def world_size(self, cfg: Config) -> int: ...

    def train(self, cfg: Config, ds: Dataset, progress: bool) -> tuple[TrainResult, dict[str, torch.Tensor]]: ...


class OneMachine:
    """This process, one device, checkpoints under ``<run>/<method>/checkpoints``."""

    verb = "pogdiff train"

    def hold(self, cfg: Config, stack: contextlib.ExitStack) -> None:
        from pogdiff.runs import RunFiles, run_lease
        from pogdiff.train.checkpoint import given_checkpoint

        stack.enter_context(run_lease(RunFiles(cfg).method, cfg.train.lease_timeout, self.verb))
        given_checkpoint(cfg.train)  # a bad path is a config error before anything starts

    def checkpoints(self, cfg: Config) -> list:
        from pogdiff.runs import RunFiles

        return sorted(RunFiles(cfg).checkpoints.glob("step_*"))

    def remove_checkpoints(self, cfg: Config) -> None:
        import shutil

        from pogdiff.runs import RunFiles

        shutil.rmtree(RunFiles(cfg).checkpoints, ignore_errors=True)

    def world_size(self, cfg: Config) -> int:
        return 1

    def train(self, cfg: Config, ds: Dataset, progress: bool) -> tuple[TrainResult, dict[str, torch.Tensor]]:
        from pogdiff.models.components import resolve_device
        from pogdiff.runs import RunFiles
        from pogdiff.train.checkpoint import Checkpointer, given_checkpoint
        from pogdiff.train.loop import LocalEngine, autocast_dtype

        tc, out_dir = cfg.train, RunFiles(cfg).method
        device = resolve_device(tc.device)
        ckpt = Checkpointer(out_dir / "checkpoints", keep=tc.checkpoint_keep)
        latest = (ckpt.latest() if tc.checkpoint_every else None) or given_checkpoint(tc)
        trainer = assemble(cfg, ds, device, lambda unet: LocalEngine(unet, tc, autocast_dtype(tc, device)), latest,
                           out_dir)
        save = ((lambda step: ckpt.save(step, trainer.engine, trainer.ema, {"data": trainer.data_position(step)}))
                if tc.checkpoint_every else None)
        result = trainer.fit(save, progress)
        return result, trainer.final_weights()


def run_training(cfg: Config, backend: Backend, progress: bool = True) -> TrainResult:
    """A training verb: hold the run, check what a rerun resumes, resolve (prepare) the dataset and
    the method's artifacts, train on ``backend``, export, write ``history.json``. ``cfg``'s paths
    must be absolute (cli makes them so)."""
    from pogdiff.data.dataset import prepare_artifacts, resolve_dataset
    from pogdiff.models.export import export_model
    from pogdiff.runs import RunFiles, check_resume
    from pogdiff.train.loop import resolve_schedule
    from pogdiff.train.metrics import write_history

    with contextlib.ExitStack() as stack:
        backend.hold(cfg, stack)
        if not check_resume(cfg, backend.checkpoints(cfg)):
            backend.remove_checkpoints(cfg)  # train.resume=never (or nothing to resume): a fresh run
        ds = resolve_dataset(cfg, progress)
        psi_stats = prepare_artifacts(cfg, ds, progress)
        torch.manual_seed(cfg.train.seed)
        cfg = resolve_schedule(cfg, len(ds), backend.world_size(cfg))
        result, weights = backend.train(cfg, ds, progress)
        export_model(cfg.train, ds.model_dir, weights, RunFiles(cfg).method, cfg.export.fuse_lora)
        write_history(cfg, psi_stats, result.seconds)
        return result


def run_train(cfg: Config, progress: bool = True) -> TrainResult:
    """``pogdiff train``: one machine, one process (``pogdiff.dist.ray_driver`` is the cluster job)."""
    return run_training(cfg, OneMachine(), progress)
