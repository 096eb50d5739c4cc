#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for tests/slurm/.
#
#   tests/slurm/install.sh            # once: apt-get install slurm-wlm munge (idempotent)
#   tests/slurm/cluster.sh start      # munged + slurmctld + slurmd -N node1 + slurmd -N node2; waits for idle
#   tests/slurm/cluster.sh status     # sinfo -N and squeue
#   tests/slurm/cluster.sh stop       # kills what start started, removes the state dir and /etc/hosts entry
#   eval "$(tests/slurm/cluster.sh env)"   # export SLURM_CONF for sinfo/sbatch/srun in this shell
#
# Installs nothing (see install.sh). Needs root: slurmd runs jobs as root, munged and /etc/hosts are system-wide.
#
# Environment:
#   DT_SLURM_DIR          state dir (slurm.conf, spool, logs, pid files)   default /tmp/dist_tune_slurm
#   DT_SLURMCTLD_PORT     slurmctld port                                   default 16817
#   DT_SLURMD_PORTS       slurmd port range for node1..node2               default 17001-17002
#   DT_SLURM_CPUS         CPUs declared per node (both nodes share the host's cores)  default: `nproc`
#   DT_SLURM_MEM_MB       RealMemory per node (not enforced: CR_CPU)       default 2000
#   DT_SLURM_START_TIMEOUT  seconds to wait for both nodes idle           default 60
#
# slurm.conf is written to $DT_SLURM_DIR/slurm.conf. Client commands find it via SLURM_CONF; when
# /etc/slurm/slurm.conf does not exist, start also symlinks it there (removed again by stop) so a
# plain `sinfo` works in any shell. Jobs get SLURM_CONF from slurmd; sbatch's default --export=ALL
# carries the submitter's PATH (python, torchrun, dist-tune) into the job.
set -euo pipefail

DIR=${DT_SLURM_DIR:-/tmp/dist_tune_slurm}
CTLD_PORT=${DT_SLURMCTLD_PORT:-16817}
SLURMD_PORTS=${DT_SLURMD_PORTS:-17001-17002}
CPUS=${DT_SLURM_CPUS:-$(nproc)}
MEM=${DT_SLURM_MEM_MB:-2000}
TIMEOUT=${DT_SLURM_START_TIMEOUT:-60}
CONF=$DIR/slurm.conf
NODES=(node1 node2)
HOSTS_MARK="# dist_tune local slurm"
ETC_CONF=/etc/slurm/slurm.conf

