"""One Ray Train worker: a DeepSpeed engine over the UNet, pogdiff's loop, checkpoints via Ray.

Only the UNet is handed to ``deepspeed.initialize``; the VAE and text encoder never are (the
worker trains on precomputed features and rank 0 loads them, plain, for validation grids).
A checkpoint (pogdiff.train.write_checkpoint) holds the gathered fp32 UNet and EMA as safetensors
and each rank's optimizer shard as tensors: DeepSpeed's own pickle-based checkpoints are not used.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from functools import partial
from pathlib import Path

import torch

from pogdiff.config import Config

log = logging.getLogger("pogdiff.dist.worker")


class DeepSpeedEngine:
    """pogdiff.train's engine contract over ``deepspeed.initialize`` (ZeRO stage from the config)."""

    def __init__(self, unet: torch.nn.Module, cfg: Config, device: torch.device):
        import deepspeed
        import torch.distributed as dist

        from pogdiff.train import build_lr_scheduler, build_optimizer

        from .deepspeed_config import deepspeed_config

        self.rank, self.world_size, self.device = dist.get_rank(), dist.get_world_size(), device
        self.zero3 = cfg.dist.zero_stage == 3
        self.config = deepspeed_config(cfg, self.world_size, cfg.dist.use_gpu)
        self.dtype = torch.bfloat16 if self.config["bf16"]["enabled"] else torch.float32
        self.engine, optimizer, _, self.scheduler = deepspeed.initialize(
            model=unet, optimizer=build_optimizer(cfg.train, unet.parameters()),
            lr_scheduler=partial(build_lr_scheduler, cfg.train), config=self.config, dist_init_required=False,
        )
        self.module = self.engine.module
        self.base_optimizer = getattr(optimizer, "optimizer", optimizer)  # under the ZeRO wrapper

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # DeepSpeed's bf16 casts the module, not its inputs (x_t comes out of fp32 schedule math)
        return self.engine(x.to(self.dtype), t, encoder_hidden_states=cond.to(self.dtype)).sample

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/grad_accum itself

    def step(self) -> None:
        self.engine.step()  # the optimizer, clipping and LR schedule act on accumulation boundaries

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    @property
    def grad_norm(self):
        return self.engine.get_global_grad_norm()

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def param_shards(self) -> list[torch.Tensor]:
        from pogdiff.ema import flat_shard

        if self.zero3:  # the rank's partition, the same cut as flat_shard
            return [p.ds_tensor.detach() for _, p in self.named_parameters()]
        return [flat_shard(p.detach(), self.rank, self.world_size) for _, p in self.named_parameters()]

    def all_gather(self, shard: torch.Tensor) -> list[torch.Tensor]:
        import torch.distributed as dist

        shard = shard.to(self.device).contiguous()
        out = torch.empty(self.world_size * shard.numel(), dtype=shard.dtype, device=self.device)
        dist.all_gather_into_tensor(out, shard)
        return list(out.chunk(self.world_size))

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        t = t.to(self.device)
        dist.all_reduce(t)
        return t.cpu()

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights, gathered (collective); a module tensor where there is no master."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for n, p in self.named_parameters():
            full = safe_get_full_fp32_param(p)
            out[n] = (p.detach() if full is None else full).float().cpu().clone()
        return out

    def load_full_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """The fp32 master from a checkpoint; the module got the same weights before initialize."""
        from deepspeed.utils import safe_set_full_fp32_param

        for n, p in self.named_parameters():
            safe_set_full_fp32_param(p, weights[n].to(self.device, torch.float32))

    @contextlib.contextmanager
    def _fp32_param_groups(self):
        """ZeRO-3 hands its flat fp32 partitions to the optimizer only around a step (or a state_dict)."""
        zero = self.engine.optimizer
        if self.zero3:
            zero._set_fp32_optimizer_param_groups()
        try:
            yield
        finally:
            if self.zero3:
                zero._clear_fp32_optimizer_param_groups()

    def optimizer_state(self) -> dict:
        with self._fp32_param_groups():
            return self.base_optimizer.state_dict()  # this rank's partition (ZeRO-1/2/3)

    def load_optimizer_state(self, state: dict) -> None:
        with self._fp32_param_groups():
            self.base_optimizer.load_state_dict(state)

    def module_digest(self) -> str:
        """sha256 of the module's full parameters as this rank sees them (gathered under ZeRO-3)."""
        import deepspeed

        params = [p for _, p in self.named_parameters()]
        gather = deepspeed.zero.GatheredParameters(params) if self.zero3 else contextlib.nullcontext()
        h = hashlib.sha256()
        with gather:
            for p in params:
                h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()


