"""``pogdiff eval``: the paper's metrics for one trained run (Sec. 4.1, App. C, F; DESIGN §2).

Real image sets per identity, read from the prepared dataset's shards (prepare.keep_images):
    training  the images the run trained on: what gRecall must cover
    held-out  the dataset's held-out split (``data.heldout_images`` per identity where the identity
              had enough images): the DINO-style score's real set; an identity without held-out
              images is scored against its training images, and ``dino_reference`` says which
    FID       training + held-out: "all images of the identity in the original dataset" (App. C)
All embeddings come from ``eval.encoder`` (pogdiff.eval.recognizer), never from the neighbours'
encoder. "All" averages over every identity, "Few" over the minority identities (at most
``data.minority_images`` training images).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from pogdiff.config import Config
from pogdiff.eval import metrics as M
from pogdiff.runs import RunFiles, write_json

METRICS = ("fid", "dino", "grecall")


def few_ids(cfg: Config, index) -> list[int]:
    """The evaluated minority identities (every one, or ``sample.few_ids`` of them)."""
    from pogdiff.eval.sampling import evaluated_identities

    counts = index.identity_counts()
    return [i for i in evaluated_identities(cfg, index) if counts[i] <= cfg.data.minority_images]


def restrict(real: dict[str, dict[int, np.ndarray]], ids) -> dict[str, dict[int, np.ndarray]]:
    """The real embeddings of the evaluated identities only."""
    ids = set(ids)
    return {name: {i: e for i, e in per_id.items() if i in ids} for name, per_id in real.items()}


def _by_identity(images, identities, encode) -> dict[int, np.ndarray]:
    if not images:
        return {}
    emb = encode(images).numpy()
    ids = np.asarray(identities)
    return {int(i): emb[ids == i] for i in np.unique(ids)}


def dataset_images(index) -> tuple[list[Image.Image], list[int]]:
    """Every labelled image of a prepared split, with its identity."""
    images, ids = [], []
    for _, identity, png in index.images():
        if identity >= 0:
            images.append(Image.open(io.BytesIO(png)).convert("RGB"))
            ids.append(identity)
    if not images and len(index):
        raise ValueError(f"dataset '{index.root}' has no images in its shards: prepare it with prepare.keep_images=true "
                         "(and identity labels) to evaluate on it")
    return images, ids


def real_embeddings(cfg: Config, ds, encode, reference_images: int = 0) -> dict[str, dict[int, np.ndarray]]:
    """Embeddings of the training and held-out images per identity. For synthetic datasets and with
    ``reference_images``, also that many fresh real images per identity ("reference": what a perfect
    generator would produce) and the same images through the dataset's VAE ("reference_vae")."""
    out = {"training": _by_identity(*dataset_images(ds.index), encode),
           "heldout": _by_identity(*dataset_images(ds.heldout), encode) if ds.heldout is not None else {}}
    synthetic = ds.meta.get("synthetic")
    if reference_images and synthetic:
        from pogdiff.data.synthetic import iter_records

        counts = synthetic["counts"]
        starts = [c + synthetic["heldout_images"] for c in counts]
        records = list(iter_records([reference_images] * len(counts), synthetic["seed"], synthetic["image_size"],
                                    starts=starts))
        out["reference"] = _by_identity([r.image for r in records], [r.identity for r in records], encode)
        vae = vae_roundtrip(ds.model_dir, [r.image for r in records])
        out["reference_vae"] = _by_identity(vae, [r.identity for r in records], encode)
    return out


