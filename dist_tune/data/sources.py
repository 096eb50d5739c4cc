"""Read records from a local source into an in-memory or memory-mapped `datasets.Dataset`."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from dist_tune.errors import DataError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
BUNDLED = {"instructions": "instructions.jsonl", "text": "text.jsonl", "sentiment": "sentiment.jsonl"}
SOURCES_HINT = ("a .jsonl/.json/.parquet/.csv file, a datasets save_to_disk directory, or "
                + "|".join(f"bundled:{name}" for name in BUNDLED))


def resolve_path(path: str, key: str = "data.path") -> Path:
    """Map `bundled:NAME` to the shipped file; check that the source exists."""
    if path.startswith("bundled:"):
        name = path.split(":", 1)[1]
        if name not in BUNDLED:
            raise DataError(f"unknown bundled dataset '{path}'; set {key} to one of "
                            + ", ".join(f"bundled:{n}" for n in BUNDLED))
        return ASSETS_DIR / "data" / BUNDLED[name]
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DataError(f"data file '{path}' not found; set {key} to {SOURCES_HINT}")
    return resolved


def _first_line(exc: Exception) -> str:
    return next(iter(str(exc).splitlines()), type(exc).__name__)


def _table_from_rows(rows: list[dict], path: Path) -> pa.Table:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    try:
        return pa.table({col: [row.get(col) for row in rows] for col in columns})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"data file '{path}' mixes value types within a column ({_first_line(exc)}); "
                        "give every row the same type per field") from None


def _check_row(row: object, path: Path, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"data file '{path}' {where} is a {type(row).__name__}, not a JSON object; "
                        "make every record a {\"field\": value} object")
    return row


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"data file '{path}' line {number} is not valid JSON: {exc.msg} at column "
                                f"{exc.colno}; fix or remove that line") from None
            rows.append(_check_row(row, path, f"line {number}"))
    return rows


def _read_json(path: Path) -> list[dict]:
    """A `.json` file holds either a JSON array of objects or one object per line."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return _read_jsonl(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"data file '{path}' line {exc.lineno} is not valid JSON: {exc.msg} at column "
                        f"{exc.colno}; fix the syntax") from None
    if not isinstance(rows, list):
        raise DataError(f"data file '{path}' holds a {type(rows).__name__}, not a list of records; "
                        "write a JSON array of objects or one object per line")
    return [_check_row(row, path, f"item {i}") for i, row in enumerate(rows)]


READERS = {
    ".jsonl": lambda path: _table_from_rows(_read_jsonl(path), path),
    ".json": lambda path: _table_from_rows(_read_json(path), path),
    ".parquet": pq.read_table,
    ".csv": pa_csv.read_csv,
}


def _read_disk(path: Path, split: str | None, key: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"directory '{path}' is not a datasets save_to_disk directory; set {key} to "
                        f"{SOURCES_HINT}") from None
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    if split in loaded:
        return loaded[split]
    raise DataError(f"dataset directory '{path}' holds splits {', '.join(loaded)}; point {key} at "
                    f"one of them, e.g. '{path / next(iter(loaded))}'")


def load_records(path: str, *, key: str = "data.path", split: str | None = None) -> datasets.Dataset:
    """Load raw records from `path` (see SOURCES_HINT); `key` names the config key in errors and
    `split` picks a split of a saved DatasetDict that holds several."""
    resolved = resolve_path(path, key)
    suffix = resolved.suffix.lower()
    if resolved.is_dir():
        dataset = _read_disk(resolved, split, key)
    elif suffix in READERS:
        try:
            dataset = datasets.Dataset(READERS[suffix](resolved))
        except (UnicodeDecodeError, pa.ArrowInvalid) as exc:
            raise DataError(f"data file '{path}' cannot be read as {suffix[1:]}: {_first_line(exc)}; "
                            f"fix the file or set {key} to another source") from None
    else:
        raise DataError(f"data file '{path}' has an unsupported type '{suffix}'; set {key} to {SOURCES_HINT}")
    if len(dataset) == 0:
        raise DataError(f"data file '{path}' has no rows; set {key} to a non-empty dataset")
    return dataset
