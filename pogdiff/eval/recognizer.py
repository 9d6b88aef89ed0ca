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

import io
import json
import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from pogdiff.config import Config
from pogdiff.data.encode import ImageEncoder, images_to_tensor, load_image_encoder
from pogdiff.data.synthetic import make_identity
from pogdiff.models.tiny_vae import disjoint_records

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


def _settings(cfg: Config, ds) -> dict:
    """What the recogniser depends on (its cache key). Synthetic datasets: disjoint identities of the
    generator; any other dataset: its own training images."""
    e, synthetic = cfg.eval, ds.meta.get("synthetic")
    base = dict(steps=e.recognizer_steps, dim=e.recognizer_dim, lr=e.recognizer_lr, blur_augment=True,
                image_size=ds.meta["image_size"])
    if synthetic:
        return dict(base, source="disjoint-synthetic", ids=e.recognizer_ids, per_id=e.recognizer_images_per_id,
                    data_seed=synthetic["seed"], exclude_ids=len(synthetic["counts"]))
    return dict(base, source="dataset", dataset=ds.meta.get("source_fingerprint") or str(ds.root))


def _training_set(cfg: Config, ds, s: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(images in [-1, 1], labels, held-back mask, classes). Held back: every identity's last image
    (synthetic), or the dataset's held-out split, else one image of each identity with >= 3 (own data)."""
    if s["source"] == "disjoint-synthetic":
        fine_tuning = [make_identity(i, s["data_seed"]) for i in range(s["exclude_ids"])]
        records = list(disjoint_records(s["ids"], s["per_id"], s["data_seed"], s["image_size"], salt=2,
                                        exclude=fine_tuning))
        last = torch.tensor([(i + 1) % s["per_id"] == 0 for i in range(len(records))])
        return images_to_tensor([r.image for r in records]), torch.tensor([r.identity for r in records]), last, s["ids"]
    train = [(ident, png) for _, ident, png in ds.index.images() if ident >= 0]
    if not train:
        raise ValueError(f"dataset '{ds.root}' has no labelled images in its shards (prepare.keep_images=true and an "
                         "identity column are needed) to train the evaluation's recogniser on")
    classes = max(i for i, _ in train) + 1
    if ds.heldout is not None:
        held = [(ident, png) for _, ident, png in ds.heldout.images() if ident >= 0]
        mask = [False] * len(train) + [True] * len(held)
        train += held
    else:
        seen: dict[int, int] = {}
        counts = ds.index.identity_counts()
        mask = []
        for ident, _ in train:
            seen[ident] = seen.get(ident, 0) + 1
            mask.append(counts[ident] >= 3 and seen[ident] == counts[ident])
    images = [Image.open(io.BytesIO(png)).convert("RGB") for _, png in train]
    return images_to_tensor(images), torch.tensor([i for i, _ in train]), torch.tensor(mask), classes


def train_recognizer(cfg: Config, ds, progress: bool = True) -> tuple[Recognizer, dict]:
    s = _settings(cfg, ds)
    return fit_recognizer(*_training_set(cfg, ds, s), s, progress)


def fit_recognizer(x: torch.Tensor, y: torch.Tensor, held: torch.Tensor, classes: int, s: dict,
                   progress: bool = True) -> tuple[Recognizer, dict]:
    """Train on images ``x`` (in [-1, 1]) labelled ``y`` except the ``held`` ones, which measure it;
    ``s`` holds dim, lr and steps."""
    from tqdm import tqdm

    torch.manual_seed(0)
    model = Recognizer(s["dim"], classes)
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, s["lr"], total_steps=max(1, s["steps"]))
    g = torch.Generator().manual_seed(0)
    train_idx = (~held).nonzero().flatten()
    model.train()
    loss = torch.tensor(float("nan"))
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
    accuracy = None
    if held.any():
        with torch.no_grad():
            accuracy = float((model(x[held]).argmax(1) == y[held]).float().mean())
    stats = {**s, "classes": classes, "heldback_images": int(held.sum()), "heldback_accuracy": accuracy,
             "final_loss": loss.item()}
    log.info("recognizer: accuracy %s on %d held-back images of its %d training identities", accuracy,
             int(held.sum()), classes)
    return model, stats


def load_or_train_recognizer(cfg: Config, ds, progress: bool = True) -> tuple[Recognizer, dict]:
    """Cached beside the dataset (``artifacts/recognizer-<fp>.safetensors``); retrained when its settings change."""
    from pogdiff.runs import fingerprint

    path = ds.artifacts / f"recognizer-{fingerprint(_settings(cfg, ds), 12)}.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            stats = json.loads(f.metadata()["stats"])
        model = Recognizer(stats["dim"], stats["classes"])
        model.load_state_dict(load_file(str(path)))
        return model.eval(), stats
    model, stats = train_recognizer(cfg, ds, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata={"stats": json.dumps(stats)})
    tmp.replace(path)
    return model, stats


def eval_encoder(cfg: Config, ds, progress: bool = True) -> tuple[ImageEncoder, dict]:
    """(images -> (B, d) embeddings, a description) for the metrics."""
    name = cfg.eval.encoder  # never the neighbours' encoder (config validation)
    if name != "recognizer":
        return load_image_encoder(name), {"encoder": name}
    model, stats = load_or_train_recognizer(cfg, ds, progress)

    @torch.no_grad()
    def encode(images: Sequence[Image.Image]) -> torch.Tensor:
        out = [model.embed(images_to_tensor(images[i:i + cfg.eval.batch_size]))
               for i in range(0, len(images), cfg.eval.batch_size)]
        return torch.cat(out).float()

    return encode, {"encoder": "recognizer", **stats}


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(N, H, W, 3) uint8 -> PIL images."""
    return [Image.fromarray(np.ascontiguousarray(im)) for im in images]
