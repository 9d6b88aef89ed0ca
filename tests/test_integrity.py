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


DIST = ["model.name=tiny", "model.tiny_vae_steps=0", "data.profile=custom", "data.majority_ids=2", "data.minority_ids=3",
        "data.majority_images=12", "prepare.backend=serial", "prepare.samples_per_shard=10", "method.name=vanilla",
        "train.batch_size=4", "train.seed=0", "train.log_every=1", "train.lr_scheduler=constant",
        "train.lr_warmup_steps=0", "dist.num_workers=2", "run_name=skips"]  # 30 samples: 4 batches per rank and epoch


def flip_a_payload_byte(shard) -> str:
    """One bit of the shard's first latent flipped; returns the sample's key."""
    offset, _ = latent_offset(shard)
    data = bytearray(shard.read_bytes())
    data[offset + 10] ^= 0x01
    shard.write_bytes(bytes(data))
    with tarfile.open(shard) as tar:
        return next(m.name for m in tar.getmembers() if m.name.endswith(".latent.npy")).split(".", 1)[0]


def unindex_a_row(root, shard) -> str:
    """The shard's first sample made a bad row (one the dataset index does not hold); returns its key."""
    import json

    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        ordinal = json.loads(tar.extractfile(member).read())["ordinal"]
    rows = np.load(root / "row_of_ordinal.npy")
    rows[ordinal] = -1
    np.save(root / "row_of_ordinal.npy", rows)
    return member.name.split(".", 1)[0]


@pytest.mark.slow
def test_train_dist_names_and_counts_every_skip_once_over_ranks_epochs_and_a_resume(tmp_path):
    """`pogdiff train-dist`, 2 ranks, a flipped payload byte and a bad row, 10 steps over 3 epochs,
    stopped at step 5 and resumed (train.resume=force with a new train.lr). At every logged step
    history.json's data/skipped is the number of distinct skips the log names up to that step,
    summed over ranks: none read ahead at step 5 (the reader holds a batch back) or re-read up to
    the checkpoint is missed or counted twice, and it is what the ranks' streams hold. The resumed
    DeepSpeed ranks train at the new lr, and the console warns once (issue 32, items 4 and 5)."""
    import json
    import re

    import torch

    from test_reliability import ROOT, pogdiff

    from pogdiff.data.dataset import Dataset
    from pogdiff.data.prepare import output_dir
    from pogdiff.runs import RunFiles
    from pogdiff.train.loop import make_loader, stream_batches

    cfg = load_run_config(ROOT / "configs/demo.yaml", [f"output_dir={tmp_path / 'runs'}", *DIST])
    meta = prepare(cfg, progress=False)  # the dataset train-dist finds prepared, damaged below
    root, files = output_dir(cfg), RunFiles(cfg)
    flipped = flip_a_payload_byte(root / meta["shards"][0]["url"])
    unindexed = unindex_a_row(root, root / meta["shards"][1]["url"])

    streams = []  # per rank, the skips each of the first 11 micro-batches carries
    for rank in range(2):
        batches = stream_batches(make_loader(cfg, Dataset(root), rank, 2), 0, torch.device("cpu"), torch.float32)
        streams.append([next(batches).skipped for _ in range(11)])
    assert any(s[5] for s in streams), streams  # a skip read ahead when step 5 stops the first run
    assert all(sum(s[:10]) for s in streams), streams

    args = ["train-dist", str(ROOT / "configs/demo.yaml"), "output_dir=runs", *DIST, "train.lr=1e-3"]
    first = pogdiff(tmp_path, *args, "train.steps=5", timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = pogdiff(tmp_path, *args, "train.steps=10", "train.resume=force", "train.lr=2e-3", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    log = (files.root / "pogdiff.log").read_text()
    # (rank, epoch, micro-batch, skip number in it, key): one sample can be drawn twice into a batch
    named = {(int(r), int(e), int(m), int(i), key) for r, e, m, i, key in re.findall(
        r"rank (\d), epoch (\d+), micro-batch (\d+), skip (\d+)/\d+: skipped 1 sample: sample '([^']+)'", log)}
    assert {key for *_, key in named} == {flipped, unindexed}, named
    assert len({e for _, e, *_ in named}) >= 2 and {r for r, *_ in named} == {0, 1}, named
    for rank in range(2):
        assert [sum(m == i for r, _, m, *_ in named if r == rank) for i in range(10)] == streams[rank][:10], named
    history = json.loads(files.history.read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 11))
    assert [h["data/skipped"] for h in history] == [sum(m < h["step"] for _, _, m, *_ in named) for h in history]

    assert [h["lr"] for h in history] == [1e-3] * 5 + [2e-3] * 5
    [note] = [line for line in resumed.stderr.splitlines() if "train.resume=force" in line]
    assert "train.lr: 0.001 -> 0.002" in note and "train.lr=0.002 on the constant schedule" in note, note
