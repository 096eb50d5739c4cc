"""glibc heap settings per phase of a run. Loading, gathering and saving a sharded model move weight-sized blocks
through host memory once each: there freed blocks of 1 MiB or more go straight back to the OS, so a rank stays
near its share of the model. The training step frees and reallocates the same activation-sized blocks every
step: there they stay in the heap for reuse (returning them costs a fresh mmap, page faults and zeroing per tensor
per step: 37 % of step time on the mixed-length benchmark). Sharded training on CPU gathers weights in host
memory inside the step, so it keeps the load-time setting, and hands back the pages freed inside the heap at each
decoder block."""
from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

import torch

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
M_MMAP_THRESHOLD = -3
GLIBC_TRIM_DEFAULT = 128 * 2**10
LARGE_ALLOCATION = 2**20
STEP_ALLOCATION = 32 * 2**20  # the ceiling of glibc's own dynamic threshold on 64-bit
_threshold: int | None = None  # what this process last set: glibc cannot be asked


@functools.cache
def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def set_mmap_threshold(threshold: int) -> bool:
    """Make glibc hand blocks of `threshold` bytes or more back to the OS when freed. At LARGE_ALLOCATION the heap
    top is trimmed at glibc's default 128 KiB, at larger thresholds only beyond twice the threshold (as glibc's own
    dynamic setting does). False where the C library is not glibc."""
    global _threshold
    libc = _glibc()
    if not (libc and hasattr(libc, "mallopt")):
        return False
    trim = GLIBC_TRIM_DEFAULT if threshold <= LARGE_ALLOCATION else 2 * threshold
    _threshold = threshold
    return libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim) == 1


def use_for_steps(weights_gathered_on_host: bool) -> bool:
    """The setting for the training steps: blocks reused from the heap, unless the step gathers weights in host
    memory (FSDP or ZeRO-3 on CPU), where a 1B LoRA step retains 0.13 GiB instead of 0.4."""
    return set_mmap_threshold(LARGE_ALLOCATION if weights_gathered_on_host else STEP_ALLOCATION)


@contextlib.contextmanager
def returning_large_frees() -> Iterator[None]:
    """Loading, saving and exporting: weight-sized blocks go back to the OS when freed (by default glibc raises its
    threshold each time such a block is freed and then keeps the one-tensor-at-a-time gathers of a sharded load or
    save resident: GiBs per rank on a 1B model). Afterwards the earlier setting returns and the freed pages go."""
    before = _threshold
    set_mmap_threshold(LARGE_ALLOCATION)
    try:
        yield
    finally:
        set_mmap_threshold(before or STEP_ALLOCATION)
        release_freed_pages()


def release_freed_pages(*_) -> None:
    """Return the whole pages of the heap's free chunks to the OS (malloc_trim). Blocks below the mmap threshold
    (a CPU step's activations at short sequence lengths) are freed into holes that a longer-lived small object
    pins, which glibc then neither reuses for larger requests nor gives back: a ZeRO-3 LoRA step on the 1B
    benchmark model grew its heap by 4 MiB of holes per decoder block. Returns None, so it can be a tensor hook."""
    libc = _glibc()
    if libc and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def release_after_each_block(blocks: list[torch.nn.Module]) -> None:
    """Call release_freed_pages when each decoder block finishes its forward and when its backward begins, so
    holes never outlive one block."""
    for block in blocks:
        block.register_forward_hook(_release_now_and_at_backward)


@torch.compiler.disable
def _release_now_and_at_backward(module: torch.nn.Module, args, output) -> None:
    release_freed_pages()
    hidden = output if isinstance(output, torch.Tensor) else output[0]
    if hidden.requires_grad:
        hidden.register_hook(release_freed_pages)
