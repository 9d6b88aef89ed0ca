"""Checkpoints: one format for the one-machine run and the DeepSpeed workers.

    <checkpoint>/unet.safetensors               full fp32 UNet (rank 0)
                 ema.safetensors                the EMA (train.ema; rank 0)
                 optimizer_rank<r>.safetensors  each rank's optimizer partition, tensors + JSON structure (no pickle)
                 trainer.json                   step, world size, LR schedule, data position (rank 0)
                 manifest_rank<r>.json          each rank's files with their sizes and sha256, written last

A checkpoint is complete when every rank's manifest is there and every file it lists has its size
(``checkpoint_state``; ``verify=True`` also checks the sha256). Resuming always takes the newest
complete checkpoint on storage (``newest_complete``), whoever registered it.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pogdiff.runs import atomic_path, atomic_write, file_sha256
from pogdiff.train.ema import ShardedEMA

log = logging.getLogger("pogdiff.train")


def save_state_dict(state: dict, path: Path) -> None:
    """A (nested) state_dict as safetensors: tensors as tensors, the structure and the other values
    as JSON metadata (dicts as key/value pairs, so integer keys stay integers). No pickle."""
    tensors: dict[str, torch.Tensor] = {}

    def split(obj):
        if torch.is_tensor(obj):
            name = str(len(tensors))
            tensors[name] = obj.detach().cpu().contiguous()
            return {"tensor": name}
        if isinstance(obj, dict):
            return {"dict": [[k, split(v)] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            return {"list": [split(v) for v in obj]}
        return {"value": obj}

    structure = json.dumps(split(state))
    save_file(tensors, str(path), metadata={"structure": structure})


def load_state_dict(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        structure = json.loads(f.metadata()["structure"])
    tensors = load_file(str(path))

    def join(node):
        if "tensor" in node:
            return tensors[node["tensor"]]
        if "dict" in node:
            return {k: join(v) for k, v in node["dict"]}
        if "list" in node:
            return [join(v) for v in node["list"]]
        return node["value"]

    return join(structure)


def require_finite(weights: dict[str, torch.Tensor], what: str) -> None:
    """NaN never reaches a checkpoint or an export: refuse weights with a non-finite value."""
    bad = [name for name, w in weights.items() if not torch.isfinite(w).all()]
    if bad:
        raise FloatingPointError(f"{what} has non-finite values in {len(bad)} tensors ({', '.join(bad[:3])}...): "
                                 "not written. Resume from the last checkpoint with a lower train.lr or cleaner data")


def write_manifest(path: Path, rank: int, files: Iterable[str]) -> None:
    """This rank's part of the checkpoint is complete: its files, sizes and sha256 (written last)."""
    entries = {name: {"bytes": (path / name).stat().st_size, "sha256": file_sha256(path / name)} for name in files}
    atomic_write(path / f"manifest_rank{rank}.json", json.dumps({"rank": rank, "files": entries}, indent=1))


def write_checkpoint(path: Path, engine, ema: Optional[ShardedEMA], step: int, meta: dict | None = None) -> None:
    """Every rank calls this (the weight and EMA gathers are collective); each rank writes its own
    optimizer shard, rank 0 the full UNet (fp32 safetensors), the EMA and ``trainer.json``; each
    rank's manifest comes last."""
    weights = engine.full_weights()
    ema_weights = ema.gather(engine.all_gather) if ema is not None else None
    require_finite(weights, f"the UNet at step {step}")
    if ema_weights is not None:
        require_finite(ema_weights, f"the EMA at step {step}")
    path.mkdir(parents=True, exist_ok=True)
    files = [f"optimizer_rank{engine.rank}.safetensors"]
    save_state_dict(engine.optimizer_state(), path / files[0])
    if engine.rank == 0:
        save_file(weights, str(path / "unet.safetensors"))
        files.append("unet.safetensors")
        if ema_weights is not None:
            save_file(ema_weights, str(path / "ema.safetensors"), metadata={"updates": str(ema.updates)})
            files.append("ema.safetensors")
        state = {"step": step, "world_size": engine.world_size, "scheduler": engine.scheduler.state_dict(), **(meta or {})}
        (path / "trainer.json").write_text(json.dumps(state, indent=1))
        files.append("trainer.json")
    write_manifest(path, engine.rank, files)


