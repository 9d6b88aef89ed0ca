"""One Ray Train worker: a DeepSpeed engine over the UNet, pogdiff's loop, checkpoints via Ray.

Only the UNet is handed to ``deepspeed.initialize``; the text encoder runs frozen beside it on
the caption tokens the worker streams (y) and reads from the dataset index (y'), and the VAE is
never loaded (latents are precomputed; rank 0 loads it, plain, for validation grids).
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
from typing import Optional

import torch

from pogdiff.config import Config
from pogdiff.models.components import unet_kwargs

log = logging.getLogger("pogdiff.dist.worker")

# DeepSpeed JIT-builds its CPU comm op under torch's extension baton (``<dir>/<op>/lock``); a run
# killed during the build leaves the lock, and every later start waits on it forever. The build
# takes about a minute here: a lock older than this, with no process building in its folder, is
# a dead build's.
STALE_BUILD_LOCK_S = 600.0


def extension_dir() -> Path:
    """torch's JIT extension folder for this Python environment: ``TORCH_EXTENSIONS_DIR`` when set,
    else one inside the environment (``sys.prefix``), set here for this process and the builds it
    starts, so two environments (two clones' venvs) never rebuild each other's op in one shared
    folder under ~/.cache."""
    import sys

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def _builds_in(folder: Path) -> bool:
    """Whether a live process works in ``folder`` (torch runs ninja there)."""
    import psutil

    for proc in psutil.process_iter(["cwd"]):
        cwd = proc.info.get("cwd")
        if cwd and Path(cwd) == folder:
            return True
    return False


def clear_stale_build_locks(root: Path, max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove, with a warning naming each, the extension build locks under ``root`` that are older
    than ``max_age_s`` while no process builds in their folder; returns them."""
    import time

    removed = []
    for lock in sorted(Path(root).glob("*/lock")):
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # released meanwhile
            continue
        if age > max_age_s and not _builds_in(lock.parent):
            log.warning("removing a stale build lock %s (%.0f s old, no build running: a killed build left it); "
                        "DeepSpeed's op is rebuilt", lock, age)
            lock.unlink(missing_ok=True)
            removed.append(lock)
    return removed


class RankPhase:
    """What this rank does while it starts, in ``<run>/ranks/rank<r>.phase.json``, for the driver's
    start watchdog (pogdiff.dist.ray_driver.StartWatchdog): ``set`` starts a phase, ``detail`` says
    more about the current one without restarting its clock."""

    def __init__(self, folder: Path, rank: int):
        self.path, self.rank = Path(folder) / f"rank{rank}.phase.json", rank
        self.phase, self.since = "", 0.0

    def set(self, phase: str) -> None:
        import time

        self.phase, self.since = phase, time.time()
        self.detail("")

    def detail(self, text: str) -> None:
        import socket

        from pogdiff.runs import atomic_write

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps({"rank": self.rank, "phase": self.phase, "detail": text, "since": self.since,
                                            "pid": os.getpid(), "host": socket.gethostname()}))


