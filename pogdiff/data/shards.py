"""The on-disk format of a prepared dataset: WebDataset tar shards plus a dataset index.

    <dataset>/
      dataset.json          what was prepared: shard list, shapes, model, counts, skipped records (written last)
      index.jsonl           row -> {key, shard, ordinal, identity, name, caption}
      tokens.npy            (N, L) int32   caption token ids: y, and y' = tokens[neighbour row] (SDXL: both
                                           tokenizers' ids, 2 x 77)
      identities.npy        (N,)   int64   -1 where unlabelled
      image_emb.npy         (N, d) fp32    for the neighbour index (Eq. 8)
      pooled.npy            (N, D) fp32    pooled text embeddings, for the density VAE (Eq. 10-11)
      row_of_ordinal.npy    (R,)   int64   planned record -> row, -1 where the record was skipped
      shards/shard-TTTTTT-PP.tar           task T, part P (a task rolls over to a new part at max bytes)
      shards/shard-TTTTTT.json / .npz      a finished task's samples and columns (its commit marker)

One sample in a shard is ``<key>.latent.npy`` (4, h, w) fp16 VAE latent, already multiplied by
the VAE scaling factor; ``<key>.tokens.npy`` (L,) int32; ``<key>.pooled.npy`` (D,) fp32;
``<key>.imgemb.npy`` (d,) fp32; ``<key>.json`` {key, ordinal, identity, name, caption, time_ids}
(time_ids: SDXL's original size, crop top-left and target size of the crop); with
data.random_flip ``<key>.latent_flip.npy``, the mirror image's latent, and time_ids_flip in the json.
Rows are the finished samples in (task, position) order; ``ordinal`` is the record's position in
the prepare plan, known when the shard is written, and ``row_of_ordinal`` maps it to its row.
Columns the whole-dataset stages need (tokens, embeddings) sit in the index as memory-mappable
arrays, so neither the neighbour/density stages nor a training step open a tar file for them.
"""
from __future__ import annotations

import functools
import io
import json
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Optional

import numpy as np

from pogdiff.npyrows import NpyRows, NpyWriter, read_rows
from pogdiff.runs import atomic_path, atomic_write, file_sha256

FORMAT = "pogdiff-shards/2"  # 2: every sample carries CHECKSUM
LATENT, TOKENS, POOLED, IMAGE_EMB, META = "latent.npy", "tokens.npy", "pooled.npy", "imgemb.npy", "json"
LATENT_FLIP = "latent_flip.npy"  # the mirror image's latent (data.random_flip)
CHECKSUM = "crc32"  # per sample: CRC-32 over its other members' bytes, in name order
IMAGE, CAPTION = "png", "txt"  # with prepare.keep_images: the image at data.image_size, the caption text
COLUMNS = {"tokens": np.int32, "image_emb": np.float32, "pooled": np.float32}  # per-task .npz -> index .npy
TAR_BLOCK = 512


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple, bool, int]:
    buf = io.BytesIO(header)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    version = np.lib.format.read_magic(buf)
    if version not in read_header:
        raise ValueError(f".npy format version {version} is not supported")
    shape, fortran, dtype = read_header[version](buf)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed in shards")
    return dtype, shape, fortran, buf.tell()


def npy_load(data: bytes) -> np.ndarray:
    """Decode .npy bytes; the header is parsed once per distinct header (all latents share one),
    the data is a zero-copy view. ~10x faster than np.load for small arrays."""
    head = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    dtype, shape, fortran, offset = _npy_header(bytes(data[:head]))
    array = np.frombuffer(data, dtype=dtype, offset=offset, count=int(np.prod(shape)))
    return array.reshape(shape, order="F" if fortran else "C")


class UnsupportedTar(tarfile.ReadError):
    """A valid tar holding a member that read_tar cannot read (e.g. a sparse file): read it with tarfile."""


ZERO_BLOCK = bytes(TAR_BLOCK)
REGULAR = (b"0", b"\0", b"7")  # regular file, pre-POSIX regular file, contiguous file
EXTENDED = (b"x", b"X", b"L")  # pax extended header (X: Solaris's), GNU long name: for the next member
# skipped like tarfile does: links, devices, directories, fifos, pax global header, GNU long link name,
# GNU dump directory, multi-volume continuation, old long names, volume label
SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6", b"g", b"K", b"D", b"M", b"N", b"V")


