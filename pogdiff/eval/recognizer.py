"""The evaluation's image encoder: a small identity-recognition CNN, or a local HF vision model.

The paper embeds images with a face-recognition model (FID) and DINOv2 (DINO score, gRecall).
Neither can be downloaded here, so by default pogdiff trains its own recogniser: a CNN with a
cosine-softmax (NormFace) head, trained to classify synthetic identities that are *disjoint* from
the fine-tuning set (pogdiff.tiny_vae.disjoint_records, salt 2: other identities, another seed).
Its penultimate embedding is the feature. It shares nothing with the neighbours' encoder
(features.tiny_image_embedding: weight-free pixel statistics of the central crop), so the metrics
do not reward a method for matching the very features that picked its neighbours.
"""
from __future__ import annotations

import json
import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import Config, ConfigError
from ..features import ImageEncoder, images_to_tensor, load_image_encoder
from ..synthetic import make_identity
from ..tiny_vae import disjoint_records

log = logging.getLogger("pogdiff.eval")

COSINE_SCALE = 16.0  # NormFace logit scale
BATCH = 64


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Recognizer(nn.Module):
    def __init__(self, dim: int = 64, n_classes: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            _block(3, 16), _block(16, 16), nn.MaxPool2d(2),
            _block(16, 32), _block(32, 32), nn.MaxPool2d(2),
            _block(32, 64), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, dim),
        )
        self.classifier = nn.Linear(dim, n_classes, bias=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate embedding, (B, dim); x in [-1, 1], (B, 3, H, W)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.embed(x), dim=1)
        return COSINE_SCALE * z @ F.normalize(self.classifier.weight, dim=1).T


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) images, reflect-padded."""
    radius = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype) / sigma) ** 2)
    k = (k / k.sum()).repeat(x.shape[1], 1, 1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(x.shape[1], 1, 1, -1), groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(x.shape[1], 1, -1, 1), groups=x.shape[1])


def _settings(cfg: Config) -> dict:
    e, d = cfg.eval, cfg.data
    return dict(ids=e.recognizer_ids, per_id=e.recognizer_images_per_id, steps=e.recognizer_steps, dim=e.recognizer_dim,
                lr=e.recognizer_lr, data_seed=d.seed, image_size=d.image_size, exclude_ids=_n_train_ids(cfg),
                blur_augment=True)


def _n_train_ids(cfg: Config) -> int:
    from ..pipeline import train_counts

    return len(train_counts(cfg))


def train_recognizer(cfg: Config, progress: bool = True) -> tuple[Recognizer, dict]:
    from tqdm import tqdm

    s = _settings(cfg)
    fine_tuning = [make_identity(i, s["data_seed"]) for i in range(s["exclude_ids"])]
    records = list(disjoint_records(s["ids"], s["per_id"], s["data_seed"], s["image_size"], salt=2, exclude=fine_tuning))
    x = images_to_tensor([r.image for r in records])
    y = torch.tensor([r.identity for r in records])
    # Every identity's last image is held back to report accuracy on unseen images.
    last = torch.tensor([(i + 1) % s["per_id"] == 0 for i in range(len(records))])
    torch.manual_seed(s["data_seed"])
    model = Recognizer(s["dim"], s["ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, s["lr"], total_steps=max(1, s["steps"]))
    g = torch.Generator().manual_seed(s["data_seed"])
    train_idx = (~last).nonzero().flatten()
    model.train()
    for _ in tqdm(range(s["steps"]), desc="recognizer", unit="step", disable=not progress):
        idx = train_idx[torch.randint(len(train_idx), (BATCH,), generator=g)]
        xb = x[idx]
        flip = torch.rand(len(idx), generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
        # Generated images come through a small VAE and are blurrier than renders: half of each
        # batch is blurred so that identity, not sharpness, decides the embedding.
        half = len(idx) // 2
        xb[half:] = gaussian_blur(xb[half:], 0.3 + 1.2 * float(torch.rand(1, generator=g)))
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x[last]).argmax(1) == y[last]).float().mean())
    stats = {**s, "heldback_accuracy": accuracy, "final_loss": float(loss)}
    log.info("recognizer: accuracy %.3f on held-back images of its %d training identities", accuracy, s["ids"])
    return model, stats


def load_or_train_recognizer(cfg: Config, progress: bool = True) -> tuple[Recognizer, dict]:
    """Cached per run at ``<run>/recognizer.safetensors``; retrained when its settings change."""
    path = cfg.run_dir / "recognizer.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            stats = json.loads(f.metadata()["stats"])
        if {k: stats.get(k) for k in _settings(cfg)} == _settings(cfg):
            model = Recognizer(stats["dim"], stats["ids"])
            model.load_state_dict(load_file(str(path)))
            return model.eval(), stats
    model, stats = train_recognizer(cfg, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata={"stats": json.dumps(stats)})
    tmp.replace(path)
    return model, stats


def eval_encoder(cfg: Config, progress: bool = True) -> tuple[ImageEncoder, dict]:
    """(images -> (B, d) embeddings, a description) for the metrics."""
    name = cfg.eval.encoder
    if name == "tiny" or name == cfg.data.image_encoder:
        raise ConfigError(f"eval.encoder='{name}' is the neighbours' image encoder (data.image_encoder); the "
                          "metrics need independent features: use 'recognizer' or another local HF vision model")
    if name != "recognizer":
        return load_image_encoder(name), {"encoder": name}
    model, stats = load_or_train_recognizer(cfg, progress)

    @torch.no_grad()
    def encode(images: Sequence[Image.Image]) -> torch.Tensor:
        out = [model.embed(images_to_tensor(images[i:i + cfg.eval.batch_size]))
               for i in range(0, len(images), cfg.eval.batch_size)]
        return torch.cat(out).float()

    return encode, {"encoder": "recognizer", **stats}


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(N, H, W, 3) uint8 -> PIL images."""
    return [Image.fromarray(np.ascontiguousarray(im)) for im in images]
