"""``pogdiff eval``: the paper's metrics for one trained run (Sec. 4.1, App. C, F; DESIGN §2).

Real image sets per identity, all rendered from the synthetic generator (so nothing is stored):
    training  the images the run trained on: what gRecall must cover
    held-out  ``data.heldout_images`` further images: the DINO-style score's real set
    FID       training + held-out: "all images of the identity in the original dataset" (App. C)
All embeddings come from ``eval.encoder`` (pogdiff.eval.recognizer), never from the neighbours'
encoder. "All" averages over every identity, "Few" over the minority identities (at most
``data.minority_images`` training images).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import Config
from ..pipeline import RunFiles, train_counts
from . import metrics as M

METRICS = ("fid", "dino", "grecall")


def few_ids(cfg: Config) -> list[int]:
    return [i for i, c in enumerate(train_counts(cfg)) if c <= cfg.data.minority_images]


def _by_identity(records, encode) -> dict[int, np.ndarray]:
    records = list(records)
    emb = encode([r.image for r in records]).numpy()
    ids = np.array([r.identity for r in records])
    return {int(i): emb[ids == i] for i in np.unique(ids)}


def real_embeddings(cfg: Config, encode, reference_images: int = 0) -> dict[str, dict[int, np.ndarray]]:
    """Embeddings of the training and held-out images per identity. With ``reference_images``,
    also that many fresh real images per identity ("reference": what a perfect generator would
    produce) and the same images through the run's VAE ("reference_vae": the best any generator
    decoding with this VAE can do)."""
    from ..synthetic import iter_records

    if cfg.data.source != "synthetic":
        raise ValueError(f"data.source='{cfg.data.source}': evaluation renders the real image sets and needs "
                         "data.source=synthetic")
    d, counts = cfg.data, train_counts(cfg)
    n = len(counts)
    out = {"training": _by_identity(iter_records(counts, d.seed, d.image_size), encode),
           "heldout": _by_identity(iter_records([d.heldout_images] * n, d.seed, d.image_size, starts=counts), encode)}
    if reference_images:
        starts = [c + d.heldout_images for c in counts]
        records = list(iter_records([reference_images] * n, d.seed, d.image_size, starts=starts))
        out["reference"] = _by_identity(records, encode)
        out["reference_vae"] = _by_identity(vae_roundtrip(cfg, records), encode)
    return out


@torch.no_grad()
def vae_roundtrip(cfg: Config, records: list) -> list:
    """The records with their images replaced by decode(encode(image)) through the run's VAE."""
    from dataclasses import replace

    from ..config import ModelConfig
    from ..features import images_to_tensor
    from ..models import load_components
    from .recognizer import to_pil

    vae = load_components(ModelConfig(name=str(RunFiles(cfg).model)), with_unet=False).vae.eval()
    x = images_to_tensor([r.image for r in records])
    y = vae.decode(vae.encode(x).latent_dist.mean).sample
    images = to_pil(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return [replace(r, image=im) for r, im in zip(records, images)]


def compute_metrics(generated: dict[int, np.ndarray], real: dict[str, dict[int, np.ndarray]], few: list[int],
                    threshold: float, fid_eps: float) -> dict:
    """Per-identity metrics and their All / Few means, from embeddings."""
    train, heldout = real["training"], real["heldout"]
    fid_real = {i: np.concatenate([train[i], heldout[i]]) for i in train}
    per_id = {
        "fid": M.fid_per_id(generated, fid_real, fid_eps),
        "dino": M.dino_score_per_id(generated, heldout),
        "grecall": M.grecall_per_id(generated, train, threshold),
    }
    summary = {}
    for name, values in per_id.items():
        summary[f"{name}_all"] = M.mean_over(values, train)
        summary[f"{name}_few"] = M.mean_over(values, few)
    return {"summary": summary, "per_id": {k: {str(i): v for i, v in d.items()} for k, d in per_id.items()}}


def metrics_path(cfg: Config) -> Path:
    return RunFiles(cfg).method / "metrics.json"


def evaluate_run(cfg: Config, progress: bool = True, encoder=None, real=None) -> dict:
    """Sample (cached) and score one trained run; writes ``<method>/metrics.json``.
    ``encoder``/``real`` let a caller that scores many runs compute them once."""
    from ..sampling import sample_run
    from .recognizer import eval_encoder, to_pil

    encode, info = encoder or eval_encoder(cfg, progress)
    real = real or real_embeddings(cfg, encode)
    images = sample_run(cfg, progress)
    generated = {i: encode(to_pil(ims)).numpy() for i, ims in images.items()}
    result = compute_metrics(generated, real, few_ids(cfg), cfg.eval.grecall_threshold, cfg.eval.fid_eps)
    result.update(method=RunFiles(cfg).method.name, seed=cfg.train.seed, encoder=info,
                  images_per_id=cfg.sample.images_per_id, few_ids=few_ids(cfg))
    _write_json(metrics_path(cfg), result)
    return result


def evaluate_reference(cfg: Config, encoder, real: Optional[dict] = None) -> dict:
    """The metrics of fresh real images, and of the same images through the VAE, in place of
    generated ones: an upper reference and the ceiling of any generator decoding with this VAE."""
    encode, info = encoder
    if real is None or "reference" not in real:
        real = real_embeddings(cfg, encode, cfg.sample.images_per_id)
    result = {}
    for name in ("reference", "reference_vae"):
        result[name] = compute_metrics(real[name], real, few_ids(cfg), cfg.eval.grecall_threshold, cfg.eval.fid_eps)
        result[name].update(encoder=info, images_per_id=cfg.sample.images_per_id, few_ids=few_ids(cfg))
    _write_json(cfg.run_dir / "reference_metrics.json", result)
    return result


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)