def extended_header(kind: bytes, data: bytes, url: str) -> dict:
    """What an extended header sets for the next member: {"path", "size"} (those it carries).
    GNU long name: the NUL-terminated name. pax: ``"<length> <key>=<value>\\n"`` records."""
    if kind == b"L":
        return {"path": data.partition(b"\0")[0].decode("utf-8", "surrogateescape")}
    records, pos, data = {}, 0, data.rstrip(b"\0")
    try:
        while pos < len(data):
            space = data.index(b" ", pos)
            end = pos + int(data[pos:space])
            if end <= space or data[end - 1] != ord("\n"):
                raise ValueError
            key, _, value = data[space + 1:end - 1].partition(b"=")
            records[key] = value
            pos = end
        overrides = {"size": int(records[b"size"])} if b"size" in records else {}
        if overrides.get("size", 0) < 0:
            raise ValueError
    except (ValueError, IndexError):
        raise tarfile.ReadError(f"{url}: corrupt pax header") from None
    if any(key.startswith(b"GNU.sparse.") for key in records):
        raise UnsupportedTar(f"{url}: a pax sparse file")
    if b"path" in records:
        overrides["path"] = records[b"path"].decode("utf-8", "surrogateescape")
    return overrides


def read_tar(stream: BinaryIO, url: str = "?") -> Iterator[dict]:
    """The regular files in a tar stream as WebDataset file dicts ``{"fname", "data"}``.

    Replaces tarfile on the training hot path: its per-member header parsing (~35 us) alone caps
    a 5-member sample at ~5.7k samples/s per core, before any decoding. Reads USTAR, GNU (long
    names, base-256 sizes) and POSIX pax archives (a member's own path and size records; global
    headers are skipped, as tarfile does), so the writer here, WebDataset's TarWriter (pax) and
    GNU tar. Other members (directories, links, ...) are skipped. Headers are checksummed; a
    truncated or corrupt stream raises tarfile.ReadError (the reader's handler then skips the rest
    of the shard). A member it cannot read (a sparse file, an unknown type) raises UnsupportedTar,
    after the members before it: the caller reads the rest with tarfile (stream.tar_samples does).
    """
    overrides: dict = {}  # set by extended headers for the next member
    while True:
        header = stream.read(TAR_BLOCK)
        if header == ZERO_BLOCK:  # end of archive
            return
        if len(header) < TAR_BLOCK:
            raise tarfile.ReadError(f"{url}: truncated tar (no end-of-archive marker)")
        try:
            checksum = int(header[148:156].strip(b"\0 ") or b"0", 8)
            if header[124] == 0x80:  # GNU base-256 size
                size = int.from_bytes(header[125:136], "big")
            else:
                size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise tarfile.ReadError(f"{url}: corrupt tar header") from None
        if checksum != sum(header[:148]) + 256 + sum(header[156:]) and \
                checksum != sum(struct.unpack("148b8x356b", header)) + 256:  # old tars sum signed bytes
            raise tarfile.ReadError(f"{url}: tar header checksum mismatch (corrupt shard)")
        kind = header[156:157]
        if kind not in REGULAR and kind not in EXTENDED and kind not in SKIPPED:  # e.g. a sparse file
            raise UnsupportedTar(f"{url}: a member of tar type {kind!r}, which the fast reader cannot read")
        name = header[:100].partition(b"\0")[0].decode("utf-8", "surrogateescape")
        if header[257:263] == b"ustar\0" and (prefix := header[345:500].rstrip(b"\0")):
            name = f"{prefix.decode('utf-8', 'surrogateescape')}/{name}"
        if overrides and kind not in EXTENDED:
            name, size = overrides.get("path", name), overrides.get("size", size)
            overrides = {}
        data = stream.read(size)
        padding = -size % TAR_BLOCK
        if len(data) < size or len(stream.read(padding)) < padding:
            raise tarfile.ReadError(f"{url}: truncated member {name}")
        if kind in REGULAR:
            if kind != b"\0" or not name.endswith("/"):  # else a pre-POSIX directory
                yield {"fname": name, "data": data}
        elif kind in EXTENDED:
            overrides.update(extended_header(kind, data, url))


