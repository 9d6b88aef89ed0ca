"""Object storage through fsspec: ``s3://`` (s3fs), ``gs://`` (gcsfs) or any other fsspec URL in
``prepare.output``, ``data.source`` (a prepared dataset) and ``dist.storage_path``.

    check_storage(cfg)              preflight: every URI of the config reachable, else ConfigError (exit 2)
    upload_dataset(local, uri)      a prepared directory into the bucket, dataset.json last
    local_copy(uri)                 its memory-mapped files on this node (verified, once); shards stay remote
    open_read(url)                  a shard, streamed (ranged reads, never downloaded whole)

Endpoint and credentials come from the standard places: the AWS_* environment variables and
~/.aws for S3, Google's application default credentials for GCS, fsspec's own config files. The
config's ``storage.options`` (fsspec storage options per protocol) override them: ``configure``
puts them into fsspec's config of this process and into its environment (``FSSPEC_<PROTOCOL>``,
which fsspec reads when it is imported), so processes started from here (DataLoader workers, an
embedded Ray cluster) open URLs the same way. Nodes of an existing cluster need their own setup.

A prepared dataset in a bucket. Memory-mapped files cannot be mapped from a bucket, so everything
but the shards (dataset.json, index.jsonl, the .npy columns, the tiny frozen model, the held-out
split's index, the artifacts) is copied to a node-local cache, ``$POGDIFF_CACHE`` (default
``~/.cache/pogdiff``) ``/<sha256 of the URI>/``, once per version of the dataset and checked
against ``files.json`` (size and sha256 of each file, written at upload). The cached copy's
``remote.json`` names the URI its shards are read from (``shard_root``).

Outages. Every operation on a bucket (through ``filesystem`` or ``open_read``) that fails for a
reason other than the object's own state (missing, access denied) is retried with exponential
backoff (tenacity) for ``storage.retry_timeout`` seconds; a shard being read is reopened at the byte
it had reached. Past that, ``StorageUnavailable`` (an OSError: one line naming the URI, exit 1)
ends the verb, never a skipped sample or a partial object taken as complete; a rerun continues.

S3 has no atomic rename, so completion is marked by writing last: ``plan.json`` first (a prefix
holding another plan's objects is refused), then the shards and the rest, then ``files.json``, then
``dataset.json``. A prefix without dataset.json is never taken as a dataset; a rerun of the upload
keeps the shards already there (same name and size: shards are byte-for-byte reproducible).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator, Optional

from pogdiff.config import ConfigError
from pogdiff.runs import atomic_path, file_sha256, is_uri

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from pogdiff.config import Config

log = logging.getLogger("pogdiff.storage")

MARKER, LISTING, PLAN, REMOTE = "dataset.json", "files.json", "plan.json", "remote.json"
SHARDS, ARTIFACTS = "shards", "artifacts"
# The FAISS service's indexes (artifacts/faiss) are built where the service runs; nothing else reads them.
NOT_SYNCED = {"faiss"}
# Fail fast while probing (the default retries an unreachable S3 endpoint for ~11 s); user options win.
PROBE_OPTIONS = {"s3": {"config_kwargs": {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 2}}}}
CREDENTIALS = {"s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws/credentials or storage.options.s3.key/secret",
               "gs": "GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login` or storage.options.gs.token"}
ENDPOINT = {"s3": "AWS_ENDPOINT_URL or storage.options.s3.endpoint_url"}


def protocol(uri: str) -> str:
    return uri.split("://", 1)[0]


# Answers about the object itself, or a mistake in the call: retrying cannot change them.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
             ValueError, TypeError, AttributeError, KeyError, NotImplementedError)


def is_permanent(e: BaseException) -> bool:
    """Not worth retrying: PERMANENT, or missing credentials (botocore's NoCredentialsError and kin,
    which s3fs passes on untranslated)."""
    return isinstance(e, PERMANENT) or "Credential" in type(e).__name__


RETRY_TIMEOUT_ENV = "POGDIFF_STORAGE_RETRY_TIMEOUT"


class StorageUnavailable(OSError):
    """Object storage did not answer within storage.retry_timeout."""


def configure(options: dict, retry_timeout: Optional[float] = None) -> None:
    """``storage.options`` ({protocol: fsspec storage options}) and ``storage.retry_timeout`` for
    every filesystem this process and the processes it starts open."""
    import fsspec.config

    for proto, kwargs in options.items():
        fsspec.config.conf.setdefault(proto, {}).update(kwargs)
        os.environ[f"FSSPEC_{proto.upper()}"] = json.dumps(fsspec.config.conf[proto])
    if retry_timeout is not None:
        os.environ[RETRY_TIMEOUT_ENV] = str(retry_timeout)


def retry_timeout() -> float:
    from pogdiff.config import StorageConfig

    return float(os.environ.get(RETRY_TIMEOUT_ENV) or StorageConfig.retry_timeout)


def retried(call, uri: str, what: str):
    """``call()``, retried with exponential backoff while it fails for a transient reason (see the
    module docstring); StorageUnavailable naming ``uri`` once the retry timeout has passed."""
    from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

    timeout = retry_timeout()

    def warn(state) -> None:
        log.warning("%s: %s failed (%s); retrying in %.1f s (storage.retry_timeout=%g)", uri, what,
                    state.outcome.exception(), state.next_action.sleep, timeout)

    retry = retry_if_exception(lambda e: not is_permanent(e))
    try:
        for attempt in Retrying(stop=stop_after_delay(timeout), wait=wait_exponential(multiplier=0.5, max=15),
                                retry=retry, before_sleep=warn, reraise=True):
            with attempt:
                return call()
    except Exception as e:  # noqa: BLE001 - a transient one was retried until the timeout
        if is_permanent(e):
            raise
        raise StorageUnavailable(f"{uri}: {what} kept failing for {timeout:g} s (storage.retry_timeout) with "
                                 f"{type(e).__name__}: {e}. Check the endpoint and the network, then run the same "
                                 "command again: it continues from what was finished") from e


class RetryingFilesystem:
    """An fsspec filesystem whose every method call goes through ``retried``."""

    def __init__(self, fs: "AbstractFileSystem", uri: str):
        self.fs, self.uri = fs, uri

    def __getattr__(self, name: str):
        method = getattr(self.fs, name)
        if not callable(method):
            return method
        return lambda *args, **kwargs: retried(lambda: method(*args, **kwargs), self.uri, name)


def filesystem(uri: str, retry: bool = True, **extra) -> tuple["AbstractFileSystem", str]:
    """(fsspec's filesystem for ``uri``, the path in it), its calls retried unless ``retry`` is
    false. No listings cache: other processes and nodes write the same prefixes."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **{"use_listings_cache": False, **extra})
    return (RetryingFilesystem(fs, uri) if retry else fs), path


def check_reachable(uri: str, key: str) -> None:
    """Raise a ConfigError naming ``key`` and ``uri`` when the storage cannot be used: credentials
    missing or wrong, no such bucket, an endpoint that does not answer. Lists the URI's prefix only."""
    import fsspec.config

    proto = protocol(uri)
    extra = dict(PROBE_OPTIONS.get(proto, {}))
    if "config_kwargs" in extra:
        extra["config_kwargs"] = {**extra["config_kwargs"], **fsspec.config.conf.get(proto, {}).get("config_kwargs", {})}
    try:
        fs, path = filesystem(uri, retry=False, skip_instance_cache=True, **extra)
        bucket = path.split("/", 1)[0]
        try:
            fs.ls(path)
        except FileNotFoundError:  # a prefix not written yet is fine; its bucket must exist
            fs.info(bucket)
    except FileNotFoundError:
        raise ConfigError(f"{key}='{uri}': the bucket '{bucket}' does not exist (create it, or correct the URI)") from None
    except Exception as e:  # noqa: BLE001 - every other failure of a listing is reported, none is expected
        what = f"{type(e).__name__}: {e}"
        if isinstance(e, PermissionError) or "Credential" in type(e).__name__:
            hint = f"access denied ({what}); check the credentials ({CREDENTIALS.get(proto, f'storage.options.{proto}')})"
        else:
            hint = (f"cannot reach the storage ({what}); check the endpoint "
                    f"({ENDPOINT.get(proto, f'storage.options.{proto}')}) and the network")
        raise ConfigError(f"{key}='{uri}': {hint}") from None


def check_storage(cfg: "Config") -> None:
    """Preflight of every URI in the config, before any work starts (the CLI runs it)."""
    from functools import reduce

    from pogdiff.config import URI_KEYS

    import fsspec

    from pogdiff.config import PROTOCOL_PACKAGES

    configure(cfg.storage.options, cfg.storage.retry_timeout)
    uris = {key: value for key in URI_KEYS if (value := reduce(getattr, key.split("."), cfg)) and is_uri(value)}
    for key, uri in uris.items():
        try:
            fsspec.get_filesystem_class(protocol(uri))
        except ImportError:
            raise ConfigError(f"{key}='{uri}': reading {protocol(uri)}:// needs "
                              f"{PROTOCOL_PACKAGES.get(protocol(uri), 'its fsspec package')}") from None
        check_reachable(uri, key)
    if "data.source" in uris and read_json(f"{uris['data.source']}/{MARKER}") is None:
        raise ConfigError(f"data.source='{uris['data.source']}' is not a prepared dataset (no {MARKER}): object storage "
                          "holds prepared datasets only; write one there with prepare.output=<that URI>")


class RetryingReader(io.RawIOBase):
    """A file in object storage read front to back through fsspec (ranged reads); a read that
    fails is retried (``retried``) on the file reopened at the byte it had reached."""

    def __init__(self, url: str):
        super().__init__()
        self.url, self.position, self.file = url, 0, None
        self.file = retried(self._open, url, "open")

    def _open(self):
        import fsspec

        file = fsspec.open(self.url, "rb").open()
        if self.position:
            file.seek(self.position)
        return file

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        def attempt() -> int:
            if self.file is None:
                self.file = self._open()
            try:
                return self.file.readinto(buffer)
            except Exception:
                self._drop()
                raise

        n = retried(attempt, self.url, f"read at byte {self.position}")
        self.position += n
        return n

    def _drop(self) -> None:
        file, self.file = self.file, None
        if file is not None:
            try:
                file.close()
            except Exception:  # noqa: BLE001 - a connection that broke may fail to close too; it is dropped
                pass

    def close(self) -> None:
        self._drop()
        super().close()


def open_read(url: str) -> BinaryIO:
    """A shard (or any file) opened for reading: URLs through fsspec, streamed with ranged reads and
    retried through outages; paths and ``pipe:`` commands through webdataset's gopen."""
    if is_uri(url):
        return io.BufferedReader(RetryingReader(url), buffer_size=1 << 20)
    import webdataset as wds

    return wds.gopen(url)


def read_json(uri: str) -> Optional[dict]:
    """A JSON object in the bucket, or None when it is not there."""
    fs, path = filesystem(uri)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _files(root: Path) -> Iterator[str]:
    """Relative paths of the finished files under ``root`` (temp files and folders are hidden)."""
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            yield rel.as_posix()


def _write_order(rel: str) -> tuple:
    """Arrays first, then weights, then JSON: the order every artifact writer follows, so the JSON
    (or, for the density, the weights) that marks an artifact complete lands after its data."""
    suffix = Path(rel).suffix
    return 0 if suffix == ".npy" else 2 if suffix == ".json" else 1, rel


def _is_shard_file(rel: str) -> bool:
    return SHARDS in Path(rel).parts[:-1]


def upload_dataset(local: Path, uri: str) -> None:
    """Copy the prepared directory ``local`` to ``uri``; see the module docstring for the order."""
    from pogdiff.data.prepare import PrepareError

    fs, path = filesystem(uri)
    local_plan, remote_plan = json.loads((local / PLAN).read_text()), read_json(f"{uri}/{PLAN}")
    if remote_plan is not None and remote_plan != local_plan:
        raise PrepareError(f"'{uri}' holds objects of a different plan (other records or settings); use another "
                           "prepare.output or delete that prefix")
    marker = (local / MARKER).read_bytes()
    there = _remote_sizes(fs, path)
    if MARKER in there and read_json(f"{uri}/{MARKER}") != json.loads(marker):
        fs.rm_file(f"{path}/{MARKER}")  # another version's marker: the prefix is incomplete until the new one lands
    files = [rel for rel in _files(local) if rel not in (MARKER, LISTING, PLAN)]
    listing = {rel: {"bytes": (local / rel).stat().st_size, "sha256": file_sha256(local / rel)}
               for rel in files if not _is_shard_file(rel) and Path(rel).parts[0] != ARTIFACTS}
    fs.put_file(str(local / PLAN), f"{path}/{PLAN}")
    ordered = sorted(files, key=lambda rel: (not _is_shard_file(rel), rel.endswith(MARKER), rel))  # heldout's marker last
    for rel in ordered:
        if not (_is_shard_file(rel) and there.get(rel) == (local / rel).stat().st_size):
            fs.put_file(str(local / rel), f"{path}/{rel}")
    fs.pipe_file(f"{path}/{LISTING}", json.dumps(listing, indent=1).encode())
    fs.pipe_file(f"{path}/{MARKER}", marker)


def upload_artifacts(local: Path, uri: str) -> None:
    """The finished artifacts under ``local`` that ``uri`` lacks (or holds at another size), markers last."""
    if not local.is_dir():
        return
    fs, path = filesystem(uri)
    there = _remote_sizes(fs, path)
    for rel in sorted(_synced(_files(local)), key=_write_order):
        if there.get(rel) != (local / rel).stat().st_size:
            fs.put_file(str(local / rel), f"{path}/{rel}")


def _remote_sizes(fs: "AbstractFileSystem", path: str) -> dict[str, int]:
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return {}
    return {info["name"][len(path) + 1:]: info["size"] for info in found.values()}


def _synced(files: Iterator[str]) -> list[str]:
    return [rel for rel in files if Path(rel).parts[0] not in NOT_SYNCED]


def cache_root() -> Path:
    return Path(os.environ.get("POGDIFF_CACHE") or "~/.cache/pogdiff").expanduser()


def local_copy(uri: str) -> Path:
    """This node's copy of the prepared dataset at ``uri`` (all but its shards); see the module
    docstring. Artifacts in the bucket that the copy lacks are fetched on every call."""
    from filelock import FileLock

    fs, path = filesystem(uri)
    try:
        marker = fs.cat_file(f"{path}/{MARKER}")
    except FileNotFoundError:
        raise FileNotFoundError(f"'{uri}' is not a prepared dataset (no {MARKER}): object storage holds prepared "
                                f"datasets only; write one there with `pogdiff prepare ... prepare.output={uri}`") from None
    target = cache_root() / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:24]
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not ((target / MARKER).is_file() and (target / MARKER).read_bytes() == marker):
            listing = json.loads(fs.cat_file(f"{path}/{LISTING}"))
            with atomic_path(target) as tmp:
                for rel, want in listing.items():
                    _fetch(fs, f"{path}/{rel}", tmp / rel, want, uri)
                (tmp / REMOTE).write_text(json.dumps({"uri": uri}))
                if (tmp / "heldout" / MARKER).is_file():
                    (tmp / "heldout" / REMOTE).write_text(json.dumps({"uri": f"{uri}/heldout"}))
                (tmp / MARKER).write_bytes(marker)
        have = {rel: (target / ARTIFACTS / rel).stat().st_size for rel in _files(target / ARTIFACTS)} \
            if (target / ARTIFACTS).is_dir() else {}
        remote = _remote_sizes(fs, f"{path}/{ARTIFACTS}")
        for rel in sorted(_synced(iter(remote)), key=_write_order):
            if have.get(rel) != remote[rel]:
                _fetch(fs, f"{path}/{ARTIFACTS}/{rel}", target / ARTIFACTS / rel, {"bytes": remote[rel]}, uri)
    return target


def _fetch(fs: "AbstractFileSystem", remote: str, local: Path, want: dict, uri: str) -> None:
    """One object to ``local`` (atomically), checked against its recorded size and sha256."""
    local.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(local) as tmp:
        fs.get_file(remote, str(tmp))
        size = tmp.stat().st_size
        if size != want["bytes"] or ("sha256" in want and file_sha256(tmp) != want["sha256"]):
            raise OSError(f"{uri}: '{remote}' is not the file its dataset recorded ({size} bytes, expected "
                          f"{want['bytes']}, or another sha256): the bucket was changed after the upload; prepare again")


def shard_root(root: str | Path) -> str:
    """Where the shards of the prepared dataset at ``root`` are read from: ``root`` itself, or for a
    cached copy of a dataset in object storage, its URI."""
    remote = Path(root) / REMOTE
    return json.loads(remote.read_text())["uri"] if remote.is_file() else str(root)
