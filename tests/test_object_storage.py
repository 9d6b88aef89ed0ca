"""Object storage: a prepared dataset written to an S3-compatible server, trained from with
train-dist (checkpoints in the bucket too) and evaluated; interrupted uploads; preflight errors.

The server is real: moto's server mode on 127.0.0.1 (as s3fs's own tests run it), with request
signatures checked (an IAM user's key; wrong secrets are refused). Verbs run as subprocesses
with the AWS_* variables set, as a user's shell would have them.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
BUCKET = "pogdiff"
DATASET = f"s3://{BUCKET}/ds"
SMALL = ["run_name=s3", "model.name=tiny-base", "data.profile=custom", "data.majority_ids=2", "data.minority_ids=3",
         "data.majority_images=12", "data.heldout_images=2", "prepare.samples_per_shard=10", "prepare.backend=serial",
         f"prepare.output={DATASET}"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _moto_auth(endpoint: str, count: str) -> None:
    """moto checks signatures after ``count`` more requests ("0": from now on; "inf": never)."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request).read()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    iam.create_user(UserName="pogdiff")
    iam.put_user_policy(UserName="pogdiff", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="pogdiff")["AccessKey"]
    _moto_auth(endpoint, "0")
    work = tmp_path_factory.mktemp("s3")
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
           "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": str(work / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(work / "no-aws-credentials"),
           "POGDIFF_CACHE": str(work / "cache")}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                 aws_secret_access_key=key["SecretAccessKey"]).create_bucket(Bucket=BUCKET)
    yield SimpleNamespace(endpoint=endpoint, env=env, work=work)
    _moto_auth(endpoint, "inf")
    server.stop()


@pytest.fixture
def aws(s3, monkeypatch):
    """This process with the server's endpoint and credentials (s3fs instances made here are dropped after)."""
    import s3fs

    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    s3fs.S3FileSystem.clear_instance_cache()