@dataclass
class Sample:
    key: str
    ordinal: int  # position in the prepare plan
    identity: int  # -1: unlabelled
    name: str
    caption: str
    latent: np.ndarray  # (4, h, w), scaled by the VAE scaling factor
    tokens: np.ndarray  # (L,)
    pooled: np.ndarray  # (D,)
    image_emb: np.ndarray  # (d,)
    image: Optional[bytes] = None  # PNG (prepare.keep_images)
    latent_flip: Optional[np.ndarray] = None  # the mirror image's latent (data.random_flip)
    time_ids: Optional[list[int]] = None  # SDXL's (original h, w, crop top, left, target h, w) of the crop
    time_ids_flip: Optional[list[int]] = None  # ... of its mirror image

    @property
    def meta(self) -> dict:
        meta = {"key": self.key, "ordinal": self.ordinal, "identity": self.identity, "name": self.name,
                "caption": self.caption}
        for name in ("time_ids", "time_ids_flip"):
            if getattr(self, name) is not None:
                meta[name] = [int(v) for v in getattr(self, name)]
        return meta


def encode_sample(s: Sample) -> dict[str, bytes]:
    files = {LATENT: npy_bytes(s.latent.astype(np.float16)), TOKENS: npy_bytes(s.tokens.astype(np.int32)),
             POOLED: npy_bytes(s.pooled.astype(np.float32)), IMAGE_EMB: npy_bytes(s.image_emb.astype(np.float32)),
             META: json.dumps(s.meta).encode()}
    if s.image is not None:
        files[IMAGE], files[CAPTION] = s.image, s.caption.encode()
    if s.latent_flip is not None:
        files[LATENT_FLIP] = npy_bytes(s.latent_flip.astype(np.float16))
    files[CHECKSUM] = sample_checksum(files)
    return files


def sample_checksum(files: dict[str, bytes]) -> bytes:
    """A sample's members but the checksum and WebDataset's ``__*__`` fields. CRC-32 (zlib, ~1 GB/s):
    the tar header checksums cover names and sizes, this the payloads a flipped bit would change."""
    crc = 0
    for name in sorted(files):
        if name[0] != "_" and name != CHECKSUM:
            crc = zlib.crc32(files[name], crc)
    return b"%08x" % crc


def verify_sample(sample: dict, required: bool) -> None:
    """Raises ValueError naming the sample and its shard when its payload is not what was written."""
    stored = sample.get(CHECKSUM)
    if stored is None:
        if required:
            raise ValueError(f"sample '{sample.get('__key__')}' in {sample.get('__url__')} has no {CHECKSUM} member: "
                             "damaged shard (run `pogdiff prepare` again to verify and remake it)")
        return
    if stored != sample_checksum(sample):
        raise ValueError(f"sample '{sample.get('__key__')}' in {sample.get('__url__')} fails its checksum: damaged "
                         "payload, skipped (run `pogdiff prepare` again to verify and remake damaged shards)")


def tar_bytes(files: dict[str, bytes]) -> int:
    """Bytes these files take in a tar: a 512-byte header each, data padded to 512."""
    return sum(TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for v in files.values())


def damaged_parts(folder: Path, record: dict) -> list[str]:
    """The parts of a finished task whose size or sha256 is not what its sidecar recorded."""
    bad = []
    for part in record["parts"]:
        path = folder / part["url"]
        if not path.is_file() or path.stat().st_size != part["bytes"] or \
                ("sha256" in part and file_sha256(path) != part["sha256"]):
            bad.append(part["url"])
    return bad


def task_name(task: int) -> str:
    return f"shard-{task:06d}"


