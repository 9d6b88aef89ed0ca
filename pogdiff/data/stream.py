"""Streaming prepared shards into training (WebDataset): the reader a trainer calls.

    from pogdiff.data.stream import make_train_loader

    loader = make_train_loader("/shared/agedb-l", batch_size=8, num_workers=4, seed=0)  # rank/world from env
    for epoch in range(epochs):
        loader.set_epoch(epoch)                       # optional: epochs also advance on their own
        for batch in loader:                          # exactly len(loader) batches on every rank
            batch["index"]     # (B,) int64  row in the dataset index: neighbour table, psi, tokens
            batch["key"]       # list[str]
            batch["latents"]   # (B, 4, h, w) fp16, already scaled by the VAE scaling factor
            batch["tokens"]    # (B, L) int64 caption token ids of y
            batch["identity"]  # (B,) int64, -1 where unlabelled
            batch["time_ids"]  # (B, 6) fp32 SDXL time ids of each latent's crop (absent before they were recorded)
            nid, psi = sampler.sample(batch["index"])        # neighbours.NeighbourSampler, Eq. 8
            y_tokens = torch.cat([batch["tokens"], loader.tokens_for(nid)])  # [y; y'], no tar access
            text, _ = models.encode_tokens(components, y_tokens, device)     # frozen text encoder

``make_train_loader(shards, batch_size, rank, world_size, num_workers, seed, epoch_len, ...)``:
``shards`` is a prepared dataset directory (pogdiff/shards.py) or a list / brace pattern of shard
URLs (then ``index_dir`` names the dataset directory; a local URL's ``../..`` is tried). The
cached copy of a dataset in object storage (pogdiff.storage.local_copy) streams its shards from
the bucket; any ``scheme://`` URL is opened through fsspec (ranged reads, never a whole download).
Rank and world size come from the arguments, else RANK/WORLD_SIZE, else SLURM_PROCID/SLURM_NTASKS,
else an initialised torch.distributed, else 0/1.

Modes.
* ``resampled=True`` (training): every (rank, DataLoader worker) draws shards at random with
  replacement from the whole list, with its own seed ``(seed, epoch, rank, worker)``, and the rank
  yields exactly ``epoch_len`` batches of ``batch_size`` per epoch (default: one pass over the
  data, ceil(N / (batch_size * world_size))). Uneven or unreadable shards cannot make one rank
  stop early, so a distributed step never waits on a rank that ran dry.
* ``resampled=False`` (one exact pass, e.g. evaluation): the shard list, shuffled by
  ``(seed, epoch)``, is split by rank, then by worker; every sample is seen exactly once per epoch
  over all ranks. Ranks may get different numbers of batches: not for lockstep training.
Within a worker a shuffle buffer (``shuffle_buffer`` samples) mixes samples across shards. The
stream is a pure function of (seed, epoch, rank, world_size, num_workers).

A shard that cannot be opened or read (missing, truncated, corrupt) is logged and skipped
(WebDataset handler); training goes on. If nothing but errors comes from a worker for
``max_consecutive_errors`` in a row, it raises instead of spinning forever.

The neighbour's conditioning y'. The training step gets y' as the neighbour's caption token ids
from the dataset index's ``tokens.npy`` ((N, L) int32, read by rows: ``tokens_for``) and runs
the frozen text encoder on [y; y'] in the step. Cost per sample and step for SD v1.5 (L = 77,
CLIP ViT-L/14 text encoder, 768-d), as counted by ``benchmarks/data_pipeline.py``: 308 bytes of
y' tokens read (the whole table is 30.8 MB per 100k samples and stays in the page cache) and one
extra text-encoder forward of 13.3 GFLOPs, 0.55% of the UNet's forward + backward on one sample
at 64x64 (2.41 TFLOPs). y costs the same again, since shards carry tokens rather than 77x768
hidden states. The alternative, a memory-mapped store of precomputed hidden states, saves those
FLOPs but reads 118 KB at random per y' (11.8 GB per 100k samples), 3.6x the 32 KB latent the
step streams anyway. docs/data.md has the comparison.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import random
import tarfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pogdiff.data.shards import FORMAT, LATENT, LATENT_FLIP, META, TOKENS, UnsupportedTar, npy_load, read_tar, verify_sample
from pogdiff.npyrows import NpyRows
from pogdiff.seeds import derive_seed
from pogdiff.storage import StorageUnavailable, open_read, shard_root

log = logging.getLogger("pogdiff.stream")


def dist_info(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """(rank, world size): the arguments, else RANK/WORLD_SIZE, else SLURM_PROCID/SLURM_NTASKS,
    else torch.distributed, else (0, 1)."""
    env = os.environ
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", torch.distributed.get_rank() if initialised else 0)))
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS",
                                                       torch.distributed.get_world_size() if initialised else 1)))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size} (check RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)")
    return rank, world_size




class SkipAndLog:
    """WebDataset handler: log the error, note the samples it costs, and go on, unless errors are
    all that is left. ``level``: the log level of its own line (a trainer that logs each skip when
    it trains on the batch carrying it reads with logging.DEBUG)."""

    def __init__(self, max_consecutive: int, level: int = logging.WARNING):
        self.max_consecutive, self.level, self.in_a_row = max_consecutive, level, 0
        self.skipped, self.skips = 0, []  # samples lost since the last ``take()``, and why

    def __call__(self, exn: Exception, samples: int = 1) -> bool:
        self.in_a_row += 1
        self.skipped += samples
        self.skips.append(f"skipped {samples} sample{'' if samples == 1 else 's'}: {exn}")
        log.log(self.level, "skipping unreadable shard data (%d more sample%s lost): %s", samples,
                "" if samples == 1 else "s", exn)
        if self.in_a_row > self.max_consecutive:
            raise RuntimeError(f"{self.in_a_row} shard read errors in a row and no sample: are the shards readable?") from exn
        return True

    def take(self) -> tuple[int, list[str]]:
        taken = self.skipped, self.skips
        self.skipped, self.skips = 0, []
        return taken


def tar_samples(urls: Iterator[str], handler: SkipAndLog, expected: Optional[dict[str, int]] = None) -> Iterator[dict]:
    """WebDataset's group_by_keys around the fast tar reader (shards.read_tar), which hands a shard
    over to WebDataset's own (tarfile-based) reader from the first member it cannot read on. A shard
    that cannot be opened, breaks off, or ends early costs the samples the dataset index says it
    holds and that were not read (``expected``: url -> samples), all counted by ``handler``."""
    expected = expected or {}

    def shard_members(url: str) -> Iterator[dict]:
        done = 0  # members yielded, as WebDataset's reader counts them: it skips "__name__" files
        with open_read(url) as stream:
            try:
                for member in read_tar(stream, url):
                    fname = member["fname"]
                    done += "/" in fname or not (fname.startswith("__") and fname.endswith("__"))
                    yield member
                return
            except UnsupportedTar as exn:
                log.info("%s; reading the shard with webdataset's tar reader from member %d on", exn, done)
        with open_read(url) as stream:
            yield from itertools.islice(wds.tariterators.tar_file_iterator(stream, skip_meta=None), done, None)

    def members() -> Iterator[dict]:
        for url in urls:
            seen: set[str] = set()
            try:
                for member in shard_members(url):
                    member["__url__"] = url
                    seen.add(member["fname"].split(".", 1)[0])
                    yield member
                if len(seen) < expected.get(url, 0):  # tarfile ends quietly at a truncated or corrupt header
                    raise tarfile.ReadError(f"{url}: ended after {len(seen)} of {expected[url]} samples")
            except StorageUnavailable:  # the storage, not the shard: retried already, and no sample is lost to it
                raise
            except Exception as exn:  # missing, unreadable, truncated or corrupt shard
                # the samples never started are lost here; a partly read one is counted when it fails to decode
                if not handler(exn, max(0, expected[url] - len(seen)) if url in expected else 1):
                    return
            yield {}  # end of shard: samples never merge across shards

    return wds.tariterators.group_by_keys(members(), handler=handler)


def collate(samples: list[dict]) -> dict:
    return {
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "key": [s["key"] for s in samples],
        "latents": torch.from_numpy(np.stack([s["latents"] for s in samples])),
        "tokens": torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64)),
        "identity": torch.tensor([s["identity"] for s in samples], dtype=torch.int64),
        **({"time_ids": torch.tensor([s["time_ids"] for s in samples], dtype=torch.float32)}
           if all(s.get("time_ids") is not None for s in samples) else {}),
    }


class ShardStream(IterableDataset):
    """Batches from shards for one rank; see the module docstring for the modes."""

    def __init__(self, urls: Sequence[str], batch_size: int, rank: int, world_size: int, seed: int = 0,
                 resampled: bool = True, shuffle_buffer: int = 1000, row_of_ordinal: Optional[str] = None,
                 max_consecutive_errors: int = 100, random_flip: bool = False):
        self.urls, self.batch_size, self.rank, self.world_size = list(urls), batch_size, rank, world_size
        self.seed, self.resampled, self.shuffle_buffer = seed, resampled, shuffle_buffer
        self.row_of_ordinal_path, self.max_consecutive_errors = row_of_ordinal, max_consecutive_errors
        self.random_flip, self.epoch = random_flip, 0
        self.epoch_len: Optional[int] = None  # batches per rank and epoch (resampled): each worker makes its share
        self._rows: Optional[NpyRows] = None
        self.expected: dict[str, int] = {}  # shard url -> samples it holds (from dataset.json)
        self.checksums = False  # every sample must carry one (a dataset of the current FORMAT)
        self.log_skips = True  # False: the consumer logs the skips each batch carries ("skips")

    def shard_urls(self, worker: int, num_workers: int) -> Iterator[str]:
        if self.resampled:
            rng = random.Random(derive_seed(self.seed, self.epoch, self.rank, worker, 0))
            while True:
                yield rng.choice(self.urls)
        urls = list(self.urls)
        random.Random(derive_seed(self.seed, self.epoch)).shuffle(urls)  # the same order on every rank
        yield from urls[self.rank::self.world_size][worker::num_workers]

    def decode(self, sample: dict) -> dict:
        verify_sample(sample, self.checksums)
        missing = [f for f in (LATENT, TOKENS, META) if f not in sample]
        if missing:
            raise ValueError(f"sample '{sample.get('__key__')}' in {sample.get('__url__')} lacks {missing}: corrupt shard")
        meta = json.loads(sample[META])
        if self.row_of_ordinal_path is not None:
            if self._rows is None:
                self._rows = NpyRows(self.row_of_ordinal_path)
            row = int(self._rows[meta["ordinal"]]) if meta["ordinal"] < len(self._rows) else -1
            if row < 0:
                raise ValueError(f"sample '{meta['key']}' in {sample['__url__']} is not in the dataset index "
                                 "(shards and index from different prepare runs?)")
        else:
            row = meta["ordinal"]
        # a pure function of (seed, epoch, row): the same choice on a resumed run
        flip = self.random_flip and LATENT_FLIP in sample and derive_seed(self.seed, self.epoch, row, 2) % 2 == 1
        latents = npy_load(sample[LATENT_FLIP if flip else LATENT])
        if not np.isfinite(latents).all():
            raise ValueError(f"sample '{meta['key']}' in {sample['__url__']} has a non-finite latent: skipped "
                             "(run `pogdiff prepare` again to verify and remake damaged shards)")
        return {"index": row, "key": meta["key"], "latents": latents, "tokens": npy_load(sample[TOKENS]),
                "identity": meta["identity"], "time_ids": meta.get("time_ids_flip" if flip else "time_ids")}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        handler = SkipAndLog(self.max_consecutive_errors, logging.WARNING if self.log_skips else logging.DEBUG)
        samples = tar_samples(self.shard_urls(worker, num_workers), handler, self.expected)
        if self.shuffle_buffer > 1:
            rng = random.Random(derive_seed(self.seed, self.epoch, self.rank, worker, 1))
            samples = wds.filters.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(samples)
        decoded = wds.filters.map(self.decode, handler=handler)(samples)

        def healthy(stream: Iterator[dict]) -> Iterator[dict]:
            for sample in stream:
                handler.in_a_row = 0
                yield sample

        # Each batch carries the samples this reader skipped since its previous batch ("skipped",
        # and "skips": one line per skip naming the shard and, where known, the key); one batch is
        # held back so that skips after the last sample of a pass are counted too. A resampled
        # worker makes exactly its share of the epoch's batches (the DataLoader takes them in turn)
        # and decodes nothing beyond: a skip read ahead and thrown away at the epoch's end would be
        # logged but in no batch's count. (WebDataset's batched() reads one sample past a full batch.)
        good = healthy(decoded)
        if self.resampled and self.epoch_len is not None:
            good = itertools.islice(good, len(range(worker, self.epoch_len, num_workers)) * self.batch_size)
        batches = wds.filters.batched(self.batch_size, collation_fn=collate, partial=not self.resampled)(good)
        held = None
        for batch in batches:
            batch["skipped"], batch["skips"] = handler.take()
            if held is not None:
                yield held
            held = batch
        if held is not None:
            more, why = handler.take()
            held["skipped"] += more
            held["skips"] += why
            yield held


class TrainLoader:
    """A DataLoader over a ShardStream that yields ``epoch_len`` batches per epoch (all of them in
    non-resampled mode when ``epoch_len`` is None). The epoch advances after each full pass."""

    def __init__(self, stream: ShardStream, num_workers: int, epoch_len: Optional[int], tokens_path: Optional[Path],
                 pin_memory: bool = False):
        self.stream, self.num_workers, self.epoch_len, self.pin_memory = stream, num_workers, epoch_len, pin_memory
        stream.epoch_len = epoch_len
        self.epoch = 0
        self._tokens = NpyRows(tokens_path) if tokens_path is not None else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.epoch_len is None:
            raise TypeError("no epoch length: a non-resampled pass yields however many batches this rank's shards hold")
        return self.epoch_len

    def tokens_for(self, rows: torch.Tensor) -> torch.Tensor:
        """Caption token ids (B, L) int64 of dataset rows: y' for a neighbour draw."""
        if self._tokens is None:
            raise RuntimeError("no dataset index: pass index_dir (the prepared dataset directory) to make_train_loader")
        return torch.from_numpy(self._tokens[rows.cpu().numpy()].astype(np.int64))

    def __iter__(self) -> Iterator[dict]:
        self.stream.epoch = self.epoch
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)
        batches = iter(loader)
        yield from batches if self.epoch_len is None else itertools.islice(batches, self.epoch_len)
        del batches  # stops this epoch's workers
        self.epoch += 1


