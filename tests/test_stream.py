"""The streaming reader: split by rank and worker, resampling with equal batch counts, seeding,
corrupt shards, and y' tokens from the index."""
import logging
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pogdiff.data.shards import Sample, write_index, write_task
from pogdiff.data.stream import dist_info, make_train_loader

SHARD_SIZES = [7, 3, 12, 5, 1, 9]  # uneven on purpose
N = sum(SHARD_SIZES)


def write_dataset(root, sizes=SHARD_SIZES, skip_ordinals=()):
    """A prepared dataset without encoders: sample with ordinal o has latents filled with o."""
    shards = root / "shards"
    shards.mkdir(parents=True)
    start = 0
    for task, size in enumerate(sizes):
        samples = [Sample(f"s{o:04d}", o, o % 4, "n", f"caption {o}", np.full((4, 2, 2), o, np.float16),
                          np.arange(o, o + 6, dtype=np.int32), np.zeros(3, np.float32), np.zeros(2, np.float32))
                   for o in range(start, start + size) if o not in skip_ordinals]
        write_task(shards, task, samples, max_samples=100, max_bytes=1 << 30, skipped=[])
        start += size
    write_index(root, len(sizes), start, {})
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds"))


def ordinals(batch):
    return batch["latents"][:, 0, 0, 0].float().long()


def run_epoch(loader):
    batches = list(loader)
    for b in batches:  # every field of a row belongs to the same sample
        o = ordinals(b)
        assert b["key"] == [f"s{v:04d}" for v in o.tolist()]
        assert torch.equal(b["identity"], o % 4)
        assert torch.equal(b["tokens"], o[:, None] + torch.arange(6))
    return batches


def test_every_sample_exactly_once_per_epoch_2_ranks_2_workers(dataset):
    loaders = [make_train_loader(dataset, batch_size=4, rank=r, world_size=2, num_workers=2, seed=3,
                                 resampled=False, shuffle_buffer=8) for r in range(2)]
    orders = []
    for _ in range(2):  # two epochs
        seen = [v for ld in loaders for b in run_epoch(ld) for v in b["index"].tolist()]
        assert sorted(seen) == list(range(N)), "a sample was lost or seen twice"
        orders.append(seen)
    assert orders[0] != orders[1], "the epoch must reshuffle"


