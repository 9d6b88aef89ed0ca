"""The per-worker training loop, shared by the one-machine run and the DeepSpeed workers
(pogdiff.train.assembly puts it together for both):

    inputs = training_inputs(cfg, dataset, device)         # UNet, objective (text encoder, psi, density)
    engine = LocalEngine(inputs.unet, cfg.train)            # or pogdiff.dist.worker.DeepSpeedEngine
    batches = stream_batches(make_loader(cfg, dataset, rank, world), start_step * grad_accum, device, dtype)
    fit(cfg, engine, inputs.objective, batches, start_step, ...)

An engine has a DeepSpeed engine's contract: ``engine(x_t, t, cond)`` is the UNet's eps,
``backward(loss)`` + ``step()`` run once per micro-batch and the optimizer steps on every
``grad_accum``-th (with gradient clipping and the LR schedule). It also hands out full fp32
weights, its rank's optimizer state and the EMA shards, so one checkpoint format serves both.

Every rank streams the prepared shards (pogdiff.data.stream, resampled, the same number of
batches per epoch on every rank). Randomness is a pure function of (seed, rank, micro-batch) and
the stream of (seed, epoch, rank, world, DataLoader workers): a run resumed from step k skips the
stream to micro-batch k * grad_accum and draws what an uninterrupted run draws after step k.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from pogdiff.config import Config, ConfigError, Method, ModelConfig, TrainConfig
from pogdiff.data.dataset import Dataset
from pogdiff.data.shards import MinorityRows
from pogdiff.method.objectives import Batch, LossOutput, Objective, TextConditioner
from pogdiff.models.components import unet_kwargs
from pogdiff.npyrows import NpyRows
from pogdiff.seeds import derive_seed
from pogdiff.train.ema import ShardedEMA, flat_shard
from pogdiff.train.metrics import MetricsLog, term_stats

log = logging.getLogger("pogdiff.train")


def step_generator(seed: int, rank: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, rank, micro))


# ---------------------------------------------------------------------------------------------- data

def make_loader(cfg: Config, ds: Dataset, rank: int, world: int):
    """This rank's reader of the dataset's shards (resampled; equal batch counts on every rank).
    Its skips are named when a batch carrying them is trained on (``stream_batches``)."""
    from pogdiff.data.stream import make_train_loader

    return make_train_loader(ds.root, cfg.train.batch_size, rank, world, num_workers=cfg.data.dataloader_num_workers,
                             seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                             random_flip=cfg.data.random_flip, log_skips=False)


def stream_batches(loader, start_micro: int, device: torch.device, dtype: torch.dtype) -> Iterator[Batch]:
    """Endless ``Batch``es from ``loader`` starting at micro-batch ``start_micro`` of the stream
    (the data position of a checkpoint): the epoch is set, then the batches before it are skipped.
    The reader's skips that each yielded batch carries are logged as it is yielded, one line each
    naming the rank, epoch, micro-batch and the skip's number in it: what is read ahead and never
    trained on, or re-read up to a checkpoint's position (the run that wrote it counted those), is
    not named again."""
    epoch, skip = divmod(start_micro, len(loader))
    loader.set_epoch(epoch)
    rank, micro = getattr(getattr(loader, "stream", None), "rank", 0), start_micro
    while True:
        epoch, skipped, recounted = loader.epoch, 0, 0
        for b in loader:
            if skip:
                skip -= 1
                recounted += b.get("skipped", 0)
                continue
            skips = b.get("skips", ())
            for i, why in enumerate(skips, 1):  # a sample drawn twice (resampled shards) is skipped twice
                log.warning("rank %d, epoch %d, micro-batch %d, skip %d/%d: %s", rank, epoch, micro, i, len(skips), why)
            skipped += b.get("skipped", 0)
            micro += 1
            yield Batch(index=b["index"], latents=b["latents"].to(device, dtype), tokens=b["tokens"], keys=b["key"],
                        skipped=b.get("skipped", 0), time_ids=b.get("time_ids"))
        if recounted:
            log.info("rank %d, epoch %d: %d skipped samples before micro-batch %d were counted by the run that wrote "
                     "the checkpoint", rank, epoch, recounted, start_micro)
        if skipped:
            log.warning("rank %d, epoch %d: the reader skipped %d samples (unreadable shards, corrupt or non-finite "
                        "samples; see the warnings above)", rank, epoch, skipped)


def data_position(cfg: Config, loader, step: int) -> dict:
    """What a checkpoint records of the stream (resume checks it against the resumed job's)."""
    return {"micro_batches": step * cfg.train.grad_accum, "epoch_len": len(loader), "seed": cfg.train.seed,
            "world_size": loader.stream.world_size, "dataloader_num_workers": loader.num_workers}


def check_data_position(saved: Optional[dict], now: dict) -> None:
    if saved and any(saved.get(k) != now[k] for k in ("epoch_len", "seed", "world_size", "dataloader_num_workers")):
        log.warning("the checkpoint's data stream was %s, this job's is %s: training continues at micro-batch %d of "
                    "a different stream, not the samples an uninterrupted run would see", saved, now,
                    now["micro_batches"])


# --------------------------------------------------------------------------- model and objective setup

def text_conditioner(model_dir: str, ds: Dataset, device: torch.device) -> TextConditioner:
    """The frozen text encoder(s) over the dataset's memory-mapped token table."""
    from pogdiff.models.components import encode_tokens, freeze, load_components, tokenize
    from pogdiff.train.diagnostics import NameTokens

    c = load_components(ModelConfig(name=model_dir), with_unet=False, with_vae=False)
    for encoder in c.text_encoders:
        freeze(encoder.to(device))
    null = tokenize(c, [""])[0]
    if len(null) != ds.index.tokens.shape[1]:
        raise ValueError(f"the dataset '{ds.root}' holds {ds.index.tokens.shape[1]} token ids per caption, the model "
                         f"'{model_dir}' makes {len(null)}: the dataset was prepared with another model")
    pooled = c.text_encoder_2.config.projection_dim if c.family == "sdxl" else None
    text = TextConditioner(lambda ids: encode_tokens(c, ids, device)[0], NpyRows(ds.root / "tokens.npy"), null,
                           pooled)
    text.names = NameTokens.of_dataset([c.tokenizer, c.tokenizer_2], ds.index)  # the name-only probe's
    return text


def build_objective(cfg: Config, ds: Dataset, text: TextConditioner, alphas_cumprod: torch.Tensor,
                    prediction_type: str = "epsilon") -> Objective:
    """The method's objective over the dataset's artifacts (rows are read per batch)."""
    from pogdiff.data.dataset import text_density, training_tables
    from pogdiff.method.neighbours import NeighbourSampler

    m = cfg.method
    sampler = log_density = None
    if m.name == Method.pogdiff:
        sampler = NeighbourSampler(*training_tables(cfg, ds))
    if m.name == Method.t2h:
        _, nll = text_density(cfg, ds, progress=False)
        log_density = -torch.from_numpy(nll)
    tc = cfg.train
    return Objective(m, alphas_cumprod, text=text, sampler=sampler, log_density=log_density,
                     caption_dropout=tc.caption_dropout, backend=tc.loss_backend, snr_gamma=tc.snr_gamma,
                     noise_offset=tc.noise_offset, input_perturbation=tc.input_perturbation,
                     prediction_type=prediction_type)


@dataclass
class TrainingInputs:
    unet: torch.nn.Module  # the dataset model's UNet, the starting point
    objective: Objective
    is_minority: MinorityRows  # per dataset row, read by rows: the psi head/tail split of the logs
    identities: NpyRows  # (N,) identity per dataset row, read by rows: the diagnostics' same-identity tests


def training_inputs(cfg: Config, ds: Dataset, device: torch.device) -> TrainingInputs:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(ds.model_dir, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(ds.model_dir, subfolder="scheduler")
    prediction_type = cfg.train.prediction_type or scheduler.config.prediction_type  # the model's, unless overridden
    objective = build_objective(cfg, ds, text_conditioner(ds.model_dir, ds, device), scheduler.alphas_cumprod,
                                prediction_type)
    return TrainingInputs(unet, objective, ds.index.is_minority(cfg.data.minority_images),
                          NpyRows(ds.root / "identities.npy"))


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


def configure_backends(tc: TrainConfig, device: torch.device) -> None:
    if device.type == "cuda" and tc.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast_dtype(tc: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``train.mixed_precision`` on ``device`` (None: fp32)."""
    mp = tc.mixed_precision
    if mp == "no" or (mp == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ConfigError(f"train.mixed_precision={mp} needs a CUDA device, but this run is on {device.type}: "
                          "use train.mixed_precision=auto or no (fp32)")
    if mp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[mp]


def resolve_schedule(cfg: Config, num_samples: int, world_size: int) -> Config:
    """``cfg`` with what depends on the data and the world made concrete: ``train.steps`` from
    ``num_train_epochs``, ``validate_every`` from ``validation_epochs``, ``lr`` by ``scale_lr``."""
    import math

    tc = cfg.train
    samples_per_step = tc.batch_size * tc.grad_accum * world_size
    steps_per_epoch = max(1, math.ceil(num_samples / samples_per_step))
    changes = {}
    if tc.num_train_epochs is not None:
        changes["steps"] = tc.num_train_epochs * steps_per_epoch
    if tc.validation_epochs is not None:
        changes["validate_every"] = tc.validation_epochs * steps_per_epoch
    if tc.scale_lr:
        changes["lr"] = tc.lr * samples_per_step
    if changes:
        log.info("%s (%d samples, %d per step)", ", ".join(f"train.{k}={v:g}" for k, v in changes.items()),
                 num_samples, samples_per_step)
    return dataclasses.replace(cfg, train=dataclasses.replace(tc, **changes))


def build_optimizer(tc: TrainConfig, params) -> torch.optim.Optimizer:
    kw = dict(lr=tc.lr, weight_decay=tc.weight_decay, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_epsilon)
    if tc.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def build_lr_scheduler(tc: TrainConfig, optimizer: torch.optim.Optimizer):
    from diffusers.optimization import get_scheduler

    return get_scheduler(tc.lr_scheduler, optimizer, num_warmup_steps=tc.lr_warmup_steps, num_training_steps=tc.steps)


class LocalEngine:
    """One process, one device: the engine contract over a plain torch optimizer."""

    rank, world_size, dtype = 0, 1, torch.float32  # dtype: what the batches' latents are cast to

    def __init__(self, unet: torch.nn.Module, tc: TrainConfig, autocast: Optional[torch.dtype] = None):
        self.module, self.tc, self.autocast = unet, tc, autocast
        self.device_type = next(unet.parameters()).device.type
        self.optimizer = build_optimizer(tc, [p for p in unet.parameters() if p.requires_grad])
        self.scheduler = build_lr_scheduler(tc, self.optimizer)
        # fp16's narrow range needs loss scaling; bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(self.device_type) if autocast == torch.float16 else None
        self.micro_steps, self.grad_norm = 0, None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.autocast, enabled=self.autocast is not None):
            return self.module(x, t, **unet_kwargs(getattr(self.module, "config", None), cond)).sample.float()

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.tc.grad_accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.tc.grad_accum:
            return
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.tc.grad_clip if self.tc.grad_clip > 0 else float("inf"))
        self.grad_norm = float(norm)
        if not torch.isfinite(norm):  # as DeepSpeed does on overflow: no update from a non-finite gradient
            if self.scaler:  # fp16 overflow: the scaler lowers its scale, as it does at the start of every run
                self.scaler.update()
            else:
                log.warning("non-finite gradient norm: skipping this optimizer step")
            self.optimizer.zero_grad(set_to_none=True)
            return
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
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


# ------------------------------------------------------------------------------------------------ loop

@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # every logged step's mean loss
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class SkipCount:
    """Samples the reader skipped in the micro-batches this rank trained on; rank 0 starts from the
    run's total at the checkpoint it resumed from. ``total`` sums over the ranks (collective)."""

    def __init__(self, before: int = 0):
        self.samples = before

    def total(self, engine) -> int:
        return int(engine.all_reduce_sum(torch.tensor([float(self.samples)], dtype=torch.float64)).item())


class NonFiniteGuard:
    """Keeps non-finite losses out of the weights. A micro-batch whose loss is not finite on any rank
    (the flag is all-reduced, so every rank decides alike) gets no backward and no optimizer step;
    the keys of its non-finite samples are logged and counted, a sample seen in two bad micro-batches
    is quarantined (``stream_batches`` drops it), and ``max_bad_steps`` bad steps in a row raise."""

    def __init__(self, max_bad_steps: int, data_skipped: Optional[SkipCount] = None):
        self.max_bad_steps = max_bad_steps
        self.strikes: dict[int, int] = {}  # dataset row -> bad micro-batches it was in
        self.quarantined: set[int] = set()
        self.bad_steps = self.in_a_row = 0
        self.data_skipped = data_skipped or SkipCount()  # as the batches trained on report them

    def is_bad(self, engine, batch: Batch, out) -> bool:
        bad_here = ~torch.isfinite(out.per_sample if out.per_sample is not None else out.loss.reshape(1)).cpu()
        flag = engine.all_reduce_sum(torch.tensor([float(bad_here.any())], dtype=torch.float64))
        if not flag.item():
            return False
        rows = batch.index[bad_here].tolist() if bad_here.shape == batch.index.shape else []
        keys = [batch.keys[i] for i in bad_here.nonzero().flatten().tolist()] if batch.keys and rows else []
        for row in rows:
            self.strikes[row] = self.strikes.get(row, 0) + 1
            if self.strikes[row] >= 2:
                self.quarantined.add(row)
        log.warning("rank %d: non-finite loss; skipping this micro-batch on every rank (non-finite samples here: %s)",
                    engine.rank, keys or "none on this rank")
        return True

    def step_done(self, step: int, bad: bool) -> None:
        if not bad:
            self.in_a_row = 0
            return
        self.bad_steps += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_bad_steps:
            raise FloatingPointError(
                f"{self.in_a_row} training steps in a row up to step {step} had a non-finite loss "
                f"(train.max_bad_steps={self.max_bad_steps}); the weights and checkpoints are untouched by them. "
                "Check the data (see the sample keys logged above), lower train.lr, or resume from the last checkpoint")


def train_step(engine, objective: Objective, batches: Iterator[Batch], seed: int, step: int, grad_accum: int,
               with_terms: bool, guard: Optional[NonFiniteGuard] = None
               ) -> tuple[torch.Tensor, list[tuple[Batch, LossOutput]], float, bool]:
    """One optimizer step over ``grad_accum`` micro-batches: (mean loss of the good micro-batches,
    per-micro-batch outputs, seconds spent waiting for data, whether any micro-batch was skipped)."""
    losses, outs, waited, skipped = [], [], 0.0, False
    for micro in range(grad_accum):
        t = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - t
        if guard is not None:
            guard.data_skipped.samples += batch.skipped
        out = objective(engine, batch, step_generator(seed, engine.rank, step * grad_accum + micro), with_terms, step)
        if guard is not None and guard.is_bad(engine, batch, out):
            skipped = True
            continue
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.detach().float())
        if with_terms:
            outs.append((batch, out))
    loss = torch.stack(losses).mean() if losses else torch.tensor(float("nan"))
    return loss, outs, waited, skipped


def _without(batches: Iterator[Batch], quarantined: set[int]) -> Iterator[Batch]:
    """The batches without quarantined rows (a batch left empty is replaced by the next one, which
    carries its reader skips)."""
    carried = 0
    for batch in batches:
        if quarantined:
            keep = torch.tensor([i not in quarantined for i in batch.index.tolist()])
            if not keep.all():
                if not keep.any():
                    carried += batch.skipped
                    continue
                batch = Batch(batch.index[keep], batch.latents[keep.to(batch.latents.device)], batch.tokens[keep],
                              [k for k, ok in zip(batch.keys, keep.tolist()) if ok] if batch.keys else None,
                              batch.skipped, None if batch.time_ids is None else batch.time_ids[keep])
        if carried:
            batch = dataclasses.replace(batch, skipped=batch.skipped + carried)
            carried = 0
        yield batch


def fit(cfg: Config, engine, objective: Objective, batches: Iterator[Batch], start_step: int, out_dir: Path,
        is_minority: torch.Tensor, ema: Optional[ShardedEMA] = None,
        save: Optional[Callable[[int], None]] = None, validate: Optional[Callable[[int, MetricsLog], None]] = None,
        progress: bool = True, identities=None, data_skipped: Optional[SkipCount] = None) -> TrainResult:
    """Steps ``start_step`` .. ``train.steps`` on every rank; rank 0 logs (``data/skipped``: the
    reader's skips in every rank's micro-batches since step 0, counted in ``data_skipped``).
    ``save(step)`` runs every ``train.checkpoint_every`` steps and ``validate(step)`` every
    ``train.validate_every`` (both on every rank: they gather). With ``identities`` (per dataset
    row), every logged step also carries pogdiff.train.diagnostics' measures."""
    from pogdiff.train import diagnostics

    from tqdm import tqdm

    tc, rank0 = cfg.train, engine.rank == 0
    pair_tag = "psi" if cfg.method.name.value == "pogdiff" else "pair_weight"
    from pogdiff.runs import training_settings

    metrics = MetricsLog(out_dir, tc.report_to, enabled=rank0, fresh=start_step == 0, config=training_settings(cfg))
    result = TrainResult(steps=start_step)
    window: list[torch.Tensor] = []
    t0 = window_start = time.perf_counter()
    waited = 0.0
    guard = NonFiniteGuard(tc.max_bad_steps, data_skipped)
    batches = _without(batches, guard.quarantined)
    if rank0 and getattr(objective, "sampler", None) is not None:
        from pogdiff.method.neighbours import summarize_psi

        stats = summarize_psi(objective.sampler.psi, is_minority, objective.sampler.table)  # also in history.json
        logged = {f"psi/{key}": stats[key] for key in ("tail_over_head", "head_mass_share", "own_identity_share_tail")
                  if stats[key] is not None and stats[key] == stats[key]}
        if logged:
            metrics.scalars(start_step, logged, trackers_only=True)
    bar = tqdm(range(start_step, tc.steps), desc=f"train {cfg.method.name.value}", unit="step",
               disable=not (progress and rank0), initial=start_step, total=tc.steps,
               mininterval=0.1 if sys.stderr.isatty() else 10.0)  # Ray forwards every redraw as a log line
    for step in bar:
        done = step + 1
        log_now = done % tc.log_every == 0 or done == tc.steps
        loss, outs, data_s, skipped = train_step(engine, objective, batches, tc.seed, step, tc.grad_accum, log_now, guard)
        waited += data_s
        guard.step_done(done, skipped)
        if ema is not None and not skipped:
            ema.update(engine.param_shards())
        if torch.isfinite(loss):
            window.append(loss)
        if log_now and window:
            diag = torch.zeros(diagnostics.SUMS, dtype=torch.float64)
            if identities is not None and outs:  # every rank alike (a ZeRO-3 forward is collective)
                diag = torch.cat([diagnostics.pair_sums(outs, is_minority, identities),
                                  diagnostics.text_sensitivity(engine, objective, outs[-1][0], is_minority, identities,
                                                               tc.seed, done)])
            sums = engine.all_reduce_sum(torch.cat([torch.stack([torch.stack(window).sum().double(),
                                                                 torch.tensor(len(window), dtype=torch.float64)]),
                                                    term_stats(outs, is_minority), diag,
                                                    torch.tensor([guard.data_skipped.samples], dtype=torch.float64)]))
            window.clear()
            n, head, tail = sums[2], sums[6], sums[8]
            now = time.perf_counter()
            entry = {"loss": float(sums[0] / sums[1]), "target_mse": float(sums[3] / n), "lr": engine.lr,
                     "grad_norm": None if engine.grad_norm is None else float(engine.grad_norm),
                     "data_wait": waited / max(now - window_start, 1e-9),  # rank 0's share of time spent waiting on data
                     "bad_steps": guard.bad_steps, "quarantined": len(guard.quarantined),
                     "data/skipped": int(sums[-1])}
            window_start, waited = now, 0.0
            has_pair = objective.cfg.name.value in ("pogdiff", "cbdm")
            if has_pair:
                entry["pair_mse"] = float(sums[4] / n)
                entry[f"{pair_tag}/head"] = float(sums[5] / head) if head else None
                entry[f"{pair_tag}/tail"] = float(sums[7] / tail) if tail else None
            if identities is not None:
                entry.update(diagnostics.entries(sums[2:9], sums[9:-1], has_pair))
            metrics.scalars(done, entry)
            result.losses.append(entry["loss"])
            result.history.append({"step": done, **entry})
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
        if validate and tc.validate_every and done % tc.validate_every == 0:
            validate(done, metrics)
        if save and (done == tc.steps or (tc.checkpoint_every and done % tc.checkpoint_every == 0)):
            save(done)
        result.steps = done
    skipped = guard.data_skipped.total(engine)
    if skipped and rank0:
        log.warning("the reader skipped %d samples in the training streams of all ranks since step 0 (each named "
                    "above or in an earlier run's log; history.json: data/skipped)", skipped)
    metrics.close()
    result.seconds = time.perf_counter() - t0
    return result