class ShardWriter:
    """Writes one task's samples into ``shard-TTTTTT-PP.tar`` parts of at most ``max_samples``
    samples and ``max_bytes`` bytes each (a single sample larger than that gets a part of its own).
    Each part is written as a hidden temp file and renamed when complete."""

    END = 2 * TAR_BLOCK + tarfile.RECORDSIZE  # end-of-archive blocks + worst-case record padding

    def __init__(self, folder: Path, task: int, max_samples: int, max_bytes: int):
        self.folder, self.task, self.max_samples, self.max_bytes = folder, task, max_samples, max_bytes
        self.parts: list[dict] = []  # {"url", "samples", "bytes"} of finished parts
        self._tar: Optional[tarfile.TarFile] = None
        self._samples = self._bytes = 0

    @property
    def part_url(self) -> str:
        return f"{task_name(self.task)}-{len(self.parts):02d}.tar"

    def write(self, key: str, files: dict[str, bytes]) -> str:
        """Add one sample; returns the shard (part) file it went into."""
        size = tar_bytes(files)
        if self._tar is not None and (self._samples >= self.max_samples
                                      or self._bytes + size + self.END > self.max_bytes):
            self._close_part()
        if self._tar is None:
            self._tar = tarfile.open(self.folder / f".{self.part_url}.tmp", "w", format=tarfile.USTAR_FORMAT)
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed mtime: reproducible shards
            self._tar.addfile(info, io.BytesIO(data))
        self._samples += 1
        self._bytes += size
        return self.part_url

    def _close_part(self) -> None:
        self._tar.close()
        tmp = self.folder / f".{self.part_url}.tmp"
        size, digest = tmp.stat().st_size, file_sha256(tmp)
        os.replace(tmp, self.folder / self.part_url)
        self.parts.append({"url": self.part_url, "samples": self._samples, "bytes": size, "sha256": digest})
        self._tar, self._samples, self._bytes = None, 0, 0

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._close_part()
        return self.parts


def write_task(folder: Path, task: int, samples: Iterable[Sample], max_samples: int, max_bytes: int,
               skipped: list[dict]) -> dict:
    """Write one task's samples into its shard parts, then its sidecar: the columns (.npz) and the
    JSON (written last: the commit marker). ``skipped`` is read after ``samples`` is exhausted, so
    a generator may still append the records it skips. Returns the task's summary."""
    writer = ShardWriter(folder, task, max_samples, max_bytes)
    rows: list[dict] = []
    columns: dict[str, list] = {name: [] for name in COLUMNS}
    for s in samples:
        rows.append({**s.meta, "shard": writer.write(s.key, encode_sample(s))})
        for name in COLUMNS:
            columns[name].append(getattr(s, name))
    return write_sidecar(folder, task, writer.close(), rows, columns, skipped)


def write_sidecar(folder: Path, task: int, parts: list[dict], rows: list[dict], columns: dict[str, list],
                  skipped: list[dict]) -> dict:
    """A task's columns (.npz), then its JSON: the commit marker, written last."""
    buf = io.BytesIO()
    np.savez(buf, **{name: np.stack(v).astype(COLUMNS[name]) if len(v) else np.zeros((0, 0), COLUMNS[name])
                     for name, v in columns.items()})
    atomic_write(folder / f"{task_name(task)}.npz", buf.getvalue())
    record = {"task": task, "parts": parts, "samples": rows, "skipped": skipped}
    atomic_write(folder / f"{task_name(task)}.json", json.dumps(record))
    return {"task": task, "samples": len(rows), "skipped": skipped}


def read_task_record(folder: Path, task: int) -> Optional[dict]:
    """The task's sidecar if the task finished (all its parts present), else None."""
    path = folder / f"{task_name(task)}.json"
    if not path.is_file() or not (folder / f"{task_name(task)}.npz").is_file():
        return None
    record = json.loads(path.read_text())
    if not all((folder / p["url"]).is_file() for p in record["parts"]):
        return None
    return record


