"""Precomputed per-sample features: VAE latents, text conditioning, pooled text and image embeddings.

The frozen encoders run once, up front; training then touches only these tensors. Here the whole
set lives in memory (the one-machine slice); the shard writer stores the same fields per sample.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .models import Components, encode_text
from .synthetic import Record

TINY_ENCODER_CROP = 0.6  # central fraction of the image the tiny encoder looks at
TINY_ENCODER_SIZE = 8


def tiny_image_embedding(images: Sequence[Image.Image]) -> torch.Tensor:
    """Weight-free image encoder for tests and the demo: the central crop at 8x8 RGB, standardised
    per image (so cosine similarity is a pixel correlation that ignores overall brightness)."""
    out = []
    for im in images:
        w, h = im.size
        m = (1 - TINY_ENCODER_CROP) / 2
        crop = im.convert("RGB").crop((int(w * m), int(h * m), int(w * (1 - m)), int(h * (1 - m))))
        x = np.asarray(crop.resize((TINY_ENCODER_SIZE, TINY_ENCODER_SIZE), Image.BILINEAR), dtype=np.float32).ravel()
        out.append((x - x.mean()) / (x.std() + 1e-6))
    return torch.from_numpy(np.stack(out))


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


@dataclass
class FeatureSet:
    keys: list[str]
    identities: torch.Tensor  # (N,) int64
    names: list[str]  # identity name per sample
    captions: list[str]
    latents: torch.Tensor  # (N, 4, h, w) fp16, already multiplied by the VAE scaling factor
    text: torch.Tensor  # (N, L, D) fp16, UNet cross-attention conditioning
    pooled: torch.Tensor  # (N, D) fp32, for the text density
    image_emb: torch.Tensor  # (N, d) fp32, for neighbours
    null_text: torch.Tensor  # (L, D) fp16, the empty caption (classifier-free guidance)

    def __len__(self) -> int:
        return len(self.keys)

    def id_counts(self) -> dict[int, int]:
        ids, counts = torch.unique(self.identities, return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist()))

    def is_minority(self, few_max_images: int) -> torch.Tensor:
        """Per sample: its identity has at most ``few_max_images`` training images (the "Few" split)."""
        counts = self.id_counts()
        return torch.tensor([counts[i] <= few_max_images for i in self.identities.tolist()])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tensors = dict(identities=self.identities, latents=self.latents, text=self.text, pooled=self.pooled,
                       image_emb=self.image_emb, null_text=self.null_text)
        meta = json.dumps(dict(keys=self.keys, names=self.names, captions=self.captions))
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"records": meta})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSet":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["records"])
        t = load_file(str(path))
        return cls(meta["keys"], t["identities"], meta["names"], meta["captions"], t["latents"], t["text"],
                   t["pooled"], t["image_emb"], t["null_text"])


@torch.no_grad()
def build_feature_set(records: Iterable[Record], components: Components, device: torch.device,
                      batch_size: int = 64, calibrate_vae_scale: bool = False, progress: bool = True) -> FeatureSet:
    """Run the frozen encoders over the records.

    ``calibrate_vae_scale`` sets the VAE's scaling factor to 1/std of the latents (what SD did
    for its VAE); for random-init tiny VAEs, whose latent scale is arbitrary.
    """
    from tqdm import tqdm

    vae, te = components.vae.to(device).eval(), components.text_encoder.to(device).eval()
    keys, ids, names, captions, latents, texts, pooled, embs = [], [], [], [], [], [], [], []
    chunk: list[Record] = []

    def flush() -> None:
        images = [r.image for r in chunk]
        latents.append(vae.encode(images_to_tensor(images).to(device)).latent_dist.mean.float().cpu())
        hidden, pool = encode_text(components, [r.caption for r in chunk], device)
        texts.append(hidden.half().cpu())
        pooled.append(pool.float().cpu())
        embs.append(tiny_image_embedding(images))
        for r in chunk:
            keys.append(r.key), ids.append(r.identity), names.append(r.name), captions.append(r.caption)
        chunk.clear()

    for rec in tqdm(records, desc="encode", unit="img", disable=not progress):
        chunk.append(rec)
        if len(chunk) == batch_size:
            flush()
    if chunk:
        flush()
    raw = torch.cat(latents)
    if calibrate_vae_scale:
        vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
    null_hidden, _ = encode_text(components, [""], device)
    return FeatureSet(
        keys=keys, identities=torch.tensor(ids, dtype=torch.int64), names=names, captions=captions,
        latents=(raw * components.vae_scale).half(), text=torch.cat(texts), pooled=torch.cat(pooled),
        image_emb=torch.cat(embs), null_text=null_hidden[0].half().cpu(),
    )
