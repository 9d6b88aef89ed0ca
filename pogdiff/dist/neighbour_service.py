"""FAISS neighbour service: top-k cosine neighbours of image embeddings, sharded over Ray actors.

Each shard holds a FAISS inner-product index over the L2-normalised embeddings of a contiguous
slice ``[start, start + n)`` of the dataset (row ``r`` of a shard is dataset id ``start + r``), and
rows added online after the build (only the last shard takes those, so new ids continue at N).
A query goes to every shard; the per-shard top-k lists are merged by similarity.

    plan = plan_shards(cluster_nodes(), n, dim, cfg.index)  # shards and their resources from the alive nodes
    svc = NeighbourService.start(root, cfg.index, plan)  # named actors; each loads root/shard-<i>
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
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from pogdiff.config import ConfigError, IndexConfig, IndexType
from pogdiff.method.neighbours import check_finite

try:
    import faiss
except ImportError as e:  # faiss-cpu and faiss-gpu-cu12 both install `faiss`, so neither is a base dependency
    raise ImportError("FAISS is not installed: pip install 'pogdiff[cpu]', or 'pogdiff[gpu]' on a CUDA 12 host "
                      "(one of the two: both install the module `faiss`)") from e

MANIFEST = "manifest.json"
GiB = 2**30
# The share of a shard's memory its index may fill; the rest holds query batches, search results,
# FAISS's temporary GPU memory and, for a GPU index, the host copy written to disk.
INDEX_MEMORY_FRACTION = 0.75
RESULT_PART_BYTES = 64 * 2**10  # a streamed part of search results: under Ray's 100 KiB inline limit


# --- choosing the index ---------------------------------------------------------------------------


@dataclass
class IndexSpec:
    kind: IndexType  # flat | ivf | ivfpq, never auto
    factory: str  # faiss.index_factory string
    nprobe: int
    train_size: int  # 0 for indexes that need no training
    bytes_per_shard: float = 0.0  # the index of one shard's rows: vectors or codes, ids, centroids


def guideline_nlist(n: int) -> int:
    """FAISS wiki, "Guidelines to choose an index": IVFK with K = 4*sqrt(N)..16*sqrt(N) (here the
    power of two at or above 4*sqrt(N)). The wiki's fixed 65536 / 262144 lists above 1M / 10M
    vectors go with an HNSW coarse quantizer for serving; in a kNN graph all N rows query, coarse
    assignment costs N*nlist*d and list scans N*nprobe*(N/nlist)*d, balanced near sqrt(nprobe*N)."""
    return 2 ** math.ceil(math.log2(4 * math.sqrt(max(n, 1))))


def index_spec(kind: IndexType, n: int, dim: int, icfg: IndexConfig, num_shards: int = 1, gpu: bool = False) -> IndexSpec:
    """The ``kind`` index for N vectors of dimension ``dim`` split over ``num_shards``, and its bytes per shard."""
    rows = math.ceil(n / num_shards)
    if kind == IndexType.flat:
        return IndexSpec(kind, "Flat", icfg.nprobe, 0, rows * dim * 4.0)
    # Lists are k-means centroids: FAISS warns below 39 training points per list.
    nlist = max(1, min(icfg.nlist or guideline_nlist(n), n // 39))
    # The wiki pairs 65536+ lists with an HNSW coarse quantizer on CPU; GPU IVF keeps a flat one.
    quantizer = f"IVF{nlist}_HNSW32" if nlist >= 65536 and not gpu else f"IVF{nlist}"
    train = icfg.train_size or 40 * nlist
    centroids = nlist * dim * 4.0
    if kind == IndexType.ivf:  # full vectors and an int64 id per row
        return IndexSpec(kind, f"{quantizer},Flat", min(icfg.nprobe, nlist), min(n, train), rows * (dim * 4 + 8) + centroids)
    m = icfg.pq_m or max(1, dim // 8)
    if dim % m:
        raise ConfigError(f"index.pq_m={m} must divide the embedding dimension {dim}")
    # 8-bit PQ trains 256 centroids per sub-quantizer; "np": no polysemous training (slow, and only
    # for Hamming-filtered search, which the service does not use). m code bytes and an id per row.
    return IndexSpec(kind, f"{quantizer},PQ{m}np", min(icfg.nprobe, nlist), min(n, max(train, 40 * 256)),
                     rows * (m + 8) + centroids + 256 * dim * 4.0)


def choose_index(n: int, dim: int, icfg: IndexConfig, num_shards: int = 1, memory_per_shard: float = math.inf,
                 gpu: Optional[bool] = None) -> IndexSpec:
    """The index for N vectors of dimension ``dim`` over ``num_shards``: index.type, or for auto
    FAISS's guidelines (Flat up to index.flat_max vectors, then IVF) and IVF-PQ codes where the full
    vectors would not fit the bytes a shard's index may take (``memory_per_shard``, the plan's;
    index.memory_gb when set)."""
    gpu = faiss.get_num_gpus() > 0 if gpu is None else gpu
    budget = icfg.memory_gb * GiB if icfg.memory_gb else memory_per_shard
    auto = icfg.type == IndexType.auto
    kinds = (([IndexType.flat] if n <= icfg.flat_max else []) + [IndexType.ivf, IndexType.ivfpq]) if auto else [icfg.type]
    for kind in kinds:
        spec = index_spec(kind, n, dim, icfg, num_shards, gpu)
        if spec.bytes_per_shard <= budget:
            return spec
    need = f"{spec.bytes_per_shard / GiB:.1f} GiB per shard for {math.ceil(n / num_shards)} of {n} {dim}-d vectors"
    have = f"a shard's index may take {budget / GiB:.1f} GiB" + (" (index.memory_gb)" if icfg.memory_gb else "")
    if auto:
        raise ConfigError(f"the kNN index does not fit even as IVF-PQ codes ({spec.factory}): {need}, {have}; "
                          "add nodes or lower index.pq_m")
    raise ConfigError(f"index.type={icfg.type.value} does not fit: {need}, {have}; use index.type=auto "
                      "(IVF-PQ codes when the vectors do not fit) or add nodes")


# --- planning the shards over the nodes -----------------------------------------------------------


@dataclass(frozen=True)
class NodeResources:
    """One alive node: Ray's logical CPUs and GPUs on it, the memory Ray schedules there (bytes, its
    ``memory`` resource) and the memory of each of its GPUs (bytes; 0 = unknown)."""

    cpus: float
    gpus: float
    memory: float
    gpu_memory: float = 0.0


@dataclass(frozen=True)
class ShardPlan:
    """``shards`` actors over contiguous slices of the N rows, each asking Ray for ``gpus`` GPUs,
    ``cpus`` CPUs (its FAISS threads) and ``memory`` bytes, each holding ``index`` over its slice."""

    shards: int
    gpus: float
    cpus: float
    memory: int
    index: IndexSpec

    def actor_options(self) -> dict:
        return dict(num_cpus=self.cpus, num_gpus=self.gpus, memory=self.memory)


def describe_nodes(nodes: Sequence[NodeResources]) -> str:
    kinds = Counter(f"{nd.gpus:g} GPUs" + (f" of {nd.gpu_memory / GiB:.0f} GiB" if nd.gpu_memory else "")
                    + f", {nd.cpus:g} CPUs, {nd.memory / GiB:.0f} GiB memory" for nd in nodes)
    return f"{len(nodes)} alive node{'s' * (len(nodes) != 1)}: " + "; ".join(f"{c} x ({k})" for k, c in kinds.items())


def _slots(capacity: float, unit: float) -> float:
    """Actors of ``unit`` that fit ``capacity`` (the epsilon absorbs float error in units like 1/3)."""
    return math.floor(capacity / unit + 1e-9) if unit > 0 else math.inf


def _whole(x: float) -> float:
    return int(x) if float(x).is_integer() else x


def _largest_unit(capacities: Sequence[float], count: int) -> float:
    """The largest per-actor quantity such that ``count`` actors of it fit on nodes of these
    capacities: a whole number, or 1/j below one (Ray accepts no other GPU quantities)."""
    units = sorted({float(u) for u in range(1, int(max(capacities, default=0)) + 1)} | {1 / j for j in range(2, count + 1)})
    lo, hi = 0, len(units)  # the fitting units are a prefix of the ascending list
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(_slots(c, units[mid]) for c in capacities) >= count:
            lo = mid + 1
        else:
            hi = mid
    return units[lo - 1] if lo else 0.0


def plan_shards(nodes: Sequence[NodeResources], n: int, dim: int, icfg: IndexConfig) -> ShardPlan:
    """How many shard actors and what each asks for, so that every one fits on one node.

    Where nodes have GPUs, shards take GPUs: by default every GPU, in equal parts as large as the
    smallest GPU node (4 nodes x 8 GPUs -> 4 shards of 8), with the CPUs and memory of a node
    shared by the shards it can take. Without GPUs (or index.gpus_per_shard=0, e.g. a service
    beside training), one CPU shard per node, as large as the nodes allow. index.shards,
    gpus_per_shard, cpus_per_shard and memory_gb given explicitly are checked against the nodes
    (ConfigError naming the key). The index type then follows from the memory a shard has."""
    if not nodes:
        raise RuntimeError("no alive Ray node to place the neighbour shards on")
    what = describe_nodes(nodes)
    gpu_caps, cpu_caps = [nd.gpus for nd in nodes], [nd.cpus for nd in nodes]
    for key, want, caps, unit in (("gpus_per_shard", icfg.gpus_per_shard, gpu_caps, "GPUs"),
                                  ("cpus_per_shard", icfg.cpus_per_shard, cpu_caps, "CPUs")):
        if want and want > max(caps):
            raise ConfigError(f"index.{key}={want:g} is more {unit} than any node has ({what})")
    if icfg.gpus_per_shard is not None:
        gpus = icfg.gpus_per_shard
    elif max(gpu_caps) >= 1:
        gpus = _largest_unit(gpu_caps, icfg.shards) if icfg.shards else float(min(math.floor(g) for g in gpu_caps if g >= 1))
    else:
        gpus = 0.0
    cpus = icfg.cpus_per_shard
    if gpus:
        gpu_slots = [_slots(g, gpus) for g in gpu_caps]
        shards = icfg.shards or sum(gpu_slots)
        if not cpus:  # a node's CPUs shared by the shards its GPUs can take
            cpus = min(nd.cpus / s for nd, s in zip(nodes, gpu_slots) if s)
            cpus = float(math.floor(cpus)) if cpus >= 1 else cpus
    else:
        shards = icfg.shards or sum(1 for c in cpu_caps if c >= 1) or 1
        cpus = cpus or _largest_unit(cpu_caps, shards)
    slots = [min(_slots(nd.gpus, gpus), _slots(nd.cpus, cpus)) for nd in nodes]
    if sum(slots) < shards:
        asked = [f"index.{key}={value:g}" for key, value in (("shards", icfg.shards), ("gpus_per_shard", icfg.gpus_per_shard),
                                                            ("cpus_per_shard", icfg.cpus_per_shard)) if value]
        raise ConfigError(f"{', '.join(asked) or 'the shards'}: {shards} shard actors of {gpus:g} GPUs and {cpus:g} CPUs "
                          f"do not fit the nodes, which take {sum(slots)} ({what})")
    hosts = [(nd, s) for nd, s in zip(nodes, slots) if s]
    host_share = min(nd.memory / min(s, shards) for nd, s in hosts)  # a node's memory shared by the shards it takes
    gpu_share = gpus * min(nd.gpu_memory for nd, _ in hosts) if gpus and all(nd.gpu_memory for nd, _ in hosts) else math.inf
    share = min(host_share, gpu_share)
    if icfg.memory_gb and icfg.memory_gb * GiB > share:
        raise ConfigError(f"index.memory_gb={icfg.memory_gb:g} is more than a shard has: {share / GiB:.1f} GiB "
                          f"with {shards} shards over the nodes ({what})")
    index = choose_index(n, dim, icfg, shards, INDEX_MEMORY_FRACTION * share, gpu=gpus > 0)
    memory = int(min(host_share, index.bytes_per_shard / INDEX_MEMORY_FRACTION))
    return ShardPlan(int(shards), _whole(gpus), _whole(cpus), max(memory, 1), index)


def gpu_memory_per_gpu() -> float:
    """The smallest GPU memory of this machine in bytes, as nvidia-smi reports it; 0 without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0.0
    out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=60)
    mib = [float(v) for v in out.stdout.split() if v.replace(".", "", 1).isdigit()] if out.returncode == 0 else []
    return min(mib) * 2**20 if mib else 0.0


