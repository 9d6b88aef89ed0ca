"""Training metrics: ``metrics.jsonl`` (appended, survives restarts) and TensorBoard, on rank 0."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
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
        if fresh:
            archive_logs(out_dir)
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


LOGS = ("metrics.jsonl", "history.json", "tb")


def archive_logs(out_dir: Path) -> Optional[Path]:
    """A run from step 0 (train.resume=never, or nothing to resume) over an earlier run's logs moves
    them to ``archive/<UTC time>/``: history is only ever appended to or archived, never lost."""
    old = [out_dir / name for name in LOGS if (out_dir / name).exists()]
    if not old:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = out_dir / "archive" / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = out_dir / "archive" / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for path in old:
        shutil.move(str(path), str(dest / path.name))
    return dest


def read_history(metrics_jsonl: Path) -> list[dict]:
    """The logged steps, the last record of each step (steps re-run after a restart log twice)."""
    by_step = {}
    if metrics_jsonl.is_file():
        for line in metrics_jsonl.read_text().splitlines():
            entry = json.loads(line)
            by_step[entry["step"]] = entry
    return [by_step[s] for s in sorted(by_step)]


def write_history(cfg: Config, psi_stats: dict, seconds: float) -> None:
    """``history.json`` of a finished run: every step logged since it started from step 0 (what
    earlier invocations logged included), psi's head/tail summary, this invocation's seconds."""
    files = RunFiles(cfg)
    write_json(files.history, {"method": cfg.method.name.value, "psi": psi_stats,
                               "history": read_history(files.method / "metrics.jsonl"), "seconds": seconds})