def pogdiff(s3, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **s3.env, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pogdiff.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def _summary(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def prepared(s3):
    return _summary(pogdiff(s3, "prepare", "configs/demo.yaml", f"output_dir={s3.work / 'runs'}", *SMALL))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_prepare_writes_a_verified_dataset_to_the_bucket_and_a_rerun_finds_it_complete(s3, prepared, aws):
    assert prepared["output"] == DATASET and prepared["samples"] == 2 * 12 + 3 * 2
    meta = json.loads(aws.cat_file(f"{BUCKET}/ds/dataset.json"))
    assert meta["num_samples"] == prepared["samples"] and len(meta["shards"]) == prepared["shards"] == 3
    for shard in meta["shards"]:  # every shard uploaded whole: its bytes hash to what the writer recorded
        assert _sha256(aws.cat_file(f"{BUCKET}/ds/{shard['url']}")) == shard["sha256"]
    listing = json.loads(aws.cat_file(f"{BUCKET}/ds/files.json"))
    assert {"index.jsonl", "tokens.npy", "row_of_ordinal.npy", "heldout/dataset.json", "heldout/tokens.npy"} <= set(listing)
    assert not any("shards/" in rel for rel in listing)  # shards are streamed, never cached
    assert all(_sha256(aws.cat_file(f"{BUCKET}/ds/{rel}")) == f["sha256"] for rel, f in listing.items())
    assert not list((s3.work / "runs" / "datasets").glob("*")), "the local staging folder is removed after the upload"

    from pogdiff.data.prepare import PrepareError, prepare
    from pogdiff.runs import load_run_config

    stamp = aws.info(f"{BUCKET}/ds/dataset.json")["LastModified"]
    config = lambda *extra: load_run_config(REPO / "configs/demo.yaml", [f"output_dir={s3.work / 'runs'}", *SMALL, *extra])  # noqa: E731
    assert prepare(config(), progress=False) == meta  # complete in the bucket: nothing redone
    assert aws.info(f"{BUCKET}/ds/dataset.json")["LastModified"] == stamp
    with pytest.raises(PrepareError, match=f"'{DATASET}' holds another prepared dataset"):
        prepare(config("data.seed=1"), progress=False)


class Interrupted(Exception):
    pass


class RecordingFS:
    """The real s3fs client, recording the objects it writes; fails after ``fail_after`` of them."""

    def __init__(self, fs, written: list, fail_after: int | None):
        self.fs, self.written, self.fail_after = fs, written, fail_after

    def _write(self, name: str, path: str, *args):
        if self.fail_after is not None and len(self.written) == self.fail_after:
            raise Interrupted(path)
        getattr(self.fs, name)(*args)
        self.written.append(path.split("/copy/", 1)[1])

    def put_file(self, local, path):
        self._write("put_file", path, local, path)

    def pipe_file(self, path, data):
        self._write("pipe_file", path, path, data)

    def __getattr__(self, name):
        return getattr(self.fs, name)


def test_an_interrupted_upload_is_never_a_dataset_and_a_rerun_completes_it(prepared, aws, tmp_path, monkeypatch):
    from pogdiff import storage
    from pogdiff.data.dataset import Dataset
    from pogdiff.data.shards import DatasetIndex
    from pogdiff.data.stream import make_train_loader

    local = tmp_path / "local"
    aws.get(f"{BUCKET}/ds", str(local), recursive=True)
    uri = f"s3://{BUCKET}/copy"
    real = storage.filesystem
    writes: list[list[str]] = [[], []]

    def recording(attempt: int, fail_after: int | None):
        def filesystem(u, **kw):
            fs, path = real(u, **kw)
            return RecordingFS(fs, writes[attempt], fail_after), path
        return filesystem

    monkeypatch.setattr(storage, "filesystem", recording(0, 6))
    with pytest.raises(Interrupted):
        storage.upload_dataset(local, uri)
    assert len(writes[0]) == 6 and not aws.exists(f"{BUCKET}/copy/dataset.json")
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        Dataset.at(uri)

    monkeypatch.setattr(storage, "filesystem", recording(1, None))
    storage.upload_dataset(local, uri)
    order = writes[1]
    assert order[0] == "plan.json" and order[-3:] == ["heldout/dataset.json", "files.json", "dataset.json"]
    in_shards = ["shards/" in rel for rel in order[1:-3]]
    assert any(in_shards) and in_shards == sorted(in_shards, reverse=True)  # the shards, then the index
    shards_before = {r for r in writes[0] if "shards/" in r and r.endswith(".tar")}
    assert shards_before and not shards_before & set(order)  # shards already in the bucket were kept

    monkeypatch.setattr(storage, "filesystem", real)
    ds = Dataset.at(uri)
    assert ds.uri == uri and all(url.startswith(f"{uri}/shards/") for url in ds.index.shard_urls)
    assert not list(ds.root.rglob("*.tar"))
    streamed = [(row, ident, _sha256(png)) for row, ident, png in ds.index.images()]
    reference = [(row, ident, _sha256(png)) for row, ident, png in DatasetIndex.load(local).images()]
    assert streamed == reference and len(streamed) == prepared["samples"]
    # the training reader: one exact pass over the bucket's shards from two DataLoader worker processes
    loader = make_train_loader(ds.root, batch_size=4, rank=0, world_size=1, num_workers=2, resampled=False,
                               shuffle_buffer=1)
    assert sorted(int(row) for batch in loader for row in batch["index"]) == list(range(len(ds)))
    assert Dataset.at(uri).root == ds.root and (ds.root / "dataset.json").stat().st_mtime_ns == \
        (Dataset.at(uri).root / "dataset.json").stat().st_mtime_ns  # cached once


def test_a_changed_object_fails_the_cached_copy(prepared, aws, tmp_path, monkeypatch):
    from pogdiff.data.dataset import Dataset

    monkeypatch.setenv("POGDIFF_CACHE", str(tmp_path / "cache"))
    aws.copy(f"{BUCKET}/ds", f"{BUCKET}/tampered", recursive=True)
    index = aws.cat_file(f"{BUCKET}/tampered/index.jsonl")
    aws.pipe_file(f"{BUCKET}/tampered/index.jsonl", index[:-2] + bytes([index[-2] ^ 1]) + index[-1:])  # same size
    with pytest.raises(OSError, match="index.jsonl"):
        Dataset.at(f"s3://{BUCKET}/tampered")
    assert not list((tmp_path / "cache").glob("*/dataset.json"))


@pytest.mark.slow
def test_train_dist_and_eval_from_the_bucket(s3, prepared, aws):
    """train-dist streams the shards from the bucket and checkpoints into it; eval reads the real
    images from the bucket."""
    run = [f"output_dir={s3.work / 'runs'}", *SMALL, f"dist.storage_path=s3://{BUCKET}/ray", "dist.num_workers=1",
           "train.steps=2", "train.checkpoint_every=1", "density.epochs=20", "train.log_every=1",
           "sample.steps=2", "sample.images_per_id=2", "sample.batch_size=8", "eval.recognizer_ids=10",
           "eval.recognizer_images_per_id=4", "eval.recognizer_steps=20"]
    trained = _summary(pogdiff(s3, "train-dist", "configs/demo.yaml", *run))
    assert trained["steps"] == 2
    checkpoints = aws.ls(f"{BUCKET}/ray/{trained['run']}")
    assert any(Path(c).name == "step_00000002" for c in checkpoints), checkpoints
    assert aws.glob(f"{BUCKET}/ds/artifacts/psi-*.json")  # published for other nodes' workers
    assert not list((s3.work / "cache").rglob("*.tar"))  # shards were streamed, not copied

    scored = _summary(pogdiff(s3, "eval", "configs/demo.yaml", *run))
    metrics = json.loads(Path(scored["metrics"]).read_text())
    assert metrics["dataset"].startswith(str(s3.work / "cache"))
    assert sorted(metrics["per_id"]["grecall"]) == [str(i) for i in range(5)]


@pytest.mark.parametrize("case", ["credentials", "bucket", "endpoint", "not prepared"])
def test_unusable_storage_exits_2_naming_the_uri_before_any_work(s3, case, tmp_path, monkeypatch, capsys):
    import fsspec.config

    from pogdiff.cli import main

    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FSSPEC_S3", "{}")  # undone after the test, with whatever the verb put there
    monkeypatch.setattr(fsspec.config, "conf", {})  # storage.options stay in this test
    work = tmp_path / "runs"
    args = ["train-dist", "configs/demo.yaml", f"output_dir={work}", *SMALL]
    if case == "credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        uri, want = DATASET, "access denied"
    elif case == "bucket":
        uri, want = "s3://no-such-bucket/ray", "the bucket 'no-such-bucket' does not exist"
        args.append(f"dist.storage_path={uri}")
    elif case == "endpoint":
        uri, want = DATASET, "cannot reach the storage"
        args.append(f"storage.options.s3.endpoint_url=http://127.0.0.1:{_free_port()}")
    else:
        uri, want = f"s3://{BUCKET}/nothing-here", "is not a prepared dataset"
        args.append(f"data.source={uri}")
    with monkeypatch.context() as m:
        m.chdir(REPO)
        assert main(args) == 2
    err = capsys.readouterr().err
    assert f"'{uri}'" in err and want in err, err
    assert not work.exists()  # nothing started: not even the run's log folder
