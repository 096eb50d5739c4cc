"""build_datasets: load, check, split, tokenize (data.num_proc processes) and pack into Arrow files in the cache
directory, keyed by a deterministic fingerprint; a finished preparation is memory-mapped, never redone."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import datasets
import numpy as np

from dist_tune.config import Config, data_formats
from dist_tune.data import chat, prepared
from dist_tune.data.formats import (ENCODERS, check_fields, encode_labels, label_names, output_features,
                                    prompt_templates)
from dist_tune.data.mixture import Mixture, describe, mix, source_config
from dist_tune.data.packing import pack
from dist_tune.data.sources import HUB, load_records, resolve_path
from dist_tune.errors import DataError

log = logging.getLogger(__name__)

# data settings that change how prepared rows are read or made, not which rows: outside the fingerprint
UNPREPARED_FIELDS = ("num_workers", "pin_memory", "cache_dir", "num_proc", "padding_free")
ROWS_PER_PROCESS = 2000  # fewer rows per tokenizing process cost more to start than they save


def _source_identity(path: str, raw: datasets.Dataset) -> list:
    """Path, size and mtime of the source file(s) (for `hf:` datasets their cache files, which are named by
    revision): a change to any of them invalidates the cache."""
    if path.startswith(HUB):
        files = [Path(f["filename"]) for f in raw.cache_files]
    else:
        resolved = resolve_path(path)
        files = sorted(p for p in resolved.rglob("*") if p.is_file()) if resolved.is_dir() else [resolved]
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else datasets.fingerprint.Hasher.hash(tokenizer)
    specials = (type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.chat_template)
    return hashlib.sha256(f"{state}{specials}".encode()).hexdigest()


def _code_hash() -> str:
    sources = sorted(Path(__file__).parent.glob("*.py"))
    return hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()


def _fingerprint(cfg: Config, tokenizer, role: str, names: list[str] | None, sources: dict[str, list]) -> str:
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in UNPREPARED_FIELDS}
    key = {
        "role": role, "data": data, "task": cfg.model.task, "names": names, "seed": cfg.train.seed, **sources,
        "tokenizer": _tokenizer_hash(tokenizer), "code": _code_hash(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def num_proc(cfg: Config, rows: int) -> int | None:
    """Tokenizing processes: data.num_proc (default the CPUs this process may use), at most one per
    ROWS_PER_PROCESS rows; None for one (datasets would start a pool of one worker for num_proc=1)."""
    available = cfg.data.num_proc or len(os.sched_getaffinity(0))
    procs = min(available, rows // ROWS_PER_PROCESS)
    return procs if procs > 1 else None


def cache_dir(cfg: Config) -> Path:
    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(datasets.config.HF_DATASETS_CACHE) / "dist_tune"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _check_config(cfg: Config) -> None:
    if cfg.data.format == "instruction":
        prompt_templates(cfg.data.prompt_template)
    if cfg.data.pack and cfg.data.format == "classification":
        raise DataError("data.pack packs text and instruction rows, not classification rows; set data.pack=false")


def _load(cfg: Config, path: str, key: str, split: str) -> datasets.Dataset:
    data = cfg.data
    raw = load_records(path, key=key, split=split, config=data.config, data_files=data.data_files,
                       cache_dir=data.cache_dir)
    check_fields(raw, cfg, path)
    return raw


def _prepare(raw: datasets.Dataset, cfg: Config, names: list[str] | None, source: str) -> datasets.Dataset:
    """Encode labels and check conversations before any split so errors name rows of the source file."""
    if cfg.data.format == "classification":
        return encode_labels(raw, cfg, names, source)
    if cfg.data.format == "chat":
        return chat.normalize(raw, cfg, source)
    return raw


def _split(raw: datasets.Dataset, cfg: Config) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The rows `train_test_split(test_size=n_val, seed=train.seed)` picks, as index mappings over the
    memory-mapped records rather than copies of them."""
    n_val = max(1, round(len(raw) * cfg.data.validation_split))
    if n_val >= len(raw):
        raise DataError(f"'{cfg.data.path}' has {len(raw)} rows, too few to hold out data.validation_split="
                        f"{cfg.data.validation_split}; set data.validation_split=0 or data.validation_path")
    order = np.random.default_rng(cfg.train.seed).permutation(len(raw))
    return raw.select(order[n_val:]), raw.select(order[:n_val])


