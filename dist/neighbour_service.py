"""FAISS neighbour service: top-k cosine neighbours of image embeddings, sharded over Ray actors.

Each shard holds a FAISS inner-product index over the L2-normalised embeddings of a contiguous
slice ``[start, start + n)`` of the dataset (row ``r`` of a shard is dataset id ``start + r``), and
rows added online after the build (only the last shard takes those, so new ids continue at N).
A query goes to every shard; the per-shard top-k lists are merged by similarity.

    svc = NeighbourService.start(root, cfg.index, num_shards=4)  # named actors; each loads root/shard-<i>
    ids, sims, identities = svc.search(vectors, k=10)
    svc = NeighbourService.connect(cfg.index.name)  # elsewhere, e.g. in a training worker
    new_ids = svc.add(vectors, identities)          # online: samples that came after the graph

The same shards also run in-process (``NeighbourService.local``): small N, tests, no Ray.
A shard writes its index with faiss.write_index (temp file + rename) and, when Ray restarts it
after a crash (max_restarts), its constructor reads it back; online additions are kept in a small
delta file beside it. The GPU index is sharded over every GPU the shard sees.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import faiss
import numpy as np
import torch

from pogdiff.config import IndexConfig, IndexType
from pogdiff.method.neighbours import check_finite

MANIFEST = "manifest.json"


# --- choosing the index ---------------------------------------------------------------------------


@dataclass
class IndexSpec:
    kind: IndexType  # flat | ivf | ivfpq, never auto
    factory: str  # faiss.index_factory string
    nprobe: int
    train_size: int  # 0 for indexes that need no training


def guideline_nlist(n: int) -> int:
    """FAISS wiki, "Guidelines to choose an index": IVFK with K = 4*sqrt(N)..16*sqrt(N) (here the
    power of two at or above 4*sqrt(N)). The wiki's fixed 65536 / 262144 lists above 1M / 10M
    vectors go with an HNSW coarse quantizer for serving; in a kNN graph all N rows query, coarse
    assignment costs N*nlist*d and list scans N*nprobe*(N/nlist)*d, balanced near sqrt(nprobe*N)."""
    return 2 ** math.ceil(math.log2(4 * math.sqrt(max(n, 1))))


def choose_index(n: int, dim: int, icfg: IndexConfig, num_shards: int = 1, gpu: Optional[bool] = None) -> IndexSpec:
    """The index for N vectors of dimension ``dim``, following FAISS's guidelines unless overridden."""
    gpu = faiss.get_num_gpus() > 0 if gpu is None else gpu
    kind = icfg.type
    if kind == IndexType.auto:
        per_shard_gb = n * dim * 4 / num_shards / 2**30
        kind = (IndexType.flat if n <= icfg.flat_max
                else IndexType.ivfpq if icfg.memory_gb and per_shard_gb > icfg.memory_gb else IndexType.ivf)
    if kind == IndexType.flat:
        return IndexSpec(kind, "Flat", icfg.nprobe, 0)
    # Lists are k-means centroids: FAISS warns below 39 training points per list.
    nlist = max(1, min(icfg.nlist or guideline_nlist(n), n // 39))
    # The wiki pairs 65536+ lists with an HNSW coarse quantizer on CPU; GPU IVF keeps a flat one.
    quantizer = f"IVF{nlist}_HNSW32" if nlist >= 65536 and not gpu else f"IVF{nlist}"
    train = icfg.train_size or 40 * nlist
    if kind == IndexType.ivf:
        return IndexSpec(kind, f"{quantizer},Flat", min(icfg.nprobe, nlist), min(n, train))
    m = icfg.pq_m or max(1, dim // 8)
    if dim % m:
        raise ValueError(f"index.pq_m={m} must divide the embedding dimension {dim}")
    # 8-bit PQ trains 256 centroids per sub-quantizer; "np": no polysemous training (slow, and only
    # for Hamming-filtered search, which the service does not use).
    return IndexSpec(kind, f"{quantizer},PQ{m}np", min(icfg.nprobe, nlist), min(n, max(train, 40 * 256)))


# --- one shard ------------------------------------------------------------------------------------


def as_vectors(x: Any, dim: Optional[int], what: str = "query vectors") -> np.ndarray:
    """(n, dim) float32 C-contiguous copy, L2-normalised; a ValueError naming the row otherwise."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, (list, tuple)) and len(x) and np.ndim(x[0]) >= 1:  # a list of rows, maybe ragged
        for i, row in enumerate(x):
            if np.ndim(row) != 1 or (dim is not None and np.size(row) != dim):
                raise ValueError(f"{what}: row {i} has shape {np.shape(row)}, expected ({dim},): "
                                 f"the index holds {dim}-d image embeddings")
    arr = np.array(x, dtype=np.float32, order="C")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected an (n, {dim}) array of vectors, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{what}: every row (row 0 first) has dimension {arr.shape[1]}, expected {dim}: "
                         f"the index holds {dim}-d image embeddings")
    check_finite(torch.from_numpy(arr), what)
    faiss.normalize_L2(arr)
    return arr


def read_rows(source, rows: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Sorted dataset rows from a source that reads slices: one pass over it, a chunk at a time."""
    return np.concatenate([source.read(a, min(a + chunk, source.n))[rows[(rows >= a) & (rows < a + chunk)] - a]
                           for a in range(0, source.n, chunk)])


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(".tmp-" + path.name)  # keeps the suffix: np.save/np.savez would add one
    write(str(tmp))
    os.replace(tmp, path)


class ShardIndex:
    """One shard of the service; a plain object in-process, the body of a Ray actor otherwise.

    ``root`` None keeps the shard in memory only (nothing to reload after a crash).
    """

    def __init__(self, root: Optional[str], shard: int = 0, num_shards: int = 1):
        self.dir = Path(root) / f"shard-{shard}" if root else None
        self.shard, self.num_shards = shard, num_shards
        self.index: Optional[faiss.Index] = None
        self.meta: dict = {}
        self.identities = np.empty(0, np.int64)  # per row; -1 = unknown
        self.extra = np.empty((0, 0), np.float32)  # normalised vectors added online
        if self.dir is not None and (self.dir / MANIFEST).is_file():
            meta = json.loads((self.dir / MANIFEST).read_text())
            if meta.get("num_shards") == num_shards:  # else a build with another split: the builder rebuilds
                self._load(meta)

    # state ---------------------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def info(self) -> dict:
        return dict(self.meta, shard=self.shard, num_shards=self.num_shards, ntotal=self.ntotal,
                    gpus=faiss.get_num_gpus())

    def _require(self) -> faiss.Index:
        if self.index is None:
            raise RuntimeError(f"neighbour shard {self.shard} has no index: build it first (`pogdiff index CONFIG`)")
        return self.index

    def _set_index(self, cpu_index: faiss.Index) -> None:
        """Onto every visible GPU (sharded), nprobe set; as is on a CPU-only machine."""
        index = cpu_index
        if faiss.get_num_gpus() > 0:
            co = faiss.GpuMultipleClonerOptions()
            co.shard = True
            co.useFloat16 = ",PQ" in self.meta["factory"]  # GPU IVF-PQ needs fp16 lookup tables for many sub-quantizers
            index = faiss.index_cpu_to_all_gpus(cpu_index, co=co)
        self.index = index
        self.set_nprobe(self.meta["nprobe"])

    def set_nprobe(self, nprobe: int) -> None:
        """IVF lists visited per query (a search-time setting: a stored index takes any value)."""
        self.meta["nprobe"] = nprobe
        if self.index is not None and self.meta["factory"] != "Flat":
            space = faiss.GpuParameterSpace() if faiss.get_num_gpus() > 0 else faiss.ParameterSpace()
            space.set_index_parameter(self.index, "nprobe", nprobe)
            if "HNSW" in self.meta["factory"]:
                space.set_index_parameter(self.index, "quantizer_efSearch", 2 * nprobe)

    def _cpu(self) -> faiss.Index:
        return faiss.index_gpu_to_cpu(self.index) if faiss.get_num_gpus() > 0 else self.index

    def _load(self, meta: dict) -> None:
        cpu = faiss.read_index(str(self.dir / "index.faiss"))
        identities = np.load(self.dir / "identities.npy")
        if cpu.ntotal != meta["nbase"] or len(identities) != meta["nbase"]:
            raise RuntimeError(f"{self.dir}: index holds {cpu.ntotal} rows and identities {len(identities)}, "
                               f"manifest says {meta['nbase']}: delete the folder and rebuild (`pogdiff index`)")
        self.meta, self.identities = meta, identities
        self._set_index(cpu)
        delta = self.dir / "delta.npz"
        if delta.is_file():
            d = np.load(delta)
            self.extra = d["vectors"]
            self.index.add(self.extra)
            self.identities = np.concatenate([identities, d["identities"]])

    def _save_base(self) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / MANIFEST).unlink(missing_ok=True)  # no manifest = no (half-written) index
        (self.dir / "delta.npz").unlink(missing_ok=True)
        _atomic(self.dir / "index.faiss", lambda p: faiss.write_index(self._cpu(), p))
        _atomic(self.dir / "identities.npy", lambda p: np.save(p, self.identities))
        _atomic(self.dir / MANIFEST, lambda p: Path(p).write_text(json.dumps(self.meta)))

    # building ------------------------------------------------------------------------------------

    def train(self, source, spec: IndexSpec, seed: int = 0) -> np.ndarray:
        """Train an empty index on ``spec.train_size`` rows drawn uniformly from ``source``;
        returns it serialised (faiss.serialize_index) for every shard's ``build``."""
        index = faiss.index_factory(source.dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
        if spec.train_size:
            rng = np.random.default_rng(seed)
            rows = np.sort(rng.choice(source.n, size=spec.train_size, replace=False))
            x = as_vectors(read_rows(source, rows), source.dim, "training embeddings")
            if faiss.get_num_gpus() > 0:  # k-means assignment on the GPUs
                ivf = faiss.extract_index_ivf(index)
                ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(source.dim))
            index.train(x)
        return faiss.serialize_index(index)

    def build(self, source, start: int, stop: int, spec: IndexSpec, trained: np.ndarray,
              fingerprint: str = "", progress: bool = False, batch_size: int = 65536) -> dict:
        """Fill this shard with dataset rows [start, stop) and write it to disk."""
        from tqdm import tqdm

        self.meta = dict(start=start, nbase=stop - start, num_shards=self.num_shards, dim=source.dim,
                         factory=spec.factory, nprobe=spec.nprobe, fingerprint=fingerprint)
        self._set_index(faiss.deserialize_index(trained))
        self.extra = np.empty((0, source.dim), np.float32)
        bar = tqdm(total=stop - start, desc=f"add shard {self.shard}", unit="vec", disable=not progress)
        for a in range(start, stop, batch_size):
            b = min(a + batch_size, stop)
            self.index.add(as_vectors(source.read(a, b), source.dim, f"image embeddings rows {a}:{b}"))
            bar.update(b - a)
        bar.close()
        self.identities = source.identities(start, stop)
        self._save_base()
        return self.info()

    # queries -------------------------------------------------------------------------------------

    def _search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sims, global ids, identities), each (n, k); missing results: id -1, sim -inf, identity -1."""
        sims, rows = self._require().search(x, k)
        found = rows >= 0
        ids = np.where(found, rows + self.meta["start"], -1)
        identities = np.where(found, self.identities[np.maximum(rows, 0)], -1) if self.ntotal else np.full_like(rows, -1)
        return np.where(found, sims, -np.inf).astype(np.float32), ids, identities

    def search(self, vectors: Any, k: int):
        return self._search(as_vectors(vectors, self.meta.get("dim")), k)

    def search_rows(self, source, start: int, stop: int, k: int):
        """Queries are dataset rows [start, stop), read by the shard itself (no vectors on the wire)."""
        return self._search(as_vectors(source.read(start, stop), self.meta.get("dim"),
                                       f"image embeddings rows {start}:{stop}"), k)

    def add(self, vectors: Any, identities: Optional[Sequence[int]] = None) -> np.ndarray:
        """Online: append samples after the build; returns their dataset ids (continuing at N)."""
        x = as_vectors(vectors, self._require().d, "added vectors")
        ident = np.full(len(x), -1, np.int64) if identities is None else np.asarray(identities, np.int64)
        if ident.shape != (len(x),):
            raise ValueError(f"added identities have shape {ident.shape}, expected ({len(x)},): one per vector")
        first = self.meta["start"] + self.ntotal
        self.index.add(x)
        self.extra = np.concatenate([self.extra.reshape(-1, x.shape[1]), x])
        self.identities = np.concatenate([self.identities, ident])
        if self.dir is not None:
            extra_ident = self.identities[self.meta["nbase"]:]
            _atomic(self.dir / "delta.npz",
                    lambda p: np.savez(p, vectors=self.extra, identities=extra_ident))
        return np.arange(first, first + len(x), dtype=np.int64)


# --- the service (client side) --------------------------------------------------------------------


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int):
    """Per query, the k most similar over all shards' (sims, ids, identities)."""
    sims, ids, idents = (np.concatenate([p[i] for p in parts], axis=1) for i in range(3))
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return tuple(np.take_along_axis(a, order, 1) for a in (sims, ids, idents))


def drop_self(sims: np.ndarray, ids: np.ndarray, idents: np.ndarray, query_ids: np.ndarray):
    """From k+1 results keep k: drop the query's own id, or the last result where it is absent."""
    is_self = ids == np.asarray(query_ids)[:, None]
    is_self[~is_self.any(1), -1] = True
    keep = ~is_self
    n, k = ids.shape[0], ids.shape[1] - 1
    return tuple(a[keep].reshape(n, k) for a in (sims, ids, idents))


def shard_bounds(n: int, num_shards: int) -> list[tuple[int, int]]:
    return [(i * n // num_shards, (i + 1) * n // num_shards) for i in range(num_shards)]


class NeighbourService:
    """Client over the shards: Ray actor handles (``start``/``connect``) or in-process ``ShardIndex``es."""

    def __init__(self, shards: list, remote: bool, names: Sequence[str] = (), namespace: Optional[str] = None):
        self.shards, self.remote, self.names, self.namespace = shards, remote, list(names), namespace

    @classmethod
    def local(cls, root: Optional[str | Path], num_shards: int = 1) -> "NeighbourService":
        return cls([ShardIndex(str(root) if root else None, i, num_shards) for i in range(num_shards)], remote=False)

    @classmethod
    def start(cls, root: str | Path, icfg: IndexConfig, num_shards: Optional[int] = None) -> "NeighbourService":
        """One named actor per shard (``<name>-<i>``); each loads ``root/shard-<i>`` if it is there."""
        import ray

        from pogdiff.dist.cluster import connect

        num_shards = num_shards or icfg.shards
        connect()
        gpus = ray.cluster_resources().get("GPU", 0)
        node_cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]]
        cpus = icfg.cpus_per_shard or max(1, min(max(node_cpus), sum(node_cpus) // num_shards))
        actor = ray.remote(ShardIndex)
        options = dict(namespace=icfg.namespace, max_restarts=icfg.max_restarts, num_cpus=cpus,
                       num_gpus=gpus / num_shards if gpus else 0)
        names = [f"{icfg.name}-{i}" for i in range(num_shards)]
        try:
            shards = [actor.options(name=name, **options).remote(str(root), i, num_shards) for i, name in enumerate(names)]
        except ValueError as e:  # the name is taken
            raise ValueError(f"{e}: a neighbour service '{icfg.name}' is already running in namespace "
                             f"'{icfg.namespace}'; connect to it or pick another index.name") from None
        return cls(shards, remote=True, names=names, namespace=icfg.namespace)

    @classmethod
    def connect(cls, name: str = IndexConfig.name, namespace: str = IndexConfig.namespace) -> "NeighbourService":
        """The live service, found by its actors' names (a training worker's entry point)."""
        import ray

        try:
            first = ray.get_actor(f"{name}-0", namespace=namespace)
        except ValueError:
            raise ValueError(f"no neighbour service '{name}' in Ray namespace '{namespace}': start it with "
                             "NeighbourService.start(...) in the driver first") from None
        num_shards = ray.get(first.info.remote())["num_shards"]
        names = [f"{name}-{i}" for i in range(num_shards)]
        return cls([ray.get_actor(n, namespace=namespace) for n in names], remote=True, names=names, namespace=namespace)

    # calls on every shard: futures when remote, results when local
    def call(self, method: str, *args, shards: Optional[list] = None, retries: int = 0) -> list:
        shards = self.shards if shards is None else shards
        if self.remote:
            return [getattr(s, method).options(max_task_retries=retries).remote(*args) for s in shards]
        return [getattr(s, method)(*args) for s in shards]

    def get(self, futures: list) -> list:
        if self.remote:
            import ray

            return ray.get(futures)
        return futures

    def info(self) -> list[dict]:
        return self.get(self.call("info"))

    def search(self, vectors: Any, k: int, exclude: Optional[Sequence[int]] = None):
        """Top-k (ids, sims, identities) for each query row, each (n, k); ``exclude`` gives each
        query's own id (a sample already in the index), which is then left out of its results.
        Missing neighbours (fewer than k others) have id -1, sim 0, identity -1."""
        if self.remote and isinstance(vectors, np.ndarray):
            import ray

            vectors = ray.put(vectors)  # once, not once per shard
        kk = k + (exclude is not None)
        sims, ids, idents = merge_topk(self.get(self.call("search", vectors, kk, retries=-1)), kk)
        if exclude is not None:
            if len(exclude) != len(ids):
                raise ValueError(f"exclude has {len(exclude)} ids for {len(ids)} query vectors: give one per query")
            sims, ids, idents = drop_self(sims, ids, idents, np.asarray(exclude))
        return ids, np.where(ids >= 0, sims, 0).astype(np.float32), idents

    def add(self, vectors: Any, identities: Optional[Sequence[int]] = None) -> np.ndarray:
        """Online additions go to the last shard, whose ids continue at N: they stay unique."""
        return self.get(self.call("add", vectors, identities, shards=self.shards[-1:]))[0]

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the actors for good (the owner's call, not a connected worker's); their index files
        stay on disk. Returns once the names are free for a new service."""
        if self.remote:
            import ray

            for s in self.shards:
                ray.kill(s, no_restart=True)
            deadline = time.monotonic() + timeout_s
            for name in self.names:
                while time.monotonic() < deadline:
                    try:
                        ray.get_actor(name, namespace=self.namespace)
                    except ValueError:
                        break
                    time.sleep(0.05)
        self.shards = []
