"""Object storage: a prepared dataset written to an S3-compatible server, trained from with
train-dist (checkpoints in the bucket too) and evaluated; interrupted uploads; preflight errors.

The server is real: moto's server mode on 127.0.0.1 (as s3fs's own tests run it), with request
signatures checked (an IAM user's key; wrong secrets are refused). Verbs run as subprocesses
with the AWS_* variables set, as a user's shell would have them.
"""
import hashlib
import json
import os
import re
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


class Server:
    """moto's server on a port of its own. Servers in one process share their buckets, so one can be
    stopped and started again (an outage) while the others, and the buckets, stay."""

    def __init__(self):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3

    server = Server()
    endpoint = server.endpoint
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


@pytest.fixture
def outage(s3, aws, monkeypatch):
    """A second server over the same buckets, for this process's fsspec (and the verbs it starts) to
    use and for the test to stop; botocore's own retries off, so that the outage reaches ours."""
    import fsspec.config

    server = Server()
    monkeypatch.setattr(fsspec.config, "conf", {"s3": {
        "endpoint_url": server.endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}}})
    monkeypatch.setenv("FSSPEC_S3", json.dumps(fsspec.config.conf["s3"]))
    yield server
    server.stop()


def _restart_after(server: Server, seconds: float):
    import threading

    thread = threading.Timer(seconds, server.start)
    thread.start()
    return thread


def test_a_read_rides_out_an_outage_from_its_byte_and_a_lasting_one_is_named(prepared, aws, outage, monkeypatch, caplog):
    import fsspec.config

    from pogdiff import storage
    from pogdiff.data.shards import read_tar
    from pogdiff.data.stream import SkipAndLog, tar_samples

    monkeypatch.setenv(storage.RETRY_TIMEOUT_ENV, "60")
    fsspec.config.conf["s3"]["default_block_size"] = 4096  # one ranged request per 4 KiB read
    shard = json.loads(aws.cat_file(f"{BUCKET}/ds/dataset.json"))["shards"][0]
    url, want = f"{DATASET}/{shard['url']}", aws.cat_file(f"{BUCKET}/ds/{shard['url']}")
    assert len(want) > 4 * 4096
    reader = storage.RetryingReader(url)
    got = reader.read(4096) + reader.read(4096)
    outage.stop()
    restarted = _restart_after(outage, 3)
    with caplog.at_level("WARNING", logger="pogdiff.storage"):
        while chunk := reader.read(4096):
            got += chunk
    restarted.join()
    reader.close()
    assert got == want  # reopened at byte 8192, nothing lost or repeated
    assert any(f"{url}: read at byte 8192 failed" in r.getMessage() for r in caplog.records), caplog.text
    with storage.open_read(url) as f:  # what the training reader opens: the samples intact
        assert len({m["fname"].split(".")[0] for m in read_tar(f, url)}) == shard["samples"]

    monkeypatch.setenv(storage.RETRY_TIMEOUT_ENV, "2")
    outage.stop()
    try:
        with pytest.raises(storage.StorageUnavailable, match=f"{url}: open kept failing for 2 s .*storage.retry_timeout"):
            storage.open_read(url)
        fs, path = storage.filesystem(DATASET)
        with pytest.raises(storage.StorageUnavailable, match=f"{DATASET}: cat_file kept failing"):
            fs.cat_file(f"{path}/dataset.json")
        handler = SkipAndLog(max_consecutive=100)  # the training reader stops: no sample is skipped for an outage
        with pytest.raises(storage.StorageUnavailable):
            list(tar_samples(iter([url]), handler, {url: shard["samples"]}))
        assert handler.skipped == 0
    finally:
        outage.start()


def _steps_logged(metrics: Path) -> int:
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return max((json.loads(line).get("step", 0) for line in lines), default=0)


