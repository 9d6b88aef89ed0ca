"""Where a run's files live, and the small helpers every stage shares (one home each): absolute
paths, atomic writes, seed derivation and fingerprints.

    <output_dir>/<run_name>/<method tag>/   unet/, pipeline/, history.json, metrics.jsonl, tb/, ranks/,
                                            checkpoints/ (one machine), generated/, metrics.json
    <output_dir>/datasets/<name>-<fp>/      prepared datasets (pogdiff.data.dataset), shared by runs
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pogdiff.config import Config, Method, load_config


def is_uri(path: str) -> bool:
    """``s3://…``, ``gs://…`` and the like: handed to Ray unchanged, never resolved locally."""
    return "://" in path


def _absolute(path: str | None, must_exist: bool = False) -> str | None:
    if path is None or is_uri(path):
        return path
    p = Path(path).expanduser()
    if must_exist and not p.exists():
        return path  # a hub id or a keyword ("tiny", "synthetic"): not a path
    return str(p.resolve())


def absolute_paths(cfg: Config) -> Config:
    """``cfg`` with every path made absolute against the current directory, so that Ray workers
    (which run in directories of their own) and later verbs find the same files. URIs and names
    that are not existing paths (``tiny``, ``synthetic``, hub ids) stay as they are."""
    d, p, m, e, dc = cfg.data, cfg.prepare, cfg.model, cfg.eval, cfg.dist
    return dataclasses.replace(
        cfg,
        output_dir=_absolute(cfg.output_dir),
        model=dataclasses.replace(m, name=_absolute(m.name, must_exist=True)),
        data=dataclasses.replace(d, source=_absolute(d.source, must_exist=True),
                                 image_encoder=_absolute(d.image_encoder, must_exist=True)),
        prepare=dataclasses.replace(p, output=_absolute(p.output), image_root=_absolute(p.image_root)),
        eval=dataclasses.replace(e, encoder=_absolute(e.encoder, must_exist=True)),
        dist=dataclasses.replace(dc, storage_path=_absolute(dc.storage_path), deepspeed_json=_absolute(dc.deepspeed_json)),
        experiment=dataclasses.replace(cfg.experiment, report_dir=_absolute(cfg.experiment.report_dir)),
    )


def load_run_config(path: str | Path | None, overrides=()) -> Config:
    """What every verb runs on: the config (file + overrides, validated) with absolute paths."""
    return absolute_paths(load_config(path, overrides))


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a file so that readers see the old content or the new, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


def derive_seed(*parts: int) -> int:
    """One 32-bit seed from integers (numpy's SeedSequence): streams, steps and workers never share one."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def fingerprint(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def method_tag(cfg: Config) -> str:
    m = cfg.method
    tag = m.name.value
    if m.name == Method.pogdiff:
        tag += f"-{m.grad_mode.value}" + ("" if m.psi_img else "-no_psi_img") + ("" if m.psi_inv else "-no_psi_inv")
    return f"{tag}-seed{cfg.train.seed}"


class RunFiles:
    """One trained method of a run; every path absolute when the config's are (cli does that)."""

    def __init__(self, cfg: Config):
        self.root = Path(cfg.output_dir) / cfg.run_name
        self.method = self.root / method_tag(cfg)
        self.unet = self.method / "unet"  # the exported UNet (EMA when train.ema), diffusers format
        self.pipeline = self.method / "pipeline"  # a StableDiffusionPipeline directory around it
        self.history = self.method / "history.json"
        self.checkpoints = self.method / "checkpoints"
        self.metrics = self.method / "metrics.json"
        self.samples = self.method / "generated"
