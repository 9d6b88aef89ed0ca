"""Damaged shards: prepare verifies and remakes them; the reader skips what it cannot use and counts
every sample it skips; a non-finite latent is never a training sample."""
from __future__ import annotations

import logging
import tarfile

import numpy as np
import pytest

from pogdiff.data.prepare import prepare
from pogdiff.data.stream import make_train_loader
from pogdiff.runs import load_run_config

SMALL = ["data.profile=custom", "data.majority_ids=2", "data.majority_images=8", "data.minority_ids=2",
         "data.minority_images=2", "data.heldout_images=0", "model.tiny_vae_steps=0", "prepare.backend=serial",
         "prepare.samples_per_shard=5"]  # 20 records in 4 shards


@pytest.fixture
def dataset(tmp_path):
    cfg = load_run_config(None, [f"output_dir={tmp_path}", f"prepare.output={tmp_path / 'ds'}", *SMALL])
    meta = prepare(cfg, progress=False)
    return cfg, tmp_path / "ds", meta


def latent_offset(shard) -> tuple[int, int]:
    """(byte offset of the first sample's latent data, its size) inside a shard tar."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".latent.npy"))
        return member.offset_data + 128, member.size - 128  # past the .npy header


def test_shards_are_checksummed_and_a_rerun_remakes_damaged_ones(dataset, caplog):
    cfg, root, meta = dataset
    assert all(len(p["sha256"]) == 64 and p["bytes"] > 0 for p in meta["shards"])
    first, second = root / meta["shards"][0]["url"], root / meta["shards"][1]["url"]
    good = first.read_bytes(), second.read_bytes()
    offset, _ = latent_offset(first)
    with open(first, "r+b") as f:  # 64 bytes overwritten inside a latent: same size, other content
        f.seek(offset)
        f.write(b"\xff" * 64)
    with open(second, "r+b") as f:  # truncated
        f.truncate(second.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="pogdiff.prepare"):
        again = prepare(cfg, progress=False)
    assert sum("damaged" in r.message for r in caplog.records) == 2
    assert (first.read_bytes(), second.read_bytes()) == good and again["shards"] == meta["shards"]


def test_reader_counts_every_sample_it_skips(dataset, caplog):
    _, root, meta = dataset
    first, second = root / meta["shards"][0]["url"], root / meta["shards"][1]["url"]
    offset, _ = latent_offset(first)
    with open(first, "r+b") as f:  # NaN bytes in one sample's latent
        f.seek(offset)
        f.write(b"\xff" * 64)
    with open(second, "r+b") as f:  # the shard breaks off after its first samples
        f.truncate(latent_offset(second)[0] + 4096)
    loader = make_train_loader(root, batch_size=1, rank=0, world_size=1, num_workers=0, resampled=False,
                               shuffle_buffer=1)
    with caplog.at_level(logging.WARNING, logger="pogdiff.stream"):
        batches = list(loader)
    seen = sum(len(b["index"]) for b in batches)
    skipped = sum(b["skipped"] for b in batches)
    assert seen + skipped == meta["num_samples"] == 20, (seen, skipped)
    assert skipped >= 2 and all(np.isfinite(b["latents"].float().numpy()).all() for b in batches)
    assert any("non-finite latent" in r.message for r in caplog.records)
