"""``pogdiff prepare``: an image folder + manifest (or the synthetic generator) -> WebDataset shards.

    pogdiff prepare configs/prepare_agedb.yaml data.source=/data/agedb/manifest.jsonl prepare.output=/shared/agedb-l

The driver reads the manifest (JSONL, CSV or Parquet: ``image``, ``caption``, optional ``identity``,
``key``, ``name``) into an on-disk row store, does the cheap checks (empty caption, missing identity,
duplicate key), applies the imbalance protocol and name masking, and fixes the plan: records ->
shard tasks of ``prepare.samples_per_shard`` records, one file each (its memory stays O(identities +
tasks)). Tasks (Ray tasks on a cluster, processes on one machine)
load and resize the images, run the frozen encoders, and write their shard parts and a sidecar
(pogdiff/shards.py); a task whose sidecar exists is not redone. The driver then merges the
sidecars into the dataset index and draws the label distribution (the paper's Fig. 4).

Bad records (the REASONS below) are skipped with a log line naming the record and counted in the
summary, or raise PrepareError under ``prepare.strict``.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import sqlite3
import stat
import tempfile
from collections import Counter, deque
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from pogdiff.config import Config, ModelConfig, PrepareConfig
from pogdiff.data.encode import encode_batch, encode_latents, images_to_tensor, load_image_encoder
from pogdiff.models.components import Components, check_model, load_components
from pogdiff.data.shards import (FORMAT, Sample, add_identity_counts, damaged_parts, read_task_record, write_index,
                                 write_task)
from pogdiff.runs import atomic_path, atomic_write, is_uri, run_lease
from pogdiff.seeds import derive_seed
from pogdiff.storage import read_json, upload_dataset
from pogdiff.data.synthetic import Record, identity_name, iter_records, profile_counts
from pogdiff.models.components import resolve_device

log = logging.getLogger("pogdiff.prepare")

REASONS = {
    "bad_manifest_row": "a manifest line that is not valid JSON/CSV or has no image",
    "unreadable_file": "the image file is missing or cannot be read",
    "corrupt_image": "the file is not a decodable image (corrupt or truncated)",
    "empty_caption": "the caption is empty",
    "missing_identity": "no identity label in a labelled dataset",
    "duplicate_key": "the key was already used by an earlier record",
    "nan_embedding": "a latent or embedding came out NaN/inf",
    "single_image_identity": "the imbalance protocol needs >= 2 images per identity",
    "outside_image_root": "the image path leaves prepare.image_root (.. or absolute; prepare.allow_outside_root)",
}
CALIBRATION_IMAGES = 64  # images the tiny VAE's latent scale is measured on


class PrepareError(RuntimeError):
    pass


@dataclass
class Item:
    """One planned record. ``ordinal`` is its position in the plan (stable across reruns)."""

    ordinal: int
    key: str
    image: str  # path; "" for synthetic records (rendered in the task)
    caption: str
    identity: int  # -1: unlabelled
    name: str  # the identity's name as it appears in captions ("" if none)
    where: str  # how log lines name the record, e.g. "manifest.jsonl:12"


def skip_record(skipped: list[dict], strict: bool, where: str, reason: str, detail: str) -> None:
    assert reason in REASONS, reason
    if strict:
        raise PrepareError(f"{where}: {reason}: {detail} (prepare.strict=true; set it false to skip and count such records)")
    skipped.append({"record": where, "reason": reason, "detail": detail})


def log_skipped(skipped: Sequence[dict]) -> None:
    for s in skipped:
        log.warning("skipped %s: %s: %s", s["record"], s["reason"], s["detail"])


# ---------------------------------------------------------------- the plan (driver side)

def _lines(path: Path) -> Iterator[tuple[int, Optional[str], str]]:
    """(line number, text or None, why not) of a manifest, decoded line by line: a line that is not
    UTF-8 is reported with its number instead of aborting the whole file. A UTF-8 BOM is dropped."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield line_no, raw.decode("utf-8"), ""
            except UnicodeDecodeError as e:
                yield line_no, None, f"not UTF-8 text ({e.reason} at byte {e.start})"


def read_manifest(path: Path) -> Iterator[tuple[str, Optional[dict], str]]:
    """(where, row or None, why the row is unusable), one per data line of the manifest."""
    if path.suffix in (".jsonl", ".json"):
        for line_no, line, problem in _lines(path):
            where = f"{path}:{line_no}"
            if line is None:
                yield where, None, problem
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, None, f"not valid JSON ({e})"
                continue
            yield where, row if isinstance(row, dict) else None, "not a JSON object"
    elif path.suffix == ".csv":
        yield from read_csv(path)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a file that is not Parquet
            raise PrepareError(f"data.source '{path}' is not a readable Parquet file: {e}") from None
        row_no = 0
        for batch in table.iter_batches(batch_size=65536):
            for row in batch.to_pylist():
                row_no += 1
                yield f"{path}:row {row_no}", row, ""
    else:
        raise PrepareError(f"data.source '{path}': a manifest is a .jsonl, .csv or .parquet file, an image folder "
                           "with metadata.jsonl, a directory (or brace pattern) of WebDataset .tar shards, a prepared "
                           "dataset directory, or 'synthetic'")


def read_csv(path: Path) -> Iterator[tuple[str, Optional[dict], str]]:
    """A CSV manifest's rows, streamed: the parser sees the UTF-8 lines (a line that is not is reported
    where it stands), and each row is named by its file line number."""
    lines = _lines(path)
    header = None
    for n, text, problem in lines:
        if text is None:
            yield f"{path}:{n}", None, problem
        elif text.strip():
            header = n, text
            break
    if header is None:
        raise PrepareError(f"{path}: a CSV manifest needs a header line naming its columns")
    numbers: deque[int] = deque()  # file line numbers of the data lines the parser has read and not yet given out
    undecodable: list[tuple[int, str]] = []  # met while the parser reads a record's lines

    def fed() -> Iterator[str]:
        yield header[1]
        for n, text, problem in lines:
            if text is None:
                undecodable.append((n, problem))
            else:
                numbers.append(n)
                yield text

    reader = csv.DictReader(fed())
    prev = 1  # the parser's line 1 is the header
    for row in reader:
        span = [numbers.popleft() for _ in range(reader.line_num - prev)]
        prev = reader.line_num
        for n, problem in undecodable:
            yield f"{path}:{n}", None, problem
        undecodable.clear()
        if len(span) > 1 and any("\n" in v for v in row.values() if isinstance(v, str)):
            # a stray quote merged lines into one record: every line it swallowed is reported
            for line_no in span:
                yield (f"{path}:{line_no}", None, f"an unbalanced quote (\") merges lines {span[0]}-{span[-1]} "
                       "into one record; fix the quoting")
            continue
        yield f"{path}:{span[-1]}", row, ""
    for n, problem in undecodable:
        yield f"{path}:{n}", None, problem


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # what img2dataset writes
TAR_MEMBER = "tar://"  # an image inside a source shard: tar://<shard path>#<offset>+<size>


