"""Freed host memory leaves the process where it is earned: large blocks when freed while loading and saving
(host_heap.returning_large_frees) and in steps that gather weights on the host, the pages of small holes at each
decoder block when a sharded model trains on CPU (host_heap.release_after_each_block); elsewhere the step keeps its
blocks in the heap for reuse."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dist_tune import host_heap
from dist_tune.config import load_config
from dist_tune.engines.parallelize import apply_common
from dist_tune.models import decoder_layers

RSS = """
import os, sys, torch
def host_rss_gib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
"""

LARGE_BLOCK = RSS + """
import contextlib
from dist_tune import host_heap
mode = sys.argv[1]
if mode == "after-loading":
    with host_heap.returning_large_frees():
        torch.ones(2**20)
if mode in ("step", "gathering-step"):
    assert host_heap.use_for_steps(weights_gathered_on_host=mode == "gathering-step")
keep = [torch.ones(16)]  # torch's first allocations out of the way
before = host_rss_gib()
with host_heap.returning_large_frees() if mode == "loading" else contextlib.nullcontext():
    for _ in range(2):  # the second block is placed after glibc has raised its threshold (when left dynamic)
        block = torch.ones(2**20)  # 4 MiB, touched (an activation or a small weight)
        keep.append(torch.ones(16))  # a live small object above it keeps the heap from shrinking
        del block
    print((host_rss_gib() - before) * 1024)
"""

HOLES = RSS + """
from dist_tune.host_heap import LARGE_ALLOCATION, release_freed_pages, set_mmap_threshold
assert set_mmap_threshold(LARGE_ALLOCATION)
before = host_rss_gib()
blocks, pins = [], []
for _ in range(64):  # 512 KiB activations, each followed by a 64 KiB object that outlives it
    blocks.append(torch.ones(2**17))
    pins.append(torch.ones(2**14))
del blocks  # 32 MiB of holes, each pinned apart from the next
if sys.argv[1] == "release":
    release_freed_pages()
print((host_rss_gib() - before) * 1024)
"""


def retained_mib(probe: str, mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def test_a_freed_4_mib_block_leaves_the_process_while_loading_and_in_gathering_steps():
    assert retained_mib(LARGE_BLOCK, "loading") < 1
    assert retained_mib(LARGE_BLOCK, "gathering-step") < 1
    assert retained_mib(LARGE_BLOCK, "dynamic") > 3  # glibc's default keeps it: what the setting prevents


def test_a_training_step_keeps_its_blocks_for_reuse_after_loading():
    """After the loading scope and in steps that gather nothing on the host, a freed activation-sized block stays
    in the heap: handing it back would cost an mmap, page faults and zeroing per tensor per step."""
    assert retained_mib(LARGE_BLOCK, "after-loading") > 3
    assert retained_mib(LARGE_BLOCK, "step") > 3


def test_releasing_freed_pages_returns_pinned_holes():
    assert retained_mib(HOLES, "keep") > 24  # glibc keeps the holes resident
    assert retained_mib(HOLES, "release") < 8  # the 4 MiB of pins stay


class TrimCounter:
    def __init__(self):
        self.calls = 0

    def malloc_trim(self, pad: int) -> int:
        self.calls += 1
        return 1


def tiny_llama(**overrides):
    cfg = load_config(None, {"model.name_or_path": "tiny-llama", **overrides})
    return cfg, LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2))


@pytest.mark.parametrize("checkpointing", [False, True])  # recomputation stops before a block's forward hooks
def test_sharded_cpu_training_releases_freed_pages_at_each_block(monkeypatch, checkpointing):
    cfg, model = tiny_llama(**{"engine.kind": "fsdp", "engine.activation_checkpointing": checkpointing})
    apply_common(model, cfg, torch.device("cpu"))
    libc = TrimCounter()
    monkeypatch.setattr(host_heap, "_glibc", lambda: libc)
    model.train()
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert libc.calls == 2 * len(decoder_layers(model))  # after each forward, before each backward


@pytest.mark.parametrize("kind, device", [("fsdp", "cuda"), ("single", "cpu"), ("ddp", "cpu")])
def test_gpu_or_unsharded_training_leaves_the_blocks_unhooked(kind, device):
    cfg, model = tiny_llama(**{"engine.kind": kind})
    apply_common(model, cfg, torch.device(device))
    assert not any(layer._forward_hooks for layer in decoder_layers(model))
