"""The launchers on real clusters, run exactly as docs/launchers.md tells users to:

* Slurm: a two-node cluster on this machine (slurm/local_cluster.sh: munged, slurmctld,
  `slurmd -N n1`, `slurmd -N n2`), then `sbatch slurm/pogdiff_multinode.sh CONFIG overrides`.
* Ray Jobs: `ray start --head` on 127.0.0.1, then `ray job submit` with the package shipped as a
  runtime_env py_module to a cluster whose Python has no pogdiff.

Needs root the first time (apt-get install slurm-wlm munge); CI runs as root.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from pogdiff.dist.cluster import run_storage
from pogdiff.runs import RunFiles, load_run_config
from pogdiff.train.checkpoint import checkpoint_state

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DRIVER = "python -m pogdiff.dist.ray_driver"
# A small run: 32 images (one identity with 30, one with 2), a few steps, checkpoints every 2 steps.
TINY = ["data.profile=agedb-s", "model.tiny_vae_steps=0", "density.epochs=5", "train.batch_size=4", "train.log_every=1",
        "train.checkpoint_every=2"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

pytestmark = pytest.mark.timeout(900)


def base_env(**extra: str) -> dict[str, str]:
    """The environment of a user who activated the venv (sbatch passes it on to the job)."""
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0",
               DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def free_port_block(size: int) -> int:
    """A base port with ``size`` consecutive free ports (Ray needs fixed, disjoint ports per node),
    below the kernel's ephemeral range: a block inside it (once 38184) can be taken by any outgoing
    connection between this check and Ray binding it, and the head then fails to start."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) \
        if Path("/proc/sys/net/ipv4/ip_local_port_range").is_file() else 32768
    for _ in range(50):
        base = random.randrange(10000, max(10001, ephemeral_low - size))
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free block of ports")


def ray_ports_env(base: int) -> dict[str, str]:
    """pogdiff_multinode.sh's port settings inside one free block: two Ray nodes share this host."""
    return {"POGDIFF_RAY_PORT": str(base), "POGDIFF_RAY_CLIENT_PORT": str(base + 1),
            "POGDIFF_RAY_DASHBOARD_PORT": str(base + 2), "POGDIFF_RAY_AGENT_PORT": str(base + 3),
            "POGDIFF_RAY_WORKER_PORTS": f"{base + 100}-{base + 199}", "POGDIFF_RAY_NODE_PORT_STRIDE": "100"}


