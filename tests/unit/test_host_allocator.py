"""Large host blocks go back to the OS when freed (run.return_large_frees_to_the_os), so per-tensor gathers do not
pile up as resident memory."""
from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys, torch
from dist_tune.metrics import host_rss_gib
from dist_tune.run import return_large_frees_to_the_os
if sys.argv[1] == "fixed":
    assert return_large_frees_to_the_os()
keep = []
for _ in range(2):  # the second block is placed after glibc has raised its threshold (when left dynamic)
    before = host_rss_gib()
    block = torch.ones(2**20)  # 4 MiB, touched (an activation or a small weight)
    keep.append(torch.ones(16))  # a live small object above it keeps the heap from shrinking
    del block
print((host_rss_gib() - before) * 1024)
"""


def retained_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def test_a_freed_4_mib_block_leaves_the_process():
    assert retained_mib("fixed") < 1
    assert retained_mib("dynamic") > 3  # glibc's default keeps it: what the setting prevents
