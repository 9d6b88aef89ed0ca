"""prepare on its Ray Data pipeline: the orchestration's memory and cost at 10^6-10^7 rows, and the
speed-up from a second encoder worker.

    .venv/bin/python benchmarks/prepare_scale.py null --n 1000000 10000000 [--source manifest] [--out r.json]
    .venv/bin/python benchmarks/prepare_scale.py workers --n 4000 24000 [--out r.json]

``null``: `pogdiff prepare`'s driver (plan, pipeline, tally, index merge) with zero-cost stages: no
image is rendered, no encoder runs and no tar is written; each task writes only its sidecar, with
one-wide columns. What is left is what the orchestration costs: the peak RSS of the driver and of
every worker (polled, as data_scale.py does), and seconds per record. Synthetic identities of 1000
images, 10,000 records per shard task. ``--source manifest``: the records come from a JSON-lines
manifest of N rows written beforehand (identities of 1000 images; the images are never read), so
the driver also plans them: the row checks, the row store, the identities, the task files.
``workers``: the real tiny encoders on synthetic 32 px records, `prepare.workers=1` then `=2`, side
by side in one run on this machine (the same records, a fresh output each), each at two sizes:
records/s of each run, the marginal records/s between the sizes (fixed costs cancel), the ratios.
Then the machine's own ceiling for that work: ``prepare.backend=serial`` (both stages in the
process, no Ray), one process against two at once, one torch thread each as an encoder actor has.
Prints one JSON object with the machine it ran on.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from data_scale import POGDIFF, ROOT, emit, machine, run_stage

SETTINGS = ["data.profile=custom", "data.minority_ids=0", "data.heldout_images=0", "data.image_size=32",
            "model.name=tiny", "model.tiny_vae_steps=0", "prepare.backend=ray", "prepare.keep_images=false"]


def null_decode(task):
    """The task's records by key and identity alone."""
    from pogdiff.data.prepare import DecodedTask, Item

    from pogdiff.data.prepare import task_items

    if task.items_file is not None:  # a manifest's task
        return DecodedTask(task, task_items(task.items_file), [], [], [], [])
    counts, _, _, bases, start, stop, first_identity, ordinal = task.synthetic
    items, offset = [], 0
    for i, (count, base) in enumerate(zip(counts, bases)):
        for j in range(max(start - offset, 0), min(stop - offset, count)):
            key = f"id{first_identity + i:06d}_img{base + j:04d}"
            items.append(Item(ordinal, key, "", "", first_identity + i, "", key))
            ordinal += 1
        offset += count
    return DecodedTask(task, items, [], [], [], [])


def null_write(decoded) -> dict:
    """Only the task's sidecar: its rows, and columns one value wide."""
    import numpy as np

    from pogdiff.data.shards import write_sidecar

    n = len(decoded.items)
    rows = [{"key": it.key, "ordinal": it.ordinal, "identity": it.identity, "name": "", "caption": "", "shard": ""}
            for it in decoded.items]
    columns = {"tokens": np.zeros((n, 1), np.int32), "image_emb": np.ones((n, 1), np.float32),
               "pooled": np.ones((n, 1), np.float32)}
    return write_sidecar(Path(decoded.task.folder), decoded.task.index, [], rows, columns, [])


def write_manifest(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"image": f"images/id{i // 1000:07d}/{i % 1000:04d}.png", "identity": f"id{i // 1000:07d}",
                                "caption": f"a photo of person {i // 1000}, number {i % 1000}"}) + "\n")


def child_null(n: int, work: Path, source: str) -> None:
    """The driver process of one null run (what `pogdiff prepare` runs, with null stages)."""
    from pogdiff import console
    from pogdiff.config import load_config
    from pogdiff.data.prepare import Stages, prepare

    cfg = load_config(str(ROOT / "configs" / "demo.yaml"), [
        f"output_dir={work}", "run_name=nullstages", *SETTINGS, f"data.majority_ids={n // 1000}", "data.majority_images=1000",
        "prepare.samples_per_shard=10000", f"data.source={source}"])
    console.setup(work / "nullstages" / "pogdiff.log")
    dataset = prepare(cfg, progress=False, stages=Stages(decode=null_decode, encode_and_write=null_write))
    print(json.dumps({"samples": dataset["num_samples"], "output": str(work)}))


def null_runs(ns: list[int], tmp: Path, source: str) -> dict:
    runs = {}
    for n in ns:
        work = tmp / f"null{n}"
        work.mkdir()
        if source == "manifest":
            write_manifest(work / "manifest.jsonl", n)
        stage = run_stage([sys.executable, __file__, "_child_null", str(n), str(work),
                           str(work / "manifest.jsonl") if source == "manifest" else source], work)
        assert stage["output"]["samples"] == n, stage
        stage["us_per_record"] = round(stage["seconds"] / n * 1e6, 2)
        runs[str(n)] = stage
        print(json.dumps({f"null {n}": stage}), file=sys.stderr)
    sizes = sorted(runs, key=int)
    for small, large in zip(sizes, sizes[1:]):
        for key in ("peak_rss_mb_driver", "peak_rss_mb_max_process"):
            runs[f"{key}_growth_{small}_to_{large}"] = round(runs[large][key] / runs[small][key] - 1, 4)
    return runs


