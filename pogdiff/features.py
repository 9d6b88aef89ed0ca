"""Precomputed per-sample features: VAE latents, text conditioning, pooled text and image embeddings.

The frozen encoders run once, up front; training then touches only these tensors. Here the whole
set lives in memory (the one-machine slice); the shard writer stores the same fields per sample.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .models import Components, encode_tokens, tokenize
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


ImageEncoder = Callable[[Sequence[Image.Image]], torch.Tensor]  # images -> (B, d) fp32 embeddings


def load_image_encoder(name: str, device: torch.device | str = "cpu") -> ImageEncoder:
    """The image encoder for neighbours (Eq. 8): ``tiny`` (weight-free) or a local Hugging Face
    vision model directory (CLIP, SigLIP: ``get_image_features``; DINOv2, ViT: the pooled CLS
    output), loaded with AutoModel/AutoImageProcessor. Nothing is downloaded."""
    if name == "tiny":
        return tiny_image_embedding
    path = Path(name).expanduser()
    if not (path / "config.json").is_file() or not (path / "preprocessor_config.json").is_file():
        raise ValueError(f"image encoder '{name}' is not 'tiny' nor a local Hugging Face model directory with "
                         "config.json and preprocessor_config.json (save one with model.save_pretrained() and "
                         "AutoImageProcessor.save_pretrained())")
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).to(device).eval()

    @torch.no_grad()
    def encode(images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"].to(device)
        if hasattr(model, "get_image_features"):
            out = model.get_image_features(pixel_values=pixels)
        else:
            out = model(pixel_values=pixels)
        if not isinstance(out, torch.Tensor):
            out = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]
        return out.float().cpu()

    return encode


@dataclass
class EncodedBatch:
    latents: torch.Tensor  # (B, 4, h, w) fp32, VAE posterior mean, NOT yet scaled by the VAE scaling factor
    tokens: torch.Tensor  # (B, L) int64 caption token ids
    text: torch.Tensor  # (B, L, D) text-encoder hidden states
    pooled: torch.Tensor  # (B, D) fp32
    image_emb: torch.Tensor  # (B, d) fp32


@torch.no_grad()
def encode_batch(components: Components, images: Sequence[Image.Image], captions: list[str], device: torch.device,
                 image_encoder: ImageEncoder = tiny_image_embedding) -> EncodedBatch:
    """One pass of the frozen encoders over a batch of (image, caption) pairs (images of one size)."""
    latents = components.vae.encode(images_to_tensor(images).to(device)).latent_dist.mean.float().cpu()
    tokens = tokenize(components, captions)
    hidden, pooled = encode_tokens(components, tokens, device)
    return EncodedBatch(latents, tokens, hidden.cpu(), pooled.float().cpu(), image_encoder(images).float().cpu())


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
                      batch_size: int = 64, calibrate_vae_scale: bool = False, progress: bool = True,
                      image_encoder: ImageEncoder = tiny_image_embedding) -> FeatureSet:
    """Run the frozen encoders over the records.

    ``calibrate_vae_scale`` sets the VAE's scaling factor to 1/std of the latents (what SD did
    for its VAE); for random-init tiny VAEs, whose latent scale is arbitrary.
    """
    from tqdm import tqdm

    vae, te = components.vae.to(device).eval(), components.text_encoder.to(device).eval()
    keys, ids, names, captions, latents, texts, pooled, embs = [], [], [], [], [], [], [], []
    chunk: list[Record] = []

    def flush() -> None:
        enc = encode_batch(components, [r.image for r in chunk], [r.caption for r in chunk], device, image_encoder)
        latents.append(enc.latents)
        texts.append(enc.text.half())
        pooled.append(enc.pooled)
        embs.append(enc.image_emb)
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
    null_hidden, _ = encode_tokens(components, tokenize(components, [""]), device)
    return FeatureSet(
        keys=keys, identities=torch.tensor(ids, dtype=torch.int64), names=names, captions=captions,
        latents=(raw * components.vae_scale).half(), text=torch.cat(texts), pooled=torch.cat(pooled),
        image_emb=torch.cat(embs), null_text=null_hidden[0].half().cpu(),
    )
