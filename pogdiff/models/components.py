"""Stable Diffusion components: loaded from a local diffusers directory / hub id, or built tiny.

Only the UNet trains; the VAE and the text encoder stay frozen (and out of any ZeRO partitioning).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pogdiff.config import ModelConfig

# (subfolder, file that must exist in it) of a diffusers Stable Diffusion directory.
REQUIRED_PARTS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": None,  # vocab/merges or tokenizer.json: any file will do
    "scheduler": "scheduler_config.json",
}
TINY_MAX_TOKENS = 48


class ModelLoadError(RuntimeError):
    pass


@dataclass
class Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def ddim_scheduler(self) -> DDIMScheduler:
        return DDIMScheduler.from_config(self.noise_scheduler.config)


def tiny_unet_config() -> dict:
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )


def tiny_vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )


def build_tiny_tokenizer(words: list[str]) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over a closed vocabulary: every word is one token, and the ids are a pure
    function of ``words`` (a trained BPE breaks ties differently in every process).

    Each word has a merge for every split of every substring, so whichever merge fires first,
    the word ends up whole. Bytes outside the words still tokenize (the byte-level alphabet).
    """
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges: dict[tuple[str, str], None] = {}
    for word in sorted(set(words)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        n = len(symbols)
        for length in range(2, n + 1):
            for i in range(n - length + 1):
                for k in range(i + 1, i + length):
                    merges.setdefault(("".join(symbols[i:k]), "".join(symbols[k:i + length])), None)
    # shorter results first: a merge's inputs always exist before it fires
    ordered = sorted(merges, key=lambda m: (len(m[0]) + len(m[1]), m))
    for left, right in ordered:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=ordered, model_max_length=TINY_MAX_TOKENS)


def build_tiny(seed: int = 0) -> Components:
    from pogdiff.data.synthetic import vocabulary

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(vocabulary())
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TINY_MAX_TOKENS, projection_dim=32,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return Components(
        unet=UNet2DConditionModel(**tiny_unet_config()),
        vae=AutoencoderKL(**tiny_vae_config()),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
        ),
    )


def check_model_dir(path: Path) -> None:
    missing = []
    for part, required in REQUIRED_PARTS.items():
        folder = path / part
        if not folder.is_dir():
            missing.append(f"{part}/")
        elif required and not (folder / required).is_file():
            missing.append(f"{part}/{required}")
        elif required is None and not any(folder.iterdir()):
            missing.append(f"{part}/ (empty)")
    if part_weights_missing := [p for p in ("unet", "vae", "text_encoder") if (path / p).is_dir()
                                and not any((path / p).glob("*.safetensors")) and not any((path / p).glob("*.bin"))]:
        missing += [f"{p}/ weights (*.safetensors or *.bin)" for p in part_weights_missing]
    if missing:
        raise ModelLoadError(
            f"model directory '{path}' is not a complete diffusers Stable Diffusion directory; missing: "
            + ", ".join(missing) + ". Export one with StableDiffusionPipeline.save_pretrained(), or use model.name=tiny."
        )


def load_components(cfg: ModelConfig, with_unet: bool = True) -> Components:
    """``with_unet=False`` leaves ``unet`` None: the frozen encoders alone (e.g. for ``prepare``)."""
    if cfg.name == "tiny":
        return build_tiny(cfg.seed)
    path = Path(cfg.name).expanduser()
    if path.exists():
        check_model_dir(path)
        source, kw = str(path), {}
    elif cfg.name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model directory '{cfg.name}' does not exist")
    else:
        source, kw = cfg.name, {"revision": cfg.revision}
    try:
        return Components(
            unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw) if with_unet else None,
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **kw),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw),
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
            noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw),
        )
    except OSError as e:
        raise ModelLoadError(f"could not load Stable Diffusion components from '{cfg.name}': {e}") from None


def freeze(*modules: torch.nn.Module) -> None:
    for m in modules:
        m.requires_grad_(False)
        m.eval()


def tokenize(components: Components, captions: list[str]) -> torch.Tensor:
    """Caption token ids (B, L) int64, padded/truncated to the tokenizer's max length (77 for SD)."""
    return components.tokenizer(
        captions, padding="max_length", max_length=components.tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode_tokens(components: Components, input_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token hidden states (B, L, D) for UNet cross-attention, pooled embedding (B, D))."""
    out = components.text_encoder(input_ids.to(device, torch.long))
    return out.last_hidden_state, out.pooler_output


def encode_text(components: Components, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_tokens(components, tokenize(components, captions), device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA device is visible")
    return torch.device(name)


def save_components(c: Components, path: Path) -> None:
    """A diffusers Stable Diffusion directory (without model_index.json) of these components."""
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        getattr(c, name).save_pretrained(path / name)
    c.noise_scheduler.save_pretrained(path / "scheduler")
