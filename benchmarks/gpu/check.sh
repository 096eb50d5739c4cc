#!/usr/bin/env bash
# Prepared GPU check of dist_tune on one H100/H200, in at most 8 minutes; results in OUT_DIR/results.{json,md}.
#
#   bash benchmarks/gpu/check.sh [--dry-run] [--steps a,b] [--budget S] [--keep] [OUT_DIR]
#
# Steps (each isolated, with its own time limit; a failed one is recorded with its log tail and the rest go on):
# environment (versions and requirement problems, printed first), gpu_tests (pytest -m gpu), throughput
# (llama-3.2-1b, bf16, seq 2048: tokens/s, MFU), engine_parity (FSDP and ZeRO-3 at world size 1 vs single
# device: first 10 losses, overhead), padding_free (vs padded tokens/s on mixed-length instructions),
# lora_memory / qlora_memory (peak memory on the llama-3-8b shape; sharded_lora_memory: the LoRA run under FSDP
# and ZeRO-3 at world size 1), chunked_loss_memory (one LoRA step on that shape at seq 8192 with the LM head and
# loss chunked and with the whole logits), generation.
# --dry-run: the same steps with tiny-llama on the CPU (throughput/MFU and QLoRA are skipped: no CUDA).
#
# On the offline GPU machine, after `bash ../shared/gpu/wheels.sh` here, install the wheels first:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl
# This script puts .site (when present) and the checkout on PYTHONPATH itself.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ARGS=()
OUT=""
while (($#)); do
  case "$1" in
    --dry-run|--keep) ARGS+=("$1") ;;
    --steps|--budget) ARGS+=("$1" "${2:?$1 needs a value}"); shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "check.sh: unknown option '$1'; see --help" >&2; exit 2 ;;
    *) OUT=$1 ;;
  esac
  shift
done
OUT=${OUT:-$ROOT/benchmarks/gpu/out-$(date +%Y%m%d-%H%M%S)}
[[ $OUT = /* ]] || OUT=$PWD/$OUT

cd "$ROOT" || exit 1
SITE=""
[[ -d .site ]] && SITE="$ROOT/.site:"
export PYTHONPATH="$SITE$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled PYTHONUNBUFFERED=1
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT TORCHELASTIC_RUN_ID
exec python3 benchmarks/gpu/check.py --out "$OUT" "${ARGS[@]}"
