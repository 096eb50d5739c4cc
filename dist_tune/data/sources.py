"""Read records from a local source or the Hugging Face Hub into a memory-mapped `datasets.Dataset`: no source is
ever held as Python objects or as an in-memory table of the whole file."""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import datasets
import pyarrow as pa
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


def _no_rows(path: Path | str, key: str) -> DataError:
    return DataError(f"data file '{path}' has no rows; set {key} to a non-empty dataset")


def _first_line(exc: Exception) -> str:
    return next(iter(str(exc).splitlines()), type(exc).__name__)


def _check_row(row: object, path: Path, where: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"data file '{path}' {where} is a {type(row).__name__}, not a JSON object; "
                        "make every record a {\"field\": value} object")


def _check_jsonl(path: Path) -> int:
    """The first bad line of a JSON-lines file as a DataError, read one line at a time; else its record count."""
    records = 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"data file '{path}' line {number} is not valid JSON: {exc.msg} at column "
                                f"{exc.colno}; fix or remove that line") from None
            _check_row(row, path, f"line {number}")
            records += 1
    return records


def _check_json(path: Path) -> int:
    """The first problem of a `.json` file (a JSON array of objects, or else one object per line), else its
    record count."""
    with path.open(encoding="utf-8") as handle:
        head = handle.read(4096).lstrip()
    if not head.startswith("["):
        return _check_jsonl(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"data file '{path}' line {exc.lineno} is not valid JSON: {exc.msg} at column "
                        f"{exc.colno}; fix the syntax") from None
    for i, row in enumerate(rows):
        _check_row(row, path, f"item {i}")
    return len(rows)


# Each local file type is read by the datasets library's own builder (Arrow-native, written once to an Arrow cache
# file and memory-mapped); the checks run only when a builder fails, to name the line and the fix.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
CHECKS = {".jsonl": _check_jsonl, ".json": _check_json}
QUIET_BELOW = 64 * 2**20
BUILDER_OPTIONS = {".csv": {"keep_default_na": False}}  # an empty text cell is "", not a missing value


def _explained(path: Path, key: str, exc: Exception) -> DataError:
    """The one-line error for a file its builder could not read: the bad line or item the checks find, else
    the builder's own first line."""
    suffix = path.suffix.lower()
    try:
        records = CHECKS.get(suffix, lambda _: None)(path)
    except UnicodeDecodeError as undecodable:
        records, exc = None, undecodable
    if records == 0:
        return _no_rows(path, key)
    return DataError(f"data file '{path}' cannot be read as {suffix[1:]}: {_first_line(exc.__cause__ or exc)}; "
                     f"fix the file or set {key} to another source")


def _mixed_types(dataset: datasets.Dataset) -> str | None:
    """A column the JSON builder could only store as JSON values (its rows hold values of different types)."""
    return next((name for name, feature in dataset.features.items() if isinstance(feature, datasets.Json)), None)


def _read_file(path: Path, key: str, cache_dir: str | None = None) -> datasets.Dataset:
    suffix = path.suffix.lower()
    if suffix not in BUILDERS:
        raise DataError(f"data file '{path}' has an unsupported type '{suffix}'; set {key} to {SOURCES_HINT}")
    size = path.stat().st_size
    if size == 0:
        raise _no_rows(path, key)
    try:
        with _builder_quietly(size):
            dataset = datasets.load_dataset(BUILDERS[suffix], data_files=[str(path)], split="train",
                                            cache_dir=cache_dir, **BUILDER_OPTIONS.get(suffix, {}))
    except Exception as exc:  # noqa: BLE001 - the builders raise many kinds; each becomes one line
        raise _explained(path, key, exc) from None
    column = _mixed_types(dataset)
    if column is not None:
        raise DataError(f"data file '{path}' mixes value types within column '{column}'; "
                        "give every row the same type per field")
    return dataset


@contextlib.contextmanager
def _builder_quietly(size: int):
    """The builder's own error log off (a failure becomes one DataError line), and its 'Generating train split'
    bar too for a file under QUIET_BELOW bytes; a larger one shows it (a long read)."""
    library_log = logging.getLogger("datasets")
    level, bars = library_log.level, datasets.utils.logging.is_progress_bar_enabled()
    library_log.setLevel(logging.CRITICAL)
    if size < QUIET_BELOW:
        datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        library_log.setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()


def _shards(path: Path) -> list[Path]:
    """The directory's data files (any depth, hidden entries skipped) in sorted order."""
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def _with_columns(dataset: datasets.Dataset, schema: pa.Schema) -> datasets.Dataset:
    """dataset with every column of `schema`, missing ones as nulls, in the schema's order."""
    for field in schema:
        if field.name not in dataset.column_names:
            dataset = dataset.add_column(field.name, pa.nulls(len(dataset), field.type))
    return dataset.select_columns(schema.names)


def _read_shards(path: Path, key: str, cache_dir: str | None) -> datasets.Dataset:
    shards = _shards(path)
    if not shards:
        raise DataError(f"directory '{path}' holds no .jsonl/.json/.parquet/.csv shards and is not a datasets "
                        f"save_to_disk directory; set {key} to {SOURCES_HINT}")
    kinds = sorted({p.suffix.lower() for p in shards})
    if len(kinds) > 1:
        raise DataError(f"directory '{path}' mixes {' and '.join(kinds)} files; keep one kind of shard per "
                        f"directory or set {key} to one file")
    parts = [_read_file(shard, key, cache_dir) for shard in shards]
    schema = parts[0].data.schema
    for shard, part in zip(shards[1:], parts[1:]):
        try:
            schema = pa.unify_schemas([schema, part.data.schema])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataError(f"shard '{shard}' does not match the columns of '{shards[0]}' ({_first_line(exc)}); "
                            "give every shard the same fields and types") from None
    return datasets.concatenate_datasets([_with_columns(part, schema) for part in parts])


def _read_dir(path: Path, split: str | None, key: str, cache_dir: str | None) -> datasets.Dataset:
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _read_shards(path, key, cache_dir)
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
    `data_files` go to `datasets.load_dataset` for `hf:` sources; `cache_dir` holds the Arrow files of every
    source (None: the datasets library's cache)."""
    if path.startswith(HUB):
        dataset = _load_hub(path[len(HUB):], key=key, config=config, split=split or "train", data_files=data_files,
                            cache_dir=cache_dir)
    else:
        resolved = resolve_path(path, key)
        dataset = (_read_dir(resolved, split, key, cache_dir) if resolved.is_dir()
                   else _read_file(resolved, key, cache_dir))
    if len(dataset) == 0:
        raise _no_rows(path, key)
    return dataset
