"""The per-worker training loop, shared by the one-machine run and the DeepSpeed workers.

    engine = LocalEngine(unet, cfg.train)      # or pogdiff.dist.worker.DeepSpeedEngine
    fit(cfg, engine, objective, batches, start_step, ...)

An engine has a DeepSpeed engine's contract: ``engine(x_t, t, cond)`` is the UNet's eps,
``backward(loss)`` + ``step()`` run once per micro-batch and the optimizer steps on every
``grad_accum``-th (with gradient clipping and the LR schedule). It also hands out full fp32
weights, its rank's optimizer state and the EMA shards, so one checkpoint format serves both.

Randomness is a pure function of (seed, rank, micro-batch) and the data of (seed, rank, world,
micro-batch): a run resumed from step k draws what an uninterrupted run draws after step k.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import Config, ModelConfig, TrainConfig
from .ema import ShardedEMA, flat_shard
from .features import FeatureSet
from .objectives import Batch, LossOutput, Objective

log = logging.getLogger("pogdiff.train")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return torch.device(name)


def step_generator(seed: int, rank: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank, micro]).generate_state(1)[0]))


# ---------------------------------------------------------------------------------------------- data

def epoch_batches(n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
    """Endless batches of dataset indices for ``rank`` of ``world``, from the ``start``-th on.

    Each epoch a fresh seeded permutation of all n samples is cut into ``world`` equal shares
    (n // world each, the remainder left out this epoch), and every share into
    ``n // world // batch_size`` full batches: every rank takes the same number of steps."""
    per_rank = n // world
    if per_rank < batch_size:
        raise ValueError(f"train.batch_size={batch_size} is larger than a worker's share of the dataset "
                         f"({n} samples / {world} workers)")
    per_epoch = per_rank // batch_size
    epoch, offset = divmod(start, per_epoch)
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        share = perm[rank * per_rank:(rank + 1) * per_rank]
        for i in range(offset, per_epoch):
            yield share[i * batch_size:(i + 1) * batch_size]
        epoch, offset = epoch + 1, 0


def train_batches(cfg: Config, feats: FeatureSet, rank: int, world: int, start_micro: int,
                  device: torch.device, dtype: torch.dtype) -> Iterator[Batch]:
    """The training data of one worker: the in-memory FeatureSet, rank-split and seeded.
    (The one place a streaming reader plugs in: it must yield the same ``Batch``es.)"""
    for index in epoch_batches(len(feats), cfg.train.batch_size, cfg.train.seed, start_micro, rank, world):
        yield Batch(index=index, latents=feats.latents[index].to(device, dtype), text=feats.text[index].to(device, dtype))


# --------------------------------------------------------------------------- model and optimizer setup

def configure_unet(unet: torch.nn.Module, cfg: ModelConfig, device: torch.device) -> None:
    """Gradient checkpointing and the attention kernel (SDPA is diffusers' default processor)."""
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    want_xformers = cfg.attention == "xformers" or (cfg.attention == "auto" and device.type == "cuda")
    if want_xformers:
        try:
            import xformers  # noqa: F401
        except ImportError:
            if cfg.attention == "xformers":
                raise RuntimeError("model.attention=xformers but xformers is not installed "
                                   "(pip install 'pogdiff[gpu]'), or use model.attention=sdpa") from None
            return
        unet.enable_xformers_memory_efficient_attention()


def build_optimizer(tc: TrainConfig, params) -> torch.optim.Optimizer:
    kw = dict(lr=tc.lr, weight_decay=tc.weight_decay, betas=(tc.adam_beta1, tc.adam_beta2))
    if tc.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def build_lr_scheduler(tc: TrainConfig, optimizer: torch.optim.Optimizer):
    from diffusers.optimization import get_scheduler

    return get_scheduler(tc.lr_scheduler, optimizer, num_warmup_steps=tc.lr_warmup_steps, num_training_steps=tc.steps)


class LocalEngine:
    """One process, one device: the engine contract over a plain torch optimizer."""

    rank, world_size = 0, 1

    def __init__(self, unet: torch.nn.Module, tc: TrainConfig):
        self.module, self.tc = unet, tc
        self.optimizer = build_optimizer(tc, unet.parameters())
        self.scheduler = build_lr_scheduler(tc, self.optimizer)
        self.micro_steps, self.grad_norm = 0, None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.module(x, t, encoder_hidden_states=cond).sample

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.tc.grad_accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.tc.grad_accum:
            return
        if self.tc.grad_clip > 0:
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.tc.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def param_shards(self) -> list[torch.Tensor]:
        return [flat_shard(p.detach(), self.rank, self.world_size) for _, p in self.named_parameters()]

    def all_gather(self, shard: torch.Tensor) -> list[torch.Tensor]:
        return [shard]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def full_weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu().clone() for n, p in self.named_parameters()}

    def load_full_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(weights, strict=False)

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def make_ema(cfg: TrainConfig, engine) -> Optional[ShardedEMA]:
    if not cfg.ema:
        return None
    named = engine.named_parameters()
    device = torch.device("cpu") if cfg.ema_offload else None
    # A ZeRO-3 parameter is an empty placeholder; ds_shape is its real shape.
    return ShardedEMA([n for n, _ in named], [getattr(p, "ds_shape", p.shape) for _, p in named],
                      engine.param_shards(), cfg.ema_decay, device)


