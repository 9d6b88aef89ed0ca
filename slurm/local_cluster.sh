#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for tests/test_launchers.py:
# munged, slurmctld and two slurmd daemons (`slurmd -N n1`, `slurmd -N n2`) from Debian's
# slurm-wlm, configured from slurm/slurm.conf.in. Needs root (CI runs as root).
#
#   slurm/local_cluster.sh start    install slurm-wlm + munge if missing, start the daemons,
#                                   wait until n1 and n2 are idle, print `export SLURM_CONF=...`
#   slurm/local_cluster.sh stop     stop exactly the daemons that `start` started (recorded PIDs)
#   slurm/local_cluster.sh status   sinfo of the local cluster
#
# Environment: POGDIFF_SLURM_DIR (state, logs, slurm.conf; default /tmp/pogdiff-slurm),
# POGDIFF_SLURMCTLD_PORT (default 16817; n1 and n2 listen on the next two ports).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
state=${POGDIFF_SLURM_DIR:-/tmp/pogdiff-slurm}
ctld_port=${POGDIFF_SLURMCTLD_PORT:-16817}
conf=$state/slurm.conf
export SLURM_CONF=$conf

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

install_if_missing() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
    [[ $(id -u) == 0 ]] || die "slurm-wlm/munge are not installed and this is not root: apt-get install -y slurm-wlm munge"
    echo "installing slurm-wlm and munge (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        echo "munged already running: using it"
        return
    fi
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; }
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.2
    done
    munge -n | unmunge >/dev/null || die "munged did not come up"
    cp /run/munge/munged.pid "$state/munged.pid"  # marks munged as ours: `stop` ends it
}

wait_idle() {
    local deadline=$((SECONDS + 90)) states
    while ((SECONDS < deadline)); do
        states=$(sinfo -h -N -o '%N=%T' 2>/dev/null | sort -u | tr '\n' ' ')
        [[ $states == *"n1=idle"* && $states == *"n2=idle"* ]] && { echo "nodes: $states"; return; }
        sleep 1
    done
    die "nodes n1/n2 not idle after 90 s (sinfo: ${states:-none}); logs in $state"
}

start() {
    install_if_missing
    [[ -f $state/slurmctld.pid ]] && kill -0 "$(cat "$state/slurmctld.pid")" 2>/dev/null \
        && die "a local cluster is already running from $state (stop it first)"
    if [[ -d $state && -n $(ls -A "$state") && ! -f $state/slurm.conf ]]; then
        die "$state is not empty and holds no local cluster: pick another POGDIFF_SLURM_DIR"
    fi
    rm -rf "$state"
    mkdir -p "$state/ctld"
    start_munge
    sed -e "s|@STATE@|$state|g" -e "s|@HOST@|$(hostname -s)|g" -e "s|@CTLD_PORT@|$ctld_port|g" \
        -e "s|@N1_PORT@|$((ctld_port + 1))|g" -e "s|@N2_PORT@|$((ctld_port + 2))|g" \
        -e "s|@CPUS@|$(nproc)|g" "$here/slurm.conf.in" >"$conf"
    slurmctld -f "$conf" -i
    slurmd -f "$conf" -N n1
    slurmd -f "$conf" -N n2
    wait_idle
    echo "export SLURM_CONF=$conf"
}

stop_pidfile() {  # SIGTERM the process in $1, SIGKILL after 15 s
    local pidfile=$1 pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

stop() {
    [[ -d $state ]] || { echo "no local cluster in $state"; return; }
    stop_pidfile "$state/slurmd-n1.pid"
    stop_pidfile "$state/slurmd-n2.pid"
    stop_pidfile "$state/slurmctld.pid"
    stop_pidfile "$state/munged.pid"
    echo "stopped the local cluster in $state"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) sinfo -N ;;
    *) die "usage: $0 start|stop|status" ;;
esac
