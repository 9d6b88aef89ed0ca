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
    assert any("fails its checksum" in r.message for r in caplog.records)


def test_a_flipped_byte_in_a_payload_is_a_counted_skip_naming_shard_and_key(dataset, caplog):
    """One byte of one latent changed (a value 0.193 becoming 0.1929): the tar headers are intact,
    the latent is finite, only the sample's checksum can tell."""
    _, root, meta = dataset
    first = root / meta["shards"][0]["url"]
    offset, _ = latent_offset(first)
    data = bytearray(first.read_bytes())
    data[offset + 10] ^= 0x01
    first.write_bytes(bytes(data))
    loader = make_train_loader(root, batch_size=4, rank=0, world_size=1, num_workers=0, resampled=False,
                               shuffle_buffer=1)
    with caplog.at_level(logging.WARNING, logger="pogdiff.stream"):
        batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 19 and sum(b["skipped"] for b in batches) == 1
    [warning] = [r.message for r in caplog.records if "checksum" in r.message]
    [lost] = sorted({f"id{i:06d}_img{j:04d}" for i in range(4) for j in range(8)} & set(warning.split("'")))
    assert lost not in keys and str(first) in warning


def test_every_skip_is_counted_once_per_epoch_whatever_the_batch_boundaries(dataset, caplog, monkeypatch):
    """Resampled training stream, several epochs, a NaN sample: each epoch, rows decoded = samples
    yielded + skips counted, and every skip warned about is counted (a skip in a batch read ahead
    and dropped at the epoch's end used to be warned about and lost)."""
    from pogdiff.data.stream import ShardStream

    _, root, meta = dataset
    first = root / meta["shards"][0]["url"]
    offset, _ = latent_offset(first)
    with open(first, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 64)
    decoded = []
    real_decode = ShardStream.decode
    monkeypatch.setattr(ShardStream, "decode", lambda self, s: (decoded.append(1), real_decode(self, s))[1])
    at_end = 0
    for batch_size in (3, 4):
        loader = make_train_loader(root, batch_size=batch_size, rank=0, world_size=1, num_workers=0, seed=7,
                                   shuffle_buffer=4)
        for epoch in range(8):
            decoded.clear()
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="pogdiff.stream"):
                batches = list(loader)
            warned = sum("fails its checksum" in r.message for r in caplog.records)
            counted = [b["skipped"] for b in batches]
            assert len(batches) == len(loader) and all(len(b["index"]) == batch_size for b in batches)
            assert sum(counted) == warned, (epoch, counted, warned)
            assert len(decoded) == sum(len(b["index"]) for b in batches) + sum(counted), (epoch, len(decoded), counted)
            at_end += counted[-1]
    assert at_end > 0, "no skip fell in an epoch's last batch: the boundary case was not exercised"
