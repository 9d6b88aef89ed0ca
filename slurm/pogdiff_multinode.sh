#!/usr/bin/env bash
#SBATCH --job-name=pogdiff
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#
# PoGDiff on a Slurm allocation: a Ray head on the first node, a Ray worker on each other node,
# the Ray Train driver on the head node, the Ray cluster stopped at the end. See docs/launchers.md.
#
#   sbatch slurm/pogdiff_multinode.sh configs/demo.yaml train.steps=1000 output_dir=/shared/runs
#   sbatch slurm/pogdiff_multinode.sh prepare configs/demo.yaml data.source=/shared/shards output_dir=/shared/runs
#
# A first argument naming a verb (prepare, index, density, train-dist, sample, eval, report,
# experiment) runs that verb with the cluster's Ray; without one the job is train-dist.
#
# Activate the pogdiff venv (on a shared filesystem) before sbatch: the job inherits PATH.
# Checkpoints go to the config's output_dir, which must be on a filesystem every node sees.
# Resource lines above are defaults (2 whole 8-GPU nodes with all their memory, 32 CPUs each for
# Ray): sbatch options on the command line override them (e.g. --nodes=4 --gpus-per-node=4).
#
# Workers follow the allocation: dist.use_gpu=true dist.num_workers=nodes x GPUs per node, or on
# CPU-only nodes dist.use_gpu=false dist.num_workers=nodes x (CPUs per node / dist.cpus_per_worker).
# dist.use_gpu / dist.num_workers given on the command line win (the config file's do not).
#   bash slurm/pogdiff_multinode.sh --print-derived CONFIG [overrides]   (e.g. inside salloc)
# prints what this shell's SLURM_* variables derive, and exits.
#
# Environment (all optional):
#   POGDIFF_RAY_PORT=6379             GCS port of the head
#   POGDIFF_RAY_CLIENT_PORT=10001     Ray client server port of the head
#   POGDIFF_RAY_AGENT_PORT=52365      dashboard-agent HTTP port of each node
#   POGDIFF_RAY_WORKER_PORTS=10002-19999  ports of Ray's worker processes on each node
#   POGDIFF_RAY_NODE_PORT_STRIDE=0    node i adds i*stride to its agent and worker ports, so that
#                                     several Ray nodes can share one host
#   POGDIFF_RAY_DASHBOARD=0           1: start the dashboard/job server, on
#   POGDIFF_RAY_DASHBOARD_HOST=127.0.0.1  this interface (0.0.0.0 exposes it beyond the node)
#   POGDIFF_RAY_DASHBOARD_PORT=8265
#   POGDIFF_RAY_HEAD_IP               address the other nodes reach the head at (default: Ray's
#                                     choice of this node's IP)
#   POGDIFF_RAY_TMPDIR=/tmp/pogdiff-ray-$SLURM_JOB_ID   node-local Ray session dirs (keep it short:
#                                     Unix socket paths must stay under 107 bytes)
#   POGDIFF_RAY_JOIN_TIMEOUT=300      seconds to wait for every node to join
#   POGDIFF_RAY_NODE_RESTARTS=3       times a lost worker node's Ray is restarted during the job
#   POGDIFF_DRIVER="python -m pogdiff.dist.ray_driver"   command train-dist runs with CONFIG [overrides]
#   RAY_task_events_report_interval_ms=0  Ray's task events, off (the GCS would keep ~2.5 KB per task
#                                     and actor call, up to ~250 MB); 1000 turns them on for
#                                     `ray list tasks` and the dashboard's timeline
#   RAY_AUTH_MODE=token, RAY_AUTH_TOKEN   Ray's token authentication (default: a fresh token per job);
#                                         another mode is refused unless POGDIFF_ALLOW_NO_AUTH=1
set -uo pipefail

die() { echo "pogdiff_multinode: $*" >&2; exit 2; }
log() { echo "pogdiff_multinode: $(date +%T) $*"; }

print_only=0
[[ ${1:-} == --print-derived ]] && { print_only=1; shift; }
# Any verb runs on the cluster (each joins it through RAY_ADDRESS); without one, train-dist.
verb=train-dist
if [[ ${1:-} =~ ^(prepare|index|density|train-dist|sample|eval|report|experiment)$ ]]; then
    verb=$1
    shift