@pytest.mark.slow
def test_training_rides_out_an_outage_and_stops_in_one_line_when_it_lasts(s3, prepared, outage, tmp_path):
    """`pogdiff train` streaming its shards from the bucket (through a DataLoader worker) while the
    server is stopped: for a few seconds, the run goes on and skips nothing; for good, it stops
    within storage.retry_timeout with one line naming the URI, and the rerun resumes."""
    import time

    env = {**os.environ, **s3.env, "OMP_NUM_THREADS": "1", "AWS_ENDPOINT_URL": outage.endpoint,
           "FSSPEC_S3": os.environ["FSSPEC_S3"]}

    def train(name: str, timeout: float) -> subprocess.Popen:
        args = [f"output_dir={tmp_path / 'runs'}", *SMALL, f"run_name={name}", f"data.source={DATASET}",
                "method.name=vanilla", "train.steps=24", "train.log_every=1", "train.checkpoint_every=2",
                "data.dataloader_num_workers=1", "train.batch_size=4", f"storage.retry_timeout={timeout}"]
        return subprocess.Popen([sys.executable, "-m", "pogdiff.cli", "train", "configs/demo.yaml", *args], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop_after_step(proc: subprocess.Popen, name: str, step: int) -> Path:
        metrics = next(iter((tmp_path / "runs" / name).glob("*/metrics.jsonl")), None)
        while metrics is None or _steps_logged(metrics) < step:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
            metrics = next(iter((tmp_path / "runs" / name).glob("*/metrics.jsonl")), None)
        outage.stop()
        return metrics

    proc = train("brief", timeout=120)
    metrics = stop_after_step(proc, "brief", 3)
    time.sleep(8)
    outage.start()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.splitlines()[-1])["steps"] == 24
    log = (tmp_path / "runs" / "brief" / "pogdiff.log").read_text()
    assert f"{DATASET}/shards/" in log and "retrying in" in log  # the outage was met, and ridden out
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert records[-1]["step"] == 24 and records[-1]["data/skipped"] == 0  # a running total

    proc = train("lasting", timeout=5)
    stop_after_step(proc, "lasting", 4)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        outage.start()
    assert proc.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert f"{DATASET}/shards/" in last and "storage.retry_timeout" in last and "run the same command again" in last
    assert "Traceback" not in err
    resumed = train("lasting", timeout=120)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    log = (tmp_path / "runs" / "lasting" / "pogdiff.log").read_text()
    assert "Traceback" in log  # the first attempt's, kept in the run's log
    resumed_at = re.search(r"resumed from .* at step (\d+)", log)
    assert resumed_at and int(resumed_at.group(1)) >= 4, log[-2000:]  # from the checkpoint before the outage


def test_an_upload_rides_out_an_outage_and_one_that_lasts_leaves_no_dataset(prepared, aws, outage, tmp_path, monkeypatch):
    """prepare's last stage, the upload, with the server stopped: for a few seconds it completes;
    for good, it stops naming the URI, the prefix is not a dataset, and the rerun completes it."""
    from pogdiff import storage
    from pogdiff.data.dataset import Dataset

    local = tmp_path / "local"
    aws.get(f"{BUCKET}/ds", str(local), recursive=True)
    monkeypatch.setenv(storage.RETRY_TIMEOUT_ENV, "60")
    outage.stop()
    restarted = _restart_after(outage, 3)
    storage.upload_dataset(local, f"s3://{BUCKET}/brief")
    restarted.join()
    assert aws.cat_file(f"{BUCKET}/brief/dataset.json") == (local / "dataset.json").read_bytes()

    monkeypatch.setenv(storage.RETRY_TIMEOUT_ENV, "2")
    outage.stop()
    try:
        with pytest.raises(storage.StorageUnavailable, match=f"s3://{BUCKET}/lasting/plan.json: cat_file kept failing"):
            storage.upload_dataset(local, f"s3://{BUCKET}/lasting")
    finally:
        outage.start()
    assert not aws.exists(f"{BUCKET}/lasting/dataset.json")
    storage.upload_dataset(local, f"s3://{BUCKET}/lasting")
    monkeypatch.setenv("POGDIFF_CACHE", str(tmp_path / "cache"))
    assert len(Dataset.at(f"s3://{BUCKET}/lasting")) == prepared["samples"]


def test_the_ray_job_entrypoint_checks_storage_before_any_work(s3, tmp_path, monkeypatch, capsys):
    """`ray job submit -- python -m pogdiff.dist.ray_driver ...` preflights its URIs as the CLI does."""
    import fsspec.config

    from pogdiff.dist.ray_driver import main

    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FSSPEC_S3", "{}")
    monkeypatch.setattr(fsspec.config, "conf", {})
    monkeypatch.chdir(REPO)
    uri = "s3://no-such-bucket/ray"
    assert main(["configs/demo.yaml", f"output_dir={tmp_path / 'runs'}", *SMALL, f"dist.storage_path={uri}"]) == 2
    err = capsys.readouterr().err
    assert f"'{uri}'" in err and "the bucket 'no-such-bucket' does not exist" in err, err
    assert not (tmp_path / "runs").exists()


