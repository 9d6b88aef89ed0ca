"""Stable Diffusion components: loaded from a local diffusers directory / hub id, or built tiny.

Only the UNet trains; the VAE and the text encoder(s) stay frozen (and out of any ZeRO partitioning).

The model family is the one seam between SD 1.x/2.x and SDXL, read from the directory
(``text_encoder_2/`` or an XL ``model_index.json``):

    family   tokens (per caption)      conditioning the UNet gets (``encode_tokens``)
    sd       (L,)  one tokenizer       (B, L, D) last hidden states
    sdxl     (2L,) both tokenizers     (B, L + 1, D1 + D2): both encoders' penultimate hidden states,
                                       and one extra row [pooled text embedding | time ids | 0]

SDXL's pooled embedding belongs to its caption, so it travels in the caption's conditioning: y and
y' stay one tensor each through caption dropout, the concatenated ``[y; y']`` call and the
diagnostics. The time ids belong to the image x, so the objective writes x's into both
(``attach_time_ids``), and ``unet_kwargs`` unpacks the row into diffusers' ``added_cond_kwargs``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pogdiff.config import ModelConfig

# (subfolder, file that must exist in it) of a diffusers Stable Diffusion directory.
REQUIRED_PARTS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": None,  # vocab/merges or tokenizer.json: any file will do
    "scheduler": "scheduler_config.json",
}
SDXL_PARTS = {"text_encoder_2": "config.json", "tokenizer_2": None}
TINY_MAX_TOKENS = 48
TIME_IDS = 6  # SDXL's (original h, w, crop top, left, target h, w)


class ModelLoadError(RuntimeError):
    pass


@dataclass
class Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    text_encoder_2: Optional[CLIPTextModelWithProjection] = None  # SDXL
    tokenizer_2: Optional[CLIPTokenizer] = None

    @property
    def family(self) -> str:
        return "sdxl" if self.text_encoder_2 is not None else "sd"

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

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


def tiny_sdxl_unet_config() -> dict:
    """The tiny UNet with SDXL's additions: text-time embedding of the pooled text embedding (32)
    and six time ids (8 each), cross-attention over both encoders' states (32 + 32)."""
    return {**tiny_unet_config(), "cross_attention_dim": 64, "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + TIME_IDS * 8,
            "use_linear_projection": True}


def build_tiny_sdxl(seed: int = 0) -> Components:
    """A random-init tiny SDXL (two text encoders, pooled embedding, time ids), for tests: save it
    with ``StableDiffusionXLPipeline(...).save_pretrained`` to get an SDXL model directory."""
    from pogdiff.data.synthetic import vocabulary

    c = build_tiny(seed)
    text_config = c.text_encoder.config
    torch.manual_seed(seed + 1)
    c.unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
    c.text_encoder_2 = CLIPTextModelWithProjection(text_config)
    c.tokenizer_2 = build_tiny_tokenizer(vocabulary())
    return c


def model_family(model: str | Path, revision: Optional[str] = None) -> str:
    """``sdxl`` for a diffusers SDXL directory (a second text encoder, or an XL pipeline class in
    ``model_index.json``) or hub id (its ``model_index.json``), else ``sd``."""
    import json

    path = Path(model).expanduser()
    if not path.is_dir():
        from diffusers import DiffusionPipeline

        return "sdxl" if "XL" in DiffusionPipeline.load_config(str(model), revision=revision).get("_class_name", "") \
            else "sd"
    index = path / "model_index.json"
    if index.is_file() and "XL" in json.loads(index.read_text()).get("_class_name", ""):
        return "sdxl"
    return "sdxl" if (path / "text_encoder_2").is_dir() else "sd"


def check_model_dir(path: Path) -> None:
    missing = []
    parts = {**REQUIRED_PARTS, **(SDXL_PARTS if model_family(path) == "sdxl" else {})}
    for part, required in parts.items():
        folder = path / part
        if not folder.is_dir():
            missing.append(f"{part}/")
        elif required and not (folder / required).is_file():
            missing.append(f"{part}/{required}")
        elif required is None and not any(folder.iterdir()):
            missing.append(f"{part}/ (empty)")
    if part_weights_missing := [p for p in ("unet", "vae", "text_encoder", "text_encoder_2") if (path / p).is_dir()
                                and not any((path / p).glob("*.safetensors")) and not any((path / p).glob("*.bin"))]:
        missing += [f"{p}/ weights (*.safetensors or *.bin)" for p in part_weights_missing]
    if missing:
        raise ModelLoadError(
            f"model directory '{path}' is not a complete diffusers Stable Diffusion directory; missing: "
            + ", ".join(missing) + ". Export one with StableDiffusionPipeline.save_pretrained() (or "
            "StableDiffusionXLPipeline's), or use model.name=tiny."
        )


