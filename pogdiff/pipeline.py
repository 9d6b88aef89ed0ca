"""The stages of a run, each reading and writing files under ``<output_dir>/<run_name>/``.

    features  synthetic records -> frozen encoders -> features.safetensors (+ model/ in diffusers format)
    neighbours  image embeddings -> top-k table (neighbours.safetensors)
    density   pooled text embeddings -> text VAE (density.safetensors)
    train     -> unet/ + pipeline/ (diffusers format), history.json, metrics.jsonl, tb/ (pogdiff.dist: on Ray)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from .config import Config, Method
from .density import TextDensity, fit_text_density
from .features import FeatureSet, build_feature_set
from .models import Components, load_components
from .neighbours import NeighbourSampler, NeighbourTable, psi_table, summarize_psi
from .objectives import Objective
from .synthetic import iter_records, profile_counts
from .train import TrainResult, resolve_device, train

log = logging.getLogger("pogdiff")


class RunFiles:
    def __init__(self, cfg: Config):
        self.root = cfg.run_dir
        self.model = self.root / "model"
        self.features = self.root / "features.safetensors"
        self.heldout = self.root / "heldout.safetensors"
        self.neighbours = self.root / "neighbours.safetensors"
        self.density = self.root / "density.safetensors"
        # Per-method outputs sit below the shared data stages: every method trains on the same files.
        self.method = self.root / method_tag(cfg)
        self.unet = self.method / "unet"  # the exported UNet (EMA when train.ema), diffusers format
        self.pipeline = self.method / "pipeline"  # a StableDiffusionPipeline directory around it
        self.history = self.method / "history.json"
        self.checkpoints = self.method / "checkpoints"


def method_tag(cfg: Config) -> str:
    m = cfg.method
    tag = m.name.value
    if m.name == Method.pogdiff:
        tag += f"-{m.grad_mode.value}" + ("" if m.psi_img else "-no_psi_img") + ("" if m.psi_inv else "-no_psi_inv")
    return f"{tag}-seed{cfg.train.seed}"


def train_counts(cfg: Config) -> list[int]:
    d = cfg.data
    return profile_counts(d.profile, d.majority_ids, d.minority_ids, d.majority_images, d.minority_images)


def save_components(c: Components, path: Path) -> None:
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        getattr(c, name).save_pretrained(path / name)
    c.noise_scheduler.save_pretrained(path / "scheduler")


def stage_features(cfg: Config) -> FeatureSet:
    """Encode the synthetic training set (and its held-out images) with the frozen encoders."""
    files = RunFiles(cfg)
    if files.features.is_file() and (files.model / "unet").is_dir():
        return FeatureSet.load(files.features)
    if cfg.data.source != "synthetic":
        raise ValueError(f"data.source='{cfg.data.source}': only 'synthetic' is built in-memory; use prepared shards")
    files.root.mkdir(parents=True, exist_ok=True)
    components = load_components(cfg.model)
    device = resolve_device(cfg.train.device)
    counts = train_counts(cfg)
    d = cfg.data
    if cfg.model.name == "tiny":  # a random-init VAE would decode meaningless images
        from .tiny_vae import pretrain_tiny_vae

        pretrain_tiny_vae(components.vae, cfg.model.tiny_vae_steps, cfg.model.seed, d.image_size)
    feats = build_feature_set(iter_records(counts, d.seed, d.image_size), components, device,
                              calibrate_vae_scale=cfg.model.name == "tiny")
    heldout = build_feature_set(iter_records([d.heldout_images] * len(counts), d.seed, d.image_size, starts=counts),
                                components, device, progress=False)
    save_components(components, files.model)
    heldout.save(files.heldout)
    feats.save(files.features)
    return feats


def stage_neighbours(cfg: Config, feats: FeatureSet) -> NeighbourTable:
    files = RunFiles(cfg)
    if files.neighbours.is_file():
        table = NeighbourTable.load(files.neighbours)
        if table.k == cfg.method.k and table.ids.shape[0] == len(feats):
            return table
    from .dist.knn_graph import ArraySource, build_knn_graph, index_dir  # exact Flat for small N: = exact_knn

    table, _ = build_knn_graph(ArraySource(feats.image_emb, feats.identities), cfg.method.k, cfg.index,
                               root=index_dir(cfg), progress=False)
    table.save(files.neighbours)
    return table


def stage_density(cfg: Config, feats: FeatureSet) -> TextDensity:
    files = RunFiles(cfg)
    if files.density.is_file():
        return TextDensity.load(files.density)
    density = fit_text_density(feats.pooled, cfg.density, progress=True)
    density.save(files.density)
    return density


def build_objective(cfg: Config, feats: FeatureSet, table: NeighbourTable, density: TextDensity,
                    alphas_cumprod: torch.Tensor) -> tuple[Objective, dict]:
    m = cfg.method
    stats: dict = {}
    sampler = log_density = None
    if m.name == Method.pogdiff:
        log_inv = density.log_psi_inv(feats.pooled, m.a3) if m.psi_inv else None
        psi = psi_table(table, log_inv, m.a1, m.a2, use_psi_img=m.psi_img)
        sampler = NeighbourSampler(table, psi)
        stats = summarize_psi(psi, feats.is_minority(cfg.data.minority_images))
    if m.name == Method.t2h:
        log_density = density.log_density(feats.pooled)
    objective = Objective(
        m, alphas_cumprod, text_table=feats.text, sampler=sampler, log_density=log_density,
        null_text=feats.null_text, caption_dropout=cfg.train.caption_dropout, backend=cfg.train.loss_backend,
        snr_gamma=cfg.train.snr_gamma, noise_offset=cfg.train.noise_offset,
    )
    return objective, stats


def training_inputs(cfg: Config) -> tuple[FeatureSet, UNet2DConditionModel, Objective, dict]:
    """What a training worker needs: features, the run's initial UNet (the frozen VAE and text
    encoder stay on disk), the objective and psi stats. Runs the data stages that are missing
    (the distributed driver runs them once, up front)."""
    files = RunFiles(cfg)
    feats = stage_features(cfg)
    table = stage_neighbours(cfg, feats)
    density = stage_density(cfg, feats)
    unet = UNet2DConditionModel.from_pretrained(files.model / "unet")
    alphas_cumprod = DDPMScheduler.from_pretrained(files.model / "scheduler").alphas_cumprod
    objective, psi_stats = build_objective(cfg, feats, table, density, alphas_cumprod)
    return feats, unet, objective, psi_stats


def write_history(cfg: Config, psi_stats: dict, result: TrainResult) -> None:
    RunFiles(cfg).history.write_text(json.dumps({"method": cfg.method.name.value, "psi": psi_stats,
                                                 "history": result.history, "seconds": result.seconds}, indent=1))


def stage_train(cfg: Config, progress: bool = True) -> TrainResult:
    """One machine, one process (``pogdiff.dist.ray_driver`` is the cluster job)."""
    from .export import export_pipeline

    files = RunFiles(cfg)
    feats, unet, objective, psi_stats = training_inputs(cfg)
    torch.manual_seed(cfg.train.seed)
    result, weights = train(cfg, unet, objective, feats, files.method, files.model, progress=progress)
    export_pipeline(files.model, weights, files.method)
    write_history(cfg, psi_stats, result)
    return result