def test_checkpoints_in_the_bucket_guard_a_resume_and_are_pruned_and_cleared(aws, tmp_path):
    """train-dist's resume guard, pruning and train.resume=never see a dist.storage_path in a bucket
    as they see a local one (they used to see no checkpoints there)."""
    import dataclasses

    from pogdiff.config import ConfigError
    from pogdiff.dist.cluster import ray_run_name, remove_checkpoints, run_checkpoints
    from pogdiff.runs import check_resume, load_run_config

    cfg = load_run_config(REPO / "configs/demo.yaml", [f"output_dir={tmp_path}", *SMALL,
                                                       f"dist.storage_path=s3://{BUCKET}/guard"])
    prefix = f"{BUCKET}/guard/{ray_run_name(cfg)}"
    assert run_checkpoints(cfg) == [] and not check_resume(cfg, run_checkpoints(cfg))
    for step in (1, 2, 3):
        aws.pipe_file(f"{prefix}/step_{step:08d}/state.json", b"{}")
    aws.pipe_file(f"{prefix}/checkpoint_manager_snapshot.json", b"{}")  # Ray's own run state
    assert [Path(p).name for p in run_checkpoints(cfg)] == ["step_00000001", "step_00000002", "step_00000003"]
    assert check_resume(cfg, run_checkpoints(cfg))
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=cfg.train.lr * 2))
    with pytest.raises(ConfigError, match="train.lr"):
        check_resume(other, run_checkpoints(other))
    remove_checkpoints(cfg, keep=2)
    assert [Path(p).name for p in run_checkpoints(cfg)] == ["step_00000002", "step_00000003"]
    assert aws.exists(f"{prefix}/checkpoint_manager_snapshot.json")
    remove_checkpoints(cfg)  # train.resume=never: the run starts afresh, Ray's state included
    assert not aws.exists(prefix) and not aws.find(prefix)


def test_one_writer_per_dataset_prefix_and_per_run_in_the_bucket(s3, aws, tmp_path):
    """The lease in object storage: created with a conditional PUT (If-None-Match), so a second
    prepare into the prefix, or a train-dist of the same run name with checkpoints in the bucket,
    exits 2 naming the holder, from any machine; a stale one is taken over."""
    import json as json_

    from pogdiff.runs import LeaseHeld, run_lease

    uri = f"s3://{BUCKET}/held"
    with run_lease(uri, 300, "holder", name=".lease.json") as mine:
        assert json_.loads(aws.cat_file(f"{BUCKET}/held/.lease.json"))["token"] == mine["token"]
        with pytest.raises(LeaseHeld, match=f"held by holder of process {os.getpid()}"):
            with run_lease(uri, 300, "second", name=".lease.json"):
                pass
        proc = pogdiff(s3, "prepare", "configs/demo.yaml", f"output_dir={tmp_path / 'runs'}", *SMALL,
                       f"prepare.output={uri}")
        assert proc.returncode == 2 and f"{uri} is held by holder of process {os.getpid()}" in proc.stderr, proc.stderr
        assert "another prepare.output" in proc.stderr and "Traceback" not in proc.stderr
        assert aws.find(f"{BUCKET}/held") == [f"{BUCKET}/held/.lease.json"]  # nothing written
    assert not aws.exists(f"{BUCKET}/held/.lease.json")  # released

    aws.pipe_file(f"{BUCKET}/held/.lease.json", json_.dumps({"host": "node-7", "pid": 1, "renewed": 0}).encode())
    with run_lease(uri, 60, "taker", name=".lease.json") as mine:  # not renewed within the timeout
        assert json_.loads(aws.cat_file(f"{BUCKET}/held/.lease.json"))["token"] == mine["token"]
    assert not aws.exists(f"{BUCKET}/held/.lease.json")


@pytest.mark.slow
def test_train_dist_with_checkpoints_in_the_bucket_holds_the_run_there(s3, prepared, aws, tmp_path):
    from pogdiff.dist.cluster import ray_run_name
    from pogdiff.runs import load_run_config, run_lease

    storage = f"s3://{BUCKET}/ray-held"
    run = [f"output_dir={tmp_path / 'elsewhere'}", *SMALL, f"dist.storage_path={storage}", "dist.num_workers=1"]
    name = ray_run_name(load_run_config(REPO / "configs/demo.yaml", run))
    with run_lease(storage, 300, "another machine's train-dist", name=f"{name}.lease.json"):
        proc = pogdiff(s3, "train-dist", "configs/demo.yaml", *run)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{storage} is held by another machine's train-dist of process {os.getpid()}" in proc.stderr, proc.stderr


def test_only_transient_storage_errors_are_retried(monkeypatch):
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    from pogdiff.storage import RETRY_TIMEOUT_ENV, StorageUnavailable, retried

    calls: list[int] = []

    def fail(exc: Exception):
        calls.append(1)
        raise exc

    for exc in (FileNotFoundError("gone"), PermissionError("denied"), NoCredentialsError(), FileExistsError("there")):
        calls.clear()
        with pytest.raises(type(exc)):
            retried(lambda: fail(exc), "s3://b/k", "get")
        assert len(calls) == 1, exc
    monkeypatch.setenv(RETRY_TIMEOUT_ENV, "1.2")
    calls.clear()
    with pytest.raises(StorageUnavailable, match=r"s3://b/k: get kept failing for 1.2 s .*EndpointConnectionError"):
        retried(lambda: fail(EndpointConnectionError(endpoint_url="http://127.0.0.1:1")), "s3://b/k", "get")
    assert len(calls) >= 2
