"""Helpers shared by the benchmark scripts: where and on what code a number was taken, and where it is written."""
from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}{' (uncommitted changes)' if dirty else ''}" if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_report(report: dict, table: str, json_out: str, results_md: str) -> None:
    """The full JSON to json_out, the markdown section appended to results_md ('' = none), the table printed."""
    out = Path(json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if results_md:
        path = Path(results_md)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = "" if path.exists() else "# Benchmark results\n\nSections are appended by the scripts in `benchmarks/`.\n"
        with open(path, "a", encoding="utf-8") as f:
            f.write(header + "\n" + table)
    print(table)
