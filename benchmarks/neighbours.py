"""kNN-graph build time, queries/s and IVF recall@10 against N (FAISS neighbour service, issue 5).

    .venv/bin/python benchmarks/neighbours.py                      # CPU: N = 1e4 .. 1e6 (Flat capped, see below)
    .venv/bin/python benchmarks/neighbours.py --sizes 10000 100000 --flat-max 30000 --out /tmp/nb.json

For each N it builds the whole graph (every row's top-k, self excluded) with
pogdiff.dist.knn_graph.build_knn_graph, exact "Flat" and "ivf" (FAISS-guideline nlist, default
nprobe), in-process (``--actors`` runs the shards as Ray actors instead), and reports index build
(train + add) and graph search times, queries/s, and IVF recall@10 against exact search on a
1000-query sample, plus recall and queries/s of that sample for a sweep of nprobe.

Flat above ``--flat-max`` and IVF above ``--ivf-max`` are not run: their times are extrapolated
from the largest measured run by operation counts (see ``extrapolate``) and marked
``"extrapolated": true``; ``--base REPORT --sizes N`` extrapolates from an earlier report's runs.

Data: clustered_embeddings (two-level Gaussian clusters, mean cluster size 64, lognormal sizes,
spread 2.0: top-10 cosine ~0.3), L2-normalised. i.i.d. Gaussians would be IVF's worst case.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import faiss
import numpy as np

from pogdiff.config import IndexConfig, IndexType
from pogdiff.dist.knn_graph import ArraySource, build_knn_graph, clustered_embeddings, exact_topk, recall_at_k
from pogdiff.dist.neighbour_service import NeighbourService, choose_index


def machine() -> dict:
    import ray
    import torch

    gpus = []
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        gpus = [g.strip() for g in out.stdout.splitlines() if g.strip()]
    with open("/proc/meminfo") as f:
        mem_gib = int(f.readline().split()[1]) / 2**20
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return dict(date=datetime.date.today().isoformat(), host=platform.node(), cpu=cpu, cores=os.cpu_count(),
                faiss_threads=faiss.omp_get_max_threads(), mem_gib=round(mem_gib, 1), load_avg=os.getloadavg(),
                gpus=gpus, faiss_gpus=faiss.get_num_gpus(), python=platform.python_version(),
                faiss=faiss.__version__, numpy=np.__version__, ray=ray.__version__, torch=torch.__version__)


def graph(x, labels, icfg: IndexConfig, k: int, root: str) -> dict:
    t = time.perf_counter()
    _, stats = build_knn_graph(ArraySource(x, labels), k, icfg, root=root, progress=False)
    stats["total_s"] = round(time.perf_counter() - t, 3)
    stats["build_s"] = round(stats["train_s"] + stats["add_s"], 3)
    if "search_cpu_s" in stats:
        stats["queries_per_cpu_s"] = round(stats["n"] / stats["search_cpu_s"], 1)
    return stats


def nprobe_sweep(x, root: str, k: int, rows: np.ndarray, exact: np.ndarray, nprobes: list[int]) -> list[dict]:
    svc = NeighbourService.local(root)
    out = []
    for nprobe in nprobes:
        svc.get(svc.call("set_nprobe", nprobe))
        t = time.perf_counter()
        ids, _, _ = svc.search(x[rows], k, exclude=rows)
        dt = time.perf_counter() - t
        out.append(dict(nprobe=nprobe, recall_at_k=round(recall_at_k(ids, exact), 4), queries_per_s=round(len(rows) / dt, 1)))
    return out


def extrapolate(measured: dict, n: int, dim: int) -> dict:
    """Scale a measured run to N by the operation counts of its index at both sizes (choose_index):
    Flat: add ~ N, search ~ N^2; IVF: train ~ train_size * nlist, add ~ N * nlist,
    search ~ N * (nlist + nprobe * N / nlist) (coarse assignment + list scans)."""
    m = measured["n"]
    at = {size: choose_index(size, dim, IndexConfig(type=IndexType(measured["kind"]), nprobe=measured["nprobe"] or 1))
          for size in (m, n)}
    if measured["kind"] == "flat":
        f_train, f_add, f_search = 1.0, n / m, (n / m) ** 2
        rule = "add ~ N, search ~ N^2"
    else:
        nl = {size: int(at[size].factory.split(",")[0][3:].split("_")[0]) for size in (m, n)}
        nprobe = measured["nprobe"]
        f_train = at[n].train_size * nl[n] / (at[m].train_size * nl[m])
        f_add = n * nl[n] / (m * nl[m])
        f_search = n * (nl[n] + nprobe * n / nl[n]) / (m * (nl[m] + nprobe * m / nl[m]))
        rule = "train ~ train_size*nlist, add ~ N*nlist, search ~ N*(nlist + nprobe*N/nlist)"
    build_scale = ((measured["train_s"] * f_train + measured["add_s"] * f_add) / measured["build_s"]
                   if measured["build_s"] else f_add)
    out = dict(n=n, extrapolated=True, from_n=m, index=at[n].factory, rule=rule,
               train_s=round(measured["train_s"] * f_train, 1), add_s=round(measured["add_s"] * f_add, 1),
               build_s=round(measured["build_s"] * build_scale, 1), search_s=round(measured["search_s"] * f_search, 1))
    if "search_cpu_s" in measured:
        out.update(build_cpu_s=round(measured["build_cpu_s"] * build_scale, 1),
                   search_cpu_s=round(measured["search_cpu_s"] * f_search, 1))
        out["queries_per_cpu_s"] = round(n / out["search_cpu_s"], 1)
    out.update(total_s=round(out["build_s"] + out["search_s"], 1), queries_per_s=round(n / out["search_s"], 1))
    return out


def main() -> int:
    gpu = faiss.get_num_gpus() > 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+",
                   default=[10**4, 10**5, 10**6, 10**7] if gpu else [10**4, 3 * 10**4, 10**5, 3 * 10**5, 10**6])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--spread", type=float, default=2.0)
    p.add_argument("--flat-max", type=int, default=10**6 if gpu else 30_000, help="largest N run with Flat")
    p.add_argument("--ivf-max", type=int, default=10**7 if gpu else 3 * 10**5, help="largest N run with IVF")
    p.add_argument("--nprobes", type=int, nargs="*", default=[4, 8, 16, 32, 64])
    p.add_argument("--actors", type=int, default=0, help="run the graph over this many Ray shard actors")
    p.add_argument("--threads", type=int, default=0, help="FAISS threads (0 = FAISS's default: every core)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--base", default=None,
                   help="a previous report: its largest measured runs are the bases for extrapolating --sizes")
    args = p.parse_args()

    base = dict(recall_sample=1000, actor_min_n=10**15)  # in-process unless --actors
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    if args.actors:
        import ray

        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        base.update(shards=args.actors, actor_min_n=0)
    report = dict(benchmark="neighbours", machine=machine(), dim=args.dim, k=args.k,
                  data=f"clustered_embeddings(n, {args.dim}, spread={args.spread}, seed=0), L2-normalised",
                  mode=f"{args.actors} Ray actors" if args.actors else "in-process", results=[])
    last = {}  # kind -> the largest measured run so far: the base for extrapolating past --flat-max/--ivf-max
    if args.base:
        report["base"] = args.base
        for row in json.load(open(args.base))["results"]:
            last.update({kind: row[kind] for kind in ("flat", "ivf") if kind in row and not row[kind].get("extrapolated")})
    for n in args.sizes:
        row = dict(n=n)
        runs = [(kind, limit) for kind, limit in ((IndexType.flat, args.flat_max), (IndexType.ivf, args.ivf_max))]
        x = labels = None
        for kind, limit in runs:
            if n > limit:
                if kind.value in last:
                    row[kind.value] = extrapolate(last[kind.value], n, args.dim)
                continue
            if x is None:
                t = time.perf_counter()
                x, labels = clustered_embeddings(n, args.dim, spread=args.spread, seed=0)
                row["generate_s"] = round(time.perf_counter() - t, 1)
            root = tempfile.mkdtemp(prefix=f"nb-bench-{kind.value}-")
            try:
                stats = graph(x, labels, IndexConfig(type=kind, **base), args.k, root)
                if kind == IndexType.ivf and args.nprobes and not args.actors:
                    rows = np.sort(np.random.default_rng(1).choice(n, min(1000, n), replace=False))
                    exact = exact_topk(ArraySource(x), rows, args.k)
                    stats["nprobe_sweep"] = nprobe_sweep(x, root, args.k, rows, exact, args.nprobes)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            row[kind.value] = last[kind.value] = stats
            print(json.dumps({"n": n, kind.value: stats}), file=sys.stderr, flush=True)
        report["results"].append(row)
    report["machine"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