def write_index(root: Path, num_tasks: int, num_records: int, meta: dict) -> dict:
    """Merge the finished tasks' sidecars into the dataset index, one task at a time (memory
    O(one task + number of shards)); ``dataset.json`` last."""
    shards = root / "shards"
    sizes, parts, missing = [], [], []
    for t in range(num_tasks):
        record = read_task_record(shards, t)
        if record is None:
            missing.append(t)
            continue
        sizes.append(len(record["samples"]))
        parts += [{**p, "url": f"shards/{p['url']}"} for p in record["parts"]]
    if missing:
        raise RuntimeError(f"tasks {missing[:10]} have not finished; run prepare again to complete them")
    n = sum(sizes)
    if n == 0:
        raise RuntimeError("no record survived prepare (see the skipped records above): nothing to index")
    filled = [t for t, size in enumerate(sizes) if size]
    with np.load(shards / f"{task_name(filled[0])}.npz") as first:
        widths = {name: first[name].shape[1:] for name in COLUMNS}
    tmp = {name: root / f".{name}.npy.tmp" for name in (*COLUMNS, "identities", "row_of_ordinal")}
    columns = {name: NpyWriter(tmp[name], dtype, (n, *widths[name])) for name, dtype in COLUMNS.items()}
    identities = NpyWriter(tmp["identities"], np.int64, (n,))
    row_of_ordinal = NpyWriter(tmp["row_of_ordinal"], np.int64, (num_records,))
    row = 0
    with atomic_path(root / "index.jsonl") as index_tmp, open(index_tmp, "w") as lines:
        for t in filled:
            record = read_task_record(shards, t)
            with np.load(shards / f"{task_name(t)}.npz") as z:
                for name in COLUMNS:
                    columns[name].append(z[name])
            ordinals = np.array([s["ordinal"] for s in record["samples"]], dtype=np.int64)
            rows = np.arange(row, row + len(ordinals), dtype=np.int64)
            # the planned records a task did not keep (skipped) are -1; tasks hold ascending ordinal ranges
            row_of_ordinal.append(np.full(int(ordinals[0]) - row_of_ordinal.rows_written, -1, np.int64))
            gaps = np.full(int(ordinals[-1]) + 1 - int(ordinals[0]), -1, np.int64)
            gaps[ordinals - ordinals[0]] = rows
            row_of_ordinal.append(gaps)
            identities.append(np.array([s["identity"] for s in record["samples"]], dtype=np.int64))
            for s in record["samples"]:
                lines.write(json.dumps({"key": s["key"], "shard": f"shards/{s['shard']}", "ordinal": s["ordinal"],
                                        "identity": s["identity"], "name": s["name"], "caption": s["caption"]}) + "\n")
            row += len(ordinals)
    row_of_ordinal.append(np.full(num_records - row_of_ordinal.rows_written, -1, np.int64))
    for writer in (*columns.values(), identities, row_of_ordinal):
        writer.close()
    for name, path in tmp.items():
        os.replace(path, root / f"{name}.npy")
    dataset = {"format": FORMAT, "num_samples": n, "num_records": num_records, "shards": parts,
               "token_length": int(widths["tokens"][0]), "pooled_dim": int(widths["pooled"][0]),
               "image_emb_dim": int(widths["image_emb"][0]), **meta}
    atomic_write(root / "dataset.json", json.dumps(dataset, indent=1))
    return dataset


def add_identity_counts(counts: np.ndarray, identities: np.ndarray) -> tuple[np.ndarray, int]:
    """(``counts``, images per identity 0, 1, ..., plus those of ``identities``, grown as needed;
    how many of ``identities`` are -1, unlabelled)."""
    labelled = identities[identities >= 0]
    found = np.bincount(labelled, minlength=len(counts)).astype(np.int64, copy=False)
    found[:len(counts)] += counts
    return found, len(identities) - len(labelled)