def checkpoint_state(path: Path, verify: bool = False) -> dict:
    """``trainer.json`` of a complete checkpoint; a clear error naming what is missing otherwise.
    ``verify`` also checks every file's sha256 against its rank's manifest."""
    path = Path(path)
    if not (path / "trainer.json").is_file() or not (path / "manifest_rank0.json").is_file():
        raise FileNotFoundError(f"checkpoint '{path}' has no trainer.json or manifest: it is incomplete")
    state = json.loads((path / "trainer.json").read_text())
    for rank in range(state["world_size"]):
        manifest = path / f"manifest_rank{rank}.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"checkpoint '{path}' is incomplete: rank {rank} has not finished writing it")
        for name, entry in json.loads(manifest.read_text())["files"].items():
            f = path / name
            if not f.is_file() or f.stat().st_size != entry["bytes"]:
                raise FileNotFoundError(f"checkpoint '{path}' is incomplete or damaged: {name}")
            if verify and file_sha256(f) != entry["sha256"]:
                raise FileNotFoundError(f"checkpoint '{path}' is damaged: {name} fails its sha256")
    return state


def newest_complete(candidates: Iterable[Path], verify: bool = True) -> Optional[Path]:
    """The complete checkpoint with the highest step among ``candidates`` (incomplete and damaged
    ones are skipped, with a log line), or None."""
    best, best_step = None, -1
    for path in candidates:
        try:
            step = int(checkpoint_state(path)["step"])
        except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as e:
            log.info("not resuming from %s: %s", path, e)
            continue
        if step > best_step:
            best, best_step = path, step
    if best is not None and verify:
        try:
            checkpoint_state(best, verify=True)
        except FileNotFoundError as e:
            log.warning("%s", e)
            return newest_complete([p for p in candidates if p != best], verify)
    return best


def given_checkpoint(tc) -> Optional[Path]:
    """``train.resume_from_checkpoint``, checked complete; None when unset."""
    from pogdiff.config import ConfigError

    if not tc.resume_from_checkpoint:
        return None
    path = Path(tc.resume_from_checkpoint)
    if newest_complete([path]) is None:
        raise ConfigError(f"train.resume_from_checkpoint: '{path}' is not a complete pogdiff checkpoint (a step_* "
                          "directory with trainer.json and the files its manifest lists)")
    return path


def load_unet_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "unet.safetensors"))


def apply_optimizer_settings(tc, scheduler) -> None:
    """This config's optimizer and LR-schedule settings on a restored optimizer and schedule, whose
    state_dicts bring back the ones they were saved with: ``train.lr`` through this config's
    schedule (its type, warm-up and length, counted from step 0) at the restored step, the weight
    decay, betas and eps. Unchanged settings give back the restored values exactly."""
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [tc.lr] * len(groups)
    lrs = [tc.lr * schedule(scheduler.last_epoch) for schedule in scheduler.lr_lambdas]  # as LambdaLR computes it
    for group, lr in zip(groups, lrs):
        group.update(lr=lr, initial_lr=tc.lr, weight_decay=tc.weight_decay, betas=(tc.adam_beta1, tc.adam_beta2),
                     eps=tc.adam_epsilon)
    scheduler._last_lr = lrs


def restore_checkpoint(path: Path, engine, ema: Optional[ShardedEMA], tc=None) -> tuple[int, dict]:
    """Optimizer, LR schedule, fp32 weights and EMA from ``path``; returns (the step to continue
    from, trainer.json). With ``tc`` (the run's TrainConfig), its optimizer and schedule settings
    then apply (``apply_optimizer_settings``), whatever the checkpoint trained with. The module
    should already hold ``load_unet_weights(path)`` (DeepSpeed partitions at init)."""
    state = checkpoint_state(path)
    if state["world_size"] != engine.world_size:
        raise ValueError(f"checkpoint '{path}' was written by {state['world_size']} workers, this job has "
                         f"{engine.world_size}: the optimizer state is sharded per worker; resume with "
                         f"dist.num_workers={state['world_size']}")
    engine.load_full_weights(load_unet_weights(path))
    engine.load_optimizer_state(load_state_dict(path / f"optimizer_rank{engine.rank}.safetensors"))
    engine.scheduler.load_state_dict(state["scheduler"])
    if tc is not None:
        apply_optimizer_settings(tc, engine.scheduler)
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise FileNotFoundError(f"train.ema is on but checkpoint '{path}' has no ema.safetensors")
        with safe_open(str(path / "ema.safetensors"), "pt") as f:
            updates = int(f.metadata()["updates"])
        ema.load(load_file(str(path / "ema.safetensors")), updates, engine.rank, engine.world_size)
    return int(state["step"]), state


class Checkpointer:
    """One-machine checkpoints ``<dir>/step_XXXXXXXX/``: written to a temp dir, then renamed; keeps K."""

    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def done(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step_*") if (p / "trainer.json").is_file())

    def latest(self) -> Optional[Path]:
        return newest_complete(sorted(self.root.glob("step_*")))

    def save(self, step: int, engine, ema: Optional[ShardedEMA], meta: Optional[dict] = None) -> Path:
        final = self.root / f"step_{step:08d}"
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(final) as tmp:
            write_checkpoint(tmp, engine, ema, step, meta)
        for old in self.done()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