def wait_for_registered_checkpoint(cfg: Config, step: int, timeout_s: float = 60.0) -> None:
    """Until Ray Train has registered the checkpoint of ``step`` (test only: Ray registers a report
    on its next poll, ~2 s, and a worker group that fails before that loses it)."""
    import time

    from .ray_driver import ray_run_name, storage_path

    snapshot = storage_path(cfg) / ray_run_name(cfg) / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout_s
    while step and time.time() < deadline:
        if snapshot.is_file() and f"step_{step:08d}" in snapshot.read_text():
            return
        time.sleep(0.2)


def train_worker(loop_config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: resume from ``ray.train.get_checkpoint()``, train, report."""
    cfg: Config = loop_config["cfg"]
    if not cfg.dist.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed picks its accelerator
    import ray.train
    import ray.train.torch

    from pogdiff.pipeline import RunFiles, training_inputs
    from pogdiff.train import (Validator, configure_unet, default_prompts, fit, load_unet_weights, make_ema,
                               restore_checkpoint, train_batches, write_checkpoint)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    files = RunFiles(cfg)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)
    feats, unet, objective, psi_stats = training_inputs(cfg)
    checkpoint = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        path = Path(stack.enter_context(checkpoint.as_directory())) if checkpoint else None
        if path is not None:  # every rank loads the same full weights before DeepSpeed partitions them
            unet.load_state_dict(load_unet_weights(path))
        configure_unet(unet, cfg.model, device)
        unet.to(device).train()
        engine = DeepSpeedEngine(unet, cfg, device)
        ema = make_ema(cfg.train, engine)
        start = restore_checkpoint(path, engine, ema) if path is not None else 0
    if path is not None:
        log.info("rank %d resumed from %s at step %d", engine.rank, checkpoint.path, start)

    def save(step: int) -> None:
        with tempfile.TemporaryDirectory(prefix="pogdiff-ckpt-") as tmp:
            write_checkpoint(Path(tmp), engine, ema, step, {"zero_stage": cfg.dist.zero_stage})
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"step_{step:08d}")

    def fail_once(step: int) -> None:  # test only (dist.fail_at_step)
        marker = files.method / f".failed_at_step_{step}"
        if step == cfg.dist.fail_at_step and engine.rank == 1 and not marker.exists():
            marker.touch()
            wait_for_registered_checkpoint(cfg, step - step % cfg.train.checkpoint_every if cfg.train.checkpoint_every else 0)
            log.warning("dist.fail_at_step=%d: rank 1 exits now", step)
            os._exit(1)

    validate = (Validator(cfg, engine, ema, files.model, files.method, default_prompts(cfg, feats))
                if cfg.train.validate_every else None)
    batches = train_batches(cfg, feats, engine.rank, engine.world_size, start * cfg.train.grad_accum,
                            device, engine.dtype)
    result = fit(cfg, engine, objective, batches, start, files.method, feats.is_minority(cfg.data.minority_images),
                 ema=ema, save=save, validate=validate, after_step=fail_once if cfg.dist.fail_at_step else None)
    summary = {"rank": engine.rank, "world_size": engine.world_size, "start_step": start, "steps": result.steps,
               "module_sha256": engine.module_digest(), "psi": psi_stats}
    out = files.method / "ranks" / f"rank{engine.rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