@dataclass
class DatasetIndex:
    """A prepared dataset's index. Arrays are memory-mapped and the per-row text of index.jsonl
    (keys, captions, names) is read only when asked for: opening the index costs O(1) memory,
    which is what a training rank does."""

    root: Path
    meta: dict  # dataset.json
    identities: np.ndarray  # (N,) int64, memory-mapped
    tokens: np.ndarray  # (N, L) int32, memory-mapped
    image_emb: np.ndarray  # (N, d) fp32, memory-mapped
    pooled: np.ndarray  # (N, D) fp32, memory-mapped

    def __len__(self) -> int:
        return int(self.meta["num_samples"])

    @functools.cached_property
    def _rows(self) -> list[dict]:
        return [json.loads(line) for line in (self.root / "index.jsonl").read_text().splitlines()]

    @property
    def keys(self) -> list[str]:
        return [r["key"] for r in self._rows]

    @property
    def captions(self) -> list[str]:
        return [r["caption"] for r in self._rows]

    @property
    def names(self) -> list[str]:
        return [r["name"] for r in self._rows]

    @property
    def shards(self) -> list[str]:
        """Per row: the shard file holding it."""
        return [r["shard"] for r in self._rows]

    @property
    def shard_urls(self) -> list[str]:
        """The shard files, or for a cached copy of a dataset in object storage, their URLs in the bucket."""
        from pogdiff.storage import shard_root

        base = shard_root(self.root)
        return [f"{base}/{p['url']}" for p in self.meta["shards"]]

    def _identity_bincount(self, chunk_rows: int = 1 << 20) -> tuple[np.ndarray, int]:
        """(rows per identity 0..max, rows without one): the identity column read a chunk at a time."""
        counts, unlabelled = np.zeros(0, np.int64), 0
        path = self.root / "identities.npy"
        for start in range(0, len(self.identities), chunk_rows):
            counts, without = add_identity_counts(counts, read_rows(path, start, start + chunk_rows))
            unlabelled += without
        return counts, unlabelled

    def identity_counts(self) -> dict[int, int]:
        counts, unlabelled = self._identity_bincount()
        out = {-1: unlabelled} if unlabelled else {}
        out.update((i, c) for i, c in enumerate(counts.tolist()) if c)
        return out

    def is_minority(self, few_max_images: int) -> "MinorityRows":
        """Per row: its identity has at most ``few_max_images`` training images (the "Few" split)."""
        counts, _ = self._identity_bincount()
        return MinorityRows(NpyRows(self.root / "identities.npy"), (counts > 0) & (counts <= few_max_images))

    def identity_names(self) -> dict[int, str]:
        """identity -> its name (the manifest's name column, else the identity label), first row wins."""
        out: dict[int, str] = {}
        with open(self.root / "index.jsonl") as lines:  # a line at a time: O(identities), not O(rows)
            for line in lines:
                row = json.loads(line)
                if row["identity"] >= 0 and row["identity"] not in out:
                    out[row["identity"]] = row["name"] or str(row["identity"])
        return dict(sorted(out.items()))

    def images(self) -> Iterator[tuple[int, int, bytes]]:
        """(row, identity, PNG bytes) of every row, shard after shard (needs prepare.keep_images)."""
        from pogdiff.storage import open_read

        # a sample's json (its plan ordinal) comes before its image; the memory-mapped ordinal -> row
        # table names the row, so no per-row table is held here
        row_of_ordinal = np.load(self.root / "row_of_ordinal.npy", mmap_mode="r")
        for url in self.shard_urls:
            with open_read(url) as f:
                row, row_key = -1, None
                for member in read_tar(f, url):
                    key, _, ext = member["fname"].partition(".")
                    if ext == META:
                        row, row_key = int(row_of_ordinal[json.loads(member["data"])["ordinal"]]), key
                    elif ext == IMAGE and key == row_key and row >= 0:
                        yield row, int(self.identities[row]), member["data"]

    @classmethod
    def load(cls, root: str | Path) -> "DatasetIndex":
        root = Path(root)
        if not (root / "dataset.json").is_file():
            raise FileNotFoundError(f"'{root}' is not a prepared dataset (no dataset.json): run `pogdiff prepare` first")
        meta = json.loads((root / "dataset.json").read_text())
        mm = lambda name: np.load(root / f"{name}.npy", mmap_mode="r")  # noqa: E731
        return cls(root, meta, mm("identities"), mm("tokens"), mm("image_emb"), mm("pooled"))


class MinorityRows:
    """Per dataset row, whether its identity is a minority one: ``split[rows]`` (a slice or an index
    array) is a bool tensor, read from the identity column when asked; the process holds one flag
    per identity (``minority``), never one per row."""

    def __init__(self, identities: NpyRows, minority: np.ndarray):
        self.identities, self.minority = identities, minority

    def __len__(self) -> int:
        return len(self.identities)

    def __getitem__(self, rows):
        import torch

        ids = self.identities[rows]
        return torch.from_numpy((ids >= 0) & self.minority[ids.clip(0, max(len(self.minority) - 1, 0))]
                                if len(self.minority) else np.zeros(ids.shape, bool))


class EmbeddingSource:
    """The FAISS builder's view of a prepared dataset: image embeddings and identities, read one slice
    at a time from the index's files (pogdiff.npyrows: no map keeps the rows read resident); picklable
    by path, so Ray shard actors open it themselves."""

    def __init__(self, root: str | Path):
        self.root = str(root)
        self.n, self.dim = np.load(Path(self.root) / "image_emb.npy", mmap_mode="r").shape

    def read(self, start: int, stop: int) -> np.ndarray:
        return read_rows(Path(self.root) / "image_emb.npy", start, stop).astype(np.float32, copy=False)

    def identities(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        return read_rows(Path(self.root) / "identities.npy", start, self.n if stop is None else stop).astype(np.int64)
