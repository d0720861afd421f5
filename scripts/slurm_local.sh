#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine (Debian's slurmctld, slurmd, slurm-client and munge; root), for
# the tests marked `slurm` and for trying hydra/launcher=slurm before a real cluster (README "Scaling out").
#
#   scripts/slurm_local.sh start    # install the packages if missing, start munged/slurmctld/slurmd (idempotent)
#   scripts/slurm_local.sh status   # the daemons this script started, and sinfo
#   scripts/slurm_local.sh stop     # stop exactly the daemons this script started (by their recorded pids)
#
# State, spool, logs, the pid file and the generated slurm.conf live under $SSN_EXP_SLURM_DIR (default
# /tmp/ssn_exp_slurm); the Slurm commands find the configuration through /etc/slurm/slurm.conf, which is a link to
# the generated one (an /etc/slurm/slurm.conf this script did not make is never replaced: start refuses).
# One partition "debug" with all CPUs (nproc) and the machine's memory; MaxTime is unlimited, so jobs may ask for
# any --time (tests use a minute or two to exercise time limits); JobRequeue=1 lets `scontrol requeue` and
# preemption requeue jobs. No accounting: sacct fails and submitit warns that job states "may be inaccurate".
set -euo pipefail

DIR=${SSN_EXP_SLURM_DIR:-/tmp/ssn_exp_slurm}
PIDS=$DIR/pids
CONF=$DIR/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
MARK="# written by ssn_exp scripts/slurm_local.sh"

die() { echo "slurm_local.sh: error: $*" >&2; exit 1; }

# the pids recorded by start that still run, one "name pid" a line
running() {
    [ -f "$PIDS" ] || return 0
    while read -r name pid; do
        # (the same pid and the same program: a stale pid file from an ended machine may name a reused pid)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ]; then
            echo "$name $pid"
        fi
    done <"$PIDS"
}

install_packages() {
    local missing=()
    for bin in /usr/sbin/slurmctld:slurmctld /usr/sbin/slurmd:slurmd /usr/bin/sbatch:slurm-client /usr/sbin/munged:munge; do
        [ -x "${bin%%:*}" ] || missing+=("${bin##*:}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    echo "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# the pid of the daemon whose pid file is $1, once it is written (the daemons fork into the background)
wait_pidfile() {
    local f=$1 i
    for i in $(seq 50); do
        if [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then cat "$f"; return 0; fi
        sleep 0.2
    done
    return 1
}

start() {
    [ "$(id -u)" -eq 0 ] || die "start needs root (it starts munged, slurmctld and slurmd)"
    if [ -n "$(running)" ]; then
        if sinfo -h >/dev/null 2>&1; then echo "already running:"; running; return 0; fi
        die "daemons from an earlier start run but sinfo does not answer; run '$0 stop' first"
    fi
    install_packages
    if [ -e "$ETC_CONF" ] && ! grep -qF "$MARK" "$ETC_CONF"; then
        die "$ETC_CONF exists and was not written by this script; not replacing it"
    fi
    # a fresh cluster: no jobs recovered from an earlier start's saved state
    rm -rf "$DIR"/state "$DIR"/spool
    mkdir -p "$DIR"/state "$DIR"/spool "$DIR"/log
    : >"$PIDS"

    # munge: the default socket, so that Slurm's auth/munge finds it without configuration
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    [ -f /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
    chmod 400 /etc/munge/munge.key && chmod 700 /etc/munge
    local munge_pid
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        echo "munged already runs (not started here, not stopped by stop)"
    else
        rm -f /run/munge/munged.pid
        su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=/run/munge/munged.pid"
        munge_pid=$(wait_pidfile /run/munge/munged.pid) || die "munged did not start"
        echo "munged $munge_pid" >>"$PIDS"
    fi

    local host mem
    host=$(hostname -s)
    # RealMemory in MB: what the machine has, less a little that slurmd reports as used by the system
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.95)}' /proc/meminfo)
    cat >"$CONF" <<CONF
$MARK
ClusterName=ssnexp
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
# a job past its time limit or cancelled gets SIGTERM, then SIGKILL after this many seconds
KillWait=5
NodeName=$host CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    mkdir -p /etc/slurm
    ln -sfn "$CONF" "$ETC_CONF"

    rm -f "$DIR"/slurmctld.pid "$DIR"/slurmd.pid
    local daemon pid
    for daemon in slurmctld slurmd; do
        /usr/sbin/$daemon || die "$daemon did not start; see $DIR/log/$daemon.log"
        pid=$(wait_pidfile "$DIR/$daemon.pid") || die "$daemon did not start; see $DIR/log/$daemon.log"
        echo "$daemon $pid" >>"$PIDS"
    done

    local i
    for i in $(seq 30); do
        if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            echo "slurm is up ($(nproc) CPUs, ${mem} MB, partition debug):"
            cat "$PIDS"
            return 0
        fi
        sleep 1
    done
    die "the node did not come up; see $DIR/log/"
}

stop() {
    local name pid
    running | while read -r name pid; do
        echo "stopping $name ($pid)"
        kill "$pid" 2>/dev/null || true
    done
    # wait for them to go, then kill what is left
    local i
    for i in $(seq 20); do
        [ -z "$(running)" ] && break
        sleep 0.5
    done
    running | while read -r name pid; do kill -9 "$pid" 2>/dev/null || true; done
    rm -f "$PIDS"
}

status() {
    if [ -z "$(running)" ]; then echo "not started by this script"; else running; fi
    sinfo 2>&1 || true
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
*) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
