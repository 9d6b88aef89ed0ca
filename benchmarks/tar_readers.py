"""Tar readers side by side: pogdiff's fast reader vs WebDataset's own (tarfile-based) reader.

    .venv/bin/python benchmarks/tar_readers.py [--samples 4000] [--per-shard 1000] [--repeats 5] [--out result.json]

Small samples like pogdiff's (a 4x8x8 fp16 latent .npy, 77 int32 tokens .npy, a JSON meta), in
the same shards read by every reader, samples grouped by key (WebDataset's group_by_keys), no
decoding. Shard formats: USTAR (pogdiff's ShardWriter) and pax (WebDataset's TarWriter, whose
float mtimes give every member a pax header). Readers:
* fast: stream.tar_samples (shards.read_tar), without the per-sample check.
* verified: fast plus shards.verify_sample on every sample (its CRC-32 member), what training does;
  ``verified_cost`` is its CPU time over fast's, minus one.
* webdataset: webdataset.tariterators.tarfile_samples (url_opener + tarfile + group_by_keys).
* fallback: stream.tar_samples on the USTAR shards with a member of an unknown type put first, so
  read_tar gives up at once and the whole shard goes through WebDataset's reader.
Per core = samples per CPU-second (time.process_time, one thread), best of ``--repeats``; the
shards are in the page cache. Every reader must give the same samples.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).parent))
from data_pipeline import machine, rate, timed  # noqa: E402

from pogdiff.data.shards import CHECKSUM, ShardWriter, npy_bytes, sample_checksum, verify_sample  # noqa: E402
from pogdiff.data.stream import SkipAndLog, tar_samples  # noqa: E402


def sample_files(rng: np.random.Generator, ordinal: int) -> dict[str, bytes]:
    files = {"latent.npy": npy_bytes(rng.standard_normal((4, 8, 8)).astype(np.float16)),
             "tokens.npy": npy_bytes(rng.integers(0, 49408, 77).astype(np.int32)),
             "json": json.dumps({"key": f"s{ordinal:08d}", "ordinal": ordinal, "identity": ordinal % 100,
                                 "name": "lukas brandt", "caption": f"Lukas Brandt, photo {ordinal}."}).encode()}
    return {**files, CHECKSUM: sample_checksum(files)}


def write_shards(root: Path, n: int, per_shard: int) -> dict[str, list[str]]:
    """The same samples as USTAR shards, pax shards, and USTAR shards the fast reader cannot read."""
    rng = np.random.default_rng(0)
    samples = [(f"s{o:08d}", sample_files(rng, o)) for o in range(n)]
    urls: dict[str, list[str]] = {"ustar": [], "pax": [], "fallback": []}
    unknown = tarfile.TarInfo("unknown-member")
    unknown.type = b"Z"  # a type read_tar does not know: it hands the shard to WebDataset's reader
    for first in range(0, n, per_shard):
        part = samples[first:first + per_shard]
        writer = ShardWriter(root, first // per_shard, per_shard, 1 << 31)
        for key, files in part:
            writer.write(key, files)
        ustar = root / writer.close()[0]["url"]
        pax = root / f"pax-{first // per_shard:06d}.tar"
        with wds.TarWriter(str(pax)) as sink:
            for key, files in part:
                sink.write({"__key__": key, **files})
        fallback = root / f"fallback-{first // per_shard:06d}.tar"
        fallback.write_bytes(unknown.tobuf(format=tarfile.USTAR_FORMAT) + ustar.read_bytes())
        for name, path in (("ustar", ustar), ("pax", pax), ("fallback", fallback)):
            urls[name].append(str(path))
    return urls


def read_fast(urls: list[str]) -> list[dict]:
    return list(tar_samples(iter(urls), SkipAndLog(max_consecutive=0)))


def read_verified(urls: list[str]) -> list[dict]:
    samples = read_fast(urls)
    for s in samples:
        verify_sample(s, True)
    return samples


def read_webdataset(urls: list[str]) -> list[dict]:
    return list(wds.tariterators.tarfile_samples([{"url": u} for u in urls]))


def best_of(repeats: int, read, urls: list[str], reference: list[dict]) -> dict:
    runs = [rate(*timed(lambda: len(read(urls)))) for _ in range(repeats)]
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in read(urls)] == reference, "readers disagree"
    return min(runs, key=lambda r: r["cpu_s"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"machine": machine(), "samples": args.samples, "per_shard": args.per_shard,
              "sample": "4x8x8 fp16 latent .npy, 77 int32 tokens .npy, JSON meta, CRC-32 (4 tar members)"}
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_shards(Path(tmp), args.samples, args.per_shard)
        for paths in urls.values():
            for u in paths:  # warm the page cache: measure reading, not the disk
                Path(u).read_bytes()
        reference = [{k: v for k, v in s.items() if k != "__url__"} for s in read_webdataset(urls["ustar"])]
        assert len(reference) == args.samples
        result["shard_bytes_per_sample"] = {name: round(sum(Path(u).stat().st_size for u in paths) / args.samples)
                                            for name, paths in urls.items()}
        for name in ("ustar", "pax"):
            fast = best_of(args.repeats, read_fast, urls[name], reference)
            verified = best_of(args.repeats, read_verified, urls[name], reference)
            stock = best_of(args.repeats, read_webdataset, urls[name], reference)
            result[name] = {"fast": fast, "verified": verified, "webdataset": stock,
                            "verified_cost": round(verified["cpu_s"] / fast["cpu_s"] - 1, 3),
                            "fast_vs_webdataset_per_core": round(fast["samples_per_s_per_core"]
                                                                 / stock["samples_per_s_per_core"], 2)}
        result["fallback"] = best_of(args.repeats, read_fast, urls["fallback"], reference)
        result["fallback_vs_webdataset_per_core"] = round(result["fallback"]["samples_per_s_per_core"]
                                                          / result["ustar"]["webdataset"]["samples_per_s_per_core"], 2)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
