"""A user's own imbalanced dataset that nothing in pogdiff generates: flat-shaded "badges" drawn with
numpy (a per-identity palette, shape and stripe count; per-image jitter, rotation and noise),
written as PNG/JPEG files with a JSONL manifest, a CSV manifest, or a Hugging Face imagefolder
(``metadata.jsonl`` with ``file_name`` and ``text``)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

PALETTES = [((200, 40, 40), (250, 220, 60)), ((30, 90, 200), (240, 240, 240)), ((20, 150, 70), (90, 40, 20)),
            ((120, 30, 160), (250, 160, 30)), ((10, 10, 10), (0, 200, 200)), ((230, 120, 170), (40, 60, 60))]
NAMES = ["orla quin", "bram toft", "cyra vell", "dax monro", "esme hart", "fenn loy", "gus arden", "hedda prim",
         "ivo stark", "juno bell", "kit moss", "lars wren"]


def badge(identity: int, image: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng([identity, image, 99])
    fg, bg = PALETTES[identity % len(PALETTES)]
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    angle = rng.normal(0, 0.3) + identity * 0.7
    u = xx * np.cos(angle) + yy * np.sin(angle)
    stripes = (np.sin(u * np.pi * (2 + identity % 4) * 2 + rng.normal(0, 0.5)) > 0)
    radius = 0.3 + 0.1 * (identity % 3) + rng.normal(0, 0.02)
    disc = xx ** 2 + yy ** 2 < radius ** 2
    mask = disc & stripes if identity % 2 else disc ^ stripes
    img = np.where(mask[..., None], np.array(fg), np.array(bg)).astype(np.float32)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def counts(n_ids: int = 12, head: int = 3, head_images: int = 28, tail_images: int = 2) -> list[int]:
    """102 images over 12 identities by default: 3 with 28 images, 9 with 2."""
    return [head_images] * head + [tail_images] * (n_ids - head)


def write(root: Path, form: str, per_id: list[int]) -> Path:
    """Write the dataset under ``root``; returns what to pass as data.source (relative to ``root``'s parent)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for ident, n in enumerate(per_id):
        for j in range(n):
            name = f"img_{ident:02d}_{j:02d}." + ("jpg" if j % 3 == 0 else "png")
            folder = root if form == "imagefolder" else root / "images"
            folder.mkdir(exist_ok=True)
            badge(ident, j).save(folder / name, quality=95) if name.endswith("jpg") else badge(ident, j).save(folder / name)
            caption = f"a badge of {NAMES[ident]} on a {'light' if j % 2 else 'dark'} card"
            rel = name if form == "imagefolder" else f"images/{name}"
            rows.append({"file": rel, "caption": caption, "person": f"p{ident:02d}", "name": NAMES[ident]})
    if form == "imagefolder":
        with (root / "metadata.jsonl").open("w") as f:
            for r in rows:
                f.write(json.dumps({"file_name": r["file"], "text": r["caption"], "identity": r["person"],
                                    "name": r["name"]}) + "\n")
        return root
    if form == "csv":
        path = root / "manifest.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption", "person", "name"])
            for r in rows:
                w.writerow([r["file"], r["caption"], r["person"], r["name"]])
        return path
    path = root / "manifest.jsonl"
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps({"image": r["file"], "caption": r["caption"], "person": r["person"],
                                "name": r["name"]}) + "\n")
    return path
