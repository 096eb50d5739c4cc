"""What a preparation leaves in the cache directory: for each role (train, validation) and fingerprint, the Arrow
files of its model-ready rows and their statistics, in a manifest written last, so a manifest means a finished
preparation whatever `data.num_proc` wrote it, and any later run (any rank, any node that sees the directory)
memory-maps the files instead of preparing again."""
from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc

ROLES = ("train", "validation")


def manifest_path(cache_dir: Path, role: str, fingerprint: str) -> Path:
    return cache_dir / f"{role}-{fingerprint}.json"


def read_manifest(cache_dir: Path, role: str, fingerprint: str) -> dict | None:
    """The manifest of a finished preparation whose files are all there, else None."""
    path = manifest_path(cache_dir, role, fingerprint)
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return manifest if all(Path(f).is_file() for f in manifest["files"]) else None


def load(cache_dir: Path, role: str, fingerprint: str) -> datasets.Dataset | None:
    """The prepared rows, memory-mapped; None when this preparation has not finished."""
    manifest = read_manifest(cache_dir, role, fingerprint)
    if manifest is None:
        return None
    parts = [datasets.Dataset.from_file(f) for f in manifest["files"]]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def save(cache_dir: Path, role: str, fingerprint: str, dataset: datasets.Dataset, stats: dict) -> None:
    """Record a finished preparation (atomically: a reader sees the whole manifest or none)."""
    path = manifest_path(cache_dir, role, fingerprint)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"files": [f["filename"] for f in dataset.cache_files], **stats}, indent=1))
    os.replace(tmp, path)


def _lengths(dataset: datasets.Dataset) -> np.ndarray:
    return pc.list_value_length(dataset.data.column("input_ids")).to_numpy().astype(np.int64)


def example_stats(encoded: datasets.Dataset, records: int, max_length: int | None) -> dict:
    """Examples, tokens, dropped records, examples at max_length (truncated or exactly full; None: examples are
    never cut, as packed text is split across rows) and the length distribution of tokenized examples, before
    any packing."""
    lengths = _lengths(encoded)
    p50, p90, p99 = (int(v) for v in np.percentile(lengths, [50, 90, 99], method="nearest"))
    return {"records": records, "examples": len(lengths), "dropped": records - len(lengths),
            "tokens": int(lengths.sum()), "at_max_length": int((lengths >= max_length).sum()) if max_length else 0,
            "length_p50": p50, "length_p90": p90, "length_p99": p99, "length_max": int(lengths.max())}


def row_stats(rows: datasets.Dataset, tokens: int, max_length: int) -> dict:
    """Rows the model sees and the share of max_length × rows they leave empty (padding at max_length)."""
    return {"rows": len(rows), "padding_share": round(1 - tokens / (len(rows) * max_length), 4)}


def manifests_of(cache_dir: Path, dataset: datasets.Dataset) -> list[dict]:
    """The manifests of the preparations whose files make up `dataset` (one per source of a mixture)."""
    files = {f["filename"] for f in dataset.cache_files}
    paths = sorted(p for role in ROLES for p in cache_dir.glob(f"{role}-*.json"))
    manifests = (json.loads(path.read_text()) for path in paths)
    return [m for m in manifests if m["files"] and set(m["files"]) <= files]
