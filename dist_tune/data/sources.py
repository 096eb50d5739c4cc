"""Read records from a local source or the Hugging Face Hub into an in-memory or memory-mapped
`datasets.Dataset`."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

from dist_tune.errors import DataError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
BUNDLED = {"instructions": "instructions.jsonl", "text": "text.jsonl", "sentiment": "sentiment.jsonl",
           "chat": "chat.jsonl"}
HUB = "hf:"
SOURCES_HINT = ("a .jsonl/.json/.parquet/.csv file, a directory of such shards, a datasets save_to_disk directory, "
                "hf:NAME, or " + "|".join(f"bundled:{name}" for name in BUNDLED))


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


def _read_file(path: Path, key: str) -> pa.Table:
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise DataError(f"data file '{path}' has an unsupported type '{suffix}'; set {key} to {SOURCES_HINT}")
    try:
        return READERS[suffix](path)
    except (UnicodeDecodeError, pa.ArrowInvalid) as exc:
        raise DataError(f"data file '{path}' cannot be read as {suffix[1:]}: {_first_line(exc)}; "
                        f"fix the file or set {key} to another source") from None


def _shards(path: Path) -> list[Path]:
    """The directory's data files (any depth, hidden entries skipped) in sorted order."""
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in READERS
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def _read_shards(path: Path, key: str) -> datasets.Dataset:
    shards = _shards(path)
    if not shards:
        raise DataError(f"directory '{path}' holds no .jsonl/.json/.parquet/.csv shards and is not a datasets "
                        f"save_to_disk directory; set {key} to {SOURCES_HINT}")
    kinds = sorted({p.suffix.lower() for p in shards})
    if len(kinds) > 1:
        raise DataError(f"directory '{path}' mixes {' and '.join(kinds)} files; keep one kind of shard per "
                        f"directory or set {key} to one file")
    tables = [_read_file(shard, key) for shard in shards]
    for shard, table in zip(shards[1:], tables[1:]):
        try:
            pa.unify_schemas([tables[0].schema, table.schema])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataError(f"shard '{shard}' does not match the columns of '{shards[0]}' ({_first_line(exc)}); "
                            "give every shard the same fields and types") from None
    return datasets.Dataset(pa.concat_tables(tables, promote_options="default"))


def _read_dir(path: Path, split: str | None, key: str) -> datasets.Dataset:
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _read_shards(path, key)
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    if split in loaded:
        return loaded[split]
    raise DataError(f"dataset directory '{path}' holds splits {', '.join(loaded)}; point {key} at "
                    f"one of them, e.g. '{path / next(iter(loaded))}'")


def _hub_snapshot(name: str) -> str | None:
    """The dataset repo's snapshot in the local hub cache (what `hf download` writes), if there is one."""
    try:
        return snapshot_download(name, repo_type="dataset", local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError):
        return None


def _hub_fix(name: str) -> str:
    download = f"`hf download --repo-type dataset {name}`"
    if datasets.config.HF_HUB_OFFLINE:
        return (f"dataset '{name}' is not in the local cache and HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) is set; "
                f"run {download} where there is network, or set HF_HUB_OFFLINE=0")
    return f"cannot reach the Hugging Face Hub for dataset '{name}'; check the network, or run {download} elsewhere"


def _load_hub(name: str, *, key: str, config: str | None = None, split: str = "train",
             data_files: list[str] | None = None, cache_dir: str | None = None) -> datasets.Dataset:
    """`hf:NAME` through `datasets.load_dataset`, cache first: a snapshot in the local hub cache (datasets itself
    does not look there offline), else the Hub, else datasets' own cache of an earlier download."""
    source = _hub_snapshot(name) or name
    try:
        return datasets.load_dataset(source, config, split=split, data_files=data_files, cache_dir=cache_dir)
    except ConnectionError:
        raise DataError(_hub_fix(name)) from None
    except DatasetNotFoundError:
        raise DataError(f"dataset '{name}' does not exist on the Hugging Face Hub or needs a login; check {key} "
                        "(hf:ORG/NAME) or run `hf auth login`") from None
    except (ValueError, FileNotFoundError) as exc:
        raise DataError(f"dataset '{name}' cannot be loaded: {_first_line(exc)}; check data.config, data.split "
                        "and data.data_files") from None


def load_records(path: str, *, key: str = "data.path", split: str | None = None, config: str | None = None,
                 data_files: list[str] | None = None, cache_dir: str | None = None) -> datasets.Dataset:
    """Load raw records from `path` (see SOURCES_HINT); `key` names the config key in errors. `split` picks the
    split of an `hf:` dataset (default train) or of a saved DatasetDict that holds several; `config`,
    `data_files` and `cache_dir` go to `datasets.load_dataset` for `hf:` sources."""
    if path.startswith(HUB):
        dataset = _load_hub(path[len(HUB):], key=key, config=config, split=split or "train", data_files=data_files,
                            cache_dir=cache_dir)
    else:
        resolved = resolve_path(path, key)
        dataset = _read_dir(resolved, split, key) if resolved.is_dir() else datasets.Dataset(
            _read_file(resolved, key))
    if len(dataset) == 0:
        raise DataError(f"data file '{path}' has no rows; set {key} to a non-empty dataset")
    return dataset