fi
(($# >= 1)) || die "usage: sbatch slurm/pogdiff_multinode.sh [VERB] CONFIG [key.path=value ...]"
if [[ $verb == train-dist ]]; then
    driver=${POGDIFF_DRIVER:-python -m pogdiff.dist.ray_driver}
else
    driver="python -m pogdiff.cli $verb"
fi
if ((!print_only)); then
    [[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job: submit with sbatch"
    command -v ray >/dev/null || die "'ray' is not on PATH: activate the pogdiff venv before sbatch"
fi

# 1. Ray Train's workers from the allocation (see the header), unless given on the command line.
arg_value() {  # KEY ARGS...: the value of the last KEY=value in ARGS; fails if there is none
    local key=$1 a value found=1
    shift
    for a; do [[ $a == "$key="* ]] && { value=${a#*=}; found=0; }; done
    echo "${value-}"
    return $found
}
gpus_per_node() {  # as Slurm exports it; CUDA_VISIBLE_DEVICES may be the submit shell's, so not it
    local per_node=${SLURM_GPUS_PER_NODE:-}  # --gpus-per-node=[type:]count
    local n=${SLURM_GPUS_ON_NODE:-${per_node##*:}}
    [[ -z $n && -n ${SLURM_JOB_GPUS:-} ]] && n=$(tr , '\n' <<<"$SLURM_JOB_GPUS" | grep -c .)
    echo "${n:-0}"
}
config_value() {  # KEY CONFIG [overrides]: the resolved value of KEY, e.g. dist.cpus_per_worker
    python -c 'import operator, sys; from pogdiff.config import load_config
print(operator.attrgetter(sys.argv[1])(load_config(sys.argv[2], sys.argv[3:])))' "$@"
}
nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
gpus=$(gpus_per_node)
derived=() given=()
if use_gpu=$(arg_value dist.use_gpu "${@:2}"); then
    given+=("dist.use_gpu=$use_gpu")
else
    use_gpu=false
    ((gpus > 0)) && use_gpu=true
    derived+=("dist.use_gpu=$use_gpu")
fi
on_gpu=0
[[ ${use_gpu,,} =~ ^(true|yes|y|on|1)$ ]] && on_gpu=1
basis="$nnodes nodes x $cpus CPUs"
((on_gpu)) && basis="$nnodes nodes x $gpus GPUs"
if n=$(arg_value dist.num_workers "${@:2}"); then
    given+=("dist.num_workers=$n")
else
    if ((on_gpu)); then
        n=$((nnodes * gpus))
    else
        cpw=$(config_value dist.cpus_per_worker "$@" 2>/dev/null) || cpw=1  # an invalid config fails in 2.
        n=$((nnodes * (cpus / cpw))) basis+=", dist.cpus_per_worker=$cpw"
    fi
    ((n > 0)) || die "no worker fits the allocation ($basis, dist.use_gpu=$use_gpu): ask for GPUs or more CPUs per node, or pass dist.num_workers; nothing was started"
    derived+=("dist.num_workers=$n")
fi
log "derived: ${derived[*]:-nothing} ($basis${given[*]:+; given: ${given[*]}})"
log "verb: $verb ($driver)"
((print_only)) && exit 0
set -- "$@" "${derived[@]}"

# 2. The config, validated before anything starts (exit 2 with the reason).
log "config: $*"
python -m pogdiff.cli config "$@" || die "invalid config (see the message above); nothing was started"
# The driver and every Ray worker import pogdiff with this python (and this directory first on sys.path).
python -c 'import pogdiff.dist, pogdiff.kernels' \
    || die "cannot import pogdiff.dist from $PWD with $(command -v python): pip install -e . (in a checkout) or pip install pogdiff"

# 3. Ports (the CPUs and GPUs of each node are those of step 1).
port=${POGDIFF_RAY_PORT:-6379}
agent_port=${POGDIFF_RAY_AGENT_PORT:-52365}
worker_ports=${POGDIFF_RAY_WORKER_PORTS:-10002-19999}
stride=${POGDIFF_RAY_NODE_PORT_STRIDE:-0}
tmp_root=${POGDIFF_RAY_TMPDIR:-/tmp/pogdiff-ray-$SLURM_JOB_ID}
head_node=${SLURMD_NODENAME:-$(hostname -s)}
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
workers=()
for n in "${nodes[@]}"; do [[ $n == "$head_node" ]] || workers+=("$n"); done
head_ip=${POGDIFF_RAY_HEAD_IP:-$(python -c 'import ray.util; print(ray.util.get_node_ip_address())')}
export RAY_ADDRESS=$head_ip:$port RAY_USAGE_STATS_ENABLED=0
export RAY_task_events_report_interval_ms=${RAY_task_events_report_interval_ms:-0}  # as pogdiff.dist.cluster.RAY_NODE_ENV
# Token authentication on every node and the driver: a fresh secret per job (passed to the nodes in
# the srun environment) unless RAY_AUTH_MODE / RAY_AUTH_TOKEN[_PATH] are already set.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [[ $RAY_AUTH_MODE != token && ${POGDIFF_ALLOW_NO_AUTH:-0} != 1 ]]; then
    die "RAY_AUTH_MODE=$RAY_AUTH_MODE: a multi-node Ray cluster without token authentication lets anyone who can reach its ports run code; unset RAY_AUTH_MODE (a fresh token per job), or set POGDIFF_ALLOW_NO_AUTH=1 to run without it anyway; nothing was started"
fi
if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-} ]]; then
    RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
    export RAY_AUTH_TOKEN
fi
log "Ray head $head_node ($RAY_ADDRESS), workers: ${workers[*]:-none}; per node: $cpus CPUs, $gpus GPUs"

ray_start_args() {  # node index -> the per-node `ray start` options
    local i=$1 lo=${worker_ports%-*} hi=${worker_ports#*-}
    echo --num-cpus="$cpus" --num-gpus="$gpus" --temp-dir="$tmp_root/n$i" --disable-usage-stats \
        --dashboard-agent-listen-port=$((agent_port + i * stride)) \
        --min-worker-port=$((lo + i * stride)) --max-worker-port=$((hi + i * stride)) --block
}

# 4. Ray head, then one Ray worker per other node (restarted if it dies while the job runs).
pids=()
cleanup() {
    trap - EXIT INT TERM
    log "stopping the Ray cluster"
    kill -TERM "${pids[@]}" 2>/dev/null
    wait "${pids[@]}" 2>/dev/null
    log "Ray cluster stopped"
}
trap cleanup EXIT
trap 'exit 143' INT TERM

dashboard=(--include-dashboard=false)
[[ ${POGDIFF_RAY_DASHBOARD:-0} == 1 ]] && dashboard=(--include-dashboard=true)
# shellcheck disable=SC2046  # ray_start_args is a list of words
srun --nodes=1 --ntasks=1 --cpus-per-task="$cpus" -w "$head_node" \
    ray start --head --node-ip-address="$head_ip" --port="$port" \
    --ray-client-server-port="${POGDIFF_RAY_CLIENT_PORT:-10001}" "${dashboard[@]}" \
    --dashboard-host="${POGDIFF_RAY_DASHBOARD_HOST:-127.0.0.1}" \
    --dashboard-port="${POGDIFF_RAY_DASHBOARD_PORT:-8265}" $(ray_start_args 0) &
head_pid=$!
pids+=("$head_pid")

events=$tmp_root/node-events
mkdir -p "$tmp_root"
: >"$events"
keep_worker_up() {  # node index: run its Ray worker, restarting it up to POGDIFF_RAY_NODE_RESTARTS times
    local node=$1 i=$2 restarts=0 child rc
    trap 'kill -TERM $child 2>/dev/null; wait $child; exit 0' TERM
    while :; do
        # shellcheck disable=SC2046
        srun --nodes=1 --ntasks=1 --cpus-per-task="$cpus" -w "$node" \
            ray start --address="$RAY_ADDRESS" $(ray_start_args "$i") &
        child=$!
        wait "$child"
        rc=$?
        echo "$node rc=$rc" >>"$events"
        ((restarts++ < ${POGDIFF_RAY_NODE_RESTARTS:-3})) || { log "Ray on $node exited (rc $rc); not restarting it again"; return 1; }
        log "Ray on $node exited (rc $rc): restarting it ($restarts/${POGDIFF_RAY_NODE_RESTARTS:-3})"
        sleep 2
    done
}
for i in "${!workers[@]}"; do
    keep_worker_up "${workers[$i]}" $((i + 1)) &
    pids+=($!)
done

# 5. A real wait until every node has joined (or the head died, or the timeout passed).
python - "${#nodes[@]}" "${POGDIFF_RAY_JOIN_TIMEOUT:-300}" "$head_pid" <<'EOF' || exit 3
import os, sys, threading, time
import ray

want, timeout, head_pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + timeout
joined = threading.Event()
alive = 0

def fail(msg):
    print(f"pogdiff_multinode: {msg} (Ray logs: the node-local temp dir, see POGDIFF_RAY_TMPDIR)", file=sys.stderr,
          flush=True)
    os._exit(1)  # from the watchdog too: ray.init can block for minutes on a head that is not there

def head_exited():
    # the head's srun is this script's child: once it exits it stays a zombie (nobody reaps it while
    # this wait runs), and a zombie still answers kill(pid, 0), so read its state
    try:
        with open(f"/proc/{head_pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:  # gone, or no /proc
        pass
    try:
        os.kill(head_pid, 0)
    except ProcessLookupError:
        return True
    return False

def watchdog():
    while not joined.wait(1):
        if head_exited():
            fail("the Ray head exited before the cluster formed (see its output above)")
        if time.monotonic() > deadline:
            fail(f"only {alive} of {want} Ray nodes joined within {timeout:.0f} s" if alive else
                 f"could not reach the Ray head at {os.environ['RAY_ADDRESS']} within {timeout:.0f} s")

threading.Thread(target=watchdog, daemon=True).start()
while True:
    try:
        ray.init(logging_level="ERROR", log_to_driver=False)
        break
    except ConnectionError:
        time.sleep(2)
while (alive := sum(n["Alive"] for n in ray.nodes())) < want:
    time.sleep(1)
joined.set()
print(f"pogdiff_multinode: all {want} Ray nodes joined: {ray.cluster_resources()}", flush=True)
EOF

# 6. The driver (of the verb); its exit code is the job's.
log "running: $driver $*"
$driver "$@"
rc=$?
if ((rc != 0)) && [[ -s $events ]]; then
    log "the driver failed (rc $rc) after Ray node(s) were lost: $(tr '\n' ' ' <"$events")." \
        "Checkpoints in the config's output_dir are kept: resubmit the same command to resume."
fi
log "driver exited with $rc"
exit "$rc"
