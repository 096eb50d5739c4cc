# Sourced by the launch scripts.

# Visible GPUs: CUDA_VISIBLE_DEVICES when set (empty or -1 means none), else nvidia-smi -L, else 0.
gpu_count() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
        if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == "-1" ]]; then echo 0; return; fi
        awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"; return
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
        return
    fi
    echo 0
}