def _tokenize(raw: datasets.Dataset, cfg: Config, tokenizer, role: str, names: list[str] | None,
              source: str, fingerprint: str) -> datasets.Dataset:
    """Tokenized (and packed) rows in the cache directory, with a manifest of their statistics."""
    cache = cache_dir(cfg)
    encode = functools.partial(ENCODERS[cfg.data.format], tokenizer=tokenizer, cfg=cfg)
    if cfg.data.format == "chat":
        encode = functools.partial(encode, source=source)
    encoded = raw.map(
        encode,
        batched=True, remove_columns=raw.column_names, features=output_features(cfg, names),
        cache_file_name=str(cache / f"{role}-{fingerprint}.arrow"), new_fingerprint=fingerprint,
        load_from_cache_file=True, num_proc=num_proc(cfg, len(raw)), desc=f"Tokenizing {role} data",
    )
    if len(encoded) == 0:
        raise DataError(f"{role} data from '{source}' has no usable rows after tokenization (every response cut "
                        f"off at data.max_length={cfg.data.max_length}, or empty texts); raise data.max_length "
                        "or fix the data")
    split_examples = cfg.data.pack and cfg.data.format == "text"
    stats = prepared.example_stats(encoded, len(raw), None if split_examples else cfg.data.max_length)
    if cfg.data.pack:
        encoded = pack(encoded, cfg.data.max_length, split_examples=split_examples,
                       path=cache / f"{role}-{fingerprint}-packed.arrow")
    prepared.save(cache, role, fingerprint, encoded,
                  {**stats, **prepared.row_stats(encoded, stats["tokens"], cfg.data.max_length)})
    log.info("%s data from '%s': prepared %s rows (%s tokens) into %s", role, source, f"{len(encoded):,}",
             f"{stats['tokens']:,}", cache)
    return encoded


def _build(cfg: Config, tokenizer, train_raw: datasets.Dataset, names: list[str] | None,
           key: str = "data") -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Train and validation rows of the one source cfg.data names, its train records already loaded: those of an
    earlier preparation with the same fingerprints, else prepared now."""
    data = cfg.data
    sources = {"path": _source_identity(data.path, train_raw), "validation_path": None}
    val_raw, val_source = None, data.path
    if data.validation_path:
        val_source = data.validation_path
        val_raw = _load(cfg, val_source, f"{key}.validation_path", "validation")
        sources["validation_path"] = _source_identity(val_source, val_raw)
    roles = ("train", "validation") if data.validation_path or data.validation_split > 0 else ("train",)
    fingerprints = {role: _fingerprint(cfg, tokenizer, role, names, sources) for role in roles}
    cache = cache_dir(cfg)
    done = {role: prepared.load(cache, role, fp) for role, fp in fingerprints.items()}
    if all(rows is not None for rows in done.values()):
        log.info("data from '%s': %s, prepared earlier, memory-mapped from %s", data.path,
                 ", ".join(f"{len(rows):,} {role} rows" for role, rows in done.items()), cache)
        return done["train"], done.get("validation")
    try:
        train_raw = _prepare(train_raw, cfg, names, data.path)
        if val_raw is not None:
            val_raw = _prepare(val_raw, cfg, names, val_source)
        elif data.validation_split > 0:
            train_raw, val_raw = _split(train_raw, cfg)
        train = _tokenize(train_raw, cfg, tokenizer, "train", names, data.path, fingerprints["train"])
        val = (_tokenize(val_raw, cfg, tokenizer, "validation", names, val_source, fingerprints["validation"])
               if val_raw is not None else None)
    except UnicodeDecodeError as exc:  # the Arrow readers keep bytes as they are; decoding them finds it
        named = " or ".join(dict.fromkeys(f"'{p}'" for p in (data.path, val_source)))
        raise DataError(f"data file {named} is not UTF-8 text ({exc.reason}: byte {exc.object[exc.start]:#x}); "
                        "re-encode it as UTF-8") from None
    return train, val


def _shared_label_names(configs: list[Config], raws: list[datasets.Dataset]) -> list[str] | None:
    per_source = [label_names(c, raw) for c, raw in zip(configs, raws)]
    for c, names in zip(configs[1:], per_source[1:]):
        if names != per_source[0]:
            raise DataError(f"data.sources have different classes ('{configs[0].data.path}': "
                            f"{', '.join(per_source[0])}; '{c.data.path}': {', '.join(names)}); set data.label_names "
                            "to the full list")
    return per_source[0]


def _build_mixture(cfg: Config, tokenizer) -> tuple[Mixture, datasets.Dataset | None]:
    """Each of data.sources built on its own, then mixed by weight (train) and concatenated (validation)."""
    configs = [source_config(cfg, source) for source in cfg.data.sources]
    keys = [f"data.sources[{i}]" for i in range(len(configs))]
    for c in configs:
        _check_config(c)
    raws = [_load(c, c.data.path, f"{key}.path", c.data.split) for c, key in zip(configs, keys)]
    names = _shared_label_names(configs, raws)
    parts = [_build(c, tokenizer, raw, names, key) for c, raw, key in zip(configs, raws, keys)]
    mixture = mix([train for train, _ in parts], [s.weight for s in cfg.data.sources], cfg.train.seed)
    for line in describe(mixture, cfg.data.sources, cfg.data.format):
        log.info(line)
    vals = [val for _, val in parts if val is not None]
    return mixture, datasets.concatenate_datasets(vals) if vals else None


def _validation_rows(cfg: Config, tokenizer, path: str, key: str) -> datasets.Dataset:
    """The prepared rows of validation source `path` alone (the train rows are streamed)."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path, validation_path=None,
                                                            validation_split=0.0, streaming=False))
    _check_config(cfg)
    raw = _load(cfg, path, key, "validation")
    fingerprint = _fingerprint(cfg, tokenizer, "validation", None, {"path": _source_identity(path, raw)})
    done = prepared.load(cache_dir(cfg), "validation", fingerprint)
    if done is not None:
        return done
    return _tokenize(_prepare(raw, cfg, None, path), cfg, tokenizer, "validation", None, path, fingerprint)


