#!/usr/bin/env bash
# A real Slurm cluster on this one machine, to try launch/slurm.sbatch without a cluster: munge, slurmctld
# and two slurmd (two node names on one host, each slurmd on its own port), all started from here (no
# systemd needed) at a low priority and stopped by their PIDs.
#
#   launch/local_slurm.sh start DIR     # DIR: an empty or new directory for config, state, logs, sockets
#   export SLURM_CONF=DIR/slurm.conf    # then sbatch/squeue/scontrol/scancel talk to this cluster
#   sbatch --gpus-per-node=0 --nodes 2 --cpus-per-task 1 launch/slurm.sbatch examples/toy_cpu.yaml
#   launch/local_slurm.sh stop DIR      # cancels what still runs, then stops the daemons
#
# Needs Slurm's daemons and munge on PATH (Debian/Ubuntu: apt-get install slurmctld slurmd slurm-client
# munge); nothing under /etc is changed. Run it as root (slurmd runs jobs as their owner); as another
# user the daemons run as that user and only that user's jobs run.
#
# The cluster: nodes NODES (default "127.0.0.1 127.0.0.2"), CPUS each (default 2), no GPUs. Node names
# must resolve (jobs use the first one as their rendezvous address) and, as Debian's slurmd is not built
# for multiple-slurmd, be distinct host names: loopback addresses are both, with no /etc/hosts entry.
# Plugins that need no cgroups (proctrack/linuxproc, task/none); select/cons_tres by CPU.
# Partitions, all on both nodes, for trying preemption (preempt/partition_prio, PreemptMode=REQUEUE):
#   main      the default; low priority; preempted with a GraceTime of GRACE_TIME seconds (default 60):
#             SIGTERM to the job's steps, SIGKILL GRACE_TIME seconds later
#   nograce   low priority; preempted with GraceTime=0 (SIGTERM, then SIGKILL after KillWait)
#   high      high priority: its jobs preempt jobs of main and nograce
# KillWait (SIGTERM to SIGKILL on scancel and time limits) is KILL_WAIT seconds (default 30). The
# scheduler runs every second, and finished jobs stay visible to `scontrol show job` for an hour
# (there is no accounting database, so no sacct); DIR/jobcomp.log has a line per job end and requeue.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop|status DIR" >&2
    exit 2
}
[ "$#" -eq 2 ] || usage
ACTION=$1
DIR=$2
case "$DIR" in /*) ;; *) DIR=$(pwd)/$DIR ;; esac
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF
PATH=$PATH:/usr/sbin:/sbin   # where the daemons live, not always on a user's PATH

# Stop the daemon whose PID file is $1: SIGTERM, then SIGKILL if it is still there after 10 s.
stop_pid() {
    local pidfile=$1 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
}

do_stop() {
    if [ ! -f "$CONF" ]; then
        echo "$0: no cluster in $DIR (no slurm.conf)" >&2
        exit 1
    fi
    # Jobs first, while slurmctld and slurmd can still end them (their processes belong to slurmstepd).
    if [ -f "$DIR/run/slurmctld.pid" ] && scontrol ping >/dev/null 2>&1; then
        scancel --full --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
        for _ in $(seq 120); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    local pidfile
    for pidfile in "$DIR"/run/slurmd-*.pid; do stop_pid "$pidfile"; done
    stop_pid "$DIR/run/slurmctld.pid"
    stop_pid "$DIR/run/munged.pid"
    echo "local Slurm cluster in $DIR stopped"
}

# A free TCP port from the kernel (bash cannot bind a socket; Python is what megarope needs anyway).
free_port() {
    "${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

do_start() {
    local missing=() cmd
    for cmd in munged mungekey slurmctld slurmd sbatch scontrol; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "$0: not installed: ${missing[*]} (Debian/Ubuntu: apt-get install slurmctld slurmd slurm-client munge)" >&2
        exit 1
    fi
    if [ -f "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
        echo "$0: a cluster already runs in $DIR (stop it first)" >&2
        exit 1
    fi
    local host user nodes cpus=${CPUS:-2} name
    host=$(hostname -s)
    user=$(id -un)
    read -r -a nodes <<< "${NODES:-127.0.0.1 127.0.0.2}"
    if [ "${#nodes[@]}" -lt 1 ] || [ "${nodes[0]}" = "${nodes[1]:-}" ]; then
        echo "$0: NODES must be distinct names, got '${NODES:-}'" >&2
        exit 2
    fi
    for name in "${nodes[@]}"; do
        if ! getent ahosts "$name" >/dev/null; then
            echo "$0: node name '$name' does not resolve: add '127.0.0.1 $name' to /etc/hosts or choose NODES" >&2
            exit 1
        fi
    done

    mkdir -p "$DIR"/{run,log,state,spool,munge}
    chmod 755 "$DIR/munge"
    [ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key"
    nice -n 10 munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
        $([ "$(id -u)" = 0 ] && echo --force)

    local ctld_port node_lines="" port
    ctld_port=$(free_port)
    for name in "${nodes[@]}"; do
        port=$(free_port)
        node_lines+="NodeName=$name NodeAddr=127.0.0.1 Port=$port CPUs=$cpus State=UNKNOWN"$'\n'
        mkdir -p "$DIR/spool/$name"
    done
    local all
    all=$(IFS=,; echo "${nodes[*]}")
    cat > "$CONF" <<EOF
# Written by launch/local_slurm.sh: a one-machine test cluster.
ClusterName=megarope-local
MailProg=/bin/true
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long plus 1 s before it starts again (default 120)
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: what works in containers and on machines without systemd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# preemption by partition priority; preempted jobs are requeued
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
# fast turnaround for tests
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1,sched_min_interval=100000
MessageTimeout=10
KillWait=${KILL_WAIT:-30}
MinJobAge=3600
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
$node_lines
PartitionName=main Nodes=$all Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=${GRACE_TIME:-60}
PartitionName=nograce Nodes=$all MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=0
PartitionName=high Nodes=$all MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
    local failed=0
    nice -n 10 slurmctld -f "$CONF" || failed=1
    for name in "${nodes[@]}"; do
        [ "$failed" = 1 ] || nice -n 10 slurmd -f "$CONF" -N "$name" || failed=1
    done
    if [ "$failed" = 1 ]; then
        echo "$0: a Slurm daemon did not start; see $DIR/log" >&2
        do_stop >/dev/null
        exit 1
    fi
    # Ready when every node is idle.
    local state
    for _ in $(seq 300); do
        state=$(sinfo -h -N -p main -o %t 2>/dev/null | sort -u | tr '\n' ' ')
        if [ "$state" = "idle " ]; then
            echo "local Slurm cluster up in $DIR: nodes ${nodes[*]} ($cpus CPUs each), partitions main (default), nograce, high"
            echo "use it with: export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.2
    done
    echo "$0: the nodes did not come up (state: ${state:-none}); see $DIR/log" >&2
    do_stop >/dev/null
    exit 1
}

case "$ACTION" in
    start) do_start ;;
    stop) do_stop ;;
    status) sinfo -N; squeue ;;
    *) usage ;;
esac