def cluster_nodes() -> list[NodeResources]:
    """The alive nodes of the connected Ray cluster (their total resources), with each GPU node's
    GPU memory read there (Ray does not track it): one zero-CPU task pinned to each GPU node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [nd for nd in ray.nodes() if nd["Alive"]]
    probe = ray.remote(num_cpus=0)(gpu_memory_per_gpu)
    pending = {nd["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nd["NodeID"], soft=False)).remote()
               for nd in alive if nd["Resources"].get("GPU", 0) > 0}
    gpu_memory = dict(zip(pending, ray.get(list(pending.values()), timeout=300)))
    return [NodeResources(cpus=r.get("CPU", 0.0), gpus=r.get("GPU", 0.0), memory=r.get("memory", 0.0),
                          gpu_memory=gpu_memory.get(nd["NodeID"], 0.0)) for nd in alive for r in [nd["Resources"]]]


def this_machine() -> NodeResources:
    """This process's machine as one node: what an in-process build has."""
    import psutil

    gpus = faiss.get_num_gpus()
    return NodeResources(cpus=float(os.cpu_count() or 1), gpus=float(gpus), memory=float(psutil.virtual_memory().available),
                         gpu_memory=gpu_memory_per_gpu() if gpus else 0.0)


def stored_plan(root: str | Path, icfg: IndexConfig) -> ShardPlan:
    """The plan for serving the index stored under ``root`` (its shards, rows and type) on the alive nodes."""
    first = Path(root) / "shard-0" / MANIFEST
    if not first.is_file():
        raise RuntimeError(f"{root}: no stored neighbour index to serve: build it first (`pogdiff index CONFIG`)")
    metas = [json.loads((Path(root) / f"shard-{i}" / MANIFEST).read_text())
             for i in range(json.loads(first.read_text())["num_shards"])]
    kind = IndexType(metas[0].get("kind", icfg.type))
    return plan_shards(cluster_nodes(), sum(m["nbase"] for m in metas), metas[0]["dim"],
                       replace(icfg, shards=len(metas), type=kind))


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