def webdataset_shards(source: str) -> Optional[list[Path]]:
    """The shards of a WebDataset source (a directory of .tar files, a brace pattern such as
    ``shards/{00000..00009}.tar``, or one .tar), in order; None for other sources."""
    if is_uri(source):  # asked first by every caller: a URI never goes through pathlib
        raise PrepareError(f"data.source '{source}': in object storage only a prepared dataset is read (as it is); "
                           "prepare a manifest, image folder or shards from local or shared storage")
    if source.endswith(".tar") or ("{" in source and ".." in source):
        from braceexpand import braceexpand

        paths = [Path(p).expanduser() for p in braceexpand(source)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise PrepareError(f"data.source '{source}': {len(missing)} of its {len(paths)} shards do not exist "
                               f"(first: {missing[0]})")
        return paths
    path = Path(source).expanduser()
    if path.is_dir() and not any((path / name).is_file() for name in IMAGEFOLDER_METADATA):
        tars = sorted(path.glob("*.tar"))
        return tars or None
    return None


def read_webdataset(shards: Sequence[Path]) -> Iterator[tuple[str, Optional[dict], str]]:
    """(where, row or None, why unusable) per sample of WebDataset shards, as img2dataset writes
    them: ``<key>.jpg|png|webp`` + ``<key>.txt`` + ``<key>.json``. A row is the json's fields plus
    ``__image__`` (a TAR_MEMBER reference: the image is read at its offset by the encoder stage, so
    this pass reads only headers, captions and json) and ``__txt__``."""
    import tarfile

    for shard in shards:
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    key = f"{folder}/{stem}" if folder else stem
                    sample = samples.setdefault(key, {"key": key})
                    ext = ext.lower()
                    if ext in IMAGE_EXTENSIONS:
                        sample["__image__"] = f"{TAR_MEMBER}{shard.resolve()}#{member.offset_data}+{member.size}"
                    elif ext in ("txt", "json"):
                        sample[f"__{ext}__"] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError) as e:
            yield f"{shard}", None, f"not a readable tar shard ({e}); its samples are skipped"
            continue
        for key, sample in samples.items():
            where = f"{shard}:{key}"
            row = {}
            if "__json__" in sample:
                try:
                    row = json.loads(sample["__json__"])
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    yield where, None, f"{key}.json is not valid JSON ({e})"
                    continue
                if not isinstance(row, dict):
                    yield where, None, f"{key}.json is not a JSON object"
                    continue
            if "__txt__" in sample:
                try:
                    row["__txt__"] = sample["__txt__"].decode("utf-8")
                except UnicodeDecodeError as e:
                    yield where, None, f"{key}.txt is not UTF-8 text ({e.reason} at byte {e.start})"
                    continue
            row["key"], row["__image__"] = key, sample.get("__image__", "")
            yield where, row, "" if row["__image__"] else f"no image member ({'/'.join(IMAGE_EXTENSIONS)})"


def read_source_bytes(path: str) -> bytes:
    """An image file's bytes, or a TAR_MEMBER's."""
    if path.startswith(TAR_MEMBER):
        shard, _, span = path[len(TAR_MEMBER):].rpartition("#")
        offset, size = (int(v) for v in span.split("+"))
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{shard} ends inside this member (truncated shard)")
        return data
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):  # a FIFO would block forever, a device read forever
        raise OSError(f"'{path}' is not a regular file")
    return Path(path).read_bytes()


IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv")  # Hugging Face's imagefolder convention


