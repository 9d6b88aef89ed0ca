"""Where a run's files live, and the small helpers every stage shares (one home each): absolute
paths, atomic writes, seed derivation and fingerprints.

    <output_dir>/<run_name>/<method tag>/   unet/, pipeline/, history.json, metrics.jsonl, tb/, ranks/,
                                            checkpoints/ (one machine), generated/, metrics.json
    <output_dir>/datasets/<name>-<fp>/      prepared datasets (pogdiff.data.dataset), shared by runs
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import logging
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional


from pogdiff.config import Config, Method, load_config


def is_uri(path: str) -> bool:
    """``s3://…``, ``gs://…`` and the like: handed to Ray unchanged, never resolved locally."""
    return "://" in path


# Values that name something built in, never a path, even where a folder of that name exists in
# the working directory (e.g. an output folder called "tiny"); "./tiny" is the path.
KEYWORDS = {"tiny", "tiny-base", "synthetic", "recognizer"}


def _absolute(path: str | None, must_exist: bool = False) -> str | None:
    if path is None or is_uri(path) or (must_exist and path in KEYWORDS):
        return path
    p = Path(path).expanduser()
    if must_exist and not p.exists():
        return path  # a hub id: not a path
    return str(p.resolve())


def model_dir_of(name: str) -> str:
    """``model.name`` as what loads it: ``tiny-base`` is the committed pretrained base of the tiny
    model (pogdiff/models/tiny_base, made by ``pogdiff pretrain``), a path becomes absolute."""
    if name == "tiny-base":
        from pogdiff.models.pretrain import BASE_DIR

        return str(BASE_DIR)
    return _absolute(name, must_exist=True)


def absolute_paths(cfg: Config) -> Config:
    """``cfg`` with every path made absolute against the current directory, so that Ray workers
    (which run in directories of their own) and later verbs find the same files. URIs and names
    that are not existing paths (``tiny``, ``synthetic``, hub ids) stay as they are."""
    d, p, m, e, dc = cfg.data, cfg.prepare, cfg.model, cfg.eval, cfg.dist
    return dataclasses.replace(
        cfg,
        output_dir=_absolute(cfg.output_dir),
        model=dataclasses.replace(m, name=model_dir_of(m.name)),
        data=dataclasses.replace(d, source=_absolute(d.source, must_exist=True),
                                 image_encoder=_absolute(d.image_encoder, must_exist=True)),
        prepare=dataclasses.replace(p, output=_absolute(p.output), image_root=_absolute(p.image_root)),
        eval=dataclasses.replace(e, encoder=_absolute(e.encoder, must_exist=True)),
        dist=dataclasses.replace(dc, storage_path=_absolute(dc.storage_path), deepspeed_json=_absolute(dc.deepspeed_json)),
        experiment=dataclasses.replace(cfg.experiment, report_dir=_absolute(cfg.experiment.report_dir)),
        train=dataclasses.replace(cfg.train, resume_from_checkpoint=_absolute(cfg.train.resume_from_checkpoint)),
        pretrain=dataclasses.replace(cfg.pretrain, output=_absolute(cfg.pretrain.output)),
        ssl=dataclasses.replace(cfg.ssl, output=_absolute(cfg.ssl.output)),
        sweep=dataclasses.replace(cfg.sweep, report_dir=_absolute(cfg.sweep.report_dir)),
    )


