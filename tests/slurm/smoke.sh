#!/usr/bin/env bash
# Smoke checks of the local Slurm cluster and of dist_tune.cluster on it (no training):
#   1. hostname   : sbatch -N 2, `srun hostname` runs once on node1 and once on node2
#   2. allreduce  : 2 nodes x 2 procs, torchrun per node with a c10d rendezvous on node1 -> gloo all_reduce
#   3. srun-direct: 2 nodes x 2 tasks started by srun itself ("slurm" launcher) -> gloo all_reduce
#   4. preempt    : 2 nodes, torchrun per node; `scancel --signal=USR1 --batch` mid-run; the batch shell
#                   forwards USR1 to the step; all ranks stop in the same step; rank 0 `scontrol requeue`s;
#                   the job runs again with SLURM_RESTART_COUNT=1 and completes
#
#   tests/slurm/cluster.sh start && tests/slurm/smoke.sh [hostname|allreduce|srun|preempt ...]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${DT_SLURM_DIR:-/tmp/dist_tune_slurm}
export SLURM_CONF=${SLURM_CONF:-$DIR/slurm.conf}
WORK=$DIR/smoke
mkdir -p "$WORK"
PYTHON=${PYTHON:-$(command -v python3)}
export PYTHON
WORKER=$HERE/smoke_worker.py
FAIL=0

log() { echo "smoke.sh: $*" >&2; }

wait_job() {  # JOBID TIMEOUT_S -> prints final state
    local jid=$1 timeout=$2 t0=$SECONDS state
    while :; do
        state=$(scontrol show job -o "$jid" 2>/dev/null | grep -oE 'JobState=[A-Z_]+' | cut -d= -f2 || true)
        case "$state" in
            COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|PREEMPTED|BOOT_FAIL|DEADLINE|OUT_OF_MEMORY)
                echo "$state"; return 0 ;;
        esac
        if (( SECONDS - t0 > timeout )); then
            echo "TIMEOUT_WAITING($state)"; scancel "$jid" || true; return 0
        fi
        sleep 0.5
    done
}

check() {  # NAME CONDITION_DESC COMMAND...
    local name=$1 desc=$2; shift 2
    if "$@"; then log "PASS $name: $desc"; else log "FAIL $name: $desc"; FAIL=1; fi
}

smoke_hostname() {
    cat > "$WORK/hostname.sbatch" <<'EOS'
#!/bin/bash
#SBATCH -N 2
#SBATCH --ntasks-per-node=1
srun -l bash -c 'echo "node=$SLURMD_NODENAME nodeid=$SLURM_NODEID procid=$SLURM_PROCID host=$(hostname)"'
EOS
    local t0=$SECONDS jid state out
    jid=$(sbatch --parsable -o "$WORK/hostname-%j.out" "$WORK/hostname.sbatch")
    state=$(wait_job "$jid" 60)
    out="$WORK/hostname-$jid.out"
    log "hostname job $jid: $state in $((SECONDS - t0))s"; cat "$out" >&2
    check hostname "state COMPLETED, ran on node1 and node2" \
        bash -c "[[ $state == COMPLETED ]] && grep -q 'node=node1 nodeid=0' '$out' && grep -q 'node=node2 nodeid=1' '$out'"
}

smoke_allreduce() {
    cat > "$WORK/allreduce.sbatch" <<EOS
#!/bin/bash
#SBATCH -N 2
#SBATCH --ntasks-per-node=1
HEAD_ADDR=\$("$PYTHON" -m dist_tune.cluster head-address)
export HEAD_ADDR RDZV_PORT=\$(( 10000 + SLURM_JOB_ID % 50000 ))
echo "head \$HEAD_ADDR:\$RDZV_PORT"
srun --kill-on-bad-exit=1 bash -c 'trap "" USR1; exec "$PYTHON" -m torch.distributed.run --nnodes=\$SLURM_NNODES \
  --node-rank=\$SLURM_NODEID --nproc-per-node=2 --rdzv-id=\$SLURM_JOB_ID --rdzv-backend=c10d \
  --rdzv-endpoint=\$HEAD_ADDR:\$RDZV_PORT --rdzv-conf=is_host=\$(( SLURM_NODEID == 0 )) "$WORKER" allreduce'
EOS
    local t0=$SECONDS jid state out
    jid=$(sbatch --parsable -o "$WORK/allreduce-%j.out" "$WORK/allreduce.sbatch")
    state=$(wait_job "$jid" 180)
    out="$WORK/allreduce-$jid.out"
    log "allreduce (torchrun c10d) job $jid: $state in $((SECONDS - t0))s"; grep -E "ALLREDUCE|head|Error|error" "$out" >&2 || cat "$out" >&2
    check allreduce "4 ranks, 2 on each of node1/node2, agree on the sum; node ranks 0 and 1 (c10d picks which)" \
        bash -c "[[ $state == COMPLETED ]] && [[ \$(grep -c 'ALLREDUCE_OK torchrun' '$out') == 4 ]] \
                 && grep -q 'node 0/2' '$out' && grep -q 'node 1/2' '$out' \
                 && [[ \$(grep -m1 -oE \"slurmd_nodes=.*\" '$out' | grep -oE 'node[12]' | sort | tr '\n' ' ') == 'node1 node1 node2 node2 ' ]]"
}

