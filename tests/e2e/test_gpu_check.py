"""The prepared GPU check (benchmarks/gpu/check.sh): it parses, and its CPU dry run records every step with the
loss-parity numbers, as results.json and a markdown table."""
from __future__ import annotations

import json
import subprocess

import pytest

from helpers import ROOT, cli_env

SCRIPT = ROOT / "benchmarks" / "gpu" / "check.sh"
STEPS = ["environment", "gpu_tests", "throughput", "engine_parity", "padding_free", "lora_memory",
         "sharded_lora_memory", "chunked_loss_memory", "qlora_memory", "generation"]


def check(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_script_parses_and_refuses_an_unknown_option():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    proc = check("--fast")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "check.sh: unknown option '--fast'; see --help"


def test_cuda_only_steps_are_skipped_on_the_cpu(tmp_path):
    proc = check("--dry-run", "--steps", "throughput,qlora_memory", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = json.loads((tmp_path / "results.json").read_text())["steps"]
    assert {name: (s["status"], s.get("reason")) for name, s in steps.items()} == {
        "environment": ("ok", None), "throughput": ("skipped", "no CUDA"), "qlora_memory": ("skipped", "no CUDA")}
    table = (tmp_path / "results.md").read_text()
    assert "| throughput | skipped | no CUDA |" in table


@pytest.mark.slow
def test_dry_run_records_every_step_with_loss_parity(tmp_path):
    proc = check("--dry-run", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    steps = report["steps"]
    assert list(steps) == STEPS
    assert {name: s["status"] for name, s in steps.items()} == {
        **dict.fromkeys(STEPS, "ok"), "throughput": "skipped", "qlora_memory": "skipped"}
    assert report["versions"]["torch"] and report["dry_run"] is True
    parity = steps["engine_parity"]
    for engine in ("fsdp", "zero3"):
        assert len(parity[engine]["losses"]) == 10
        assert parity[engine]["max_rel_diff"] <= 1e-2 and parity[engine]["agree"] is True
        assert isinstance(parity[engine]["overhead_pct"], float)
    assert steps["padding_free"]["speedup"] > 0
    assert steps["padding_free"]["first_loss"]["padding_free"] == pytest.approx(
        steps["padding_free"]["first_loss"]["padded"], rel=1e-2)
    assert steps["lora_memory"]["peaks_gib"]
    for engine in ("fsdp", "zero3"):
        assert steps["sharded_lora_memory"]["peaks_gib"][engine]["train/peak_rss_gib"] > 0
    chunked = steps["chunked_loss_memory"]["peaks_gib"]
    assert steps["chunked_loss_memory"]["seq"] == 512
    assert chunked["chunked"]["train/peak_rss_gib"] > 0 and chunked["whole_logits"]["train/peak_rss_gib"] > 0
    assert isinstance(steps["generation"]["text"], str)
    table = (tmp_path / "results.md").read_text().splitlines()
    assert "| step | status | result | s |" in table
    assert [line.split(" | ")[0].lstrip("| ") for line in table if line.startswith("| ")][2:] == STEPS