def manifest_path(source: str) -> tuple[Path, bool]:
    """(the manifest file, whether the source is an imagefolder directory)."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in IMAGEFOLDER_METADATA:
            if (path / name).is_file():
                return path / name, True
        raise PrepareError(f"data.source '{source}' is a directory without dataset.json (a prepared dataset), "
                           f"{' / '.join(IMAGEFOLDER_METADATA)} (a Hugging Face imagefolder) or .tar files (WebDataset "
                           "shards)")
    if not path.is_file():
        raise PrepareError(f"data.source '{source}' is neither 'synthetic' nor an existing manifest file or directory")
    return path, False


def columns(cfg: Config, row: dict) -> tuple[str, str]:
    """(image column, caption column) of this manifest: data.image_column / data.caption_column,
    else the first present of diffusers' and this project's usual names."""
    d = cfg.data
    image = d.image_column or next((c for c in ("image", "file_name") if c in row), "image")
    caption = d.caption_column or next((c for c in ("caption", "text") if c in row), "caption")
    return image, caption


MAX_KEY = 80  # a USTAR member name holds 100 characters: the key plus ".latent.npy" must fit


def sanitize_key(key: str) -> str:
    """WebDataset splits a member name at its first dot, so a key holds no dots (or slashes). A key
    that had to change gets a hash of the original at its end, so two different originals never
    collide (``a b`` and ``a_b``); a long key keeps its start and gets a hash of the whole."""
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", key)
    digest = hashlib.sha1(key.encode()).hexdigest()
    if clean != key:
        clean = f"{clean[:MAX_KEY - 9]}_{digest[:8]}"
    if len(clean) > MAX_KEY:
        clean = f"{clean[:MAX_KEY - 17]}_{digest[:16]}"
    return clean


def select_identities(sizes: dict[str, int], counts: Sequence[int], seed: int,
                      positions: Callable[[str], list[int]]) -> tuple[dict[str, list[int]], list[str]]:
    """The imbalance protocol on any identity-labelled data: for each target count (e.g. 30 for a
    majority identity, 2 for a minority one; largest first) a random identity with at least that
    many images, and a random subset of its images of exactly that size. ``sizes``: images per
    identity, in the order identities first appear; ``positions(label)``: where its images are.

    Returns (the positions kept, per chosen identity; the identities with a single image, which can
    never be a minority identity). Raises if the data cannot fill the requested counts.
    """
    singles = [lab for lab, n in sizes.items() if n == 1]
    available = sorted(lab for lab, n in sizes.items() if n >= 2)
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[int]] = {}
    for need in sorted(counts, reverse=True):
        eligible = [lab for lab in available if sizes[lab] >= need]
        if not eligible:
            have = sum(n >= need for n in sizes.values())
            raise PrepareError(
                f"imbalance protocol: {sum(c >= need for c in counts)} identities with >= {need} images are needed "
                f"but the data has {have}; lower data.majority_ids/minority_ids or pick a smaller data.profile")
        label = eligible[int(rng.integers(len(eligible)))]
        available.remove(label)
        chosen[label] = rng.choice(positions(label), size=need, replace=False).tolist()
    return chosen, singles


def generic_names(real_names: Sequence[str], seed: int) -> list[str]:
    """Masking names (Sec. 4.1, AgeDB-IT2I: "Albert Einstein" -> a random generic name): a distinct
    generic first + last name per identity, none sharing a word with any real name."""
    real_words = {w.lower() for name in real_names for w in name.split()}
    out, candidate = [], 0
    for _ in real_names:
        while not real_words.isdisjoint((name := identity_name(candidate, seed)).split()):
            candidate += 1
        out.append(name.title())
        candidate += 1
    return out


def mask_caption(caption: str, real: str, generic: str) -> str:
    """Replace the full real name, then any remaining part of it (>= 3 letters; the last part ->
    the generic last name, the others -> the generic first name), case-insensitively."""
    parts, generic_parts = real.split(), generic.split()
    if not parts:
        return caption
    full = r"\s+".join(re.escape(p) for p in parts)
    caption = re.sub(rf"(?<!\w){full}(?!\w)", generic, caption, flags=re.IGNORECASE)
    for i, part in enumerate(parts):
        if len(part) >= 3:
            replacement = generic_parts[-1] if i == len(parts) - 1 else generic_parts[0]
            caption = re.sub(rf"(?<!\w){re.escape(part)}(?!\w)", replacement, caption, flags=re.IGNORECASE)
    return caption


def label_order(labels: set[str]) -> list[str]:
    return sorted(labels, key=int) if all(lab.lstrip("-").isdigit() for lab in labels) else sorted(labels)


@dataclass
class Plan:
    num_records: int
    tasks_dir: Optional[Path]  # a manifest's records: one file of Items per shard task (write_task_files); None for synthetic
    synthetic: Optional[tuple]  # (images per identity, seed, image size, first image index)
    skipped: list[dict]  # found by the driver
    name_map: dict[str, str]  # identity label -> generic name (name masking)
    selection: dict  # what the imbalance protocol did
    heldout_count: int = 0  # the held-out split's records
    heldout_synthetic: Optional[tuple] = None  # (images per identity, seed, image size, first image index)
    rows_in: Optional[int] = None  # manifest data lines read
    identity_counts: Optional[Counter] = None  # a manifest's planned training records per identity
    records_hash: Optional[object] = None  # sha256 of the records' JSON so far (a manifest's plan)
    synthetic_names: str = "grid"  # the synthetic records' name scheme (data.names)

    def fingerprint(self, cfg: Config) -> str:
        pc = cfg.prepare
        rest = {
            "keep_images": pc.keep_images,
            "model": [cfg.model.name, cfg.model.revision, cfg.model.seed], "image_encoder": cfg.data.image_encoder,
            "image_size": cfg.data.image_size, "samples_per_shard": pc.samples_per_shard,
            "crop": None if cfg.data.center_crop else cfg.data.seed, "random_flip": cfg.data.random_flip,
            "max_shard_bytes": pc.max_shard_bytes, "format": FORMAT,
        }
        if self.records_hash is None:
            content = {"records": self.synthetic, "heldout": self.heldout_synthetic, **rest}
            if self.synthetic_names != "grid":  # grid plans keep the fingerprint they had before data.names
                content["names"] = self.synthetic_names
            return hashlib.sha256(json.dumps(content).encode()).hexdigest()
        h = self.records_hash.copy()  # the same text json.dumps gives with the records in the dict
        h.update(b", " + json.dumps(rest)[1:].encode())
        return h.hexdigest()


def plan_manifest(cfg: Config, path: Path, work: Path) -> Plan:
    root = Path(cfg.prepare.image_root) if cfg.prepare.image_root else path.parent
    return plan_rows(cfg, read_manifest(path), root, work)


def plan_webdataset(cfg: Config, shards: Sequence[Path], work: Path) -> Plan:
    """The samples of WebDataset shards; the caption is the ``txt`` member, or the json field
    ``data.caption_column``."""
    return plan_rows(cfg, read_webdataset(shards), None, work, ("__image__", cfg.data.caption_column or "__txt__"))


ACCEPTED, HELDOUT, SKIPPED, NOT_SELECTED = 0, 1, -1, -2  # a row's state in the plan's row store


def plan_rows(cfg: Config, source_rows: Iterator[tuple[str, Optional[dict], str]], root: Optional[Path], work: Path,
              fixed_columns: Optional[tuple[str, str]] = None) -> Plan:
    """The plan of a manifest's (or shards') rows. ``root``: what image paths are relative to (None:
    the rows give complete references); ``fixed_columns``: (image, caption) columns, else found
    from the first row. The rows go to an SQLite file as they are read, and every
    step that needs them all (duplicate keys, identities, the imbalance protocol, the held-out
    split) is a query on it, so the driver holds O(identities + shard tasks), not O(rows): a
    10^7-row manifest's keys, paths and captions are GBs. The plan ends as one file of records per
    shard task under ``work`` (write_task_files), which the tasks read."""
    # the row store is the driver's alone: on local disk ($TMPDIR), where SQLite's locks work, not on
    # the shared output folder; a scratch file rebuilt from the source on every run, so no journal and no fsync
    with tempfile.TemporaryDirectory(prefix="pogdiff-plan-") as scratch:
        db = sqlite3.connect(Path(scratch) / "rows.sqlite")
        try:
            db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA locking_mode=EXCLUSIVE;"
                             "PRAGMA cache_size=-16384; CREATE TABLE rows(pos INTEGER PRIMARY KEY, key TEXT UNIQUE, "
                             "place TEXT, image TEXT, caption TEXT, label TEXT, name TEXT, state INTEGER)")
            skipped: list[dict] = []
            rows_in = read_rows(cfg, source_rows, root, db, skipped, fixed_columns)
            return select_rows(cfg, db, skipped, rows_in, work)
        finally:
            db.close()


def read_rows(cfg: Config, source_rows: Iterator[tuple[str, Optional[dict], str]], root: Optional[Path],
              db: sqlite3.Connection, skipped: list[dict], fixed_columns: Optional[tuple[str, str]] = None) -> int:
    """The row-by-row checks, each row stored as it passes them (or as SKIPPED: it still holds its
    key). Returns the rows read."""
    pc, d = cfg.prepare, cfg.data
    image_col, caption_col = fixed_columns or (None, None)
    rows_in = 0
    for where, row, problem in source_rows:
        rows_in += 1
        if row is not None and image_col is None:
            image_col, caption_col = columns(cfg, row)
        if row is None or not str(row.get(image_col) or "").strip():
            skip_record(skipped, pc.strict, where, "bad_manifest_row", problem or f"no '{image_col}' field "
                        f"(the image column; set data.image_column if it has another name)")
            continue
        image = str(row[image_col]).strip()
        key = sanitize_key(str(row.get("key") or Path(image).with_suffix("").as_posix()))
        where = f"{where} (key={key}, image={image})" if root is not None else f"{where} (key={key})"
        full = (root / image).resolve() if root is not None else None
        if full is not None and not pc.allow_outside_root and not full.is_relative_to(root.resolve()):
            skip_record(skipped, pc.strict, where, "outside_image_root",
                        f"'{image}' resolves to '{full}', outside '{root}' (set prepare.allow_outside_root=true to allow)")
            continue
        caption = " ".join(str(row.get(caption_col) or "").split())
        label = row.get(d.identity_column)
        label = "" if label is None else str(label).strip()
        name = str(row.get(d.name_column) or "").strip() or label.replace("_", " ")
        try:
            db.execute("INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (rows_in, key, where, str(root / image) if root is not None else image, caption, label, name,
                        ACCEPTED if caption else SKIPPED))
        except sqlite3.IntegrityError:
            (first,) = db.execute("SELECT place FROM rows WHERE key = ?", (key,)).fetchone()
            skip_record(skipped, pc.strict, where, "duplicate_key", f"key '{key}' was already used by {first}")
            continue
        if not caption:
            skip_record(skipped, pc.strict, where, "empty_caption", f"the caption (column '{caption_col}') is empty")
    return rows_in


def select_rows(cfg: Config, db: sqlite3.Connection, skipped: list[dict], rows_in: int, work: Path) -> Plan:
    """Identities, the imbalance protocol, name masking and the held-out split over the stored rows."""
    pc, d = cfg.prepare, cfg.data
    labelled = pc.imbalance or pc.mask_names or \
        db.execute("SELECT 1 FROM rows WHERE state = ? AND label != '' LIMIT 1", (ACCEPTED,)).fetchone() is not None
    if labelled:
        why = "the dataset is identity-labelled (or prepare.imbalance/mask_names is on) but this record has no identity"
        for (where,) in db.execute("SELECT place FROM rows WHERE state = ? AND label = '' ORDER BY pos", (ACCEPTED,)):
            skip_record(skipped, pc.strict, where, "missing_identity", why)
        db.execute("UPDATE rows SET state = ? WHERE state = ? AND label = ''", (SKIPPED, ACCEPTED))
    db.execute("CREATE INDEX by_label ON rows(label, state, pos)")

    def sizes() -> dict[str, int]:  # accepted rows per identity, in the order identities first appear
        return dict(db.execute("SELECT label, COUNT(*) FROM rows WHERE state = ? GROUP BY label ORDER BY MIN(pos)",
                               (ACCEPTED,)))

    def positions(label: str) -> list[int]:
        return [p for (p,) in db.execute("SELECT pos FROM rows WHERE label = ? AND state = ? ORDER BY pos",
                                         (label, ACCEPTED))]

    def keep_only(kept: Iterator[int], other: int) -> None:
        db.execute("CREATE TEMP TABLE chosen(pos INTEGER PRIMARY KEY)")
        db.executemany("INSERT INTO chosen VALUES (?)", ((int(p),) for p in kept))
        db.execute("UPDATE rows SET state = ? WHERE state = ? AND pos NOT IN (SELECT pos FROM chosen)", (other, ACCEPTED))
        db.execute("DROP TABLE chosen")

    selection: dict = {}
    if pc.imbalance:
        counts = profile_counts(d.profile, d.majority_ids, d.minority_ids, d.majority_images, d.minority_images)
        have = sizes()
        chosen, singles = select_identities(have, counts, pc.seed, positions)
        for label in singles:  # skipped, so not also counted as not selected (rows in = samples + skipped + ...)
            (pos, where) = db.execute("SELECT pos, place FROM rows WHERE label = ? AND state = ?",
                                      (label, ACCEPTED)).fetchone()
            skip_record(skipped, pc.strict, where, "single_image_identity",
                        f"identity '{label}' has a single image; the imbalance protocol needs >= 2")
            db.execute("UPDATE rows SET state = ? WHERE pos = ?", (SKIPPED, pos))
        # records_before: the records the protocol chose from (identities with >= 2 images)
        selection = {"target_counts": counts, "records_before": sum(have.values()) - len(singles),
                     "records_selected": sum(len(p) for p in chosen.values()), "identities_before": len(have)}
        keep_only((p for kept in chosen.values() for p in kept), NOT_SELECTED)

    have = sizes() if labelled else {}
    identity_of = {lab: i for i, lab in enumerate(label_order(set(have)))}
    name_map: dict[str, str] = {}
    if pc.mask_names:
        real = dict(db.execute("SELECT label, name FROM rows WHERE pos IN (SELECT MIN(pos) FROM rows WHERE state = ? "
                               "GROUP BY label)", (ACCEPTED,)))  # the first name given for each identity
        name_map = dict(zip(identity_of, generic_names([real[lab] for lab in identity_of], pc.seed)))
    if d.heldout_images:
        # ``heldout_images`` random rows of every identity that keeps more than ``minority_images`` training
        # images after giving them: never trained on, the real set of the DINO-style score. Minority
        # identities give none (their few images are what the method is about).
        rng = np.random.default_rng([pc.seed, 7])
        for label in sorted(have):
            if have[label] - d.heldout_images > d.minority_images:
                out = rng.choice(positions(label), size=d.heldout_images, replace=False)
                db.executemany("UPDATE rows SET state = ? WHERE pos = ?", ((HELDOUT, int(p)) for p in out))
    (train_n,) = db.execute("SELECT COUNT(*) FROM rows WHERE state = ?", (ACCEPTED,)).fetchone()
    keep = None
    if d.max_train_samples is not None and train_n > d.max_train_samples:  # diffusers' --max_train_samples
        keep = np.sort(np.random.default_rng(d.seed).choice(train_n, d.max_train_samples, replace=False))
        selection["left_out_by_max_train_samples"] = train_n - d.max_train_samples

    def records(state: int) -> Iterator[Item]:
        ordinal = 0
        cursor = db.execute("SELECT key, image, caption, label, name, place FROM rows WHERE state = ? ORDER BY pos",
                            (state,))
        for index, (key, image, caption, label, name, where) in enumerate(cursor):
            if keep is not None and state == ACCEPTED and (ordinal >= len(keep) or keep[ordinal] != index):
                continue
            if pc.mask_names:
                caption, name = mask_caption(caption, name, name_map[label]), name_map[label]
            yield Item(ordinal, key, image, caption, identity_of.get(label, -1), name, where)
            ordinal += 1

    h = hashlib.sha256()
    h.update(b'{"records": ')
    num_records, identity_counts = write_task_files(records(ACCEPTED), work / "train", pc.samples_per_shard, h)
    h.update(b', "heldout": ')
    heldout_count, _ = write_task_files(records(HELDOUT), work / "heldout", pc.samples_per_shard, h)
    return Plan(num_records, work, None, skipped, name_map, selection, heldout_count=heldout_count, rows_in=rows_in,
                identity_counts=identity_counts, records_hash=h)


def write_task_files(items: Iterator[Item], folder: Path, per_task: int, h) -> tuple[int, Counter]:
    """The split's records as ``task-<t>.jsonl`` files of ``per_task`` records each (what shard
    task t reads); feeds ``h`` the JSON list of (key, image, caption, identity, name) that the
    plan's fingerprint hashes. Returns (records, records per identity)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    n, per_identity, out = 0, Counter(), None
    h.update(b"[")
    for item in items:
        if n % per_task == 0:
            if out is not None:
                out.close()
            out = (folder / f"task-{n // per_task:06d}.jsonl").open("w")
        out.write(json.dumps(astuple(item)) + "\n")
        h.update((", " if n else "").encode() + json.dumps([item.key, item.image, item.caption, item.identity,
                                                            item.name]).encode())
        per_identity[item.identity] += 1
        n += 1
    if out is not None:
        out.close()
    h.update(b"]")
    return n, per_identity