def load_run_config(path: str | Path | None, overrides=()) -> Config:
    """What every verb runs on: the config (file + overrides, validated) with absolute paths."""
    return absolute_paths(load_config(path, overrides))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that take a path (safetensors, numpy, matplotlib,
    save_pretrained): moved onto ``path`` when the block succeeds, removed when it fails, so readers
    see the old content or the new, never a part. A directory replaces the old one (removed first)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir():
            _remove(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write a file so that readers see the old content or the new, never a part."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


def fingerprint(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def method_tag(cfg: Config) -> str:
    m = cfg.method
    tag = m.name.value
    if m.name == Method.pogdiff:
        tag += f"-{m.grad_mode.value}" + ("" if m.psi_img else "-no_psi_img") + ("" if m.psi_inv else "-no_psi_inv")
        tag += ("" if m.a2 == 1 else f"-a2x{m.a2:g}") + ("" if m.a3 == 1 else f"-a3x{m.a3:g}")
        tag += ("" if m.k == 10 else f"-k{m.k}") + (f"-start{m.pair_start}" if m.pair_start else "")
    if cfg.train.adapter != "none":  # beside the full fine-tune of the same method
        tag += f"-{cfg.train.adapter}"
    return f"{tag}-seed{cfg.train.seed}"


class RunFiles:
    """One trained method of a run; every path absolute when the config's are (cli does that)."""

    def __init__(self, cfg: Config):
        self.root = Path(cfg.output_dir) / cfg.run_name
        self.method = self.root / method_tag(cfg)
        self.unet = self.method / "unet"  # the exported UNet (EMA when train.ema), diffusers format
        self.pipeline = self.method / "pipeline"  # a StableDiffusionPipeline directory around it
        self.lora = self.method / "lora"  # train.adapter=lora: diffusers LoRA weights, and base.json naming the base
        self.history = self.method / "history.json"
        self.checkpoints = self.method / "checkpoints"
        self.metrics = self.method / "metrics.json"
        self.samples = self.method / "generated"

    def trained_model(self) -> tuple[Path, Optional[Path]]:
        """What sample and eval load: (the exported pipeline, None), or for a LoRA run that did not
        fuse (its base model directory, its LoRA directory). FileNotFoundError before any export."""
        if (self.pipeline / "model_index.json").is_file():
            return self.pipeline, None
        base = self.lora / "base.json"
        if base.is_file():
            return Path(json.loads(base.read_text())["model_dir"]), self.lora
        raise FileNotFoundError(f"no trained model at '{self.method}' (neither pipeline/ nor lora/): run `pogdiff train` "
                                "or `pogdiff train-dist` with this config (method, seed, run_name, output_dir) first")

    def export_marker(self) -> Optional[Path]:
        """The file whose presence (and mtime) says the run exported its model; None before."""
        for path in (self.pipeline / "model_index.json", self.lora / "base.json"):
            if path.is_file():
                return path
        return None


# What may change between a run and its resumption: how long it trains and how often it logs,
# saves and validates, and where Ray keeps its files. Everything else in these sections decides
# what the checkpoints are checkpoints of.
TRAINING_SECTIONS = ("model", "data", "prepare", "method", "density", "train", "dist")
RESUMABLE_CHANGES = {"train.steps", "train.checkpoint_every", "train.checkpoint_keep", "train.log_every",
                     "train.validate_every", "train.validation_prompts", "train.validation_images",
                     "train.validation_ddim_steps", "train.report_to", "train.resume",
                     "train.resume_from_checkpoint", "train.validation_epochs", "train.num_train_epochs", "dist.max_failures",
                     "dist.ray_address", "dist.storage_path", "prepare.backend", "prepare.workers", "prepare.device",
                     "prepare.gpus_per_worker", "prepare.precision",
                     "density.device", "density.distributed_min_rows", "train.lease_timeout", "dist.allow_oversubscribe"}


# Under train.resume=force these apply to the restored optimizer and LR schedule
# (pogdiff.train.checkpoint.apply_optimizer_settings); train.optimizer cannot (another state format).
OPTIMIZER_SETTINGS = ("train.lr", "train.scale_lr", "train.lr_scheduler", "train.lr_warmup_steps", "train.weight_decay",
                      "train.adam_beta1", "train.adam_beta2", "train.adam_epsilon")


def training_settings(cfg: Config) -> dict:
    """The run's training config as flat ``section.key -> value`` (JSON-able)."""
    out = {}
    for section in TRAINING_SECTIONS:
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            name = f"{section}.{key}"
            if name not in RESUMABLE_CHANGES:
                out[name] = value.value if hasattr(value, "value") else value
    return out


def check_resume(cfg: Config, checkpoints: list[Path]) -> bool:
    """Whether the run resumes from ``checkpoints`` (its existing ones), by ``train.resume``; records
    the run's training config. Raises ConfigError when they belong to another config under "auto"."""
    from pogdiff.config import ConfigError

    files = RunFiles(cfg)
    record = files.method / "run_config.json"
    now = json.loads(json.dumps(training_settings(cfg), default=str))
    resume = bool(checkpoints) and cfg.train.resume != "never"
    if resume and record.is_file():
        saved = json.loads(record.read_text())
        changed = {k: [saved.get(k), now.get(k)] for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        if changed and cfg.train.resume == "auto":
            raise ConfigError(f"run '{cfg.run_name}' ({files.method.name}) has checkpoints of another training config "
                              f"({listed}). Use another run_name, train.resume=never to start over (deleting them), "
                              "or train.resume=force to resume anyway")
        if "train.optimizer" in changed:
            old, new = changed["train.optimizer"]
            raise ConfigError(f"train.resume=force cannot change train.optimizer ({old!r} -> {new!r}): run "
                              f"'{cfg.run_name}' ({files.method.name}) has checkpoints of {old!r}'s state. Use another "
                              "run_name, or train.resume=never to start over (deleting them)")
        if changed:
            logging.getLogger("pogdiff.runs").warning("%s", force_resume_note(cfg, files.method.name, changed))
    files.method.mkdir(parents=True, exist_ok=True)
    write_json(record, now)
    return resume


def force_resume_note(cfg: Config, run: str, changed: dict) -> str:
    """The warning of train.resume=force: each changed key, old -> new, and what now applies."""
    tc = cfg.train
    applied = [k for k in changed if k in OPTIMIZER_SETTINGS]
    rest = [k for k in changed if k not in OPTIMIZER_SETTINGS]
    now = []
    if applied:
        lr = f"train.lr={tc.lr:g}" + (" times the samples per step (train.scale_lr)" if tc.scale_lr else "")
        now.append(f"{lr} on the {tc.lr_scheduler} schedule with {tc.lr_warmup_steps} warm-up steps counted from "
                   f"step 0, at the restored step; weight decay {tc.weight_decay:g}, betas ({tc.adam_beta1:g}, "
                   f"{tc.adam_beta2:g}), eps {tc.adam_epsilon:g}; on the restored optimizer state "
                   f"({', '.join(applied)})")
    if rest:
        now.append(f"the new value{'s' if len(rest) > 1 else ''} of {', '.join(rest)} from the restored step on")
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
    return (f"train.resume=force: run '{cfg.run_name}' ({run}) resumes from checkpoints of another training config "
            f"({listed}). Now applies: {'; and '.join(now)}")


class LeaseHeld(RuntimeError):
    """Another live process holds the run's lease (the CLI exits 2 with this message)."""


LEASE = "lease.json"


class LeaseFile:
    """The lease's file: in a local (or network-mounted) folder, or in object storage. Created
    exclusively (O_EXCL; S3's conditional PUT, If-None-Match), replaced atomically (a rename; a PUT)."""

    def __init__(self, folder: str | Path, name: str):
        self.remote = is_uri(str(folder))
        if self.remote:
            from pogdiff.storage import filesystem

            self.fs, root = filesystem(str(folder))
            self.path: str | Path = f"{root}/{name}"
            self.shown = f"{str(folder).rstrip('/')}/{name}"
        else:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.path = self.shown = Path(folder) / name

    def create(self, lease: dict) -> None:
        """Raises FileExistsError when the file exists."""
        data = json.dumps(lease).encode()
        if self.remote:
            self.fs.pipe_file(self.path, data, mode="create")
            return
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def replace(self, lease: dict) -> None:
        if self.remote:
            self.fs.pipe_file(self.path, json.dumps(lease).encode())
        else:
            atomic_write(self.path, json.dumps(lease))

    def read(self) -> Optional[dict]:
        try:
            return json.loads(self.fs.cat_file(self.path) if self.remote else Path(self.path).read_text())
        except (FileNotFoundError, ValueError):  # gone, or caught half-written by a local create: look again
            return None

    def remove(self) -> None:
        try:
            self.fs.rm_file(self.path) if self.remote else Path(self.path).unlink()
        except FileNotFoundError:
            pass


def _lease_is_stale(lease: dict, timeout: float) -> Optional[str]:
    """Why the lease's holder is gone, or None while it lives."""
    age = time.time() - float(lease.get("renewed", 0))
    if age > timeout:
        return f"not renewed for {age:.0f} s (train.lease_timeout={timeout:g})"
    if lease.get("host") == socket.gethostname():
        try:
            os.kill(int(lease["pid"]), 0)
        except ProcessLookupError:
            return f"process {lease['pid']} on this host has exited"
        except PermissionError:
            pass
    return None


@contextlib.contextmanager
def run_lease(folder: str | Path, timeout: float, what: str = "run", name: str = LEASE,
              instead: str = "use another run_name") -> Iterator[dict]:
    """One writer per run directory (a folder, or a prefix in object storage): ``folder/<name>``
    (``lease.json``) names the holder (host, PID, start) and is renewed by a thread every
    ``timeout / 10`` s. flock is not to be trusted on the network filesystems Slurm clusters share,
    so the lease is a file created exclusively (LeaseFile), and a stale one (its holder's PID gone
    on this host, or not renewed for ``timeout`` s) is taken over with a warning: replaced
    atomically, then read back to see which of two takers won. Raises LeaseHeld naming a live
    holder. Readers (sample, eval, report) take no lease."""
    log = logging.getLogger("pogdiff.runs")
    lease = LeaseFile(folder, name)
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "renewed": time.time(), "what": what}
    for _ in range(50):
        try:
            lease.create(mine)
            break
        except FileExistsError:
            held = lease.read()
            if held is None:
                time.sleep(0.1)
                continue
            stale = _lease_is_stale(held, timeout)
            if stale is None:
                raise LeaseHeld(f"{folder} is held by {held.get('what', 'a run')} of process {held.get('pid')} on "
                                f"{held.get('host')} since {held.get('started')} (renewed "
                                f"{time.time() - float(held.get('renewed', 0)):.0f} s ago). Wait for it, stop it, or "
                                f"{instead}; a holder that died is taken over after train.lease_timeout="
                                f"{timeout:g} s") from None
            log.warning("taking over the lease of %s from process %s on %s: %s", folder, held.get("pid"),
                        held.get("host"), stale)
            lease.replace(mine)
            time.sleep(0.2)  # another taker that saw the same stale lease writes in this window
            if (lease.read() or {}).get("token") == mine["token"]:
                break
    else:
        raise LeaseHeld(f"{folder}: could not take its lease ({lease.shown} keeps changing); is another run starting?")

    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(timeout / 10):
            if (lease.read() or {}).get("token") != mine["token"]:
                log.error("the lease of %s was taken over by another process: this run is no longer its only writer",
                          folder)
                return
            mine["renewed"] = time.time()
            lease.replace(mine)

    thread = threading.Thread(target=renew, name="pogdiff-lease", daemon=True)
    thread.start()
    try:
        yield mine
    finally:
        stop.set()
        thread.join()
        if (lease.read() or {}).get("token") == mine["token"]:
            lease.remove()