log() { echo "cluster.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pid_alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }
pid_of() { [[ -f "$1" ]] && cat "$1" 2>/dev/null || true; }

write_conf() {
    local host
    host=$(hostname -s)
    mkdir -p "$DIR/ctld" "$DIR/log" "$DIR/run"
    for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/$n"; done
    cat > "$CONF" <<EOF
# Written by tests/slurm/cluster.sh -- two "nodes" on one host, for tests only.
ClusterName=dt
MailProg=/bin/true
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job becomes eligible again only after the step-credential lifetime (cred_expire, default
# 120 s) has passed; 10 s keeps the requeue tests short.
AuthInfo=cred_expire=10
StateSaveLocation=${DIR}/ctld
SlurmdSpoolDir=${DIR}/spool/%n
SlurmctldPidFile=${DIR}/run/slurmctld.pid
SlurmdPidFile=${DIR}/run/slurmd-%n.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# schedule often: a requeued job waits for a periodic pass once it is eligible again
SchedulerParameters=sched_interval=2,bf_interval=2
# requeue: 'scontrol requeue' and '#SBATCH --requeue' work; jobs are requeued after node failure too
JobRequeue=1
ReturnToService=2
# keep finished jobs visible to 'scontrol show job' for 10 minutes (no accounting daemon here)
MinJobAge=600
# SIGTERM -> SIGKILL grace at job end / scancel / requeue
KillWait=15
SlurmdTimeout=60
InactiveLimit=0
MessageTimeout=20
NodeName=node[1-2] NodeHostname=${host} NodeAddr=127.0.0.1 Port=${SLURMD_PORTS} CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
}

ensure_hosts() {
    if ! grep -qE "^[^#]*[[:space:]]node1([[:space:]]|$)" /etc/hosts || ! grep -qE "^[^#]*[[:space:]]node2([[:space:]]|$)" /etc/hosts; then
        # /etc/hosts may be a bind mount (containers): rewrite in place, never replace the inode
        echo "127.0.0.1 node1 node2 $HOSTS_MARK" >> /etc/hosts
        log "added node1 node2 to /etc/hosts"
    fi
}

remove_hosts() {
    if grep -qF "$HOSTS_MARK" /etc/hosts; then
        local tmp
        tmp=$(grep -vF "$HOSTS_MARK" /etc/hosts)
        printf '%s\n' "$tmp" > /etc/hosts
    fi
}

ensure_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        log "created /etc/munge/munge.key"
    fi
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0   # a munged is already serving (ours or the system's): leave it alone
    fi
    munged --force
    echo started > "$DIR/run/munged.ours"
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged does not answer (munge -n | unmunge failed); see /var/log/munge/munged.log"
}

print_logs() {
    for f in "$DIR"/log/*.log; do
        [[ -f "$f" ]] || continue
        echo "----- $f (last 30 lines) -----" >&2
        tail -n 30 "$f" >&2
    done
}

nodes_idle() {
    local out
    out=$(SLURM_CONF=$CONF sinfo -N -h -o "%N %t" 2>/dev/null) || return 1
    local n
    for n in "${NODES[@]}"; do
        grep -qE "^$n idle$" <<<"$out" || return 1
    done
}

start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    command -v slurmctld >/dev/null && command -v munged >/dev/null || die "slurm/munge not installed: run tests/slurm/install.sh"
    export SLURM_CONF=$CONF
    if pid_alive "$(pid_of "$DIR/run/slurmctld.pid")" && nodes_idle; then
        log "already running (state dir $DIR)"
        return 0
    fi
    local t0=$SECONDS
    mkdir -p "$DIR"
    write_conf
    ensure_hosts
    ensure_munge
    if [[ ! -e $ETC_CONF && ! -L $ETC_CONF ]]; then
        mkdir -p /etc/slurm
        ln -s "$CONF" "$ETC_CONF"
        echo "$ETC_CONF" > "$DIR/run/etc_conf.ours"
    fi
    if ! pid_alive "$(pid_of "$DIR/run/slurmctld.pid")"; then
        # -c: clear saved state (jobs of a previous test session); -i: ignore state-file errors
        slurmctld -f "$CONF" -c -i || { print_logs; die "slurmctld failed to start"; }
    fi
    for n in "${NODES[@]}"; do
        if ! pid_alive "$(pid_of "$DIR/run/slurmd-$n.pid")"; then
            slurmd -f "$CONF" -N "$n" || { print_logs; die "slurmd -N $n failed to start"; }
        fi
    done
    local deadline=$((SECONDS + TIMEOUT))
    until nodes_idle; do
        if (( SECONDS >= deadline )); then
            SLURM_CONF=$CONF sinfo -N -l >&2 || true
            print_logs
            die "nodes not idle after ${TIMEOUT}s"
        fi
        sleep 0.5
    done
    log "up in $((SECONDS - t0))s: $(SLURM_CONF=$CONF sinfo -N -h -o '%N=%t' | tr '\n' ' ')(SLURM_CONF=$CONF)"
}

kill_pidfile() {
    local f=$1 pid
    pid=$(pid_of "$f")
    if pid_alive "$pid"; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do pid_alive "$pid" || break; sleep 0.1; done
        pid_alive "$pid" && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

stop() {
    export SLURM_CONF=$CONF
    if [[ -f $CONF ]] && pid_alive "$(pid_of "$DIR/run/slurmctld.pid")"; then
        scancel --quiet --full --signal=KILL --state=RUNNING 2>/dev/null || true
        scancel --quiet 2>/dev/null || true   # pending ones
    fi
    for n in "${NODES[@]}"; do kill_pidfile "$DIR/run/slurmd-$n.pid"; done
    kill_pidfile "$DIR/run/slurmctld.pid"
    if [[ -f $DIR/run/munged.ours ]]; then
        kill_pidfile /run/munge/munged.pid
    fi
    if [[ -f $DIR/run/etc_conf.ours && -L $ETC_CONF ]]; then
        rm -f "$ETC_CONF"
    fi
    remove_hosts
    case "$DIR" in
        /|"") ;;
        *) rm -rf "$DIR" ;;
    esac
    log "stopped"
}

status() {
    export SLURM_CONF=$CONF
    local rc=0
    for n in slurmctld slurmd-node1 slurmd-node2; do
        local pid
        pid=$(pid_of "$DIR/run/$n.pid")
        if pid_alive "$pid"; then echo "$n: running (pid $pid)"; else echo "$n: not running"; rc=1; fi
    done
    if [[ $rc -eq 0 ]]; then
        sinfo -N || rc=1
        squeue || true
    fi
    return $rc
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    restart) stop; start ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    logs) print_logs 2>&1 ;;
    *) echo "usage: $0 start|stop|status|restart|env|logs" >&2; exit 2 ;;
esac