def test_resampled_equal_batch_counts_on_uneven_shards(dataset):
    batch_size, world = 4, 2
    expected = -(-N // (batch_size * world))
    for rank in range(world):
        loader = make_train_loader(dataset, batch_size=batch_size, rank=rank, world_size=world, num_workers=2, seed=0)
        assert len(loader) == expected
        for _ in range(2):
            batches = run_epoch(loader)
            assert len(batches) == expected and all(len(b["key"]) == batch_size for b in batches)
    fixed = make_train_loader(dataset, batch_size=5, rank=1, world_size=2, num_workers=2, epoch_len=13)
    assert len(run_epoch(fixed)) == 13


def _ddp_worker(rank, root, init_file, counts):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    loader = make_train_loader(root, batch_size=4, num_workers=0, seed=0)  # rank/world from torch.distributed
    steps = 0
    for batch in loader:  # a lockstep collective per step hangs if one rank runs out first
        total = torch.tensor([float(batch["latents"].float().sum())])
        torch.distributed.all_reduce(total)
        steps += 1
    counts[rank] = steps
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
def test_distributed_steps_never_hang(tmp_path):
    # rank 0's share of shards in a split would be 1 sample, rank 1's 40: resampling evens it out
    root = write_dataset(tmp_path / "ds", sizes=[1, 40])
    counts = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(str(root), str(tmp_path / "init"), counts), nprocs=2, join=True)
    assert counts[0] == counts[1] == -(-41 // 8)


def test_deterministic_per_epoch(dataset):
    def keys(seed, epoch=None, rank=0):
        loader = make_train_loader(dataset, batch_size=4, rank=rank, world_size=2, num_workers=2, seed=seed)
        if epoch is not None:
            loader.set_epoch(epoch)
            return [k for b in loader for k in b["key"]]
        return [[k for b in loader for k in b["key"]] for _ in range(2)]  # epochs 0 and 1

    e0, e1 = keys(seed=7)
    assert (e0, e1) == tuple(keys(seed=7))
    assert e0 != e1
    assert keys(seed=7, epoch=1) == e1  # resuming at an epoch reproduces it
    assert keys(seed=8, epoch=0) != e0
    assert keys(seed=7, epoch=0, rank=1) != e0  # ranks draw different shards


def test_rank_and_world_from_args_and_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert dist_info() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert dist_info() == (3, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist_info() == (1, 2)
    assert dist_info(0, 8) == (0, 8)
    with pytest.raises(ValueError, match="outside world size"):
        dist_info(2, 2)


def test_corrupt_shards_are_logged_and_skipped(tmp_path, caplog):
    root = write_dataset(tmp_path / "ds")
    urls = sorted((root / "shards").glob("*.tar"))
    truncated, garbage, missing = urls[2], urls[3], urls[5]  # 12, 5 and 9 samples
    truncated.write_bytes(truncated.read_bytes()[:5000])
    garbage.write_bytes(os.urandom(4096))
    missing.unlink()
    with caplog.at_level(logging.WARNING, logger="pogdiff.stream"):
        loader = make_train_loader(root, batch_size=4, rank=0, world_size=1, num_workers=0, resampled=False)
        seen = [v for b in run_epoch(loader) for v in b["index"].tolist()]
    intact = set(range(0, 10)) | {27}  # shards 0, 1 and 4
    assert len(seen) == len(set(seen)) and intact <= set(seen) <= set(range(N))
    assert set(seen) - intact <= set(range(10, 22)), "only the truncated shard's leading samples may come through"
    logged = caplog.text
    assert truncated.name in logged and garbage.name in logged and missing.name in logged
    # resampled training keeps its full epoch over the damaged set
    loader = make_train_loader(root, batch_size=4, rank=0, world_size=1, num_workers=2, epoch_len=20)
    assert len(run_epoch(loader)) == 20


def test_all_shards_unreadable_is_an_error_not_a_hang(tmp_path):
    root = write_dataset(tmp_path / "ds", sizes=[3, 3])
    for url in (root / "shards").glob("*.tar"):
        url.write_bytes(b"not a tar file" * 100)
    loader = make_train_loader(root, batch_size=2, rank=0, world_size=1, num_workers=0)
    with pytest.raises(RuntimeError, match="shard read errors in a row"):
        list(loader)


def test_neighbour_tokens_come_from_the_index(dataset):
    loader = make_train_loader(dataset, batch_size=4, rank=0, world_size=1, num_workers=0, seed=1)
    batch = next(iter(loader))
    assert torch.equal(loader.tokens_for(batch["index"]), batch["tokens"])
    rows = torch.tensor([0, N - 1, 5])
    assert torch.equal(loader.tokens_for(rows), rows[:, None] + torch.arange(6))


def test_skipped_records_leave_rows_contiguous(tmp_path):
    root = write_dataset(tmp_path / "ds", sizes=[5, 5], skip_ordinals={1, 6})
    loader = make_train_loader(root, batch_size=2, rank=0, world_size=1, num_workers=0, resampled=False)
    pairs = {(int(i), int(o)) for b in run_epoch(loader) for i, o in zip(b["index"], ordinals(b))}
    assert pairs == {(0, 0), (1, 2), (2, 3), (3, 4), (4, 5), (5, 7), (6, 8), (7, 9)}


def test_shard_urls_as_list_or_brace_pattern(dataset):
    urls = sorted(str(p) for p in (dataset / "shards").glob("*.tar"))
    from_list = make_train_loader(urls, batch_size=4, rank=0, world_size=1, num_workers=0, resampled=False)
    pattern = str(dataset / "shards" / "shard-{000000..000005}-00.tar")
    from_pattern = make_train_loader(pattern, batch_size=4, rank=0, world_size=1, num_workers=0, resampled=False)
    for loader in (from_list, from_pattern):
        assert sorted(v for b in run_epoch(loader) for v in b["index"].tolist()) == list(range(N))
    elsewhere = [u.replace("/shards/", "/elsewhere/") for u in urls]  # no dataset index beside them
    with pytest.raises(ValueError, match="needs epoch_len"):
        make_train_loader(elsewhere, batch_size=4, rank=0, world_size=1)