def worker_runs(sizes: list[int], tmp: Path) -> dict:
    """Each worker count at two sizes: the wall rate of each run, and the marginal rate between the
    two sizes (start-up, the model's load and the index merge cancel out)."""
    cfg = str(ROOT / "configs" / "demo.yaml")
    runs: dict = {}
    for workers in (1, 2):
        for n in sizes:
            work = tmp / f"workers{workers}-{n}"
            work.mkdir()
            stage = run_stage([POGDIFF, "prepare", cfg, f"output_dir={work}", *SETTINGS, f"data.majority_ids={n // 100}",
                               "data.majority_images=100", "prepare.samples_per_shard=500", f"prepare.workers={workers}"],
                              work)
            stage["records_per_s"] = round(n / stage["seconds"], 1)
            runs[f"{workers} workers, {n}"] = stage
            print(json.dumps({f"{workers} workers, {n}": stage}), file=sys.stderr)
        small, large = runs[f"{workers} workers, {sizes[0]}"], runs[f"{workers} workers, {sizes[-1]}"]
        runs[f"{workers} workers, marginal records_per_s"] = round(
            (sizes[-1] - sizes[0]) / (large["seconds"] - small["seconds"]), 1)
    for what in (f"{sizes[-1]}", "marginal records_per_s"):
        one, two = runs[f"1 workers, {what}"], runs[f"2 workers, {what}"]
        rate = (lambda r: r["records_per_s"]) if isinstance(one, dict) else (lambda r: r)
        runs[f"ratio_2_over_1 ({what})"] = round(rate(two) / rate(one), 3)
    return runs


def serial_runs(sizes: list[int], tmp: Path) -> dict:
    """One serial `pogdiff prepare` against two running at once (separate outputs), at two sizes:
    how much a second core adds to this work on this machine without any orchestration."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    cfg = str(ROOT / "configs" / "demo.yaml")
    runs: dict = {}
    os.environ["OMP_NUM_THREADS"] = "1"  # what Ray gives an actor with num_cpus=1
    try:
        for procs in (1, 2):
            for n in sizes:
                def one(i: int) -> dict:
                    work = tmp / f"serial{procs}-{n}-{i}"
                    work.mkdir()
                    return run_stage([POGDIFF, "prepare", cfg, f"output_dir={work}", *SETTINGS, f"data.majority_ids={n // 100}",
                                      "data.majority_images=100", "prepare.samples_per_shard=500", "prepare.backend=serial"],
                                     work)
                t0 = time.perf_counter()
                with ThreadPoolExecutor(procs) as pool:
                    stages = list(pool.map(one, range(procs)))
                seconds = time.perf_counter() - t0
                runs[f"{procs} processes, {n}"] = {"seconds": round(seconds, 1), "records_per_s": round(procs * n / seconds, 1),
                                                   "peak_rss_mb": [s["peak_rss_mb_driver"] for s in stages]}
                print(json.dumps({f"{procs} serial processes, {n}": runs[f"{procs} processes, {n}"]}), file=sys.stderr)
            small, large = runs[f"{procs} processes, {sizes[0]}"], runs[f"{procs} processes, {sizes[-1]}"]
            extra = large["seconds"] - small["seconds"]  # sizes too close to measure: none
            runs[f"{procs} processes, marginal records_per_s"] = \
                round(procs * (sizes[-1] - sizes[0]) / extra, 1) if extra > 0 else None
    finally:
        del os.environ["OMP_NUM_THREADS"]
    one, two = runs["1 processes, marginal records_per_s"], runs["2 processes, marginal records_per_s"]
    runs["ratio_2_over_1 (marginal records_per_s)"] = round(two / one, 3) if one and two else None
    return runs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["null", "workers"])
    parser.add_argument("--n", type=int, nargs="+", default=None)
    parser.add_argument("--source", choices=["synthetic", "manifest"], default="synthetic", help="null: the records' source")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    report = {"benchmark": f"prepare_scale {args.mode}", "machine": machine(), "source": args.source}
    with tempfile.TemporaryDirectory(prefix="pogdiff-prepare-scale-") as tmp:
        if args.mode == "null":
            report["runs"] = null_runs(args.n or [1_000_000, 10_000_000], Path(tmp), args.source)
        else:
            report["runs"] = worker_runs(sorted(args.n or [4000, 24000]), Path(tmp))
            report["serial"] = serial_runs(sorted(args.n or [4000, 24000]), Path(tmp))
    return emit(report, args.out)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "_child_null":
        child_null(int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
    else:
        main()