@torch.no_grad()
def vae_roundtrip(model_dir: str, images: list) -> list:
    """The images replaced by decode(encode(image)) through the frozen VAE of ``model_dir``."""
    from diffusers import AutoencoderKL

    from pogdiff.data.encode import images_to_tensor
    from pogdiff.eval.recognizer import to_pil

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval()
    y = vae.decode(vae.encode(images_to_tensor(images)).latent_dist.mean).sample
    return to_pil(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def compute_metrics(generated: dict[int, np.ndarray], real: dict[str, dict[int, np.ndarray]], few: list[int],
                    threshold: float, fid_eps: float) -> dict:
    """Per-identity metrics and their All / Few means, from embeddings."""
    train, heldout = real["training"], real["heldout"]
    fid_real = {i: np.concatenate([train[i], heldout[i]]) if i in heldout else train[i] for i in train}
    dino_real = {i: heldout[i] if i in heldout else train[i] for i in train}
    per_id = {
        "fid": M.fid_per_id(generated, fid_real, fid_eps),
        "dino": M.dino_score_per_id(generated, dino_real),
        "grecall": M.grecall_per_id(generated, train, threshold),
    }
    summary = {}
    for name, values in per_id.items():
        summary[f"{name}_all"] = M.mean_over(values, train)
        summary[f"{name}_few"] = M.mean_over(values, few)
    return {"summary": summary, "per_id": {k: {str(i): v for i, v in d.items()} for k, d in per_id.items()},
            "dino_reference": {"heldout": sorted(i for i in train if i in heldout),
                               "training": sorted(i for i in train if i not in heldout)}}


def validity(cfg: Config, info: dict) -> tuple[bool, Optional[str]]:
    """Metrics are only as good as the encoder: a recogniser that cannot tell the identities apart
    on held-back images makes any gRecall meaningless."""
    accuracy = info.get("heldback_accuracy")
    if info.get("encoder") != "recognizer":
        return True, None
    if accuracy is None:
        return False, "the recogniser's accuracy could not be measured (no held-back images)"
    if accuracy < cfg.eval.min_encoder_accuracy:
        return False, (f"the recogniser identifies only {accuracy:.2f} of held-back images correctly "
                       f"(< eval.min_encoder_accuracy={cfg.eval.min_encoder_accuracy})")
    return True, None


def evaluate_run(cfg: Config, progress: bool = True, encoder=None, real=None, ds=None) -> dict:
    """Sample (cached) and score one trained run; writes ``<method>/metrics.json``. ``encoder`` /
    ``real`` / ``ds`` let a caller that scores many runs compute them once."""
    from pogdiff.data.dataset import resolve_dataset
    from pogdiff.eval.recognizer import eval_encoder, to_pil
    from pogdiff.eval.sampling import evaluated_identities, sample_run

    ds = ds or resolve_dataset(cfg, progress)
    encode, info = encoder or eval_encoder(cfg, ds, progress)
    real = real or real_embeddings(cfg, ds, encode)
    images = sample_run(cfg, progress)
    generated = {i: encode(to_pil(ims)).numpy() for i, ims in images.items()}
    few = few_ids(cfg, ds.index)
    result = compute_metrics(generated, restrict(real, evaluated_identities(cfg, ds.index)), few,
                             cfg.eval.grecall_threshold, cfg.eval.fid_eps)
    valid, why = validity(cfg, info)
    result.update(method=RunFiles(cfg).method.name, seed=cfg.train.seed, encoder=info, valid=valid,
                  invalid_reason=why, dataset=str(ds.root), images_per_id=cfg.sample.images_per_id, few_ids=few)
    if not valid:
        import logging

        logging.getLogger("pogdiff.eval").warning("metrics of %s are marked invalid: %s", RunFiles(cfg).method, why)
    write_json(RunFiles(cfg).metrics, result)
    return result


def metrics_path(cfg: Config) -> Path:
    return RunFiles(cfg).metrics


def evaluate_reference(cfg: Config, ds, encoder, real: Optional[dict] = None) -> dict:
    """The metrics of fresh real images, and of the same images through the VAE, in place of
    generated ones (synthetic datasets only): an upper reference and the ceiling of any generator
    decoding with this VAE."""
    encode, info = encoder
    if real is None or "reference" not in real:
        real = real_embeddings(cfg, ds, encode, cfg.sample.images_per_id)
    from pogdiff.eval.sampling import evaluated_identities

    real = restrict(real, evaluated_identities(cfg, ds.index))
    result = {}
    for name in ("reference", "reference_vae"):
        if name in real:
            result[name] = compute_metrics(real[name], real, few_ids(cfg, ds.index), cfg.eval.grecall_threshold,
                                           cfg.eval.fid_eps)
            result[name].update(encoder=info, images_per_id=cfg.sample.images_per_id)
    run_dir = RunFiles(cfg).root
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "reference_metrics.json", result)
    return result