# ------------------------------------------------------------------------------------------ checkpoints

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


def write_checkpoint(path: Path, engine, ema: Optional[ShardedEMA], step: int, meta: dict | None = None) -> None:
    """Every rank calls this (the weight and EMA gathers are collective); each rank writes its own
    optimizer shard, rank 0 the full UNet (fp32 safetensors), the EMA and ``trainer.json``."""
    weights = engine.full_weights()
    ema_weights = ema.gather(engine.all_gather) if ema is not None else None
    path.mkdir(parents=True, exist_ok=True)
    save_state_dict(engine.optimizer_state(), path / f"optimizer_rank{engine.rank}.safetensors")
    if engine.rank != 0:
        return
    save_file(weights, str(path / "unet.safetensors"))
    if ema_weights is not None:
        save_file(ema_weights, str(path / "ema.safetensors"), metadata={"updates": str(ema.updates)})
    state = {"step": step, "world_size": engine.world_size, "scheduler": engine.scheduler.state_dict(), **(meta or {})}
    (path / "trainer.json").write_text(json.dumps(state, indent=1))


def checkpoint_state(path: Path) -> dict:
    """``trainer.json`` of a complete checkpoint; a clear error naming what is missing otherwise."""
    path = Path(path)
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"checkpoint '{path}' has no trainer.json: it is incomplete; delete it to fall back")
    state = json.loads((path / "trainer.json").read_text())
    needed = ["unet.safetensors"] + [f"optimizer_rank{r}.safetensors" for r in range(state["world_size"])]
    if missing := [f for f in needed if not (path / f).is_file()]:
        raise FileNotFoundError(f"checkpoint '{path}' is incomplete, missing {missing}; delete it to fall back")
    return state


def load_unet_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "unet.safetensors"))


def restore_checkpoint(path: Path, engine, ema: Optional[ShardedEMA]) -> int:
    """Optimizer, LR schedule, fp32 weights and EMA from ``path``; returns the step to continue from.
    The module should already hold ``load_unet_weights(path)`` (DeepSpeed partitions at init)."""
    state = checkpoint_state(path)
    if state["world_size"] != engine.world_size:
        raise ValueError(f"checkpoint '{path}' was written by {state['world_size']} workers, this job has "
                         f"{engine.world_size}: the optimizer state is sharded per worker; resume with "
                         f"dist.num_workers={state['world_size']}")
    engine.load_full_weights(load_unet_weights(path))
    engine.load_optimizer_state(load_state_dict(path / f"optimizer_rank{engine.rank}.safetensors"))
    engine.scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise FileNotFoundError(f"train.ema is on but checkpoint '{path}' has no ema.safetensors")
        with safe_open(str(path / "ema.safetensors"), "pt") as f:
            updates = int(f.metadata()["updates"])
        ema.load(load_file(str(path / "ema.safetensors")), updates, engine.rank, engine.world_size)
    return int(state["step"])