def task_items(path: str) -> list[Item]:
    with open(path) as f:
        return [Item(*json.loads(line)) for line in f]


def make_plan(cfg: Config, work: Path) -> Plan:
    """``work``: where a manifest's plan is written (plan_rows)."""
    d = cfg.data
    if d.source == "synthetic":
        if d.max_train_samples is not None:
            raise PrepareError("data.max_train_samples applies to manifest sources; the synthetic set's size is "
                               "data.profile's (or data.majority_ids / minority_ids / majority_images)")
        if cfg.prepare.mask_names:
            raise PrepareError("prepare.mask_names: synthetic identities already carry generic names; nothing to mask")
        counts = profile_counts(d.profile, d.majority_ids, d.minority_ids, d.majority_images, d.minority_images)
        heldout = [d.heldout_images] * len(counts) if d.heldout_images else None
        return Plan(sum(counts), None, (counts, d.seed, d.image_size, [0] * len(counts)), [], {}, {},
                    heldout_count=d.heldout_images * len(counts),
                    heldout_synthetic=(heldout, d.seed, d.image_size, counts) if heldout else None,
                    synthetic_names=d.names)
    if (shards := webdataset_shards(d.source)) is not None:
        return plan_webdataset(cfg, shards, work)
    return plan_manifest(cfg, manifest_path(d.source)[0], work)


# ---------------------------------------------------------------- shard tasks (workers)

