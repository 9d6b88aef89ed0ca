"""One config system: typed dataclasses, YAML files in ``configs/``, dotted overrides.

    cfg = load_config("configs/demo.yaml", ["train.lr=1e-4", "method.name=vanilla"])

OmegaConf validates types against the dataclasses; this module turns its errors into messages
that name the key, the closest valid key, or the expected type.
"""
from __future__ import annotations

import difflib
import enum
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A config file or override is wrong; the message says where and what to do."""


class Method(str, enum.Enum):
    pogdiff = "pogdiff"
    vanilla = "vanilla"
    cbdm = "cbdm"
    t2h = "t2h"


class GradMode(str, enum.Enum):
    full = "full"  # Alg. 1 as printed: gradient flows into both halves of [y; y']
    stop = "stop"  # e' = UNet(x_t, t, y') is detached


@dataclass
class ModelConfig:
    # "tiny" (random-init tiny SD components, no download), a local diffusers directory, or a hub id.
    name: str = "tiny"
    revision: Optional[str] = None
    seed: int = 0  # initialisation seed of the tiny model
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    source: str = "synthetic"
    # Imbalance preset (see pogdiff.synthetic.PROFILES) or "custom" with the counts below.
    profile: str = "agedb-s"
    majority_ids: int = 1
    minority_ids: int = 1
    majority_images: int = 30
    minority_images: int = 2
    image_size: int = 32
    heldout_images: int = 4  # per identity, never trained on: the DINO-style score's real set
    seed: int = 0
    # Image encoder for neighbours: "tiny" (weight-free pixel statistics) or a local HF vision model.
    image_encoder: str = "tiny"


@dataclass
class MethodConfig:
    name: Method = Method.pogdiff
    grad_mode: GradMode = GradMode.full
    # grad_mode=stop: run the y' half as a separate no_grad forward (~4/3 of a vanilla step
    # instead of ~2x); false keeps one UNet call on the concatenated batch with e' detached.
    stop_split_forward: bool = True
    k: int = 10  # neighbours per sample (Eq. 8)
    a1: float = 1.0  # Eq. 9 exponent for same-identity neighbours
    a2: float = 1.0  # Eq. 9 extra exponent for different-identity neighbours
    a3: float = 1.0  # Eq. 11 scale of the inverse text density
    psi_img: bool = True  # Table 6 ablation "w/o psi_img" when false
    psi_inv: bool = True  # Table 6 ablation "w/o psi_inv" when false
    cbdm_tau: float = 1.0


@dataclass
class DensityConfig:
    """The text-embedding VAE of Eq. 10-11 and the log-space normalisation of psi_inv."""

    latent_dim: int = 16
    hidden_dim: int = 128
    epochs: int = 300
    batch_size: int = 256
    lr: float = 1e-3
    elbo_samples: int = 16  # Monte-Carlo samples per ELBO evaluation
    # log psi_inv = (nll - median_nll) / temperature - log a3, with nll = -ELBO. None means the
    # embedding dimension (a per-dimension density ratio); 1.0 is Eq. 11 exactly, up to the
    # constant exp(median_nll) folded into a3.
    temperature: Optional[float] = None
    log_clip: float = 10.0  # |log psi_inv + log a3| is clipped here so psi_inv is always finite
    seed: int = 0


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    loss_backend: str = "auto"  # pogdiff.kernels dispatch: "auto" | "torch" | "triton"
    caption_dropout: float = 0.1  # fraction of captions replaced by "" (classifier-free guidance)
    checkpoint_every: int = 0  # steps between checkpoints; 0 = none


@dataclass
class SampleConfig:
    steps: int = 50  # DDIM steps
    guidance_scale: float = 5.0
    images_per_id: int = 4
    batch_size: int = 16
    prompt_template: str = "An image of {p}."
    seed: int = 1234


@dataclass
class Config:
    run_name: str = "demo"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    density: DensityConfig = field(default_factory=DensityConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(node):
        key = prefix + f.name
        keys.append(key)
        value = getattr(node, f.name)
        if is_dataclass(value):
            keys.extend(_valid_keys(value, key + "."))
    return keys


def _closest(key: str, schema: Any) -> str:
    candidates = _valid_keys(schema())
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not match:  # a typo in the leaf only: compare against the leaf names
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
        match = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.5)]
    return f"; did you mean '{match[0]}'?" if match else ""


def _explain(err: OmegaConfBaseException, source: str, schema: Any, key: str | None = None) -> ConfigError:
    key = key or getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        return ConfigError(f"{source}: unknown config key '{key}'{_closest(key, schema)}")
    if isinstance(err, ValidationError):
        expected = getattr(err, "ref_type", None) or getattr(err, "object_type", None)
        msg = str(err).splitlines()[0]
        return ConfigError(f"{source}: bad value for '{key}': {msg} (expected {expected})")
    return ConfigError(f"{source}: {err}")


def _parse_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.path=value (e.g. train.lr=1e-4)")
    key, value = item.split("=", 1)
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), schema: Any = Config) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated against the dataclasses."""
    merged = OmegaConf.structured(schema)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist (see configs/ for examples)")
        try:
            raw = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        try:
            merged = OmegaConf.merge(merged, raw)
        except OmegaConfBaseException as e:
            raise _explain(e, str(path), schema) from None
    for item in overrides:
        key, value = _parse_override(item)
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException as e:
            raise _explain(e, f"override '{item}'", schema, key) from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _explain(e, str(path or "config"), schema) from None
    _check_values(cfg)
    return cfg


def _check_values(cfg: Config) -> None:
    """Constraints a type cannot express."""
    problems = []
    if cfg.method.k < 1:
        problems.append("method.k must be >= 1")
    if cfg.train.batch_size < 1:
        problems.append("train.batch_size must be >= 1")
    if cfg.train.loss_backend not in ("auto", "torch", "triton"):
        problems.append(f"train.loss_backend must be auto|torch|triton, got '{cfg.train.loss_backend}'")
    if cfg.train.device not in ("auto", "cpu", "cuda"):
        problems.append(f"train.device must be auto|cpu|cuda, got '{cfg.train.device}'")
    if cfg.density.temperature is not None and cfg.density.temperature <= 0:
        problems.append("density.temperature must be > 0 (or null for the embedding dimension)")
    if cfg.method.a3 <= 0:
        problems.append("method.a3 must be > 0")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
