"""Memory readings: host RSS now and at its peak (per rank), device memory peaks, and resetting them per log
window."""
from __future__ import annotations

import os
import resource
from pathlib import Path

import torch
import torch.distributed as dist

GIB = 2**30


def host_rss_gib() -> float | None:
    """This process's current resident set size in GiB (Linux /proc/self/statm), or None where unavailable."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / GIB


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Memory under honest keys: on CUDA the peak allocated and reserved since the last reset_peak_memory
    ("train/peak_mem_gib", "train/peak_reserved_gib"), on CPU the process's lifetime peak RSS
    ("train/peak_rss_gib"), and everywhere the current host RSS ("train/host_rss_gib"), which offload fills."""
    out = {}
    if device.type == "cuda":
        out["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        out["train/peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    elif device.type == "cpu":
        out["train/peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    rss = host_rss_gib()
    if rss is not None:
        out["train/host_rss_gib"] = rss
    return out


def peak_host_rss_per_rank() -> list[float]:
    """Every rank's lifetime peak host RSS in GiB (ru_maxrss: model load, training and final save included), in
    rank order. Collective."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    if not (dist.is_available() and dist.is_initialized()):
        return [peak]
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    return peaks


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on CUDA (ru_maxrss on CPU cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
