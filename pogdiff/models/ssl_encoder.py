"""``tiny-ssl``: a learned image encoder for the neighbours (Eq. 8), standing in for the paper's
pretrained encoder, which cannot be downloaded here.

A small CNN trained self-supervised, SimCLR-style: two augmented views of each image are pulled
together against every other image of the batch (NT-Xent); no identity label is read. Its
images are renders of synthetic identities disjoint from every fine-tuning profile and from the
evaluation recogniser's (another salt, their looks excluded), so neither the data the method
fine-tunes on nor the metrics' encoder share anything with it.

    pogdiff pretrain-encoder configs/encoder.yaml     # -> pogdiff/models/tiny_ssl (committed)
    data.image_encoder=tiny-ssl                       # prepare embeds every image with it

The augmentations remove what changes between two photos of one person and is not the person:
crop, scale and mirror, the light's colour and strength, sensor noise, and the background
(the ring outside a random radius around the centre is refilled with one random colour, as the
subject is centred; the pixel encoder, tiny, keeps only the central crop for the same reason).
``encoder.json`` beside the weights holds the settings and the go/no-go: the share of each
sample's neighbours of its own identity, head and tail, against the pixel encoder's.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from pogdiff.config import Config

log = logging.getLogger("pogdiff.ssl")

SSL_DIR = Path(__file__).parent / "tiny_ssl"  # the committed encoder: data.image_encoder=tiny-ssl
WEIGHTS, META = "encoder.safetensors", "encoder.json"
SALT = 4  # the tiny VAE, the recogniser (2) and tiny-base (3) use other salts
RECOGNISER_SALT, RECOGNISER_LOOKS = 2, 1024  # the recogniser's first identities, whose looks are excluded


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """3x3 conv, batch norm, ReLU: the block of this encoder and of the evaluation's recogniser."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SSLEncoder(nn.Module):
    """CNN backbone (the embedding) and a projection head (for the contrastive loss only)."""

    def __init__(self, dim: int = 64, size: int = 32):
        super().__init__()
        self.size = size
        self.backbone = nn.Sequential(
            conv_block(3, 16), conv_block(16, 16), nn.MaxPool2d(2),
            conv_block(16, 32), conv_block(32, 32), nn.MaxPool2d(2),
            conv_block(32, 64), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64 * 4, dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim) embeddings of images in [-1, 1], (B, 3, size, size)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.embed(x)), dim=1)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random view of each image of ``x`` (B, 3, H, W) in [-1, 1] (see the module docstring)."""
    b, _, h, w = x.shape
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    scale = 0.7 + 0.3 * u(b)  # the view covers 70-100% of the side
    flip = torch.where(u(b) < 0.5, -1.0, 1.0)
    shift = (1 - scale)[:, None] * (2 * u(b, 2) - 1)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale * flip, scale, shift
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode="reflection",
                      align_corners=False)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    outside = (xx ** 2 + yy ** 2).sqrt()[None] > (0.75 + 0.35 * u(b))[:, None, None]  # the background ring
    fill = 2 * u(b, 3, 1, 1) - 1
    x = torch.where(outside[:, None], fill, x)
    gain = (0.75 + 0.5 * u(b, 1, 1, 1)) * (0.85 + 0.3 * u(b, 3, 1, 1))  # light's strength and colour
    x = (x + 1) * gain - 1
    return (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view's positive is the other view of its image, among all 2B - 1 others."""
    z = torch.cat([z1, z2])
    logits = z @ z.T / temperature
    logits.fill_diagonal_(-float("inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, target)


def training_images(cfg: Config) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1]: ``ssl.ids`` x ``ssl.images_per_id`` renders of identities no
    fine-tuning profile nor the recogniser uses (the labels are dropped)."""
    from pogdiff.data.encode import images_to_tensor
    from pogdiff.data.synthetic import make_identity
    from pogdiff.models.pretrain import FINE_TUNING_IDS
    from pogdiff.models.tiny_vae import DISJOINT_INDEX_OFFSET, disjoint_records

    seed = cfg.data.seed
    exclude = [make_identity(i, seed) for i in range(FINE_TUNING_IDS)]
    exclude += [make_identity(DISJOINT_INDEX_OFFSET + i, seed + 7919 * RECOGNISER_SALT) for i in range(RECOGNISER_LOOKS)]
    records = disjoint_records(cfg.ssl.ids, cfg.ssl.images_per_id, seed, cfg.data.image_size, SALT, exclude)
    return images_to_tensor([r.image for r in records])


def train_encoder(cfg: Config, progress: bool = True) -> tuple[SSLEncoder, dict]:
    from tqdm import tqdm

    sc = cfg.ssl
    images = training_images(cfg)
    torch.manual_seed(sc.seed)
    g = torch.Generator().manual_seed(sc.seed)
    model = SSLEncoder(sc.dim, cfg.data.image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=sc.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, sc.lr, total_steps=max(1, sc.steps), pct_start=0.05)
    losses = []
    model.train()
    t0 = time.perf_counter()
    for _ in tqdm(range(sc.steps), desc="ssl encoder", unit="step", disable=not progress):
        batch = images[torch.randint(len(images), (sc.batch_size,), generator=g)]
        loss = nt_xent(model(augment(batch, g)), model(augment(batch, g)), sc.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    stats = {"settings": {**vars(sc), "output": None, "image_size": cfg.data.image_size, "data_seed": cfg.data.seed},
             "images": len(images), "first_loss": losses[0] if losses else None,
             "last_loss": float(np.mean(losses[-50:])) if losses else None,
             "seconds": round(time.perf_counter() - t0, 1)}
    return model, stats


def same_identity_shares(embeddings: torch.Tensor, identities: torch.Tensor, is_minority: torch.Tensor,
                         k: int) -> dict:
    """Over each sample's top-k cosine neighbours (self excluded), head and tail: the share of its
    own identity; the share Eq. 8's draw gives it (weights proportional to the similarity); and
    the recall, its identity's other images found among them, out of as many as could be (a tail
    identity's one other image, or k). A tail sample's share is at most 1/k; its recall is 0 or 1."""
    from pogdiff.method.neighbours import exact_knn, neighbour_weights

    table = exact_knn(embeddings, k, identities)
    valid = table.ids >= 0
    same = valid & ~table.different_identity
    drawn = (neighbour_weights(table.sims, table.ids) * same).sum(1)
    share = same.sum(1) / valid.sum(1).clamp(min=1)
    others = torch.bincount(identities)[identities] - 1
    recall = same.sum(1) / others.clamp(max=k).clamp(min=1)
    out = {}
    for part, rows in (("head", ~is_minority), ("tail", is_minority)):
        for name, value in (("knn_same_identity", share), ("drawn_same_identity", drawn), ("knn_recall", recall)):
            out[f"{name}/{part}"] = round(float(value[rows].mean()), 4)
    return out


def go_no_go(encoder, cfg: Config, profiles: Sequence[str] = ("agedb-m", "agedb-l"), k: int = 10) -> dict:
    """The neighbours' same-identity shares on the fine-tuning profiles' synthetic sets, for
    ``encoder`` and for the pixel encoder (``tiny``)."""
    from pogdiff.data.encode import tiny_image_embedding
    from pogdiff.data.synthetic import iter_records, profile_counts

    out = {}
    for profile in profiles:
        counts = profile_counts(profile)
        records = list(iter_records(counts, cfg.data.seed, cfg.data.image_size))
        images = [r.image for r in records]
        identities = torch.tensor([r.identity for r in records])
        minority = torch.tensor([counts[r.identity] <= cfg.data.minority_images for r in records])
        out[profile] = {name: same_identity_shares(embed(images), identities, minority, k)
                        for name, embed in (("tiny", tiny_image_embedding), ("tiny-ssl", encoder))}
    return out


def image_encoder(model: SSLEncoder, device: torch.device | str = "cpu"):
    """images -> (B, dim) fp32 embeddings, each image resized to the encoder's size first."""
    from pogdiff.data.encode import images_to_tensor

    model = model.to(device).eval()

    @torch.no_grad()
    def encode(images: Sequence[Image.Image]) -> torch.Tensor:
        size = (model.size, model.size)
        resized = [im.convert("RGB") if im.size == size else im.convert("RGB").resize(size, Image.BILINEAR)
                   for im in images]
        return model.embed(images_to_tensor(resized).to(device)).float().cpu()

    return encode


def is_encoder_dir(path: str | Path) -> bool:
    return (Path(path) / META).is_file() and (Path(path) / WEIGHTS).is_file()


def load_encoder(path: str | Path = SSL_DIR, device: torch.device | str = "cpu"):
    """The committed encoder (or another ``pretrain-encoder`` output directory) as an image encoder."""
    path = Path(path)
    meta = json.loads((path / META).read_text())
    model = SSLEncoder(meta["settings"]["dim"], meta["settings"]["image_size"])
    model.load_state_dict(load_file(str(path / WEIGHTS)))
    return image_encoder(model, device)


def pretrain_encoder(cfg: Config, progress: bool = True, out: Optional[Path] = None) -> dict:
    """Train, measure the go/no-go, and write the weights and ``encoder.json`` to ``ssl.output``."""
    from pogdiff.runs import atomic_path

    model, stats = train_encoder(cfg, progress)
    stats["go_no_go"] = go_no_go(image_encoder(model), cfg)
    out = Path(out or cfg.ssl.output or Path(cfg.output_dir) / "tiny-ssl")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
        (tmp / META).write_text(json.dumps(stats, indent=1))
    log.info("tiny-ssl encoder written to %s: %s", out, stats["go_no_go"])
    return stats
