"""Memory of ``sample`` and ``eval`` against the dataset's size: peak RSS at two sizes, each stage in
a fresh process.

    .venv/bin/python benchmarks/eval_scale.py --n 10000 100000 [--stages recognizer features] [--out r.json]

For each N it writes a prepared dataset directly (pogdiff.data.shards.write_task / write_index: N
rows of 32 px PNGs, 60% in identities of 30 images, 40% in identities of 2, a held-out split of 3
images per majority identity; dummy latents and columns, no encoder runs) and a tiny random-init
pipeline as the trained run's export, then runs in a fresh subprocess each:

    recognizer  eval's own-data recogniser, trained from the shard stream (eval.recognizer_steps)
    features    the training and held-out images' embeddings, streamed into the eval cache
    sample      ``sample_run``: sample.images_per_id images of every identity into sample shards
    eval        ``evaluate_run`` on what the stages above cached: the samples' embeddings and the metrics

and reads its peak RSS (VmHWM) and its RSS after the imports (VmRSS before the stage starts). Flat
in N means the ratio of the peaks at the two sizes stays near 1 while N grows tenfold. Prints one
JSON object with the machine it ran on.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("recognizer", "features", "sample", "eval")
SETTINGS = ["eval.recognizer_steps=50", "sample.steps=1", "sample.images_per_id=2", "sample.batch_size=16",
            "data.minority_images=2", "train.device=cpu"]


def pattern_png(identity: int, image: int, size: int = 32) -> bytes:
    """An identity's fixed 4x4 colour pattern at ``size`` px with per-image noise, as PNG bytes."""
    from PIL import Image

    base = np.random.default_rng([identity, 7]).integers(0, 256, (4, 4, 3)).repeat(size // 4, 0).repeat(size // 4, 1)
    noise = np.random.default_rng([identity, image, 8]).normal(0, 16, base.shape)
    buf = io.BytesIO()
    Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_prepared(root: Path, counts: list[int], first_image: int = 0, size: int = 32, per_shard: int = 1000) -> Path:
    """A prepared dataset of ``counts[i]`` images of identity i (images first_image, ...), identity-major."""
    from pogdiff.data.shards import Sample, write_index, write_task

    (root / "shards").mkdir(parents=True)
    bounds = np.cumsum([0, *counts])
    n = int(bounds[-1])
    tasks = -(-n // per_shard)

    def samples(task: int):
        for ordinal in range(task * per_shard, min(n, (task + 1) * per_shard)):
            identity = int(np.searchsorted(bounds, ordinal, side="right")) - 1
            image = first_image + ordinal - int(bounds[identity])
            name = f"person{identity}"
            yield Sample(key=f"r{ordinal:08d}", ordinal=ordinal, identity=identity, name=name,
                         caption=f"an image of {name}", latent=np.zeros((4, 1, 1)), tokens=np.zeros(1, np.int32),
                         pooled=np.zeros(1), image_emb=np.zeros(1), image=pattern_png(identity, image, size))

    for task in range(tasks):
        write_task(root / "shards", task, samples(task), per_shard, 1 << 30, skipped=[])
    write_index(root, tasks, n, {"image_size": size, "model": "tiny", "keep_images": True})
    return root


def make_dataset(root: Path, n: int) -> int:
    """N rows (about) in identities of 30 and 2, 3 held out per majority identity; returns the identities."""
    majority = max(1, round(0.6 * n / 30))
    minority = max(1, (n - 30 * majority) // 2)
    write_prepared(root, [30] * majority + [2] * minority)
    write_prepared(root / "heldout", [3] * majority, first_image=30)
    return majority + minority


def config(dataset: Path, work: Path):
    from pogdiff.runs import load_run_config

    return load_run_config(None, [f"output_dir={work}", "run_name=scale", f"data.source={dataset}", *SETTINGS])


def export_tiny_pipeline(cfg) -> None:
    """A random-init tiny SD as the run's trained export (what ``sample`` loads)."""
    from pogdiff.models.components import build_tiny, save_components
    from pogdiff.models.export import export_pipeline
    from pogdiff.runs import RunFiles

    components = build_tiny(0)
    model = Path(cfg.output_dir) / "model"
    save_components(components, model)
    export_pipeline(model, components.unet.state_dict(), RunFiles(cfg).method)


def proc_status_mb(field: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return round(int(line.split()[1]) / 1024, 1)


def run_stage(stage: str, dataset: Path, work: Path) -> dict:
    """In this (fresh) process: one stage, with its peak RSS."""
    import torch

    from pogdiff.data.dataset import resolve_dataset
    from pogdiff.eval import evaluate_run, real_embeddings
    from pogdiff.eval.recognizer import eval_encoder
    from pogdiff.eval.sampling import sample_run

    torch.set_num_threads(1)
    cfg = config(dataset, work)
    before = proc_status_mb("VmRSS")
    t0 = time.perf_counter()
    ds = resolve_dataset(cfg, progress=False)
    if stage == "recognizer":
        info = eval_encoder(cfg, ds, progress=False)[1]
        out = {"heldback_accuracy": info["heldback_accuracy"]}
    elif stage == "features":
        real = real_embeddings(cfg, ds, eval_encoder(cfg, ds, progress=False))
        out = {"embedded": sum(b - a for part in real.values() for a, b in part.ranges.values())}
    elif stage == "sample":
        out = {"images": sample_run(cfg, progress=False).num_images}
    else:
        out = {"summary": evaluate_run(cfg, progress=False)["summary"]}
    return {"seconds": round(time.perf_counter() - t0, 1), "rss_after_imports_mb": before,
            "peak_rss_mb": proc_status_mb("VmHWM"), **out}


def measure(n: int, work: Path, stages: list[str]) -> dict:
    t0 = time.perf_counter()
    dataset = work / "dataset"
    identities = make_dataset(dataset, n)
    export_tiny_pipeline(config(dataset, work))
    result = {"rows": len(np.load(dataset / "identities.npy", mmap_mode="r")), "identities": identities,
              "write_seconds": round(time.perf_counter() - t0, 1)}
    for stage in stages:
        proc = subprocess.run([sys.executable, __file__, "--stage", stage, "--dataset", str(dataset), "--work", str(work)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"stage {stage} at n={n} failed:\n{proc.stderr[-4000:]}")
        result[stage] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="a subset, in order (eval needs sample's samples)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # a child process: one stage
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        print(json.dumps(run_stage(args.stage, Path(args.dataset), Path(args.work))))
        return {}
    sys.path.insert(0, str(Path(__file__).parent))
    from data_scale import emit, machine

    report = {"benchmark": "eval_scale", "machine": machine(), "settings": SETTINGS, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="pogdiff-eval-scale-") as tmp:
        for n in args.n:
            report["runs"][str(n)] = measure(n, Path(tmp) / f"n{n}", args.stages)
            print(json.dumps({str(n): report["runs"][str(n)]}), file=sys.stderr)
    if len(args.n) >= 2:
        small, large = (report["runs"][str(n)] for n in (min(args.n), max(args.n)))
        report["peak_rss_ratio_large_over_small"] = {s: round(large[s]["peak_rss_mb"] / small[s]["peak_rss_mb"], 3)
                                                     for s in args.stages}
    return emit(report, args.out)


if __name__ == "__main__":
    main()
