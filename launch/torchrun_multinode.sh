#!/usr/bin/env bash
# Several machines, torchrun on each, joined by a c10d rendezvous (no Slurm needed; under Slurm use
# slurm/multi_node.sbatch, which runs the same command on every node through srun).
#
#   # on every node (same command; RDZV_HOST = an address of one of them that all can reach):
#   NNODES=2 NPROC_PER_NODE=8 RDZV_HOST=10.0.0.1 launch/torchrun_multinode.sh [CONFIG.yaml] [--section.key=value ...]
#
# Environment:
#   NNODES          number of nodes, or MIN:MAX for an elastic job            (required)
#   RDZV_HOST       rendezvous host (name or IP); its torchrun hosts the c10d store   (required)
#   RDZV_PORT       rendezvous port                                             default 29400
#   NPROC_PER_NODE  processes on this node    default: visible GPUs, or 2 on a CPU-only node
#   NODE_RANK       this node's rank (optional: c10d assigns ranks itself; when set it is passed on and
#                   RDZV_IS_HOST defaults to 1 on node 0, 0 elsewhere)
#   RDZV_IS_HOST    1/0: this node runs the rendezvous store (default: torch guesses from the hostname;
#                   set it when several "nodes" share one host or the name is ambiguous)
#   RDZV_ID         job id shared by all nodes   default $SLURM_JOB_ID, else "dist_tune"
#   RDZV_CONF       extra --rdzv-conf entries, comma separated (e.g. join_timeout=900)
#   MAX_RESTARTS    torchrun --max-restarts (default 0)
#   PYTHON, TORCHRUN_ARGS, DRY_RUN=1   as in torchrun_local.sh
# Prints the exact command, then execs it.
set -euo pipefail

die() { echo "torchrun_multinode.sh: $*" >&2; exit 2; }
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ -n "${NNODES:-}" ]] || die "set NNODES (e.g. NNODES=2, or NNODES=1:4 for elastic)"
[[ -n "${RDZV_HOST:-}" ]] || die "set RDZV_HOST to the address of the node that hosts the rendezvous"
RDZV_PORT=${RDZV_PORT:-29400}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-dist_tune}}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NGPU=$(gpu_count)
    NPROC_PER_NODE=$(( NGPU > 0 ? NGPU : 2 ))
fi

CONF=()
[[ -n "${RDZV_CONF:-}" ]] && CONF+=("$RDZV_CONF")
if [[ -z "${RDZV_IS_HOST:-}" && -n "${NODE_RANK:-}" ]]; then
    RDZV_IS_HOST=$([[ "$NODE_RANK" == 0 ]] && echo 1 || echo 0)
fi
[[ -n "${RDZV_IS_HOST:-}" ]] && CONF+=("is_host=$RDZV_IS_HOST")

PY=${PYTHON:-$(command -v python3 || command -v python)}
# shellcheck disable=SC2206
EXTRA=(${TORCHRUN_ARGS:-})
CMD=("$PY" -m torch.distributed.run
     --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE"
     --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv-id="$RDZV_ID"
     --max-restarts="${MAX_RESTARTS:-0}")
[[ -n "${NODE_RANK:-}" ]] && CMD+=(--node-rank="$NODE_RANK")
[[ ${#CONF[@]} -gt 0 ]] && CMD+=(--rdzv-conf="$(IFS=,; echo "${CONF[*]}")")
CMD+=("${EXTRA[@]}" -m dist_tune.cli train "$@")

printf 'torchrun_multinode.sh: exec'; printf ' %q' "${CMD[@]}"; printf '\n'
[[ "${DRY_RUN:-0}" == 1 ]] && exit 0
exec "${CMD[@]}"
