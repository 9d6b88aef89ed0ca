"""The trained UNet in diffusers format, a StableDiffusionPipeline around it, and image grids.

    export_pipeline(model_dir, weights, out)   # out/unet (UNet2DConditionModel), out/pipeline
    StableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)

``model_dir`` is a diffusers Stable Diffusion directory (the run's ``model/``): the frozen VAE,
text encoder and tokenizer come from it unchanged, the UNet gets ``weights`` (EMA or raw).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from pogdiff.runs import atomic_path
from pogdiff.config import ModelConfig
from pogdiff.models.components import load_components


def build_unet(model_dir: str | Path, weights: dict[str, torch.Tensor]) -> UNet2DConditionModel:
    """The UNet of ``model_dir``'s config with ``weights`` (every parameter must be there)."""
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(Path(model_dir) / "unet"))
    unet.load_state_dict(weights, strict=True)
    return unet


def make_pipeline(model_dir: str | Path, unet: UNet2DConditionModel,
                  prediction_type: Optional[str] = None) -> StableDiffusionPipeline:
    """A DDIM Stable Diffusion pipeline: ``model_dir``'s frozen parts around ``unet``; its scheduler
    says ``prediction_type`` when given (what the UNet was trained to predict), else the model's."""
    from diffusers import DDIMScheduler

    c = load_components(ModelConfig(name=str(model_dir)), with_unet=False)
    scheduler = c.ddim_scheduler() if prediction_type is None else \
        DDIMScheduler.from_config(c.noise_scheduler.config, prediction_type=prediction_type)
    return StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=unet,
        scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def export_pipeline(model_dir: str | Path, weights: dict[str, torch.Tensor], out: str | Path,
                    prediction_type: Optional[str] = None) -> Path:
    """Write ``out/unet`` and ``out/pipeline`` (each via a temp dir + rename); returns ``out``."""
    from pogdiff.train.checkpoint import require_finite

    require_finite(weights, "the UNet to export")
    out = Path(out)
    unet = build_unet(model_dir, weights)
    out.mkdir(parents=True, exist_ok=True)
    for name, save in (("unet", unet.save_pretrained), ("pipeline", make_pipeline(model_dir, unet, prediction_type).save_pretrained)):
        with atomic_path(out / name) as tmp:
            save(tmp)
    return out


def image_grid(images: Sequence[Image.Image], rows: int) -> Image.Image:
    """Images of one size pasted row-major into a ``rows`` x ceil(n / rows) grid."""
    cols = -(-len(images) // rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid
