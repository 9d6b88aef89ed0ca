"""``pogdiff pretrain``: a pretrained base for the tiny model, so that fine-tuning starts from a
model that already draws people from captions, as the paper's Stable Diffusion does.

The UNet and the text encoder are trained from scratch (the VAE is the pretrained tiny VAE) on
balanced synthetic identities that are disjoint from every fine-tuning profile: other looks and
other names, recombined from the same name pools, with captions from the same grammar. Half of
the captions are the bare prompt the evaluation uses ("An image of <name>."), so that the base
learns names as well as descriptions. The text encoder is frozen from then on: fine-tuning trains
the UNet only.

A go/no-go comes with it: samples of ``pretrain.eval_ids`` of its own identities, from the base
and from the random-init model, scored by gRecall and the DINO-style similarity against held-out
renders those identities never trained on, with a recogniser trained on their training renders.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pogdiff.config import Config
from pogdiff.data.synthetic import Record, make_identity, render

log = logging.getLogger("pogdiff.pretrain")

BASE_DIR = Path(__file__).parent / "tiny_base"  # the committed base: model.name=tiny-base
FINE_TUNING_IDS = 1_000  # every fine-tuning profile's identities are indices below this
BASE_INDEX_OFFSET = FINE_TUNING_IDS  # base identities: indices from here, under a salted seed (two-part names)
SALT = 3  # the tiny VAE and the recogniser use other salts


def base_records(n_ids: int, per_id: int, seed: int, size: int) -> Iterator[tuple[Record, int]]:
    """(record, image index) for ``per_id`` images of each of ``n_ids`` identities whose look and
    name no fine-tuning identity (data.seed ``seed``, index < FINE_TUNING_IDS) has. Labels 0..n-1."""
    from pogdiff.models.tiny_vae import looks

    fine = [make_identity(i, seed) for i in range(FINE_TUNING_IDS)]
    taken_looks, taken_names = {looks(i) for i in fine}, {i.name for i in fine}
    salted = seed + 7919 * SALT
    label, index = 0, BASE_INDEX_OFFSET
    while label < n_ids:
        ident = make_identity(index, salted)
        index += 1
        if looks(ident) in taken_looks or ident.name in taken_names:
            continue
        taken_names.add(ident.name)
        for j in range(per_id):
            image, caption = render(ident, j, salted, size)
            yield Record(key=f"base{ident.index:06d}_img{j:04d}", identity=label, name=ident.name, caption=caption,
                         image=image), j
        label += 1


def save_model_dir(c, path: Path) -> None:
    """A diffusers StableDiffusionPipeline directory of components ``c`` (its DDPM scheduler)."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                            scheduler=c.noise_scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)