def check_model(cfg: ModelConfig) -> str:
    """``model.name`` checked where the job starts, before any worker loads it: ``tiny``, a complete
    local diffusers directory, or a hub id whose ``model_index.json`` this machine can read (from the
    Hugging Face cache or the hub). Returns its family (``sd`` | ``sdxl``); raises ModelLoadError."""
    if cfg.name == "tiny":
        return "sd"
    path = Path(cfg.name).expanduser()
    if path.exists():
        check_model_dir(path)
        return model_family(path)
    if cfg.name.startswith((".", "/", "~")) or cfg.name.count("/") != 1:
        raise ModelLoadError(f"model directory '{cfg.name}' does not exist (model.name; nor is it a hub id, which is "
                             "'owner/name'). Give a diffusers directory that save_pretrained() wrote, or model.name=tiny")
    import logging

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings: the error below says it once
    try:
        return model_family(cfg.name, cfg.revision)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"model.name='{cfg.name}' is not a local directory, and this machine cannot read it as a "
                             f"hub id ({first}). Download it with `huggingface-cli download {cfg.name}` (or "
                             "save_pretrained() it to a directory and give that path)") from None
    finally:
        hub_log.setLevel(level)


def load_components(cfg: ModelConfig, with_unet: bool = True, with_vae: bool = True) -> Components:
    """``with_unet=False`` leaves ``unet`` None: the frozen encoders alone (e.g. for ``prepare``);
    ``with_vae=False`` leaves ``vae`` None too (the text encoders alone, for training)."""
    if cfg.name == "tiny":
        return build_tiny(cfg.seed)
    family = check_model(cfg)
    path = Path(cfg.name).expanduser()
    source, kw = (str(path), {}) if path.exists() else (cfg.name, {"revision": cfg.revision})
    try:
        xl = family == "sdxl"
        return Components(
            unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw) if with_unet else None,
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **kw) if with_vae else None,
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw),
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
            noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **kw)
            if xl else None,
            tokenizer_2=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw) if xl else None,
        )
    except OSError as e:
        raise ModelLoadError(f"could not load Stable Diffusion components from '{cfg.name}': {e}") from None


def freeze(*modules: torch.nn.Module) -> None:
    for m in modules:
        m.requires_grad_(False)
        m.eval()


def tokenize(components: Components, captions: list[str]) -> torch.Tensor:
    """Caption token ids (B, L) int64, padded/truncated to the tokenizer's max length (77 for SD);
    SDXL: (B, 2L), the first tokenizer's ids then the second's."""
    return torch.cat([tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids
                      for tokenizer in (components.tokenizer, components.tokenizer_2) if tokenizer is not None], 1)


@torch.no_grad()
def encode_tokens(components: Components, input_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the UNet's conditioning, pooled text embedding (B, P)), see the module's docstring. SDXL's
    pooled embedding is the second encoder's projection (what its UNet's text-time embedding
    takes); its time ids are left 0 here."""
    ids = input_ids.to(device, torch.long)
    if components.text_encoder_2 is None:
        out = components.text_encoder(ids)
        return out.last_hidden_state, out.pooler_output
    split = components.tokenizer.model_max_length  # tokenize's layout: the first tokenizer's ids, then the second's
    first, second = ids[:, :split], ids[:, split:]  # as diffusers' SDXL encode_prompt: penultimate states, pooled of the 2nd
    one = components.text_encoder(first, output_hidden_states=True).hidden_states[-2]
    out = components.text_encoder_2(second, output_hidden_states=True)
    hidden, pooled = torch.cat([one, out.hidden_states[-2]], -1), out.text_embeds
    if hidden.shape[-1] < pooled.shape[-1] + TIME_IDS:
        raise ModelLoadError(f"SDXL text states ({hidden.shape[-1]}) narrower than the pooled embedding "
                             f"({pooled.shape[-1]}) and {TIME_IDS} time ids")
    row = torch.zeros_like(hidden[:, :1])
    row[:, 0, :pooled.shape[-1]] = pooled.to(row.dtype)
    return torch.cat([hidden, row], 1), pooled


def pooled_dim(unet_config: Optional[dict]) -> Optional[int]:
    """The pooled text embedding's width an SDXL UNet takes (None: no text-time embedding, or no
    diffusers config at all)."""
    if not unet_config or unet_config.get("addition_embed_type") != "text_time":
        return None
    return unet_config["projection_class_embeddings_input_dim"] - TIME_IDS * unet_config["addition_time_embed_dim"]


def attach_time_ids(cond: torch.Tensor, time_ids: torch.Tensor, pooled: int) -> torch.Tensor:
    """SDXL conditioning (B, L + 1, D) with x's time ids (B, 6) written after the pooled embedding."""
    cond = cond.clone()
    cond[:, -1, pooled:pooled + TIME_IDS] = time_ids.to(cond.device, cond.dtype)
    return cond


def unet_kwargs(unet_config: Optional[dict], cond: torch.Tensor) -> dict:
    """The UNet's conditioning arguments from ``cond`` (see the module's docstring)."""
    pooled = pooled_dim(unet_config)
    if pooled is None:
        return {"encoder_hidden_states": cond}
    row = cond[:, -1]
    return {"encoder_hidden_states": cond[:, :-1],
            "added_cond_kwargs": {"text_embeds": row[:, :pooled], "time_ids": row[:, pooled:pooled + TIME_IDS]}}


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
    for name in ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        if getattr(c, name) is not None:
            getattr(c, name).save_pretrained(path / name)
    c.noise_scheduler.save_pretrained(path / "scheduler")
