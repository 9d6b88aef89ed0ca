"""The trained model in diffusers format, and image grids.

    export_model(cfg, model_dir, weights, out)
      full fine-tune:     out/unet (UNet2DConditionModel), out/pipeline (StableDiffusionPipeline, or
                          StableDiffusionXLPipeline for an SDXL base)
      train.adapter=lora: out/lora/pytorch_lora_weights.safetensors (+ base.json naming the base);
                          export.fuse_lora also writes out/pipeline with the adapter fused in
    StableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
    make_pipeline(base, base_unet).load_lora_weights(out / "lora")

``model_dir`` is a diffusers Stable Diffusion directory (the dataset's ``model/``): the frozen VAE,
text encoder and tokenizer come from it unchanged, the UNet gets ``weights`` (EMA or raw).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

from pogdiff.runs import atomic_path
from pogdiff.config import ModelConfig, TrainConfig
from pogdiff.models.components import load_components, model_family

PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def pipeline_class(model_dir: str | Path):
    """The diffusers pipeline class of ``model_dir``'s model family."""
    return PIPELINES[model_family(model_dir)]


def make_pipeline(model_dir: str | Path, unet: UNet2DConditionModel, prediction_type: Optional[str] = None):
    """A DDIM pipeline of ``model_dir``'s family: its frozen parts around ``unet``; its scheduler
    says ``prediction_type`` when given (what the UNet was trained to predict), else the model's."""
    from diffusers import DDIMScheduler

    c = load_components(ModelConfig(name=str(model_dir)), with_unet=False)
    scheduler = c.ddim_scheduler() if prediction_type is None else \
        DDIMScheduler.from_config(c.noise_scheduler.config, prediction_type=prediction_type)
    if c.family == "sdxl":
        import json

        index = Path(model_dir) / "model_index.json"  # the base's guidance: a zero or an encoded empty caption
        zeros = json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True) if index.is_file() else True
        return StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                                         tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=zeros)
    return StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=unet,
        scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def export_pipeline(model_dir: str | Path, weights: dict[str, torch.Tensor], out: str | Path,
                    prediction_type: Optional[str] = None) -> Path:
    """A full fine-tune's ``out/unet`` and ``out/pipeline`` (each via a temp dir + rename); returns ``out``."""
    from pogdiff.config import TrainConfig

    return export_model(TrainConfig(prediction_type=prediction_type), model_dir, weights, out)


def export_model(tc: TrainConfig, model_dir: str | Path, weights: dict[str, torch.Tensor], out: str | Path,
                 fuse_lora: bool = False) -> Path:
    """What ``tc`` trained, exported under ``out`` (see the module's docstring); returns ``out``."""
    import json
    import shutil

    from pogdiff.models.adapters import LORA_WEIGHTS, lora_layers, trained_unet
    from pogdiff.train.checkpoint import require_finite

    require_finite(weights, "the UNet to export" if tc.adapter == "none" else "the LoRA adapter to export")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet = trained_unet(model_dir, weights, tc)
    if tc.adapter == "none":
        for name, save in (("unet", unet.save_pretrained),
                           ("pipeline", make_pipeline(model_dir, unet, tc.prediction_type).save_pretrained)):
            with atomic_path(out / name) as tmp:
                save(tmp)
        return out
    with atomic_path(out / "lora") as tmp:
        pipeline_class(model_dir).save_lora_weights(tmp, unet_lora_layers=lora_layers(unet), weight_name=LORA_WEIGHTS,
                                                    safe_serialization=True)
        (tmp / "base.json").write_text(json.dumps({
            "model_dir": str(Path(model_dir).resolve()), "prediction_type": tc.prediction_type,
            "adapter": tc.adapter, "rank": tc.lora_rank, "alpha": tc.lora_alpha or tc.lora_rank,
            "target_modules": list(tc.lora_target_modules), "use_dora": tc.lora_use_dora}, indent=1))
    if fuse_lora:
        pipe = lora_pipeline(model_dir, out / "lora")
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        with atomic_path(out / "pipeline") as tmp:
            pipe.save_pretrained(tmp)
    else:  # an earlier fused export is not this run's model
        shutil.rmtree(out / "pipeline", ignore_errors=True)
    return out


def lora_pipeline(model_dir: str | Path, lora_dir: str | Path):
    """``model_dir``'s pipeline (its own UNet) with the LoRA weights of ``lora_dir`` loaded."""
    import json

    meta = Path(lora_dir) / "base.json"
    prediction_type = json.loads(meta.read_text()).get("prediction_type") if meta.is_file() else None
    pipe = make_pipeline(model_dir, UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet"), prediction_type)
    pipe.load_lora_weights(str(lora_dir))
    return pipe


def image_grid(images: Sequence[Image.Image], rows: int) -> Image.Image:
    """Images of one size pasted row-major into a ``rows`` x ceil(n / rows) grid."""
    cols = -(-len(images) // rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid
