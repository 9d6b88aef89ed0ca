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
import itertools
import json
import logging
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from pogdiff.config import Config
from pogdiff.data.encode import ImageEncoder, images_to_tensor, load_image_encoder
from pogdiff.data.synthetic import make_identity
from pogdiff.models.ssl_encoder import conv_block
from pogdiff.models.tiny_vae import disjoint_records

log = logging.getLogger("pogdiff.eval")

COSINE_SCALE = 16.0  # NormFace logit scale
BATCH = 64
SHUFFLE_BUFFER = 1000  # own data: PNGs mixed across the shards the training stream draws
ROWS_PER_READ = 1 << 20  # rows of the memory-mapped identity column read at once


class Recognizer(nn.Module):
    def __init__(self, dim: int = 64, n_classes: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            conv_block(3, 16), conv_block(16, 16), nn.MaxPool2d(2),
            conv_block(16, 32), conv_block(32, 32), nn.MaxPool2d(2),
            conv_block(32, 64), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, dim),
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
    generator; any other dataset: its own training images, streamed through a shuffle buffer."""
    e, synthetic = cfg.eval, ds.meta.get("synthetic")
    base = dict(steps=e.recognizer_steps, dim=e.recognizer_dim, lr=e.recognizer_lr, blur_augment=True,
                image_size=ds.meta["image_size"])
    if synthetic:
        return dict(base, source="disjoint-synthetic", ids=e.recognizer_ids, per_id=e.recognizer_images_per_id,
                    data_seed=synthetic["seed"], exclude_ids=len(synthetic["counts"]))
    return dict(base, source="dataset", dataset=ds.meta.get("source_fingerprint") or str(ds.root),
                shuffle_buffer=SHUFFLE_BUFFER)


def _disjoint_synthetic_set(s: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(images in [-1, 1], labels, held-back mask, classes) of the generator's identities disjoint from
    the fine-tuning set (a size the settings fix, not the dataset); every identity's last image is held back."""
    fine_tuning = [make_identity(i, s["data_seed"]) for i in range(s["exclude_ids"])]
    records = list(disjoint_records(s["ids"], s["per_id"], s["data_seed"], s["image_size"], salt=2,
                                    exclude=fine_tuning))
    last = torch.tensor([(i + 1) % s["per_id"] == 0 for i in range(len(records))])
    return images_to_tensor([r.image for r in records]), torch.tensor([r.identity for r in records]), last, s["ids"]


def decode_pngs(pngs: Sequence[bytes]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]


def png_batches(items: Iterable[tuple[int, bytes]], size: int) -> Iterator[tuple[list[int], list[bytes]]]:
    """(identities, PNGs) of ``size`` (identity, PNG) items at a time."""
    import webdataset as wds

    for batch in wds.filters.batched(size, collation_fn=None)(iter(items)):
        identities, pngs = zip(*batch)
        yield list(identities), list(pngs)


def labelled_batches(items: Iterable[tuple[int, bytes]], size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images in [-1, 1], identities) of ``size`` (identity, PNG) items at a time."""
    for identities, pngs in png_batches(items, size):
        yield images_to_tensor(decode_pngs(pngs)), torch.tensor(identities)


def held_back_rows(index) -> set[int]:
    """Own data without a held-out split: the last row of every identity with at least 3 images
    (read from the memory-mapped identity column a block at a time)."""
    counts, last = index.identity_counts(), {}
    for start in range(0, len(index), ROWS_PER_READ):
        block = np.asarray(index.identities[start:start + ROWS_PER_READ])
        ids, from_end = np.unique(block[::-1], return_index=True)
        last.update(zip(ids.tolist(), (start + len(block) - 1 - from_end).tolist()))
    return {row for i, row in last.items() if i >= 0 and counts[i] >= 3}


def _training_stream(ds, held: set[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless BATCH-sized batches of the dataset's labelled training images but ``held``: shards
    drawn at random with replacement (as training draws them), mixed by a shuffle buffer of PNGs."""
    import random

    import webdataset as wds

    from pogdiff.data.shards import IMAGE, META
    from pogdiff.data.stream import SkipAndLog, tar_samples
    from pogdiff.seeds import derive_seed

    urls, draw = ds.index.shard_urls, random.Random(derive_seed(0, 1))
    row_of_ordinal = np.load(ds.root / "row_of_ordinal.npy", mmap_mode="r") if held else None
    samples = tar_samples((draw.choice(urls) for _ in itertools.count()), SkipAndLog(100))
    samples = wds.filters.shuffle(SHUFFLE_BUFFER, min(SHUFFLE_BUFFER, 100), rng=random.Random(derive_seed(0, 2)))(samples)

    def labelled() -> Iterator[tuple[int, bytes]]:
        for sample in samples:
            meta = json.loads(sample[META])
            if meta["identity"] >= 0 and IMAGE in sample and \
                    (row_of_ordinal is None or int(row_of_ordinal[meta["ordinal"]]) not in held):
                yield meta["identity"], sample[IMAGE]

    return labelled_batches(labelled(), BATCH)


def _fit_on_dataset(cfg: Config, ds, s: dict, progress: bool) -> tuple[Recognizer, dict]:
    """Own data: trained on its training images, streamed from the shards; measured on the held-out
    split, else on one image of each identity with >= 3 (held back from training)."""
    counts = {i: c for i, c in ds.index.identity_counts().items() if i >= 0}
    if not counts or ds.meta.get("keep_images") is False:
        raise ValueError(f"dataset '{ds.root}' has no labelled images in its shards (prepare.keep_images=true and an "
                         "identity column are needed) to train the evaluation's recogniser on")
    held = set() if ds.heldout is not None else held_back_rows(ds.index)

    def heldback() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if ds.heldout is not None:
            items = ((identity, png) for _, identity, png in ds.heldout.images() if identity >= 0)
        else:
            items = ((identity, png) for row, identity, png in ds.index.images() if row in held)
        return labelled_batches(items, cfg.eval.batch_size)

    return fit_on_batches(_training_stream(ds, held), heldback, max(counts) + 1, s, torch.Generator().manual_seed(0),
                          progress)


def train_recognizer(cfg: Config, ds, progress: bool = True) -> tuple[Recognizer, dict]:
    s = _settings(cfg, ds)
    if s["source"] == "disjoint-synthetic":
        return fit_recognizer(*_disjoint_synthetic_set(s), s, progress)
    return _fit_on_dataset(cfg, ds, s, progress)


def fit_recognizer(x: torch.Tensor, y: torch.Tensor, held: torch.Tensor, classes: int, s: dict,
                   progress: bool = True) -> tuple[Recognizer, dict]:
    """Train on images ``x`` (in [-1, 1], in memory) labelled ``y`` except the ``held`` ones, which
    measure it: batches drawn at random with replacement."""
    g = torch.Generator().manual_seed(0)
    train_idx = (~held).nonzero().flatten()

    def draws() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            idx = train_idx[torch.randint(len(train_idx), (BATCH,), generator=g)]
            yield x[idx], y[idx]

    return fit_on_batches(draws(), lambda: [(x[held], y[held])] if held.any() else [], classes, s, g, progress)


def fit_on_batches(batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                   heldback: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], classes: int, s: dict,
                   g: torch.Generator, progress: bool = True) -> tuple[Recognizer, dict]:
    """``s["steps"]`` steps on the next batch of ``batches`` each (images in [-1, 1], labels), then
    the accuracy on ``heldback()``'s batches; ``s`` holds dim, lr and steps, ``g`` draws the augmentation."""
    from tqdm import tqdm

    torch.manual_seed(0)
    model = Recognizer(s["dim"], classes)
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, s["lr"], total_steps=max(1, s["steps"]))
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(s["steps"]), desc="recognizer", unit="step", disable=not progress):
        xb, yb = next(batches)
        flip = torch.rand(len(yb), generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
        # Generated images come through a small VAE and are blurrier than renders: half of each
        # batch is blurred so that identity, not sharpness, decides the embedding.
        half = len(yb) // 2
        xb[half:] = gaussian_blur(xb[half:], 0.3 + 1.2 * float(torch.rand(1, generator=g)))
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for xh, yh in heldback():
            correct += int((model(xh).argmax(1) == yh).sum())
            total += len(yh)
    accuracy = correct / total if total else None
    stats = {**s, "classes": classes, "heldback_images": total, "heldback_accuracy": accuracy,
             "final_loss": loss.item()}
    log.info("recognizer: accuracy %s on %d held-back images of its %d training identities", accuracy, total, classes)
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


def eval_encoder(cfg: Config, ds, progress: bool = True, device: str = "cpu") -> tuple[ImageEncoder, dict]:
    """(images -> (B, d) fp32 embeddings on the CPU, a description) for the metrics; the encoder runs on ``device``."""
    name = cfg.eval.encoder  # never the neighbours' encoder (config validation)
    if name != "recognizer":
        return load_image_encoder(name, device), {"encoder": name}
    model, stats = load_or_train_recognizer(cfg, ds, progress)
    model.to(device)

    @torch.no_grad()
    def encode(images: Sequence[Image.Image]) -> torch.Tensor:
        out = [model.embed(images_to_tensor(images[i:i + cfg.eval.batch_size]).to(device)).cpu()
               for i in range(0, len(images), cfg.eval.batch_size)]
        return torch.cat(out).float()

    return encode, {"encoder": "recognizer", **stats}


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(N, H, W, 3) uint8 -> PIL images."""
    return [Image.fromarray(np.ascontiguousarray(im)) for im in images]