def pretrain(cfg: Config, progress: bool = True) -> dict:
    """Train the base, write it (a diffusers SD directory) and its ``pretrain.json``; returns that."""
    from tqdm import tqdm

    from pogdiff.data.encode import encode_latents
    from pogdiff.models.components import build_tiny, tokenize
    from pogdiff.models.tiny_vae import pretrain_tiny_vae
    from pogdiff.runs import atomic_path, write_json

    pc, size = cfg.pretrain, cfg.data.image_size
    out = Path(pc.output or Path(cfg.output_dir) / "tiny-base")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.model.seed)
    c = build_tiny(cfg.model.seed)
    pretrain_tiny_vae(c.vae, cfg.model.tiny_vae_steps, cfg.model.seed, size, progress)
    c.vae.requires_grad_(False).eval()
    records = [r for r, j in base_records(pc.ids, pc.images_per_id, cfg.data.seed, size)]
    cpu = torch.device("cpu")
    raw = torch.cat([encode_latents(c, [r.image for r in records[i:i + 64]], cpu) for i in range(0, len(records), 64)])
    c.vae.register_to_config(scaling_factor=float(1.0 / raw.std()))  # unit-variance latents, as SD's VAE
    latents = raw * c.vae.config.scaling_factor
    full = tokenize(c, [r.caption for r in records])
    named = tokenize(c, [cfg.sample.prompt_template.format(p=r.name) for r in records])
    empty = tokenize(c, [""])[0]

    params = list(c.unet.parameters()) + list(c.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=pc.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, pc.warmup_steps))
                                              * 0.5 * (1 + math.cos(math.pi * min(1.0, s / pc.steps))))
    alphas = c.noise_scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(cfg.model.seed)
    c.unet.train()
    c.text_encoder.train()
    losses = []
    bar = tqdm(range(pc.steps), desc="pretrain", unit="step", disable=not progress)
    for step in bar:
        idx = torch.randint(len(records), (pc.batch_size,), generator=g)
        u = torch.rand(pc.batch_size, generator=g)
        tokens = torch.where((u < pc.name_prompt_fraction)[:, None], named[idx], full[idx])
        tokens = torch.where((torch.rand(pc.batch_size, generator=g) < pc.caption_dropout)[:, None], empty, tokens)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(alphas), (pc.batch_size,), generator=g)
        abar = alphas[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        pred = c.unet(x_t, t, encoder_hidden_states=c.text_encoder(tokens).last_hidden_state).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    c.unet.eval()
    c.text_encoder.requires_grad_(False).eval()
    with atomic_path(out) as tmp:
        save_model_dir(c, tmp)
    seconds = time.perf_counter() - t0
    summary = {"settings": {**vars(pc), "output": None, "image_size": size, "data_seed": cfg.data.seed,
                            "model_seed": cfg.model.seed, "tiny_vae_steps": cfg.model.tiny_vae_steps},
               "images": len(records), "first_loss": float(np.mean(losses[:50])), "last_loss": float(np.mean(losses[-50:])),
               "seconds": round(seconds, 1)}
    summary["go_no_go"] = go_no_go(cfg, out, progress)
    write_json(out / "pretrain.json", summary)
    log.info("base written to %s: %s", out, json.dumps(summary["go_no_go"]))
    return summary


def go_no_go(cfg: Config, base: Path, progress: bool = True) -> dict:
    """gRecall and the DINO-style score of the base and of the random-init model (same VAE and
    tokenizer) on held-out renders of ``pretrain.eval_ids`` of the base's own identities."""
    from pogdiff.data.encode import images_to_tensor
    from pogdiff.eval.metrics import dino_score_per_id, grecall
    from pogdiff.eval.recognizer import fit_recognizer, to_pil
    from pogdiff.eval.sampling import generate, load_pipeline
    from pogdiff.models.components import build_tiny, load_components
    from pogdiff.config import ModelConfig

    pc, e, sc = cfg.pretrain, cfg.eval, cfg.sample
    per_id = pc.images_per_id + pc.heldout_images
    records = list(base_records(pc.eval_ids, per_id, cfg.data.seed, cfg.data.image_size))
    x = images_to_tensor([r.image for r, _ in records])
    y = torch.tensor([r.identity for r, _ in records])
    held = torch.tensor([j >= pc.images_per_id for _, j in records])
    recognizer, stats = fit_recognizer(x, y, held, pc.eval_ids, dict(dim=e.recognizer_dim, lr=e.recognizer_lr,
                                                                      steps=e.recognizer_steps), progress)

    @torch.no_grad()
    def embed(images) -> np.ndarray:
        return recognizer.embed(images_to_tensor(images)).float().numpy()

    heldout = {i: embed([r.image for r, j in records if r.identity == i and j >= pc.images_per_id])
               for i in range(pc.eval_ids)}
    prompts = {r.identity: sc.prompt_template.format(p=r.name) for r, _ in records}
    result = {"recognizer_heldout_accuracy": stats["heldback_accuracy"], "identities": pc.eval_ids,
              "images_per_identity": sc.images_per_id, "ddim_steps": sc.steps, "guidance_scale": sc.guidance_scale}
    with tempfile.TemporaryDirectory() as tmp:
        random_init = build_tiny(cfg.model.seed)
        trained = load_components(ModelConfig(name=str(base)))
        random_init.vae, random_init.tokenizer = trained.vae, trained.tokenizer
        save_model_dir(random_init, Path(tmp) / "random")
        for name, path in (("base", base), ("random_init", Path(tmp) / "random")):
            pipe = load_pipeline(path, torch.device("cpu"))
            images = generate(pipe, prompts, sc.images_per_id, sc.steps, sc.guidance_scale, sc.seed, sc.batch_size)
            generated = {i: embed(to_pil(images[i])) for i in images}
            result[name] = {"grecall": grecall(generated, heldout, e.grecall_threshold),
                            "dino_style": float(np.mean(list(dino_score_per_id(generated, heldout).values())))}
    result["go"] = bool(result["base"]["grecall"] > result["random_init"]["grecall"] + 0.1
                        and result["base"]["dino_style"] > result["random_init"]["dino_style"] + 0.1)
    return result
