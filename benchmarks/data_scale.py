"""The data path at scale: synthetic N records at 32 px through prepare -> index -> density -> train-dist
-> sample -> eval.

    .venv/bin/python benchmarks/data_scale.py --n 10000 100000 [--steps 100] [--workers 2] [--out r.json]
    ... --work DIR --stages index density    # rerun stages on the datasets prepared in DIR before

Each stage runs as the user runs it (`pogdiff VERB configs/demo.yaml overrides`, a subprocess),
while this script polls the stage's process tree with psutil: wall time, records/s and the peak
RSS of every process (the largest one and the sum; ``per_process``: [process, peak RSS, its
anonymous memory at that peak], so that pages of files and of Ray's shared object store can be
told from the heap). Training ranks are Ray workers, outside that
tree; each writes its own peak RSS (``ranks/rank<r>.json``, ``max_rss_mb``) and rank 0 logs the
share of step time spent waiting for data (``data_wait`` in metrics.jsonl, steady state = every
logged window but the first). Prints one JSON object with the machine it ran on.

Settings: the tiny model (VAE not pretrained: ``model.tiny_vae_steps=0``, which changes no cost of
the pipeline), 60% of the records in identities of 30 images and 40% in identities of 2
(``--majority-share``; the generator names at most 184,788 identities, so 10^6 records need 0.8),
``prepare.workers`` processes, ``density.epochs=2`` (the VAE's cost is linear in N and epochs).
sample and eval on a fixed subset: every majority identity and ``--few-ids`` minority ones
(``sample.few_ids``), ``--images-per-id`` images each at 1 DDIM step; eval's recogniser trains for
50 steps. eval still embeds every training image (its real-image statistics), so its cost grows with N.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
POGDIFF = str(Path(sys.executable).parent / "pogdiff")
STAGES = ("prepare", "index", "density", "train-dist", "sample", "eval")


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def emit(report: dict, out: str | None) -> dict:
    """Print the report (one JSON object), and write it to ``out`` when given."""
    text = json.dumps(report, indent=1)
    if out:
        Path(out).write_text(text)
    print(text)
    return report


def label(cmdline: str) -> str:
    """A short name for a process of a stage's tree: the pogdiff verb, a Ray component, a Ray worker's title."""
    words = cmdline.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0]
    names = [Path(w).name for w in words[:4]]
    if "pogdiff" in names:
        return "driver: pogdiff " + words[names.index("pogdiff") + 1]
    for part in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "agent"):
        if any(part in n for n in names):
            return part
    return " ".join(names)[:60]


def rss_anon_mb(pid: int) -> float:
    """A process's anonymous resident memory (its heap: RSS without file pages and shared memory,
    such as Ray's object store mapped into every process that reads an object), MB; 0 if gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("RssAnon:")), 0.0)


def run_stage(argv: list[str], cwd: Path) -> dict:
    """Run one CLI verb; poll its process tree for per-process peak RSS."""
    peaks: dict[int, float] = {}
    private: dict[int, float] = {}  # of each process's peak RSS, its anonymous memory (RssAnon)
    labels: dict[int, str] = {}  # what each process is: its command line, or a Ray worker's title (ray::<task or actor>)
    peak_sum = 0.0
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    done = threading.Event()

    def poll() -> None:
        nonlocal peak_sum
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total = 0.0
                for p in procs:
                    try:
                        rss = p.memory_info().rss / 2**20
                        title = " ".join(p.cmdline()) or p.name()
                    except psutil.Error:
                        continue
                    if p.pid not in labels or not title.startswith("ray::IDLE"):
                        labels[p.pid] = label(title)
                    if rss > peaks.get(p.pid, 0.0):
                        peaks[p.pid], private[p.pid] = rss, rss_anon_mb(p.pid)
                    total += rss
                peak_sum = max(peak_sum, total)
            except psutil.Error:
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed ({proc.returncode}):\n{err[-4000:]}")
    last = [line for line in out.splitlines() if line.startswith("{")]
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb_driver": round(peaks.get(proc.pid, 0.0), 1),
            "peak_rss_mb_max_process": round(max(peaks.values()), 1),
            "peak_rss_mb_sum": round(peak_sum, 1), "processes": len(peaks),
            # [process, peak RSS, its anonymous memory at that peak], MB
            "per_process": sorted(([labels.get(pid, "?"), round(mb, 1), round(private[pid], 1)] for pid, mb in peaks.items()),
                                  key=lambda x: -x[1]),
            "output": json.loads(last[-1]) if last else None}