@dataclass
class Task:
    index: int
    folder: str  # the shards/ folder
    model: str  # frozen encoders: a diffusers directory or hub id
    image_encoder: str
    image_size: int
    device: str
    batch_size: int
    max_samples: int
    max_bytes: int
    strict: bool
    keep_images: bool = True
    crop_seed: Optional[int] = None  # None: centre crops; else random crops drawn per record from it
    random_flip: bool = False  # also encode each image's mirror
    precision: str = "auto"  # the encoders' autocast on a GPU (prepare.precision)
    items_file: Optional[str] = None  # a manifest's records for this task (write_task_files)
    size: int = 0  # its records
    # the identities it touches: counts, seed, size, first image indices, start, stop (in them), the
    # first's identity, the first record's ordinal (synthetic_task)
    synthetic: Optional[tuple] = None
    names: str = "grid"  # the synthetic records' name scheme (data.names)


class BadRecord(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def load_image(path: str, size: int, crop_seed: Optional[int] = None) -> tuple[Image.Image, list[int]]:
    """Decode fully (a truncated file fails here, not later), then resize the shorter side to
    ``size`` and crop ``size`` x ``size``: centred, or at a random offset drawn from ``crop_seed``.
    Returns the crop and its SDXL time ids (``crop_time_ids``)."""
    try:
        data = read_source_bytes(path)
    except OSError as e:
        raise BadRecord("unreadable_file", f"cannot read '{path}': {e.strerror or e}") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            scale = size / min(im.size)
            width, height = (max(size, round(n * scale)) for n in im.size)
            if crop_seed is None:
                left, top = round((width - size) / 2), round((height - size) / 2)
                return ImageOps.fit(to_rgb(im), (size, size), Image.BICUBIC), [im.height, im.width, top, left, width]
            resized = to_rgb(im).resize((width, height), Image.BICUBIC)
            rng = np.random.default_rng(crop_seed)
            left, top = (int(rng.integers(0, n - size + 1)) for n in resized.size)
            return resized.crop((left, top, left + size, top + size)), [im.height, im.width, top, left, width]
    except Exception as e:  # PIL raises many types for bad data
        raise BadRecord("corrupt_image", f"'{path}' is not a decodable image: {e}") from None


def crop_time_ids(geometry: Sequence[int], size: int, mirrored: bool = False) -> list[int]:
    """SDXL's time ids of a crop, as diffusers' SDXL training script makes them: the source's
    (height, width), the crop's (top, left) in the resized image, the target (size, size). The
    mirror image is a crop of the flipped resized image, at ``width - left - size``."""
    height, width, top, left, resized_width = geometry
    return [height, width, top, resized_width - left - size if mirrored else left, size, size]


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB with the image's full range kept: 16-bit and 32-bit integer images are scaled down
    (PIL's own conversion clips them to white), float images from [0, 1] or [0, 255], palette and
    grey-with-alpha images composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            a = a * 255.0 if a.max(initial=0) <= 1.0 else a
        elif im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / (65535.0 if a.max(initial=0) <= 65535 else float(a.max())) * 255.0
        return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if im.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def synthetic_slice(counts: Sequence[int], seed: int, size: int, bases: Sequence[int], start: int,
                    stop: int, first_identity: int = 0, names: str = "grid") -> Iterator[Record]:
    """Records ``start .. stop`` of the synthetic stream (identity after identity, from identity
    ``first_identity``; its ``i``-th identity's images from ``bases[i]`` on), rendered on the spot;
    ``names``: the name scheme (data.names)."""
    sub, starts, offset = [], [], 0
    for c, base in zip(counts, bases):
        a, b = max(start - offset, 0), min(stop - offset, c)
        sub.append(max(b - a, 0))
        starts.append(base + (a if b > a else 0))
        offset += c
    return iter_records(sub, seed, size, starts, first_identity, names)


def synthetic_task(synthetic: tuple, offsets: np.ndarray, a: int, b: int) -> tuple:
    """Records ``a .. b`` of a synthetic split as a task's slice: the counts and bases of just the
    identities it touches (a task stays O(its records) however many identities the split has).
    ``offsets``: the split's first record of each identity, and its size last."""
    counts, seed, size, bases = synthetic
    first, last = int(np.searchsorted(offsets, a, "right")) - 1, int(np.searchsorted(offsets, b, "left"))
    base = int(offsets[first])
    return (list(counts[first:last]), seed, size, list(bases[first:last]), a - base, b - base, first, a)


def task_records(task: Task) -> Iterator[tuple[Item, tuple[Image.Image, list[int]] | BadRecord]]:
    """(record, (its image, crop geometry) or why it is unusable)."""
    if task.synthetic is not None:
        counts, seed, size, bases, start, stop, first_identity, first_ordinal = task.synthetic
        for ordinal, rec in enumerate(synthetic_slice(counts, seed, size, bases, start, stop, first_identity,
                                                      task.names), first_ordinal):
            item = Item(ordinal, rec.key, "", rec.caption, rec.identity, rec.name, f"synthetic:{rec.key}")
            yield item, (rec.image, [size, size, 0, 0, size])  # generated at the target size
        return
    for item in task_items(task.items_file):
        try:
            seed = None if task.crop_seed is None else derive_seed(task.crop_seed, int(hashlib.sha256(item.key.encode()).hexdigest()[:8], 16))
            yield item, load_image(item.image, task.image_size, seed)
        except BadRecord as e:
            yield item, e


_ENCODERS: dict[tuple, tuple] = {}  # one set of frozen encoders per worker process


def frozen_encoders(model: str, image_encoder: str, device: torch.device) -> tuple[Components, object]:
    key = (model, image_encoder, str(device))
    if key not in _ENCODERS:
        _ENCODERS.clear()
        c = load_components(ModelConfig(name=model), with_unet=False)
        for module in (c.vae, *c.text_encoders):
            module.to(device).eval()
        _ENCODERS[key] = (c, load_image_encoder(image_encoder, device))
    return _ENCODERS[key]


@dataclass
class DecodedTask:
    """A task after the read/decode stage: its usable records with their images (and PNGs), and the
    records it skipped (already counted in ``skipped``)."""

    task: Task
    items: list[Item]
    images: list[np.ndarray]  # (H, W, 3) uint8 each
    pngs: list[Optional[bytes]]
    skipped: list[dict]
    crops: list[list[int]]  # each image's crop geometry (load_image)


def decode_task(task: Task) -> DecodedTask:
    """Stage 1 (CPU): read and decode the task's records, skip the bad ones, and make the PNG the
    shard keeps, so the encoder stage does only the frozen encoders and the write."""
    items, images, pngs, skipped, crops = [], [], [], [], []
    for item, loaded in task_records(task):
        if isinstance(loaded, BadRecord):
            skip_record(skipped, task.strict, item.where, loaded.reason, loaded.detail)
            continue
        image, crop = loaded
        items.append(item)
        images.append(np.asarray(image, dtype=np.uint8))
        pngs.append(png_bytes(image) if task.keep_images else None)
        crops.append(crop)
    return DecodedTask(task, items, images, pngs, skipped, crops)


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast for the frozen encoders on a GPU (``prepare.precision``); fp32 elsewhere."""
    import contextlib

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get("bf16" if precision == "auto" else precision)
    if device.type != "cuda" or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def encode_and_write(decoded: DecodedTask) -> dict:
    """Stage 2: the frozen encoders over the task's records in batches of ``batch_size``, then its
    shard parts and sidecar. Returns the task's summary."""
    task = decoded.task
    device = resolve_device(task.device)
    components, image_encoder = frozen_encoders(task.model, task.image_encoder, device)
    skipped = list(decoded.skipped)

    def encoded(lo: int, hi: int) -> Iterator[Sample]:
        chunk = [Image.fromarray(a) for a in decoded.images[lo:hi]]
        items = decoded.items[lo:hi]
        with autocast(device, task.precision):
            enc = encode_batch(components, chunk, [it.caption for it in items], device, image_encoder)
            latents = (enc.latents.float() * components.vae_scale).half()
            flipped = None
            if task.random_flip:
                mirrored = [ImageOps.mirror(im) for im in chunk]
                flipped = (encode_latents(components, mirrored, device).float() * components.vae_scale).half()
        for j, item in enumerate(items):
            fields = {"latent": latents[j], "pooled text embedding": enc.pooled[j], "image embedding": enc.image_emb[j]}
            if flipped is not None:
                fields["mirror image latent"] = flipped[j]
            if bad := [name for name, x in fields.items() if not torch.isfinite(x).all()]:
                skip_record(skipped, task.strict, item.where, "nan_embedding", f"non-finite {', '.join(bad)}")
                continue
            crop = decoded.crops[lo + j]
            yield Sample(item.key, item.ordinal, item.identity, item.name, item.caption, latents[j].numpy(),
                         enc.tokens[j].numpy(), enc.pooled[j].float().numpy(), enc.image_emb[j].float().numpy(),
                         decoded.pngs[lo + j], None if flipped is None else flipped[j].numpy(),
                         crop_time_ids(crop, task.image_size),
                         None if flipped is None else crop_time_ids(crop, task.image_size, mirrored=True))

    def samples() -> Iterator[Sample]:
        for lo in range(0, len(decoded.items), task.batch_size):
            yield from encoded(lo, lo + task.batch_size)

    return write_task(Path(task.folder), task.index, samples(), task.max_samples, task.max_bytes, skipped)


@dataclass(frozen=True)
class Stages:
    """What the pipeline runs per task; benchmarks/prepare_scale.py swaps in zero-cost stages to
    measure the orchestration alone."""

    decode: Callable[[Task], DecodedTask] = decode_task
    encode_and_write: Callable[[DecodedTask], dict] = encode_and_write


def run_task(task: Task, stages: Stages = Stages()) -> dict:
    """One task in this process: both stages, one after the other."""
    return stages.encode_and_write(stages.decode(task))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _in_ray_worker(log_path: str) -> None:
    """First in every function the pipeline runs: the worker logs to the run's log file."""
    from pogdiff import console

    if log_path and console.log_path() != log_path:
        console.setup(Path(log_path))


def _decode_row(row: dict, decode: Callable[[Task], DecodedTask]) -> dict:
    """A user's error (prepare.strict) travels as a result: Ray Data's wrapping of a raised one
    loses the original exception on its way to the driver."""
    _in_ray_worker(row["log"])
    try:
        decoded = pickle.dumps(decode(pickle.loads(row["task"])), protocol=pickle.HIGHEST_PROTOCOL)
        return {"decoded": decoded, "error": "", "log": row["log"]}
    except PrepareError as e:
        return {"decoded": b"", "error": str(e), "log": row["log"]}


class ShardEncoder:
    """The encoder stage's actor: the frozen encoders load once per actor (``frozen_encoders``) and
    serve every task routed to it; one row is one task."""

    def __init__(self, encode_and_write: Callable[[DecodedTask], dict]):
        self.encode_and_write = encode_and_write

    def __call__(self, batch: dict) -> dict:
        summaries = []
        for decoded, error, log_path in zip(batch["decoded"], batch["error"], batch["log"]):
            _in_ray_worker(log_path)
            try:
                summaries.append(json.dumps({"error": error} if error else self.encode_and_write(pickle.loads(decoded))))
            except PrepareError as e:
                summaries.append(json.dumps({"error": str(e)}))
        return {"summary": summaries}


def run_tasks(tasks: list[Task], pc: PrepareConfig, progress: bool, total: int, ray_address: Optional[str],
              stages: Stages = Stages()) -> None:
    """Run the tasks, in this process (``prepare.backend=serial``) or as a Ray Data pipeline; progress
    in records, skipped records logged as each task finishes."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="prepare", unit="rec", disable=not progress)
    try:
        results = (run_task(t, stages) for t in tasks) if pc.backend == "serial" else \
            run_pipeline(tasks, pc, ray_address, stages)
        shards = skipped = 0
        for result in results:
            log_skipped(result["skipped"])
            shards, skipped = shards + 1, skipped + len(result["skipped"])
            bar.update(result["samples"] + len(result["skipped"]))
            bar.set_postfix(shards=f"{shards}/{len(tasks)}", skipped=skipped)
    finally:
        bar.close()


def encoder_pool(pc: PrepareConfig, resources: dict) -> tuple[int, float]:
    """(encoder actors, GPUs each): ``prepare.workers`` / ``prepare.gpus_per_worker``, else one actor
    per GPU of the cluster when it has GPUs (and prepare.device is not cpu), else one per CPU but
    the one the decode stage needs."""
    gpus = pc.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 and pc.device != "cpu" else 0.0
    workers = pc.workers or (int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 2)) - 1)
    return max(1, workers), gpus


def run_pipeline(tasks: list[Task], pc: PrepareConfig, ray_address: Optional[str], stages: Stages) -> Iterator[dict]:
    """The tasks through Ray Data: read the task list -> decode (CPU tasks) -> the frozen encoders
    (an actor pool of ``prepare.workers`` actors, ``prepare.gpus_per_worker`` GPUs each) -> the shard
    write, streaming; yields each task's summary as it finishes. Where the two stages ask for the
    same resources (a CPU cluster) Ray Data fuses them into the actors. Runs on the cluster at
    ``dist.ray_address`` / $RAY_ADDRESS, else on the embedded one (the output folder must be on
    storage every node sees). One row is one shard task, so a task's records stay together and its
    shard is the same whichever worker encodes it."""
    import ray
    import ray.data

    from pogdiff import console
    from pogdiff.dist.cluster import machine_cpus, session

    if not tasks:
        return
    # the encoder actors hold a CPU each; the decode stage needs one more to ever run beside them
    with session(ray_address, num_cpus=(pc.workers or machine_cpus()) + 1):
        console.route_ray_logs()
        workers, gpus = encoder_pool(pc, ray.cluster_resources())
        log.info("prepare: %d encoder actors with %g GPUs each, %d tasks", workers, gpus, len(tasks))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver draws its own bar, in records
        ctx.print_on_execution_start = False
        rows = ray.data.from_items([{"task": pickle.dumps(t, protocol=pickle.HIGHEST_PROTOCOL),
                                     "log": console.log_path() or ""} for t in tasks], override_num_blocks=len(tasks))
        decoded = rows.map(_decode_row, fn_kwargs={"decode": stages.decode}, num_cpus=1)
        summaries = decoded.map_batches(ShardEncoder, fn_constructor_kwargs={"encode_and_write": stages.encode_and_write},
                                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(workers, len(tasks))),
                                        num_cpus=1, num_gpus=gpus or None)
        for row in summaries.iter_rows():
            result = json.loads(row["summary"])
            if "error" in result:
                raise PrepareError(result["error"])
            yield result


# ---------------------------------------------------------------- the driver

def source_fingerprint(cfg: Config) -> str:
    """What a prepared dataset depends on: the source (a manifest's bytes), the frozen encoders and
    every setting that changes a shard. Equal fingerprints reuse one prepared directory."""
    d, pc, m = cfg.data, cfg.prepare, cfg.model
    content: dict = {"model": [m.name, m.revision, m.seed, m.tiny_vae_steps if m.name == "tiny" else None],
                     "images": [d.max_train_samples, d.center_crop, d.random_flip],
                     "image_encoder": d.image_encoder, "image_size": d.image_size, "heldout_images": d.heldout_images,
                     "minority_images": d.minority_images, "prepare": {k: getattr(pc, k) for k in (
                         "image_root", "samples_per_shard", "max_shard_bytes", "mask_names", "imbalance", "seed",
                         "keep_images", "precision")}, "format": FORMAT}
    if d.source == "synthetic" or pc.imbalance:
        content["counts"] = profile_counts(d.profile, d.majority_ids, d.minority_ids, d.majority_images, d.minority_images)
    if d.source == "synthetic":
        from pogdiff.data.synthetic import GENERATOR_VERSION

        content["synthetic_seed"] = d.seed
        content["synthetic_version"] = GENERATOR_VERSION
        if d.names != "grid":  # a grid dataset keeps the folder it had before data.names existed
            content["synthetic_names"] = d.names
    elif (shards := webdataset_shards(d.source)) is not None:  # names, sizes and times: not GBs of bytes
        content.update(shards=[[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in shards],
                       columns=[d.caption_column, d.identity_column, d.name_column])
    else:
        path, _ = manifest_path(d.source)
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        content.update(manifest=str(path.resolve()), manifest_sha256=h.hexdigest(),
                       columns=[d.image_column, d.caption_column, d.identity_column, d.name_column])
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def output_dir(cfg: Config) -> Path:
    """Where prepare writes: ``prepare.output``, else ``<output_dir>/datasets/<source name>-<fingerprint>``.
    For a ``prepare.output`` in object storage, that default folder + ``.staging``: written like any
    output, uploaded at the end (pogdiff.storage.upload_dataset), then removed."""
    if cfg.prepare.output and not is_uri(cfg.prepare.output):
        return Path(cfg.prepare.output).expanduser()
    if cfg.data.source == "synthetic":
        name = f"synthetic-{cfg.data.profile}"
    elif (shards := webdataset_shards(cfg.data.source)) is not None:
        name = shards[0].parent.name or "shards"
    else:
        path, imagefolder = manifest_path(cfg.data.source)
        name = path.parent.name if imagefolder else path.stem
    folder = Path(cfg.output_dir).expanduser() / "datasets" / f"{sanitize_key(name)[:40]}-{source_fingerprint(cfg)}"
    return folder.with_name(f"{folder.name}.staging") if cfg.prepare.output else folder


def output_location(cfg: Config) -> str:
    """Where the prepared dataset lives: ``prepare.output`` when it is a URI, else ``output_dir``."""
    return cfg.prepare.output if cfg.prepare.output and is_uri(cfg.prepare.output) else str(output_dir(cfg))


def calibration_images(plan: Plan, size: int) -> list[Image.Image]:
    if plan.synthetic is not None:
        counts, seed, img_size, bases = plan.synthetic
        return [r.image for r in synthetic_slice(counts, seed, img_size, bases, 0, min(CALIBRATION_IMAGES, sum(counts)),
                                                 names=plan.synthetic_names)]
    images = []
    for path in sorted((plan.tasks_dir / "train").glob("task-*.jsonl")):
        for item in task_items(str(path)):
            try:
                images.append(load_image(item.image, size)[0])
            except BadRecord:
                continue  # the task that owns the record logs and counts it
            if len(images) == CALIBRATION_IMAGES:
                return images
    return images


def frozen_model(cfg: Config, out: Path, plan: Plan) -> str:
    """Where tasks load the frozen encoders from. A random-init tiny model is saved under the
    dataset (trainers must use the very same VAE and text encoder), with its VAE scaling factor
    set to 1/std of the latents (what SD did for its VAE)."""
    if cfg.model.name != "tiny":
        check_model(cfg.model)  # here, before the workers load it
        return cfg.model.name
    target = out / "model"
    if (target / "vae" / "config.json").is_file():
        return str(target)
    from pogdiff.models.components import save_components

    from pogdiff.models.tiny_vae import pretrain_tiny_vae

    components = load_components(cfg.model)
    # a random-init decoder would make images meaningless: pretrain the tiny VAE as an autoencoder first
    pretrain_tiny_vae(components.vae, cfg.model.tiny_vae_steps, cfg.model.seed, cfg.data.image_size)
    images = calibration_images(plan, cfg.data.image_size)
    if images:
        with torch.no_grad():
            raw = components.vae.encode(images_to_tensor(images)).latent_dist.mean
        components.vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
    with atomic_path(target) as tmp:
        save_components(components, tmp)
    return str(target)


PLOT_STEPS = 2048  # the PNG is 720 px wide; a step per identity beyond this only costs memory


def plot_label_distribution(counts: Sequence[int], path: Path, title: str) -> list[int]:
    """Images per identity (``counts``, largest first), as the paper's Fig. 4, in a PNG. Beyond
    PLOT_STEPS identities a step covers a run of them at its largest count, its first (the counts
    are sorted), which draws the same picture at this width; a step per identity took +114 MB at
    126,662 identities. Returns the plotted steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(counts)
    edges = np.unique(np.linspace(0, len(counts), min(len(counts), PLOT_STEPS) + 1).astype(np.int64))
    steps = counts[edges[:-1]]
    fig, ax = plt.subplots(figsize=(6, 3), dpi=120)
    # one artist for all steps (a bar each costs ~10 KB, which 10^4 identities turn into 100 MB)
    ax.stairs(steps, edges - 0.5, fill=True, color="#3b6ea8")
    ax.set_xlabel(f"identities, sorted by images ({len(counts)})")
    ax.set_ylabel("images per identity")
    ax.set_title(title)
    ax.set_xlim(-0.5, len(counts) - 0.5)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return steps.tolist()


@dataclass
class SplitTally:
    """What one split's finished tasks hold, counted one sidecar at a time."""

    tasks: int
    samples: int
    skipped: list[dict]
    per_identity: np.ndarray  # images per identity 0, 1, ...
    unlabelled: int = 0  # images of identity -1

    def images_of(self, identity: int) -> int:
        if identity < 0:
            return self.unlabelled
        return int(self.per_identity[identity]) if identity < len(self.per_identity) else 0


def tally_split(shards: Path, num_tasks: int) -> SplitTally:
    tally = SplitTally(num_tasks, 0, [], np.zeros(0, np.int64))
    for t in range(num_tasks):
        record = read_task_record(shards, t)
        tally.samples += len(record["samples"])
        tally.skipped += record["skipped"]
        ids = np.fromiter((s["identity"] for s in record["samples"]), np.int64, len(record["samples"]))
        tally.per_identity, unlabelled = add_identity_counts(tally.per_identity, ids)
        tally.unlabelled += unlabelled
    return tally


def pending_tasks(shards: Path, items_dir: Optional[Path], synthetic: Optional[tuple], num_records: int,
                  common: dict, pc: PrepareConfig) -> tuple[int, list[Task]]:
    """(the split's number of tasks, those not finished yet); damaged finished ones are redone."""
    shards.mkdir(parents=True, exist_ok=True)
    for tmp in shards.glob(".*.tmp"):  # parts of tasks an earlier run did not finish
        tmp.unlink()
    per = pc.samples_per_shard
    num_tasks = -(-num_records // per)
    offsets = np.concatenate([[0], np.cumsum(synthetic[0])]) if synthetic is not None else None
    tasks = []
    for t in range(num_tasks):
        a, b = t * per, min((t + 1) * per, num_records)
        record = read_task_record(shards, t)
        if record is not None and (bad := damaged_parts(shards, record)):
            log.warning("%s: shard parts %s are damaged (size or sha256 differs from when they were written): "
                        "remaking task %d", shards, bad, t)
            (shards / f"shard-{t:06d}.json").unlink()
            record = None
        if record is not None:
            continue
        if items_dir is not None:
            tasks.append(Task(t, folder=str(shards), items_file=str(items_dir / f"task-{t:06d}.jsonl"), size=b - a,
                              **common))
        else:
            tasks.append(Task(t, folder=str(shards), synthetic=synthetic_task(synthetic, offsets, a, b), size=b - a,
                              **common))
    log.info("%s: %d records in %d shard tasks, %d to do", shards, num_records, num_tasks, len(tasks))
    return num_tasks, tasks


def prepare(cfg: Config, progress: bool = True, stages: Stages = Stages()) -> dict:
    """Plan, run the unfinished shard tasks (training split, then the held-out split), write the
    indexes. Returns dataset.json's content. Rows in = samples + skipped records (+ held out).
    Into object storage: a dataset.json there means complete (written last by the upload)."""
    if is_uri(location := output_location(cfg)) and (done := read_json(f"{location}/dataset.json")) is not None:
        if done.get("source_fingerprint") != source_fingerprint(cfg):
            raise PrepareError(f"'{location}' holds another prepared dataset (other source, model or prepare "
                               "settings); use another prepare.output or delete it")
        return done
    out = output_dir(cfg)
    # one writer per dataset directory: a second prepare would remove the first one's unfinished parts
    with contextlib.ExitStack() as leases:
        for folder in [location, out] if is_uri(location) else [out]:
            leases.enter_context(run_lease(folder, cfg.train.lease_timeout, "pogdiff prepare", name=".lease.json",
                                           instead="use another prepare.output"))
        dataset = prepare_into(out, cfg, progress, stages)
        if is_uri(location):
            upload_dataset(out, location)
    if is_uri(location):
        shutil.rmtree(out)  # the bucket holds the dataset now
        log.info("uploaded to %s", location)
    return dataset


def prepare_into(out: Path, cfg: Config, progress: bool, stages: Stages) -> dict:
    """``prepare`` into the local folder ``out`` (its caller holds the folder's lease)."""
    pc, d = cfg.prepare, cfg.data
    plan = make_plan(cfg, out / "plan")
    log_skipped(plan.skipped)
    fingerprint = plan.fingerprint(cfg)
    plan_file = out / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text())["fingerprint"] != fingerprint:
        raise PrepareError(f"'{out}' holds shards of a different plan (other records or settings); "
                           "use another prepare.output or delete that directory")
    if plan.num_records == 0:
        raise PrepareError(f"data.source '{d.source}': no usable record (see the skipped records above)")
    atomic_write(plan_file, json.dumps({"fingerprint": fingerprint, "num_records": plan.num_records}))
    model = frozen_model(cfg, out, plan)
    common = dict(model=model, image_encoder=d.image_encoder, image_size=d.image_size, device=pc.device,
                  batch_size=pc.batch_size, max_samples=pc.samples_per_shard, max_bytes=pc.max_shard_bytes,
                  strict=pc.strict, keep_images=pc.keep_images, random_flip=d.random_flip,
                  crop_seed=None if d.center_crop else d.seed, precision=pc.precision, names=plan.synthetic_names)
    heldout_n = plan.heldout_count
    split_dir = lambda split: plan.tasks_dir / split if plan.tasks_dir else None  # noqa: E731
    train_tasks, todo = pending_tasks(out / "shards", split_dir("train"), plan.synthetic, plan.num_records, common, pc)
    if heldout_n:  # one pipeline for both splits
        heldout_tasks, heldout_todo = pending_tasks(out / "heldout" / "shards", split_dir("heldout"),
                                                    plan.heldout_synthetic, heldout_n, common, pc)
        todo += heldout_todo
    run_tasks(todo, pc, progress, sum(t.size for t in todo), cfg.dist.ray_address, stages)
    train = tally_split(out / "shards", train_tasks)
    heldout_skipped: list[dict] = []
    if heldout_n:
        held = tally_split(out / "heldout" / "shards", heldout_tasks)
        heldout_skipped = held.skipped
        if held.samples:
            write_index(out / "heldout", held.tasks, heldout_n, {"model": os.path.relpath(model, out / "heldout")
                                                                 if Path(model).is_relative_to(out) else model,
                                                                 "split": "heldout"})

    skipped = plan.skipped + train.skipped + heldout_skipped
    if plan.selection.get("target_counts"):  # bad images found after the selection leave an identity short of its count
        want = plan.identity_counts
        plan.selection["short_identities"] = {str(i): [train.images_of(i), n] for i, n in sorted(want.items())
                                              if train.images_of(i) < n}
        if plan.selection["short_identities"]:
            log.warning("imbalance protocol: identities below their count after skipping bad records "
                        "(identity: [have, want]): %s", plan.selection["short_identities"])
    heldout_samples = 0
    if (out / "heldout" / "dataset.json").is_file():
        heldout_samples = json.loads((out / "heldout" / "dataset.json").read_text())["num_samples"]
    samples = train.samples
    rows_in = plan.rows_in if plan.rows_in is not None else plan.num_records + heldout_n
    sel = plan.selection
    not_selected = sel.get("records_before", 0) - sel.get("records_selected", 0) + sel.get("left_out_by_max_train_samples", 0)
    # every row is accounted for: rows in = samples + held out + skipped (+ left out by the imbalance protocol)
    accounted = samples + heldout_samples + len(skipped) + not_selected
    summary = {"rows_in": rows_in, "samples": samples, "heldout": heldout_samples, "skipped_total": len(skipped),
               "not_selected": not_selected, "skipped": dict(Counter(s["reason"] for s in skipped)),
               "skipped_records": skipped, "imbalance": plan.selection}
    if accounted != rows_in:
        log.warning("rows in (%d) != samples (%d) + held out (%d) + skipped (%d) + not selected (%d)", rows_in, samples,
                    heldout_samples, len(skipped), not_selected)
    meta = {"model": os.path.relpath(model, out) if Path(model).is_relative_to(out) else model,
            "image_encoder": d.image_encoder, "image_size": d.image_size,
            "source": d.source, "source_fingerprint": source_fingerprint(cfg), "name_masking": pc.mask_names,
            "summary": summary, "prepare": asdict(pc), "keep_images": pc.keep_images, "random_flip": d.random_flip,
            "heldout": {"samples": heldout_samples, "per_identity": d.heldout_images} if heldout_samples else None,
            "synthetic": {"counts": plan.synthetic[0], "seed": plan.synthetic[1], "image_size": plan.synthetic[2],
                          "heldout_images": d.heldout_images, "names": plan.synthetic_names}
            if plan.synthetic is not None else None}
    dataset = write_index(out, train.tasks, plan.num_records, meta)
    shutil.rmtree(out / "plan", ignore_errors=True)  # the tasks' records: every task has its sidecar now
    if plan.name_map:
        atomic_write(out / "name_map.json", json.dumps(plan.name_map, indent=1))
    counts = -np.sort(-train.per_identity[train.per_identity > 0])
    if len(counts):
        plot_label_distribution(counts, out / "label_distribution.png", f"{Path(d.source).name}: {samples} images")
    log.info("prepared %d samples (+%d held out) in %d shards under %s; skipped %d records %s", dataset["num_samples"],
             heldout_samples, len(dataset["shards"]), out, len(skipped), summary["skipped"] or "")
    return dataset
