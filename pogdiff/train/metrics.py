"""Training metrics: ``metrics.jsonl`` (appended, survives restarts) and TensorBoard, on rank 0."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pogdiff.config import Config
from pogdiff.method.objectives import Batch, LossOutput
from pogdiff.runs import RunFiles, write_json


def term_stats(outs: list[tuple[Batch, LossOutput]], is_minority: torch.Tensor) -> torch.Tensor:
    """Sums to all-reduce: [n, target_mse, pair_mse, pair_weight head, n head, pair_weight tail, n tail]."""
    s = torch.zeros(7, dtype=torch.float64)
    for batch, out in outs:
        s[0] += len(batch.index)
        s[1] += out.target_mse.double().sum().cpu()
        if out.pair_mse is not None:
            s[2] += out.pair_mse.double().sum().cpu()
            w, tail = out.weights.pair.detach().double().cpu(), is_minority[batch.index]
            s[3:7] += torch.stack([w[~tail].sum(), (~tail).sum().double(), w[tail].sum(), tail.sum().double()])
    return s


class MetricsLog:
    """Rank 0: ``metrics.jsonl`` (appended, survives restarts) and the trackers of ``train.report_to``
    (TensorBoard under ``tb/``, Weights & Biases under ``wandb/``, resumed into the same W&B run)."""

    def __init__(self, out_dir: Path, report_to: str, enabled: bool = True, fresh: bool = False,
                 config: Optional[dict] = None):
        self.enabled, self.writer, self.wandb = enabled, None, None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = out_dir / "metrics.jsonl"
        if fresh:  # a run from step 0 replaces an earlier run's logs
            self.jsonl.unlink(missing_ok=True)
            shutil.rmtree(out_dir / "tb", ignore_errors=True)
        if report_to in ("tensorboard", "all"):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tb"))
        if report_to in ("wandb", "all"):
            try:
                import wandb
            except ImportError:
                raise RuntimeError("train.report_to=wandb needs wandb: pip install 'pogdiff[wandb]'") from None
            run_id = hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:16]  # one W&B run per run dir
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "pogdiff"), name=f"{out_dir.parent.name}/{out_dir.name}",
                                    id=run_id, resume="allow", dir=str(out_dir), config=config)

    def scalars(self, step: int, values: dict, trackers_only: bool = False) -> None:
        if not self.enabled:
            return
        if not trackers_only:
            with self.jsonl.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        values = {k: v for k, v in values.items() if v is not None}
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.wandb:
            self.wandb.log(values, step=step)

    def image(self, step: int, tag: str, image) -> None:
        if self.enabled and self.writer:
            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
            self.writer.flush()
        if self.enabled and self.wandb:
            import wandb

            self.wandb.log({tag: wandb.Image(np.asarray(image))}, step=step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()


def write_history(cfg: Config, psi_stats: dict, result) -> None:
    """``history.json`` of a finished run: the logged steps, psi's head/tail summary, seconds."""
    write_json(RunFiles(cfg).history, {"method": cfg.method.name.value, "psi": psi_stats, "history": result.history,
                                       "seconds": result.seconds})
