"""The frozen encoders that ``prepare`` runs once per record: VAE latents, caption tokens, pooled
text embeddings (for the density) and image embeddings (for the neighbours)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from pogdiff.models.components import Components, encode_tokens, tokenize

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
    """The image encoder for neighbours (Eq. 8): ``tiny`` (weight-free pixel correlation),
    ``tiny-ssl`` (the committed self-supervised CNN, pogdiff.models.ssl_encoder) or a directory
    ``pogdiff pretrain-encoder`` wrote, or a local Hugging Face vision model directory (CLIP,
    SigLIP: ``get_image_features``; DINOv2, ViT: the pooled CLS output), loaded with
    AutoModel/AutoImageProcessor. Nothing is downloaded."""
    if name == "tiny":
        return tiny_image_embedding
    from pogdiff.models.ssl_encoder import SSL_DIR, is_encoder_dir, load_encoder

    path = SSL_DIR if name == "tiny-ssl" else Path(name).expanduser()
    if is_encoder_dir(path):  # tiny-ssl, or another `pogdiff pretrain-encoder` output
        return load_encoder(path, device)
    if not (path / "config.json").is_file() or not (path / "preprocessor_config.json").is_file():
        raise ValueError(f"image encoder '{name}' is not 'tiny', 'tiny-ssl', a `pogdiff pretrain-encoder` output nor "
                         "a local Hugging Face model directory with config.json and preprocessor_config.json (save one "
                         "with model.save_pretrained() and AutoImageProcessor.save_pretrained())")
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
def encode_latents(components: Components, images: Sequence[Image.Image], device: torch.device) -> torch.Tensor:
    """The VAE's posterior means (B, 4, h, w) fp32, not yet scaled."""
    return components.vae.encode(images_to_tensor(images).to(device)).latent_dist.mean.float().cpu()


@torch.no_grad()
def encode_batch(components: Components, images: Sequence[Image.Image], captions: list[str], device: torch.device,
                 image_encoder: ImageEncoder = tiny_image_embedding) -> EncodedBatch:
    """One pass of the frozen encoders over a batch of (image, caption) pairs (images of one size)."""
    latents = encode_latents(components, images, device)
    tokens = tokenize(components, captions)
    hidden, pooled = encode_tokens(components, tokens, device)
    return EncodedBatch(latents, tokens, hidden.cpu(), pooled.float().cpu(), image_encoder(images).float().cpu())
