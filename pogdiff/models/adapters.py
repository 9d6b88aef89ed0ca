"""What trains of the UNet: all of it, or peft LoRA adapters on it (``train.adapter``).

    apply_adapter(unet, cfg.train)      # once, in pogdiff.train.assembly, before any engine
    load_trained(unet, weights, what)   # a checkpoint's trainable weights, strict over them
    trained_unet(model_dir, weights, cfg.train)   # the base UNet with what was trained

A LoRA run's engine sees only the adapter's parameters (the base is frozen before peft adds
them), so its optimizer, ZeRO partitions, EMA, checkpoints and export hold the adapter alone.
The export is diffusers' LoRA format (``pytorch_lora_weights.safetensors``), which
``pipe.load_lora_weights(dir)`` loads into the base pipeline.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pogdiff.config import TrainConfig

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' name, what load_lora_weights looks for
ADAPTER_STREAM = 0xADA  # derive_seed(train.seed, ADAPTER_STREAM) initialises the adapter


def apply_adapter(unet: torch.nn.Module, tc: TrainConfig) -> None:
    """Freeze the UNet and add the LoRA adapter (``train.adapter=lora``); nothing for a full fine-tune.
    The adapter's initial weights are a function of ``train.seed`` alone (not of the global RNG's
    state), so every rank, and a run and its rerun, start from the same adapter."""
    if tc.adapter == "none":
        return
    from peft import LoraConfig

    from pogdiff.seeds import derive_seed

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(tc.seed, ADAPTER_STREAM))
        try:
            unet.add_adapter(LoraConfig(r=tc.lora_rank, lora_alpha=tc.lora_alpha or tc.lora_rank,
                                        lora_dropout=tc.lora_dropout, target_modules=list(tc.lora_target_modules),
                                        init_lora_weights="gaussian", use_dora=tc.lora_use_dora))
        except ValueError as e:  # peft: "Target modules ... not found in the base model"
            raise ValueError(f"train.lora_target_modules={list(tc.lora_target_modules)} matched no module of the "
                             f"UNet ({e}); the attention projections are to_q, to_k, to_v, to_out.0") from None


def trainable_names(module: torch.nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def load_trained(unet: torch.nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Load ``weights`` into ``unet``'s trainable parameters: exactly those, no more, no fewer."""
    trainable = set(trainable_names(unet))
    missing, unexpected = sorted(trainable - weights.keys()), sorted(weights.keys() - trainable)
    if missing or unexpected:
        raise ValueError(f"{what} does not hold this run's trainable parameters ({len(trainable)}): "
                         f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:2]}). Was it written with another train.adapter or LoRA setting?")
    unet.load_state_dict(weights, strict=False)


def trained_unet(model_dir: str | Path, weights: dict[str, torch.Tensor], tc: TrainConfig):
    """``model_dir``'s UNet with the trained ``weights``: every parameter of a full fine-tune (the
    base's own are not read), or the base with its adapter."""
    from diffusers import UNet2DConditionModel

    unet_dir = Path(model_dir) / "unet"
    if tc.adapter == "none":
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_dir))
    else:
        unet = UNet2DConditionModel.from_pretrained(unet_dir)
        apply_adapter(unet, tc)
    load_trained(unet, weights, "the trained weights")
    return unet


def lora_layers(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under diffusers' LoRA names."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