smoke_srun() {
    local t0=$SECONDS jid state out
    jid=$(sbatch --parsable -N 2 --ntasks-per-node=2 -o "$WORK/srun-%j.out" \
          --wrap "srun --kill-on-bad-exit=1 bash -c 'trap \"\" USR1; exec \"$PYTHON\" \"$WORKER\" allreduce'")
    state=$(wait_job "$jid" 180)
    out="$WORK/srun-$jid.out"
    log "srun-direct job $jid: $state in $((SECONDS - t0))s"; grep -E "ALLREDUCE|Error|error" "$out" >&2 || cat "$out" >&2
    check srun-direct "4 srun tasks (launcher slurm) agree, master node1 -> 127.0.0.1 via /etc/hosts" \
        bash -c "[[ $state == COMPLETED ]] && [[ \$(grep -c 'ALLREDUCE_OK slurm: ' '$out') == 4 ]] && grep -q 'local 1/2 node 1/2 master node1:' '$out'"
}

smoke_preempt() {
    cat > "$WORK/preempt.sbatch" <<EOS
#!/bin/bash
#SBATCH -N 2
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --open-mode=append
echo "BATCH_START restart_count=\${SLURM_RESTART_COUNT:-0}"
HEAD_ADDR=\$("$PYTHON" -m dist_tune.cluster head-address)
export HEAD_ADDR RDZV_PORT=\$(( 10000 + SLURM_JOB_ID % 50000 ))
on_usr1() { echo "BATCH_GOT_USR1 forwarding to srun \$SRUN_PID"; kill -USR1 "\$SRUN_PID"; }
trap on_usr1 USR1
srun --kill-on-bad-exit=1 bash -c 'trap "" USR1; exec "$PYTHON" -m torch.distributed.run --nnodes=\$SLURM_NNODES \
  --node-rank=\$SLURM_NODEID --nproc-per-node=1 --rdzv-id=\$SLURM_JOB_ID --rdzv-backend=c10d \
  --rdzv-endpoint=\$HEAD_ADDR:\$RDZV_PORT --rdzv-conf=is_host=\$(( SLURM_NODEID == 0 )) "$WORKER" preempt "$WORK/preempt-markers-\$SLURM_JOB_ID"' &
SRUN_PID=\$!
while :; do RC=0; wait \$SRUN_PID || RC=\$?; (( RC > 128 )) && kill -0 \$SRUN_PID 2>/dev/null && continue; break; done
echo "BATCH_END restart_count=\${SLURM_RESTART_COUNT:-0} rc=\$RC"
exit \$RC
EOS
    local t0=$SECONDS jid state out info t_sig
    jid=$(sbatch --parsable -o "$WORK/preempt-%j.out" "$WORK/preempt.sbatch")
    local deadline=$((SECONDS + 120))
    until [[ -f "$WORK/preempt-markers-$jid/running.0" ]]; do
        if (( SECONDS > deadline )); then log "preempt: job $jid never started stepping"; cat "$WORK/preempt-$jid.out" >&2; FAIL=1; scancel "$jid"; return; fi
        sleep 0.2
    done
    t_sig=$SECONDS
    log "preempt job $jid: stepping after $((t_sig - t0))s; scancel --signal=USR1 --batch $jid"
    scancel --signal=USR1 --batch "$jid"
    # wait for the requeue (Restarts=1) and for the second attempt to finish
    state=$(wait_job "$jid" 240)
    out="$WORK/preempt-$jid.out"
    info=$(scontrol show job -o "$jid")
    log "preempt job $jid: $state, $(grep -oE 'Restarts=[0-9]+' <<<"$info"), total $((SECONDS - t0))s (after signal $((SECONDS - t_sig))s)"
    cat "$out" >&2
    check preempt "USR1 via batch shell -> both ranks stop in the same step -> requeue -> rerun with SLURM_RESTART_COUNT=1" \
        bash -c "[[ $state == COMPLETED ]] && grep -q 'Restarts=1 ' <<<'$info' \
                 && grep -q 'BATCH_GOT_USR1' '$out' \
                 && [[ \$(grep -oE 'PREEMPT_STOP rank=[01] step=[0-9]+' '$out' | awk '{print \$3}' | sort -u | wc -l) == 1 ]] \
                 && [[ \$(grep -c 'PREEMPT_STOP' '$out') == 2 ]] \
                 && grep -q 'REQUEUE_CALLED ok=True' '$out' \
                 && grep -q 'BATCH_START restart_count=1' '$out' && [[ \$(grep -c 'RESUMED_DONE attempt=1' '$out') == 2 ]] \
                 && grep -q 'BATCH_END restart_count=1 rc=0' '$out'"
}

scontrol ping >/dev/null 2>&1 || { log "Slurm is not up (SLURM_CONF=$SLURM_CONF): run tests/slurm/cluster.sh start"; exit 2; }
CHECKS=("$@")
[[ ${#CHECKS[@]} -gt 0 ]] || CHECKS=(hostname allreduce srun preempt)
for c in "${CHECKS[@]}"; do
    case "$c" in
        hostname) smoke_hostname ;;
        allreduce) smoke_allreduce ;;
        srun) smoke_srun ;;
        preempt) smoke_preempt ;;
        *) log "unknown check $c"; exit 2 ;;
    esac
done
if (( FAIL )); then log "FAILED"; exit 1; fi
log "all passed"