def measure(n: int, args, work: Path) -> dict:
    majority = max(1, round(args.majority_share * n / 30))
    minority = max(1, (n - 30 * majority) // 2)
    overrides = [f"output_dir={work}", "run_name=scale", "data.profile=custom", f"data.majority_ids={majority}",
                 f"data.minority_ids={minority}", "data.majority_images=30", "data.minority_images=2",
                 "data.heldout_images=0", "data.image_size=32", "model.tiny_vae_steps=0", f"prepare.workers={args.workers}",
                 "density.epochs=2", "method.name=pogdiff", f"train.steps={args.steps}", "train.log_every=10",
                 "train.batch_size=8", f"dist.num_workers={args.workers}", "eval.recognizer_ids=8", *args.set]
    cfg = str(ROOT / "configs" / "demo.yaml")
    records = 30 * majority + 2 * minority
    result = {"records": records, "identities": majority + minority}
    if "prepare" in args.stages:
        prep = run_stage([POGDIFF, "prepare", cfg, *overrides], work)
        prep["records_per_s"] = round(records / prep["seconds"], 1)
        result["prepare"] = prep
    for verb in ("index", "density"):
        if verb in args.stages:
            result[verb] = run_stage([POGDIFF, verb, cfg, *overrides], work)
    if "train-dist" in args.stages:
        train = run_stage([POGDIFF, "train-dist", cfg, *overrides], work)
        method = work / "scale" / "pogdiff-full-seed0"
        ranks = [json.loads(p.read_text()) for p in sorted((method / "ranks").glob("rank*.json"))]
        logged = [json.loads(line) for line in (method / "metrics.jsonl").read_text().splitlines()]
        steady = [e["data_wait"] for e in logged[1:]] or [logged[0]["data_wait"]]
        train.update(rank_peak_rss_mb=[round(r["max_rss_mb"], 1) for r in ranks],
                     rank_train_seconds=[round(r["seconds"], 1) for r in ranks],
                     data_wait_fraction_steady=round(sum(steady) / len(steady), 4),
                     data_wait_fraction_first_window=round(logged[0]["data_wait"], 4),
                     samples_per_s=round(args.steps * 8 * args.workers / max(r["seconds"] for r in ranks), 1))
        result["train_dist"] = train
    subset = [f"sample.few_ids={args.few_ids}", f"sample.images_per_id={args.images_per_id}", "sample.steps=1",
              "eval.recognizer_steps=50"]
    for verb in ("sample", "eval"):
        if verb in args.stages:
            result[verb] = run_stage([POGDIFF, verb, cfg, *overrides, *subset], work)
    [dataset] = (work / "datasets").glob("synthetic-custom-*")
    sizes = {p.name: p.stat().st_size for p in dataset.glob("*.npy")}
    result["index_tables_mb"] = {k: round(v / 2**20, 2) for k, v in sizes.items()}
    result["artifacts_mb"] = {p.relative_to(dataset / "artifacts").as_posix(): round(p.stat().st_size / 2**20, 2)
                              for p in (dataset / "artifacts").rglob("*.npy")}
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--majority-share", type=float, default=0.6,
                        help="share of the records in identities of 30 (the rest in identities of 2)")
    parser.add_argument("--few-ids", type=int, default=100, help="minority identities sampled and scored")
    parser.add_argument("--images-per-id", type=int, default=2)
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one, removed after)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="the stages to run (the others' outputs must be in --work already)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more config overrides, e.g. model.name=<the tiny model of the clone that prepared --work>")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    report = {"benchmark": "data_scale", "machine": machine(), "steps": args.steps, "workers": args.workers,
              "majority_share": args.majority_share,
              "few_ids": args.few_ids, "images_per_id": args.images_per_id, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="pogdiff-scale-") as tmp:
        for n in args.n:
            work = Path(args.work or tmp) / f"n{n}"
            work.mkdir(parents=True, exist_ok=True)
            report["runs"][str(n)] = measure(n, args, work)
            print(json.dumps({str(n): report["runs"][str(n)]}), file=sys.stderr)
    return emit(report, args.out)


if __name__ == "__main__":
    main()