def read_rows(source, rows: np.ndarray, chunk_bytes: int = 16 * 2**20) -> np.ndarray:
    """Sorted dataset rows from a source that reads slices: one pass over it, ``chunk_bytes`` of
    float32 vectors at a time."""
    chunk = max(1, chunk_bytes // (4 * source.dim))
    return np.concatenate([source.read(a, min(a + chunk, source.n))[rows[(rows >= a) & (rows < a + chunk)] - a]
                           for a in range(0, source.n, chunk)])


def result_parts(*columns: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    """The rows of equal-length arrays, ``RESULT_PART_BYTES`` at a time: the items of a Ray streaming
    generator that come back in the reply, not through the object store (``NeighbourService.stream``)."""
    step = max(1, RESULT_PART_BYTES // max(1, sum(c[:1].nbytes for c in columns)))
    for a in range(0, len(columns[0]), step):
        yield tuple(c[a:a + step] for c in columns)


def exact_search(source, queries: np.ndarray, k: int, start: int = 0, stop: Optional[int] = None,
                 chunk_bytes: int = 16 * 2**20) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k (sims, dataset ids) of normalised ``queries`` over dataset rows [start, stop)
    of ``source``, read ``chunk_bytes`` of float32 vectors at a time; missing: -inf and -1."""
    stop = source.n if stop is None else stop
    chunk = max(1, chunk_bytes // (4 * source.dim))
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for a in range(start, stop, chunk):
        xb = as_vectors(source.read(a, min(a + chunk, stop)), source.dim)
        sims, ids = faiss.knn(queries, xb, min(k, len(xb)), metric=faiss.METRIC_INNER_PRODUCT)
        pad = k - ids.shape[1]
        sims, ids = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf), np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        heap.add_result(np.ascontiguousarray(sims), np.ascontiguousarray(np.where(ids >= 0, ids + a, -1)))
    heap.finalize()
    return heap.D, heap.I


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
                         kind=spec.kind.value, factory=spec.factory, nprobe=spec.nprobe, fingerprint=fingerprint)
        self._set_index(faiss.deserialize_index(trained))
        self.extra = np.empty((0, source.dim), np.float32)
        if spec.kind != IndexType.flat and faiss.get_num_gpus() == 0:
            self._reserve_lists(source, start, stop, batch_size)
        bar = tqdm(total=stop - start, desc=f"add shard {self.shard}", unit="vec", disable=not progress)
        for a in range(start, stop, batch_size):
            b = min(a + batch_size, stop)
            self.index.add(as_vectors(source.read(a, b), source.dim, f"image embeddings rows {a}:{b}"))
            bar.update(b - a)
        bar.close()
        self.identities = source.identities(start, stop)
        self._save_base()
        return self.info()

    def _reserve_lists(self, source, start: int, stop: int, batch_size: int) -> None:
        """Give every IVF list the capacity for exactly the rows it will get. FAISS grows a list as a
        std::vector grows (to 2x on a full one): adding 3*10^5 192-d vectors to IVF2048,Flat took
        1.5x their bytes, against 1.0x with this (one more coarse-assignment pass). The shard must fit
        the memory its plan asked Ray for (IndexSpec.bytes_per_shard)."""
        ivf = faiss.extract_index_ivf(self.index)
        counts = np.zeros(ivf.nlist, np.int64)
        for a in range(start, stop, batch_size):
            b = min(a + batch_size, stop)
            _, assign = ivf.quantizer.search(as_vectors(source.read(a, b), source.dim, f"image embeddings rows {a}:{b}"), 1)
            assign = assign.ravel()
            counts += np.bincount(assign[assign >= 0], minlength=ivf.nlist)
        lists = faiss.downcast_InvertedLists(ivf.invlists)
        for list_no, rows in enumerate(counts.tolist()):
            if rows:  # resizing down keeps a vector's capacity
                lists.resize(list_no, rows)
                lists.resize(list_no, 0)

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

    def exact_rows(self, source, rows: np.ndarray, k: int):
        """The recall reference, on the shard that holds the slice (and its GPUs at scale): the
        brute-force top-k of dataset rows ``rows`` over this shard's rows, as ``_search`` returns
        them (identities unknown: -1)."""
        start = self.meta["start"]
        sims, ids = exact_search(source, as_vectors(read_rows(source, rows), source.dim), k, start, start + self.meta["nbase"])
        return sims.astype(np.float32), ids, np.full_like(ids, -1)

    def search_rows_in_parts(self, source, start: int, stop: int, k: int):
        """``search_rows`` in ``result_parts``."""
        yield from result_parts(*self.search_rows(source, start, stop, k))

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
    def start(cls, root: str | Path, icfg: IndexConfig, plan: Optional[ShardPlan] = None) -> "NeighbourService":
        """One named actor per shard (``<name>-<i>``), each loading ``root/shard-<i>`` if it is there,
        with the resources of ``plan`` (default: ``stored_plan``, the index under ``root`` on the alive nodes)."""
        import ray

        from pogdiff.dist.cluster import connect

        connect()
        plan = plan or stored_plan(root, icfg)
        actor = ray.remote(ShardIndex)
        options = dict(namespace=icfg.namespace, max_restarts=icfg.max_restarts, **plan.actor_options())
        names = [f"{icfg.name}-{i}" for i in range(plan.shards)]
        try:
            shards = [actor.options(name=name, **options).remote(str(root), i, plan.shards) for i, name in enumerate(names)]
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

    def stream(self, method: str, *args, retries: int = 0) -> list[Iterator]:
        """Per shard, the items of the generator ``method``, in order. Remote, a Ray streaming
        generator: items under Ray's inline limit (100 KiB) come back in the reply, while a larger
        result goes through the object store, and every page of the store a process has read
        stays in its RSS (the kNN-graph driver grew by 76 MB over 62 batches at 10^6 rows)."""
        if not self.remote:
            return [getattr(s, method)(*args) for s in self.shards]
        import ray

        return [(ray.get(ref) for ref in getattr(s, method).options(num_returns="streaming", max_task_retries=retries)
                 .remote(*args)) for s in self.shards]

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