def run(cmd: list[str], env: dict, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


# --------------------------------------------------------------------------------------- Slurm


class SlurmCluster:
    def __init__(self, state: Path, env: dict):
        self.state, self.env = state, env
        self.jobs: list[str] = []

    def sbatch(self, logdir: Path, config: str, overrides: list[str], **env: str) -> str:
        """`sbatch slurm/pogdiff_multinode.sh CONFIG overrides` with the test's resources (2 CPUs,
        no GPUs per node) on the command line, as a user overrides the script's #SBATCH defaults."""
        out = subprocess.run(
            ["sbatch", "--parsable", "--cpus-per-task=2", "--gpus-per-node=0", "--time=15",
             f"--output={logdir}/%x-%j.out", "slurm/pogdiff_multinode.sh", config, *overrides],
            env={**self.env, **env}, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"sbatch failed: {out.stderr}"
        job = out.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], env=self.env, capture_output=True, text=True)
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait(self, job: str, timeout: float, until=None) -> dict[str, str]:
        """Poll until the job ends (or ``until(info)`` holds); fail with the job's log on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job)
            if info.get("JobState") in TERMINAL or (until is not None and until(info)):
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job} still {self.job(job).get('JobState')} after {timeout:.0f} s\n{self.log(job)}")

    def log(self, job: str) -> str:
        path = self.job(job).get("StdOut")
        return Path(path).read_text(errors="replace") if path and Path(path).is_file() else f"(no log for job {job})"

    def daemon_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:])
                         for p in sorted(self.state.glob("*.log")))


@pytest.fixture(scope="module")
def slurm():
    state = Path(tempfile.mkdtemp(prefix="pgslurm", dir="/tmp"))
    env = base_env(POGDIFF_SLURM_DIR=str(state), POGDIFF_SLURMCTLD_PORT=str(free_port_block(3)))
    start = subprocess.run(["bash", str(ROOT / "slurm/local_cluster.sh"), "start"], env=env,
                           capture_output=True, text=True, timeout=900)
    cluster = SlurmCluster(state, {**env, "SLURM_CONF": str(state / "slurm.conf")})
    try:
        assert start.returncode == 0, f"local_cluster.sh start failed:\n{start.stdout}\n{start.stderr}\n{cluster.daemon_logs()}"
        yield cluster
    finally:
        for job in cluster.jobs:  # a test that failed midway leaves no job behind
            subprocess.run(["scancel", job], env=cluster.env, capture_output=True)
        if cluster.jobs:
            cluster.wait(cluster.jobs[-1], 60)
        subprocess.run(["bash", str(ROOT / "slurm/local_cluster.sh"), "stop"], env=env, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def ray_tmp():
    # Node-local Ray session dirs: short, since Unix socket paths must stay under 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="pgr", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_slurm_invalid_config_fails_before_ray_starts(slurm, tmp_path):
    job = slurm.sbatch(tmp_path, "configs/demo.yaml", ["train.stepz=3"])
    info = slurm.wait(job, 120)
    log = slurm.log(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    assert "unknown config key 'train.stepz'; did you mean 'train.steps'?" in log
    assert "nothing was started" in log
    assert "ray start" not in log and "Ray head" not in log

    job = slurm.sbatch(tmp_path, "configs/missing.yaml", [])
    info = slurm.wait(job, 120)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and "config file 'configs/missing.yaml' does not exist" in slurm.log(job)


def test_slurm_refuses_ray_without_token_auth(slurm, tmp_path):
    job = slurm.sbatch(tmp_path, "configs/demo.yaml", [], RAY_AUTH_MODE="disabled")
    info = slurm.wait(job, 120)
    log = slurm.log(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    assert "without token authentication" in log and "POGDIFF_ALLOW_NO_AUTH=1" in log and "ray start" not in log


# pogdiff_multinode.sh --print-derived: the derivation alone, for SLURM_* variables set by hand.
# (SLURM_* variables, overrides) -> exit code and the line the script logs.
DERIVED = [
    ({"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"}, [],
     0, "derived: dist.use_gpu=true dist.num_workers=16 (2 nodes x 8 GPUs)"),
    ({"SLURM_NNODES": "4", "SLURM_GPUS_PER_NODE": "h100:4"}, [],
     0, "derived: dist.use_gpu=true dist.num_workers=16 (4 nodes x 4 GPUs)"),
    ({"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7"}, ["dist.num_workers=4"],
     0, "derived: dist.use_gpu=true (2 nodes x 8 GPUs; given: dist.num_workers=4)"),
    ({"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "32"}, ["dist.use_gpu=false", "dist.cpus_per_worker=4"],
     0, "derived: dist.num_workers=16 (2 nodes x 32 CPUs, dist.cpus_per_worker=4; given: dist.use_gpu=false)"),
    ({"SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "2"}, ["dist.cpus_per_worker=4"],
     2, "no worker fits the allocation (2 nodes x 2 CPUs, dist.cpus_per_worker=4, dist.use_gpu=false)"),
]


@pytest.mark.parametrize("slurm_vars, overrides, rc, line", DERIVED)
def test_slurm_script_derives_workers_from_the_allocation(slurm_vars, overrides, rc, line):
    env = {k: v for k, v in base_env().items() if not k.startswith("SLURM_")} | slurm_vars
    out = run(["bash", "slurm/pogdiff_multinode.sh", "--print-derived", "configs/demo.yaml", *overrides], env)
    assert out.returncode == rc and line in out.stdout + out.stderr, out.stdout + out.stderr


@pytest.mark.parametrize("verb, driver", [([], "train-dist (python -m pogdiff.dist.ray_driver)"),
                                          (["prepare"], "prepare (python -m pogdiff.cli prepare)"),
                                          (["eval"], "eval (python -m pogdiff.cli eval)")])
def test_slurm_script_runs_any_verb(verb, driver):
    env = {k: v for k, v in base_env().items() if not k.startswith("SLURM_")} | {"SLURM_JOB_NUM_NODES": "2"}
    out = run(["bash", "slurm/pogdiff_multinode.sh", "--print-derived", *verb, "configs/demo.yaml"], env)
    assert out.returncode == 0 and f"verb: {driver}" in out.stdout, out.stdout + out.stderr


def test_slurm_script_starts_ray_with_pogdiffs_ray_settings():
    """The Slurm script's cluster gets the embedded cluster's Ray settings, unless the job's
    environment sets them."""
    from pogdiff.dist.cluster import RAY_NODE_ENV

    script = (ROOT / "slurm/pogdiff_multinode.sh").read_text()
    for key, value in RAY_NODE_ENV.items():
        assert f"export {key}=${{{key}:-{value}}}" in script, key


def test_slurm_derived_workers_reach_the_config_check_and_the_driver(slurm, tmp_path, ray_tmp):
    """On the CPU-only test cluster (2 nodes, --cpus-per-task=2, demo's dist.cpus_per_worker=1) the
    script derives 4 CPU workers, and passes them to the config check and to the driver, here a
    stub that prints its arguments; dist.num_workers on the command line wins."""
    cases = [([], "derived: dist.use_gpu=false dist.num_workers=4 (2 nodes x 2 CPUs, dist.cpus_per_worker=1)",
              ["dist.use_gpu=false", "dist.num_workers=4"], 4),
             (["dist.num_workers=1"], "derived: dist.use_gpu=false (2 nodes x 2 CPUs; given: dist.num_workers=1)",
              ["dist.num_workers=1", "dist.use_gpu=false"], 1)]
    for overrides, derived, driver_args, workers in cases:
        job = slurm.sbatch(tmp_path, "configs/demo.yaml", overrides, POGDIFF_DRIVER=r"printf driver-arg:%s\n",
                           POGDIFF_RAY_TMPDIR=str(ray_tmp), **ray_ports_env(free_port_block(300)))
        info = slurm.wait(job, 300)
        log = slurm.log(job)
        assert info["JobState"] == "COMPLETED", f"{log}\n{slurm.daemon_logs()}"
        assert info["OverSubscribe"] == "NO", info  # the header's --exclusive (and --mem=0) were accepted
        assert derived in log, log
        assert f"\n  num_workers: {workers}\n  use_gpu: false\n" in log, log  # the config check's resolved config
        args = [line.removeprefix("driver-arg:") for line in log.splitlines() if line.startswith("driver-arg:")]
        assert args == ["configs/demo.yaml", *driver_args], log


def test_slurm_job_fails_at_once_when_the_ray_head_cannot_start(slurm, tmp_path, ray_tmp):
    """The head's GCS port is taken, so `ray start --head` exits. Its srun then stays a zombie
    child of the batch script, which kill(pid, 0) took for alive: the job sat RUNNING until the
    join timeout. It must fail as soon as the head is gone, long before that timeout (600 s here)."""
    base = free_port_block(300)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", base))
        taken.listen()
        start = time.monotonic()
        job = slurm.sbatch(tmp_path, "configs/demo.yaml", [], POGDIFF_DRIVER="true", POGDIFF_RAY_JOIN_TIMEOUT="600",
                           POGDIFF_RAY_TMPDIR=str(ray_tmp), **ray_ports_env(base))
        info = slurm.wait(job, 240)
    log = slurm.log(job)
    assert info["JobState"] == "FAILED", f"{log}\n{slurm.daemon_logs()}"
    assert "the Ray head exited before the cluster formed" in log, log
    assert "running: true" not in log, log  # the driver never started
    assert time.monotonic() - start < 240


def ray_checkpoints(cfg) -> list[Path]:
    """The driver's complete checkpoints (every rank's optimizer shard present), oldest first."""
    done = []
    for path in sorted(run_storage(cfg).glob("step_*")):
        try:
            checkpoint_state(path)
            done.append(path)
        except (FileNotFoundError, ValueError):
            pass  # being written
    return done


def kill_raylet(ray_tmp: Path, node: int) -> int:
    """SIGKILL the raylet of Ray node ``node`` of the job (its session dir is ray_tmp/n<node>)."""
    marker = f"{ray_tmp}/n{node}/"
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and cmd[0].endswith("/raylet") and any(marker in arg for arg in cmd):
            proc.kill()
            return proc.pid
    raise AssertionError(f"no raylet of node {node} under {ray_tmp}")


@pytest.mark.slow
def test_slurm_two_nodes_train_and_survive_worker_node_loss(slurm, tmp_path, ray_tmp):
    """Two Ray nodes join, one DeepSpeed worker per node (2 CPUs each, 2 CPUs per node); the
    worker node's raylet is killed after the first checkpoint: the script restarts that node's Ray,
    Ray Train restarts the worker group from the latest checkpoint, and the job completes."""
    steps = 30
    overrides = [f"output_dir={tmp_path / 'runs'}", f"train.steps={steps}", "dist.cpus_per_worker=2", *TINY]
    cfg = load_run_config(ROOT / "configs/demo.yaml", overrides)
    job = slurm.sbatch(tmp_path, "configs/demo.yaml", overrides,
                       POGDIFF_RAY_TMPDIR=str(ray_tmp), **ray_ports_env(free_port_block(300)))
    info = slurm.wait(job, 420, until=lambda info: info.get("JobState") == "RUNNING" and ray_checkpoints(cfg))
    assert info["JobState"] == "RUNNING", f"the job ended before its first checkpoint\n{slurm.log(job)}"
    killed_at = checkpoint_state(ray_checkpoints(cfg)[-1])["step"]
    kill_raylet(ray_tmp, 1)

    info = slurm.wait(job, 420)
    log = slurm.log(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{log}\n{slurm.daemon_logs()}"
    assert info["NodeList"] == "n[1-2]"
    assert re.search(r"all 2 Ray nodes joined: .*'CPU': 4\.0", log), log
    assert "Ray on n2 exited" in log and "restarting it (1/3)" in log, log
    for node in (0, 1):  # each node's raylet ran a training worker (its logs are in that node's session dir)
        assert any("RayTrainWorker" in p.read_text(errors="replace") for p in ray_tmp.glob(f"n{node}/session_*/logs/worker-*.out")), \
            f"no Ray Train worker ran on Ray node {node}"
    ranks = [json.loads((RunFiles(cfg).method / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:  # the last worker group resumed from a checkpoint at or after the kill, not from 0
        assert rank["world_size"] == 2 and rank["steps"] == steps and rank["start_step"] >= killed_at, (ranks, log)
    assert ranks[0]["module_sha256"] == ranks[1]["module_sha256"]
    assert checkpoint_state(ray_checkpoints(cfg)[-1])["step"] == steps
    assert "Ray cluster stopped" in log


# ------------------------------------------------------------------------------------ Ray Jobs


@pytest.fixture
def ray_head(tmp_path, ray_tmp):
    """`ray start --head` on 127.0.0.1 with the job server, non-default ports and token auth, in a
    Python environment without pogdiff: a stub package that refuses to import shadows the venv's
    install, so only a copy shipped with the job can satisfy `import pogdiff`."""
    stub = tmp_path / "no_pogdiff" / "pogdiff"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('this Ray cluster has no pogdiff: ship it with the job')\n")
    base = free_port_block(200)
    # No drain on SIGTERM (Ray waits up to 30 s for draining by default): the teardown stops it.
    env = base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(32).hex(), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    log = tmp_path / "ray_head.log"
    head = subprocess.Popen(
        ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={base}", f"--ray-client-server-port={base + 1}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={base + 2}",
         f"--dashboard-agent-listen-port={base + 3}", f"--min-worker-port={base + 100}", f"--max-worker-port={base + 199}",
         "--num-cpus=2", "--num-gpus=0", f"--temp-dir={ray_tmp}", "--disable-usage-stats", "--block"],
        env={**env, "PYTHONPATH": str(stub.parent)}, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{base + 2}"
    try:
        deadline = time.monotonic() + 120
        while run(["ray", "job", "list", "--address", address], env).returncode != 0:
            assert head.poll() is None, f"ray start --head exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the job server did not come up:\n{log.read_text()}"
            time.sleep(2)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


@pytest.mark.slow
def test_ray_job_submit(ray_head, tmp_path):
    address, env = ray_head
    bare = run(["ray", "job", "submit", "--address", address, "--working-dir", "configs", "--",
                "python", "-c", "import pogdiff"], env, timeout=300)
    assert bare.returncode != 0 and "this Ray cluster has no pogdiff" in bare.stdout + bare.stderr, \
        "the cluster imports pogdiff without the job shipping it: this test would prove nothing"
    # docs/launchers.md, "Ray Jobs": the installed package
    # as a py_module, the configs as the working dir, output_dir on storage the cluster shares.
    build = run([sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--quiet",
                 "--target", "build/ray_modules", "."], env, timeout=300)
    assert build.returncode == 0, build.stderr
    # One worker: the head has 2 CPUs, and multi-worker DeepSpeed is the Slurm test's part.
    overrides = [f"output_dir={tmp_path / 'runs'}", "train.steps=4", "dist.num_workers=1", *TINY]
    submit = run(["ray", "job", "submit", "--address", address, "--submission-id", "pogdiff-launcher-test",
                  "--working-dir", "configs", "--runtime-env-json", json.dumps({"py_modules": ["build/ray_modules/pogdiff"]}),
                  "--", *DRIVER.split(), "demo.yaml", *overrides], env, timeout=400)
    (tmp_path / "ray_job.log").write_text(submit.stdout + submit.stderr)
    status = run(["ray", "job", "status", "--address", address, "pogdiff-launcher-test"], env)
    assert submit.returncode == 0 and "Job 'pogdiff-launcher-test' succeeded" in status.stdout, \
        f"{submit.stdout}\n{submit.stderr}\n{status.stdout}\n{status.stderr}"
    cfg = load_run_config(ROOT / "configs/demo.yaml", overrides)
    assert checkpoint_state(ray_checkpoints(cfg)[-1])["step"] == 4
    rank0 = json.loads((RunFiles(cfg).method / "ranks" / "rank0.json").read_text())
    assert rank0["world_size"] == 1 and rank0["steps"] == 4 and RunFiles(cfg).unet.is_dir()