def make_train_loader(shards: str | Path | Sequence[str], batch_size: int, rank: Optional[int] = None,
                      world_size: Optional[int] = None, num_workers: int = 2, seed: int = 0,
                      epoch_len: Optional[int] = None, resampled: bool = True, shuffle_buffer: int = 1000,
                      index_dir: Optional[str | Path] = None, pin_memory: bool = False,
                      random_flip: bool = False, log_skips: bool = True) -> TrainLoader:
    """The training reader; see the module docstring. ``epoch_len`` is in batches per rank.
    ``log_skips=False``: the reader logs its skips at DEBUG only, for a consumer that logs those
    of the batches it uses (a trainer: skips read ahead and never trained on are then not named)."""
    rank, world_size = dist_info(rank, world_size)
    if isinstance(shards, (str, Path)) and Path(shards).is_dir():
        index_dir = index_dir or shards
        urls = None
    else:
        urls = wds.shardlists.expand_urls(shards) if isinstance(shards, str) else [str(u) for u in shards]
        if index_dir is None and urls and Path(urls[0]).is_file() and (Path(urls[0]).parents[1] / "dataset.json").is_file():
            index_dir = Path(urls[0]).parents[1]
    meta = None
    if index_dir is not None:
        index_dir = Path(index_dir)
        if not (index_dir / "dataset.json").is_file():
            raise FileNotFoundError(f"'{index_dir}' is not a prepared dataset (no dataset.json): run `pogdiff prepare`")
        meta = json.loads((index_dir / "dataset.json").read_text())
        base = shard_root(index_dir)  # the bucket, for a cached copy of a dataset in object storage
        urls = urls if urls is not None else [f"{base}/{p['url']}" for p in meta["shards"]]
    if not urls:
        raise ValueError(f"no shards in {shards!r}")
    if random_flip and meta is not None and not meta.get("random_flip"):
        raise ValueError(f"data.random_flip: '{index_dir}' was prepared without mirrored latents; prepare the "
                         "source with data.random_flip=true (a data.source that is not a prepared directory is)")
    if resampled and epoch_len is None:
        if meta is None:
            raise ValueError("resampled mode needs epoch_len (batches per rank) when no dataset index gives the size")
        epoch_len = max(1, -(-meta["num_samples"] // (batch_size * world_size)))
    stream = ShardStream(urls, batch_size, rank, world_size, seed, resampled, shuffle_buffer,
                         str(index_dir / "row_of_ordinal.npy") if index_dir is not None else None,
                         random_flip=random_flip)
    stream.log_skips = log_skips
    if meta is not None:
        stream.expected = {f"{base}/{p['url']}": p["samples"] for p in meta["shards"]}
        stream.checksums = meta.get("format") == FORMAT
    return TrainLoader(stream, num_workers, epoch_len, index_dir / "tokens.npy" if index_dir is not None else None,
                       pin_memory)
