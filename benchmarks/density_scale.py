"""The density stage's memory against N: fit + score of the text VAE on a memory-mapped column.

    .venv/bin/python benchmarks/density_scale.py [--n 100000 1000000] [--dim 32] [--epochs 1]

For each N, a column of N random rows (D = 32, the tiny model's pooled text dimension; two
clusters, 80/20) is written to a .npy, then a fresh Python process runs
``pogdiff.method.density.fit_text_density`` on it as ``pogdiff density`` does (memory-mapped input,
-ELBO written to a memory-mapped nll.npy, the chunked median and spread; below
density.distributed_min_rows, so in that process) with the default DensityConfig but ``epochs``.

Peak memory of that process, two ways: ``VmHWM`` (peak resident set, which also counts the pages of
memory-mapped files while they are mapped; the density code maps the column anew per read, so they
do not pile up) and the peak of ``RssAnon`` (the process's own memory, polled every 5 ms). Both
must stay flat in N. Prints one JSON object with the machine and the ratios largest N / smallest N.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_scale import machine  # noqa: E402


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def child(column: str, epochs: int) -> None:
    """In the fresh process: fit + score, printing its peak memory as JSON."""
    import torch

    from pogdiff.config import DensityConfig
    from pogdiff.method.density import fit_text_density

    torch.set_num_threads(1)
    peak_anon, done = 0.0, threading.Event()

    def poll() -> None:
        nonlocal peak_anon
        while not done.is_set():
            peak_anon = max(peak_anon, _status_mb("RssAnon"))
            time.sleep(0.005)

    watcher = threading.Thread(target=poll, daemon=True)
    base_anon = _status_mb("RssAnon")  # after importing torch and pogdiff
    watcher.start()
    t0 = time.perf_counter()
    density = fit_text_density(np.load(column, mmap_mode="r"), DensityConfig(epochs=epochs),
                               nll_path=Path(column).with_name("nll.npy"))
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_mb": round(_status_mb("VmHWM"), 1),
                      "peak_rss_anon_mb": round(peak_anon, 1), "rss_anon_after_imports_mb": round(base_anon, 1),
                      "rss_file_end_mb": round(_status_mb("RssFile"), 1), "median_nll": density.median_nll}))


def write_column(path: Path, n: int, dim: int, chunk: int = 1 << 16) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 2, (2, dim)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        which = (rng.random(rows) < 0.2).astype(np.int64)
        out[start:start + rows] = centres[which] + rng.normal(0, 1, (rows, dim)).astype(np.float32)
    out.flush()
    del out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.epochs)
        return {}
    report = {"benchmark": "density_scale", "machine": machine(), "dim": args.dim, "epochs": args.epochs, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="pogdiff-density-") as tmp:
        for n in args.n:
            column = Path(tmp) / f"n{n}" / "pooled.npy"
            column.parent.mkdir()
            write_column(column, n, args.dim)
            out = subprocess.run([sys.executable, __file__, "--child", str(column), "--epochs", str(args.epochs)],
                                 capture_output=True, text=True, check=True)
            report["runs"][str(n)] = json.loads(out.stdout.strip().splitlines()[-1])
            report["runs"][str(n)]["column_mb"] = round(column.stat().st_size / 2**20, 1)
    small, large = (report["runs"][str(n)] for n in (min(args.n), max(args.n)))
    report["ratio_largest_over_smallest"] = {key: round(large[key] / small[key], 3)
                                             for key in ("peak_rss_anon_mb", "peak_rss_mb", "seconds")}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
