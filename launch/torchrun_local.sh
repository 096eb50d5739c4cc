#!/usr/bin/env bash
# One machine, N processes (one per GPU; 2 on a CPU-only box) under torchrun --standalone.
#
#   launch/torchrun_local.sh [NPROC] [CONFIG.yaml] [--section.key=value ...]
#
#   launch/torchrun_local.sh 8 my.yaml --engine.kind=fsdp        # 8 GPUs
#   launch/torchrun_local.sh my.yaml --engine.kind=ddp           # NPROC = visible GPUs, or 2 on CPU
#   launch/torchrun_local.sh 2 --model.name_or_path=tiny-llama --train.max_steps=10   # library defaults, tiny model
#
# NPROC: first argument when it is a number; else $NPROC_PER_NODE; else the number of visible GPUs
# (CUDA_VISIBLE_DEVICES, then nvidia-smi -L); else 2 (CPU, gloo).
# Environment:
#   MAX_RESTARTS   torchrun --max-restarts (default 0: a failed rank fails the run)
#   PYTHON         interpreter that has dist_tune installed (default: python3, else python)
#   TORCHRUN_ARGS  extra torchrun flags, word-split (e.g. "--log-dir=logs --redirects=3")
#   DRY_RUN=1      print the command and exit
# Prints the exact command, then execs it (signals go straight to torchrun).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NPROC=""
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
    NPROC=$1; shift
fi
if [[ -z "$NPROC" ]]; then
    NPROC=${NPROC_PER_NODE:-}
fi
if [[ -z "$NPROC" ]]; then
    NGPU=$(gpu_count)
    NPROC=$(( NGPU > 0 ? NGPU : 2 ))
fi
if (( NPROC < 1 )); then
    echo "torchrun_local.sh: NPROC must be >= 1 (got $NPROC)" >&2; exit 2
fi

PY=${PYTHON:-$(command -v python3 || command -v python)}
# shellcheck disable=SC2206
EXTRA=(${TORCHRUN_ARGS:-})
CMD=("$PY" -m torch.distributed.run
     --standalone --nnodes=1 --nproc-per-node="$NPROC"
     --max-restarts="${MAX_RESTARTS:-0}"
     "${EXTRA[@]}"
     -m dist_tune.cli train "$@")

printf 'torchrun_local.sh: exec'; printf ' %q' "${CMD[@]}"; printf '\n'
[[ "${DRY_RUN:-0}" == 1 ]] && exit 0
exec "${CMD[@]}"
