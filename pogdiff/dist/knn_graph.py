"""The kNN graph of the whole dataset (the neighbour table of Eq. 8) from the FAISS neighbour service.

    pogdiff index CONFIG  ->  <dataset>/artifacts/neighbours-k<k>/  (+ artifacts/faiss/shard-<i>/ for online lookups)

Every dataset row queries every shard for its k+1 most similar rows (itself among them), in
batches of ``index.batch_size``; the shards read the query rows from the source themselves, so
only row ranges and results cross the wire. Each batch's merged rows go straight into the
table's files. Below ``index.actor_min_n`` rows (and with one shard) the shard runs
in-process; above, as Ray actors planned from the alive nodes (``plan_shards``), with several
batches in flight.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from pogdiff.config import IndexConfig, IndexType
from pogdiff.method.neighbours import NeighbourTable
from pogdiff.npyrows import NpyWriter
from pogdiff.runs import atomic_path

from pogdiff.dist.neighbour_service import (NeighbourService, as_vectors, cluster_nodes, describe_nodes, drop_self,
                                            exact_search, merge_topk, plan_shards, read_rows, shard_bounds, this_machine)

log = logging.getLogger("pogdiff.index")
# The neighbour table's columns, each (N, k): <name>.npy in the table's folder.
COLUMNS = (("ids", np.int64), ("sims", np.float32), ("different_identity", np.bool_))

# --- where the embeddings come from ---------------------------------------------------------------


class ArraySource:
    """Embeddings (N, d) and identities (N,) in memory; identities None = unknown (-1)."""

    def __init__(self, embeddings: Any, identities: Any = None):
        as_np = lambda t: t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        self.emb = np.ascontiguousarray(as_np(embeddings), dtype=np.float32)
        self.ident = np.full(len(self.emb), -1, np.int64) if identities is None else as_np(identities).astype(np.int64)
        self.n, self.dim = self.emb.shape

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.emb[start:stop]

    def identities(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        return self.ident[start:stop]


def fingerprint(source, chunk: int = 1 << 20) -> str:
    """Size, 16 evenly spaced rows and all identities: a stored index is reused only for the same data."""
    h = hashlib.sha1(f"{source.n}x{source.dim}".encode())
    for r in np.linspace(0, source.n - 1, num=min(16, source.n), dtype=np.int64):
        h.update(np.ascontiguousarray(source.read(int(r), int(r) + 1), dtype=np.float32).tobytes())
    for a in range(0, source.n, chunk):  # identities a chunk at a time: the same digest as all at once
        h.update(np.ascontiguousarray(source.identities(a, min(a + chunk, source.n))).tobytes())
    return h.hexdigest()


# --- the graph ------------------------------------------------------------------------------------


def exact_topk(source, rows: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k ids of the given dataset rows, self excluded, in this process."""
    sims, ids = exact_search(source, as_vectors(read_rows(source, rows), source.dim), k + 1)
    return drop_self(sims, ids, ids, rows)[1]


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| (ids -1 = missing are ignored)."""
    hits = [len(np.intersect1d(a[a >= 0], e[e >= 0])) / max(1, int((e >= 0).sum())) for a, e in zip(approx, exact)]
    return float(np.mean(hits))


def ensure_index(svc: NeighbourService, src, source, spec, seed: int, progress: bool) -> dict:
    """Reuse the shards' stored indexes when they hold this data with this index type; else train
    once (on shard 0) and fill every shard with its slice. Returns timings and whether it reused."""
    fp = fingerprint(source)
    bounds = shard_bounds(source.n, len(svc.shards))
    want = [dict(start=a, nbase=b - a, dim=source.dim, factory=spec.factory, fingerprint=fp) for a, b in bounds]
    reused = all(all(info.get(key) == w[key] for key in w) and info["ntotal"] == w["nbase"]
                 for info, w in zip(svc.info(), want))
    t0 = time.perf_counter()
    if reused:
        svc.get(svc.call("set_nprobe", spec.nprobe))
        return dict(reused=True, train_s=0.0, add_s=0.0)
    # train and build are pure functions of their arguments (build starts from the trained index and
    # saves it whole), so a shard actor killed during either is restarted and the call retried
    trained = svc.get(svc.call("train", src, spec, seed, shards=svc.shards[:1], retries=-1))[0]
    t1 = time.perf_counter()
    if svc.remote:
        import ray

        trained = ray.put(trained)
    svc.get([svc.call("build", src, a, b, spec, trained, fp, progress, shards=[shard], retries=-1)[0]
             for shard, (a, b) in zip(svc.shards, bounds)])
    return dict(reused=False, train_s=round(t1 - t0, 3), add_s=round(time.perf_counter() - t1, 3))


@contextlib.contextmanager
def table_columns(out: Optional[Path], n: int, k: int) -> Iterator[dict]:
    """The (N, k) columns the search fills: in memory for ``out`` None, else <name>.npy files
    written by rows (pogdiff.npyrows) in a temp folder beside ``out`` that replaces it when the block
    completes."""
    if out is None:
        yield {name: np.zeros((n, k), dtype) for name, dtype in COLUMNS}
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as folder, contextlib.ExitStack() as opened:
        folder.mkdir()
        yield {name: opened.enter_context(NpyWriter(folder / f"{name}.npy", dtype, (n, k))) for name, dtype in COLUMNS}


def load_table(out: Path) -> NeighbourTable:
    """The table in ``out``, memory-mapped copy-on-write: torch wraps it without a copy (a read-only
    map would warn), and a page is read when a row on it is."""
    return NeighbourTable(*(torch.from_numpy(np.load(Path(out) / f"{name}.npy", mmap_mode="c")) for name, _ in COLUMNS))


def search_graph(svc: NeighbourService, src, source, k: int, batch_size: int, columns: dict[str, np.ndarray],
                 progress: bool) -> None:
    """Every row against every shard, k+1 results to drop the row itself, batch by batch into ``columns``.

    A row's top-k is final only once every shard's list is merged, so the driver merges each batch
    as it arrives, writes it into the columns and drops it: no process holds (N, k) arrays, and the
    output folder need not be visible to the nodes."""
    from tqdm import tqdm

    bar = tqdm(total=source.n, desc="knn graph", unit="query", disable=not progress)

    def collect(a: int, b: int, streams: list) -> None:
        parts = [tuple(np.concatenate(column) for column in zip(*stream)) for stream in streams]
        s, i, ident = drop_self(*merge_topk(parts, k + 1), np.arange(a, b))
        q = source.identities(a, b)[:, None]
        columns["ids"][a:b], columns["sims"][a:b] = i, np.where(i >= 0, s, 0)
        columns["different_identity"][a:b] = (i >= 0) & (q >= 0) & (ident >= 0) & (ident != q)
        bar.update(b - a)

    pending: deque = deque()
    for a in range(0, source.n, batch_size):
        b = min(a + batch_size, source.n)
        pending.append((a, b, svc.stream("search_rows_in_parts", src, a, b, k + 1, retries=-1)))
        while len(pending) > (2 if svc.remote else 0):  # remote: the next batches run while this one merges
            collect(*pending.popleft())
    while pending:
        collect(*pending.popleft())
    bar.close()


def build_knn_graph(source, k: int, icfg: IndexConfig, root: Optional[str | Path] = None,
                    out: Optional[str | Path] = None, progress: bool = True) -> tuple[NeighbourTable, dict]:
    """Top-k neighbours (self excluded) of every row of ``source`` -> (NeighbourTable, stats).

    ``out`` None keeps the table in memory (small N); else it is written batch by batch into
    ids.npy, sims.npy and different_identity.npy in a folder that replaces ``out`` once they are
    complete, and returned memory-mapped. ``root`` keeps the shards' indexes on disk (reused when
    the data and index type match, and what the online service loads); Ray actors need it. The
    shards and their resources come from the alive nodes (``plan_shards``; a ConfigError when
    explicit index settings do not fit them).
    """
    n = source.n
    remote = icfg.shards > 1 or n >= icfg.actor_min_n
    if remote and root is None:
        raise ValueError("a kNN graph over Ray actors needs a root folder for the shards' indexes")
    svc = None
    with contextlib.ExitStack() as stack:
        if remote:
            import ray

            from pogdiff.dist.cluster import session

            stack.enter_context(session())
        stack.callback(lambda: svc is not None and svc.shutdown())  # before the session ends
        if remote:
            nodes = cluster_nodes()
            plan = plan_shards(nodes, n, source.dim, icfg)
            svc = NeighbourService.start(root, icfg, plan)
            src = ray.put(source)  # once; the shards read their rows from it
        else:  # this process is the one shard: the per-actor settings do not apply
            nodes = [this_machine()]
            plan = plan_shards(nodes, n, source.dim, replace(icfg, shards=1, gpus_per_shard=None, cpus_per_shard=0.0))
            svc, src = NeighbourService.local(root, 1), source
        log.info("kNN graph of %d x %d: %s on %s", n, source.dim, plan, describe_nodes(nodes))
        spec = plan.index
        stats: dict = dict(n=n, dim=source.dim, k=k, index=spec.factory, kind=spec.kind.value, shards=plan.shards,
                           actors=remote, gpus=plan.gpus * plan.shards,
                           nprobe=spec.nprobe if spec.kind != IndexType.flat else None)
        c0 = time.process_time()
        stats.update(ensure_index(svc, src, source, spec, icfg.seed, progress))
        t1, c1 = time.perf_counter(), time.process_time()
        with table_columns(None if out is None else Path(out), n, k) as columns:
            search_graph(svc, src, source, k, icfg.batch_size, columns, progress)
        t2, c2 = time.perf_counter(), time.process_time()
        exact = None
        if spec.kind != IndexType.flat and icfg.recall_sample and n > 1:
            # the reference scans all N rows: each shard its own slice, merged here like a search
            rows = np.sort(np.random.default_rng(icfg.seed).choice(n, min(icfg.recall_sample, n), replace=False))
            parts = svc.get(svc.call("exact_rows", src, rows, k + 1, retries=-1))
            exact = drop_self(*merge_topk(parts, k + 1), rows)[1]
    table = load_table(Path(out)) if out is not None else NeighbourTable(*(torch.from_numpy(columns[name]) for name, _ in COLUMNS))
    stats.update(search_s=round(t2 - t1, 3), queries_per_s=round(n / max(t2 - t1, 1e-9), 1))
    if not remote:  # CPU seconds of this process (all its FAISS threads): what a busy machine does not inflate
        stats.update(build_cpu_s=round(c1 - c0, 3), search_cpu_s=round(c2 - c1, 3))
    if exact is not None:
        stats.update(recall_at_k=round(recall_at_k(table.ids[rows].numpy(), exact), 4), recall_sample=len(rows))
    return table, stats


# --- synthetic data for tests and benchmarks ------------------------------------------------------


def clustered_embeddings(n: int, dim: int = 768, cluster_size: int = 64, spread: float = 1.0, seed: int = 0,
                         chunk: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 embeddings with identity-like structure, and their cluster labels.

    Two levels: "topics" (random directions), cluster centres = topic + 0.7 * noise, members =
    centre + ``spread`` * noise (all noise N(0, I/dim)); cluster sizes are imbalanced (lognormal
    weights, mean ``cluster_size``). spread=1 gives within-cluster cosine ~0.5. IVF lists follow
    the clusters, as with real image embeddings; i.i.d. Gaussians are IVF's worst case instead.
    """
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n // cluster_size)
    topics = rng.standard_normal((max(1, n_clusters // 32), dim), dtype=np.float32)
    centres = topics[rng.integers(len(topics), size=n_clusters)]
    centres += 0.7 * rng.standard_normal(centres.shape, dtype=np.float32)
    weights = rng.lognormal(0.0, 1.0, n_clusters)
    labels = rng.choice(n_clusters, size=n, p=weights / weights.sum())
    x = np.empty((n, dim), np.float32)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        x[a:b] = centres[labels[a:b]] + spread * rng.standard_normal((b - a, dim), dtype=np.float32)
    return x / np.sqrt(dim, dtype=np.float32), labels.astype(np.int64)