@contextlib.contextmanager
def watching_build_locks(root: Path, phase: RankPhase, every_s: float = 10.0):
    """While DeepSpeed starts: clear stale build locks (one may turn stale while this rank waits on
    it) and name a lock that exists in this rank's phase."""
    import threading
    import time

    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(every_s):
            clear_stale_build_locks(root)
            locks = [(lock, time.time() - lock.stat().st_mtime) for lock in Path(root).glob("*/lock") if lock.exists()]
            phase.detail("; ".join(
                f"the build lock {lock} is {age:.0f} s old, " + (
                    "a build runs there" if _builds_in(lock.parent) else
                    f"no build runs there (it is removed once {STALE_BUILD_LOCK_S:.0f} s old; `rm {lock}` does it now)")
                for lock, age in locks))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class DeepSpeedEngine:
    """pogdiff.train's engine contract over ``deepspeed.initialize`` (ZeRO stage from the config)."""

    def __init__(self, unet: torch.nn.Module, cfg: Config, device: torch.device, phase: Optional[RankPhase] = None):
        clear_stale_build_locks(extension_dir())
        with watching_build_locks(extension_dir(), phase) if phase else contextlib.nullcontext():
            self._initialize(unet, cfg, device)

    def _initialize(self, unet: torch.nn.Module, cfg: Config, device: torch.device) -> None:
        import deepspeed
        import torch.distributed as dist

        from pogdiff.train.loop import build_lr_scheduler, build_optimizer

        from pogdiff.dist.deepspeed_config import deepspeed_config

        self.rank, self.world_size, self.device = dist.get_rank(), dist.get_world_size(), device
        self.zero3 = cfg.dist.zero_stage == 3
        self.config = deepspeed_config(cfg, self.world_size, cfg.dist.use_gpu)
        self.dtype = torch.bfloat16 if self.config["bf16"]["enabled"] else torch.float32
        self.engine, optimizer, _, self.scheduler = deepspeed.initialize(
            model=unet, optimizer=build_optimizer(cfg.train, [p for p in unet.parameters() if p.requires_grad]),
            lr_scheduler=partial(build_lr_scheduler, cfg.train), config=self.config, dist_init_required=False,
        )
        self.module = self.engine.module
        self.base_optimizer = getattr(optimizer, "optimizer", optimizer)  # under the ZeRO wrapper

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # DeepSpeed's bf16 casts the module, not its inputs (x_t comes out of fp32 schedule math)
        conditioning = unet_kwargs(getattr(self.module, "config", None), cond.to(self.dtype))
        return self.engine(x.to(self.dtype), t, **conditioning).sample

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
        from pogdiff.train.ema import flat_shard

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


def resume_checkpoint(cfg: Config):
    """(a local directory to resume from, or None; a context to keep open while reading it).

    The newest complete checkpoint on storage, whether or not Ray Train registered it: Ray registers
    a report a poll (~2 s) after it, and a group that fails inside that window would otherwise
    restart from an older checkpoint. Ray's own checkpoint is a candidate too (and the only one when
    storage is a URI)."""
    import ray.train

    from pogdiff.train.checkpoint import given_checkpoint, newest_complete

    from pogdiff.dist.cluster import run_storage

    stack = contextlib.ExitStack()
    candidates = []
    local = run_storage(cfg)
    if local is not None and local.is_dir():
        candidates += sorted(local.glob("step_*"))
    registered = ray.train.get_checkpoint()
    if registered is not None:
        candidates.append(Path(stack.enter_context(registered.as_directory())))
    return newest_complete(candidates) or given_checkpoint(cfg.train), stack


def train_worker(loop_config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: resume from the newest complete checkpoint, stream the
    prepared dataset, train, report checkpoints."""

    cfg: Config = loop_config["cfg"]
    if not cfg.dist.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed picks its accelerator
    import resource

    import ray.train
    import ray.train.torch

    from pogdiff.data.dataset import Dataset
    from pogdiff.runs import RunFiles
    from pogdiff.train.assembly import assemble
    from pogdiff.train.checkpoint import write_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    files = RunFiles(cfg)
    ds = Dataset.at(loop_config["dataset"])
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)
    phase = RankPhase(files.method / "ranks", ray.train.get_context().get_world_rank())
    phase.set("starting: its DeepSpeed engine (the process-group rendezvous, DeepSpeed's CPU op build)")
    path, stack = resume_checkpoint(cfg)
    with stack:
        trainer = assemble(cfg, ds, device, lambda unet: DeepSpeedEngine(unet, cfg, device, phase), path, files.method)
    engine = trainer.engine
    phase.set("waiting for its first batch (the data stream)")
    trainer.on_first_batch = lambda: phase.set("training")

    def save(step: int) -> None:
        with tempfile.TemporaryDirectory(prefix="pogdiff-ckpt-") as tmp:
            write_checkpoint(Path(tmp), engine, trainer.ema, step, {"zero_stage": cfg.dist.zero_stage,
                                                                   "data": trainer.data_position(step)})
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"step_{step:08d}")

    result = trainer.fit(save)
    summary = {"rank": engine.rank, "world_size": engine.world_size, "start_step": trainer.start, "steps": result.steps,
               "module_sha256": engine.module_digest(), "dataset": str(ds.root),
               "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": result.seconds}
    out = files.method / "ranks" / f"rank{engine.rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