def _streamed_validation(cfg: Config, tokenizer) -> datasets.Dataset | None:
    """data.streaming: the validation rows of data.validation_path (or each source's), prepared as usual; a
    stream has no size to hold a data.validation_split fraction out of, so without one there is none."""
    configs = [source_config(cfg, s) for s in cfg.data.sources] or [cfg]
    keys = [f"data.sources[{i}].validation_path" for i in range(len(cfg.data.sources))] or ["data.validation_path"]
    parts = [_validation_rows(c, tokenizer, c.data.validation_path, key)
             for c, key in zip(configs, keys) if c.data.validation_path]
    if not parts and cfg.data.validation_split > 0:
        log.info("data.streaming: no validation rows (a stream has no size to hold data.validation_split out of); "
                 "set data.validation_path to evaluate")
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else (parts[0] if parts else None)


def build_datasets(cfg: Config, tokenizer) -> tuple[datasets.Dataset | Mixture, datasets.Dataset | None]:
    """Train and validation datasets of model-ready rows: `input_ids`, `labels` and, when packed, `position_ids`.

    Validation comes from data.validation_path (its `validation` split for `hf:` datasets), else a
    data.validation_split hold-out seeded by train.seed, else is None. Classification labels are a ClassLabel
    feature (`train.features['labels'].names`). format=chat gives a tokenizer without a chat_template the
    default one (chat.DEFAULT_CHAT_TEMPLATE). With data.sources the train set is a Mixture and validation the
    union of each source's validation rows. With data.streaming the train rows are None (each rank streams its
    own, see data.stream) and validation comes from validation_path alone."""
    if "chat" in data_formats(cfg):
        chat.ensure_chat_template(tokenizer)
    if cfg.data.streaming:
        return None, _streamed_validation(cfg, tokenizer)
    if cfg.data.sources:
        return _build_mixture(cfg, tokenizer)
    _check_config(cfg)
    train_raw = _load(cfg, cfg.data.path, "data.path", cfg.data.split)
    return _build(cfg, tokenizer, train_raw, label_names(cfg, train_raw))