class Checkpointer:
    """One-machine checkpoints ``<dir>/step_XXXXXXXX/``: written to a temp dir, then renamed; keeps K."""

    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def done(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step_*") if (p / "trainer.json").is_file())

    def latest(self) -> Optional[Path]:
        done = self.done()
        return done[-1] if done else None

    def save(self, step: int, engine, ema: Optional[ShardedEMA]) -> Path:
        final, tmp = self.root / f"step_{step:08d}", self.root / f".tmp_step_{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_checkpoint(tmp, engine, ema, step)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in self.done()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


# ------------------------------------------------------------------------------------------------ loop

@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # every logged step's mean loss
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def train_step(engine, objective: Objective, batches: Iterator[Batch], seed: int, step: int, grad_accum: int,
               with_terms: bool) -> tuple[torch.Tensor, list[tuple[Batch, LossOutput]]]:
    """One optimizer step over ``grad_accum`` micro-batches: (mean loss, per-micro-batch outputs)."""
    losses, outs = [], []
    for micro in range(grad_accum):
        batch = next(batches)
        out = objective(engine, batch, step_generator(seed, engine.rank, step * grad_accum + micro), with_terms)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.detach().float())
        if with_terms:
            outs.append((batch, out))
    return torch.stack(losses).mean(), outs


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
    """Rank 0: ``metrics.jsonl`` (appended, survives restarts) and TensorBoard scalars/images."""

    def __init__(self, out_dir: Path, tensorboard: bool, enabled: bool = True, fresh: bool = False):
        self.enabled, self.writer = enabled, None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = out_dir / "metrics.jsonl"
            if fresh:  # a run from step 0 replaces an earlier run's logs
                self.jsonl.unlink(missing_ok=True)
                shutil.rmtree(out_dir / "tb", ignore_errors=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tb"))

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def image(self, step: int, tag: str, image) -> None:
        if self.enabled and self.writer:
            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def fit(cfg: Config, engine, objective: Objective, batches: Iterator[Batch], start_step: int, out_dir: Path,
        is_minority: torch.Tensor, ema: Optional[ShardedEMA] = None,
        save: Optional[Callable[[int], None]] = None, validate: Optional[Callable[[int, MetricsLog], None]] = None,
        after_step: Optional[Callable[[int], None]] = None, progress: bool = True) -> TrainResult:
    """Steps ``start_step`` .. ``train.steps`` on every rank; rank 0 logs. ``save(step)`` runs every
    ``train.checkpoint_every`` steps and ``validate(step)`` every ``train.validate_every`` (both on
    every rank: they gather)."""
    from tqdm import tqdm

    tc, rank0 = cfg.train, engine.rank == 0
    pair_tag = "psi" if cfg.method.name.value == "pogdiff" else "pair_weight"
    metrics = MetricsLog(out_dir, tc.tensorboard, enabled=rank0, fresh=start_step == 0)
    result = TrainResult(steps=start_step)
    window: list[torch.Tensor] = []
    t0 = time.perf_counter()
    bar = tqdm(range(start_step, tc.steps), desc=f"train {cfg.method.name.value}", unit="step",
               disable=not (progress and rank0), initial=start_step, total=tc.steps,
               mininterval=0.1 if sys.stderr.isatty() else 10.0)  # Ray forwards every redraw as a log line
    for step in bar:
        done = step + 1
        log_now = done % tc.log_every == 0 or done == tc.steps
        loss, outs = train_step(engine, objective, batches, tc.seed, step, tc.grad_accum, log_now)
        if ema is not None:
            ema.update(engine.param_shards())
        window.append(loss)
        if log_now:
            sums = engine.all_reduce_sum(torch.cat([torch.stack([torch.stack(window).sum().double(),
                                                                 torch.tensor(len(window), dtype=torch.float64)]),
                                                    term_stats(outs, is_minority)]))
            window.clear()
            n, head, tail = sums[2], sums[6], sums[8]
            entry = {"loss": float(sums[0] / sums[1]), "target_mse": float(sums[3] / n), "lr": engine.lr,
                     "grad_norm": None if engine.grad_norm is None else float(engine.grad_norm)}
            if objective.cfg.name.value in ("pogdiff", "cbdm"):
                entry["pair_mse"] = float(sums[4] / n)
                entry[f"{pair_tag}/head"] = float(sums[5] / head) if head else None
                entry[f"{pair_tag}/tail"] = float(sums[7] / tail) if tail else None
            metrics.scalars(done, entry)
            result.losses.append(entry["loss"])
            result.history.append({"step": done, **entry})
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
        if validate and tc.validate_every and done % tc.validate_every == 0:
            validate(done, metrics)
        if save and (done == tc.steps or (tc.checkpoint_every and done % tc.checkpoint_every == 0)):
            save(done)
        result.steps = done
        if after_step:
            after_step(done)
    metrics.close()
    result.seconds = time.perf_counter() - t0
    return result


class Validator:
    """DDIM sample grids (prompts x images) from the EMA, else the raw weights: every rank gathers,
    rank 0 samples and writes ``samples/step_XXXXXXXX.png`` and a TensorBoard image."""

    def __init__(self, cfg: Config, engine, ema: Optional[ShardedEMA], model_dir: Path, out_dir: Path, prompts: list[str]):
        self.cfg, self.engine, self.ema, self.model_dir, self.out_dir, self.prompts = cfg, engine, ema, model_dir, out_dir, prompts

    def __call__(self, step: int, metrics: MetricsLog) -> Path | None:
        from .export import build_unet, image_grid, make_pipeline

        weights = self.ema.gather(self.engine.all_gather) if self.ema is not None else self.engine.full_weights()
        if self.engine.rank != 0:
            return None
        tc = self.cfg.train
        device = resolve_device(tc.device) if self.engine.world_size == 1 else next(self.engine.module.parameters()).device
        pipe = make_pipeline(self.model_dir, build_unet(self.model_dir, weights)).to(device)
        pipe.set_progress_bar_config(disable=True)
        images = pipe([p for p in self.prompts for _ in range(tc.validation_images)],
                      num_inference_steps=tc.validation_ddim_steps, guidance_scale=self.cfg.sample.guidance_scale,
                      generator=torch.Generator().manual_seed(self.cfg.sample.seed)).images
        grid = image_grid(images, rows=len(self.prompts))
        path = self.out_dir / "samples" / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        metrics.image(step, "validation", grid)
        return path


def default_prompts(cfg: Config, feats: FeatureSet) -> list[str]:
    """``train.validation_prompts``, else the most and the least frequent identity's name."""
    if cfg.train.validation_prompts:
        return list(cfg.train.validation_prompts)
    counts = feats.id_counts()
    name = {i: n for i, n in zip(feats.identities.tolist(), feats.names)}
    head, tail = max(counts, key=counts.get), min(counts, key=counts.get)
    return [cfg.sample.prompt_template.format(p=name[i]) for i in dict.fromkeys([head, tail])]


def train(cfg: Config, unet: torch.nn.Module, objective: Objective, feats: FeatureSet, out_dir: Path,
          model_dir: Optional[Path] = None, progress: bool = True) -> tuple[TrainResult, dict[str, torch.Tensor]]:
    """One machine: train ``unet`` in place, resuming from ``out_dir/checkpoints``.
    Returns the result and the weights to export (the EMA when ``train.ema``)."""
    tc = cfg.train
    device = resolve_device(tc.device)
    ckpt = Checkpointer(out_dir / "checkpoints", keep=tc.checkpoint_keep)
    latest = ckpt.latest() if tc.checkpoint_every else None
    if latest is not None:
        unet.load_state_dict(load_unet_weights(latest))
    configure_unet(unet, cfg.model, device)
    unet.to(device).train()
    engine = LocalEngine(unet, tc)
    ema = make_ema(tc, engine)
    start = 0
    if latest is not None:
        start = restore_checkpoint(latest, engine, ema)
        log.info("resumed from %s (step %d)", latest, start)
    batches = train_batches(cfg, feats, 0, 1, start * tc.grad_accum, device, torch.float32)
    validate = Validator(cfg, engine, ema, model_dir, out_dir, default_prompts(cfg, feats)) if model_dir and tc.validate_every else None
    save = (lambda step: ckpt.save(step, engine, ema)) if tc.checkpoint_every else None
    result = fit(cfg, engine, objective, batches, start, out_dir, feats.is_minority(cfg.data.minority_images),
                 ema=ema, save=save, validate=validate, progress=progress)
    return result, (ema.gather(engine.all_gather) if ema is not None else engine.full_weights())
