"""The per-worker training loop: batches of precomputed features -> objective -> optimizer step.

Kept short on purpose; the checkpointer, the objective and the data live beside it.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors.torch import load_file, save_file

from .config import Config
from .objectives import Batch, Objective

log = logging.getLogger("pogdiff.train")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return torch.device(name)


def epoch_batches(n: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
    """Endless batches of indices: a fresh seeded permutation each epoch, the last partial batch
    dropped (every step sees ``batch_size`` samples). Deterministic from (seed, step)."""
    if n < batch_size:
        raise ValueError(f"train.batch_size={batch_size} is larger than the dataset ({n} samples)")
    per_epoch = n // batch_size
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for i in range(offset, per_epoch):
            yield perm[i * batch_size:(i + 1) * batch_size]
        epoch, offset = epoch + 1, 0


class Checkpointer:
    """``<run>/checkpoints/step_XXXXXXXX/``: UNet (safetensors), optimizer + RNG (tensors only,
    loaded with weights_only=True), a JSON of the step. Written to a temp dir, then renamed."""

    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def latest(self) -> Optional[Path]:
        done = sorted(p for p in self.root.glob("step_*") if (p / "state.json").is_file())
        return done[-1] if done else None

    def save(self, step: int, unet: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}, str(tmp / "unet.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "rng": generator.get_state()}, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(p for p in self.root.glob("step_*") if (p / "state.json").is_file())[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def restore(self, path: Path, unet: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> int:
        unet.load_state_dict(load_file(str(path / "unet.safetensors")))
        state = torch.load(path / "trainer.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["rng"])
        return json.loads((path / "state.json").read_text())["step"]


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # every logged step's mean loss
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def train(
    cfg: Config,
    unet: torch.nn.Module,
    objective: Objective,
    latents: torch.Tensor,
    text: torch.Tensor,
    checkpoint_dir: Path,
    progress: bool = True,
) -> TrainResult:
    """Train ``unet`` in place on (latents, text) with ``objective``; resumes from ``checkpoint_dir``."""
    from tqdm import tqdm

    tc = cfg.train
    device = resolve_device(tc.device)
    unet.to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                                  betas=(tc.adam_beta1, tc.adam_beta2))
    generator = torch.Generator().manual_seed(tc.seed)
    checkpoint_every = tc.checkpoint_every
    ckpt = Checkpointer(checkpoint_dir)
    start = 0
    if checkpoint_every and (latest := ckpt.latest()) is not None:
        start = ckpt.restore(latest, unet, optimizer, generator)
        log.info("resumed from %s (step %d)", latest, start)

    def unet_fn(x, t, cond):
        return unet(x, t, encoder_hidden_states=cond).sample

    result = TrainResult(steps=start)
    batches = epoch_batches(latents.shape[0], tc.batch_size, tc.seed, start)
    t0, window = time.perf_counter(), []
    bar = tqdm(range(start, tc.steps), desc=f"train {cfg.method.name.value}", unit="step", disable=not progress,
               initial=start, total=tc.steps)
    for step in bar:
        index = next(batches)
        batch = Batch(index=index, latents=latents[index].to(device, torch.float32), text=text[index].to(device, torch.float32))
        log_now = (step + 1) % tc.log_every == 0 or step + 1 == tc.steps
        out = objective(unet_fn, batch, generator, with_terms=log_now)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), tc.grad_clip)
        optimizer.step()
        window.append(out.loss.detach())
        if log_now:
            mean_loss = float(torch.stack(window).mean())
            window.clear()
            entry = {"step": step + 1, "loss": mean_loss, "target_mse": float(out.target_mse.mean())}
            if out.pair_mse is not None:
                entry["pair_mse"] = float(out.pair_mse.mean())
                entry["pair_weight"] = float(out.weights.pair.mean())
            result.losses.append(mean_loss)
            result.history.append(entry)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        if checkpoint_every and (step + 1) % checkpoint_every == 0:
            ckpt.save(step + 1, unet, optimizer, generator)
        result.steps = step + 1
    result.seconds = time.perf_counter() - t0
    return result
