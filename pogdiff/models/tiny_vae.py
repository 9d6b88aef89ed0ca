"""Pretraining of the tiny VAE, so that its latents mean something.

A random-init AutoencoderKL decodes generated latents into images unrelated to the data, and any
image-space metric would then measure nothing. The tiny model's VAE is therefore first trained as
an autoencoder (reconstruction + a small KL term, as SD's VAE was) on synthetic identities that are
disjoint from the fine-tuning set, and only then frozen. SD-scale models bring their own VAE.

Pretraining is deterministic, so its result is cached per setting under ``$POGDIFF_CACHE``
(default ``~/.cache/pogdiff``): every run and test on a machine pays for it once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from pogdiff.runs import atomic_path
from pogdiff.data.encode import images_to_tensor
from pogdiff.data.synthetic import Identity, Record, make_identity, render

log = logging.getLogger("pogdiff.tiny_vae")

# Identities outside the fine-tuning set (VAE pretraining, the evaluation's recogniser) sit at
# indices from here on, under a salted seed: other identities, and never a fine-tuning image.
DISJOINT_INDEX_OFFSET = 100_000


def looks(ident: Identity) -> tuple:
    """What an identity looks like: its fixed attributes, hair colour only where hair or beard shows."""
    hair = ident.hair_colour if ident.hairstyle != "bald" or ident.beard else None
    return (ident.face_shape, ident.skin, hair, ident.hairstyle, ident.eyes, ident.glasses, ident.beard, ident.hat)


def disjoint_records(n_ids: int, per_id: int, seed: int, size: int, salt: int,
                     exclude: Iterable[Identity] = ()) -> Iterator[Record]:
    """``per_id`` images of each of ``n_ids`` synthetic identities at indices >= DISJOINT_INDEX_OFFSET
    under seed ``seed + 7919 * salt``, skipping any that looks like one in ``exclude``
    (e.g. the fine-tuning identities). Labels are 0..n_ids-1."""
    taken = {looks(i) for i in exclude}
    seed = seed + 7919 * salt
    label, index = 0, DISJOINT_INDEX_OFFSET
    while label < n_ids:
        ident = make_identity(index, seed)
        index += 1
        if looks(ident) in taken:
            continue
        for j in range(per_id):
            image, caption = render(ident, j, seed, size)
            yield Record(key=f"disjoint{ident.index:06d}_img{j:04d}", identity=label, name=ident.name,
                         caption=caption, image=image)
        label += 1


# Pretraining settings; part of the cache key.
PRETRAIN = dict(batch_size=16, lr=2e-3, kl_weight=1e-6, n_images=2048)


def train_autoencoder(vae: AutoencoderKL, steps: int, seed: int, image_size: int, batch_size: int, lr: float,
                      kl_weight: float, n_images: int, progress: bool = True) -> list[float]:
    """Train ``vae`` in place as an autoencoder on ``n_images`` disjoint synthetic images
    (256 identities x 8); returns the per-step reconstruction MSE (images in [-1, 1])."""
    from tqdm import tqdm

    per_id = 8
    x = images_to_tensor([r.image for r in disjoint_records(max(1, n_images // per_id), per_id, seed, image_size, salt=1)])
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    vae.train()
    losses = []
    for _ in tqdm(range(steps), desc="tiny VAE", unit="step", disable=not progress):
        batch = x[torch.randint(len(x), (batch_size,), generator=g)]
        post = vae.encode(batch).latent_dist
        mse = (vae.decode(post.mode()).sample - batch).pow(2).mean()  # pogdiff encodes with the mean
        loss = mse + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(mse.detach()))
    vae.eval()
    return losses


def cache_dir() -> Path:
    return Path(os.environ.get("POGDIFF_CACHE", Path.home() / ".cache" / "pogdiff"))


def pretrain_tiny_vae(vae: AutoencoderKL, steps: int, seed: int, image_size: int, progress: bool = True) -> None:
    """Load ``vae``'s pretrained weights for this setting from the cache, or train and cache them."""
    if steps <= 0:
        return
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}  # "_use_default_values" is unordered
    key = dict(steps=steps, seed=seed, image_size=image_size, config=config, **PRETRAIN,
               init=float(sum(p.detach().double().sum() for p in vae.parameters())))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir() / f"tiny_vae-{digest}.safetensors"
    if path.is_file():
        vae.load_state_dict(load_file(str(path)))
        vae.eval()
        return
    losses = train_autoencoder(vae, steps, seed, image_size, progress=progress, **PRETRAIN)
    log.info("tiny VAE pretrained for %d steps: reconstruction mse %.4f -> %.4f", steps,
             float(np.mean(losses[:10])), float(np.mean(losses[-10:])))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp),
                  metadata={"key": json.dumps(key, default=str), "final_mse": str(np.mean(losses[-10:]))})
