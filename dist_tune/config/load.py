"""Loading a config: YAML files and dotted overrides merged into the schema, with values coerced to the field
types and an unknown key answered by the closest valid one; dumping it back as YAML."""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dist_tune.config.checks import validate
from dist_tune.config.schema import Config, ConfigError


# Names other trainers (HF TrainingArguments, DeepSpeed) use for our keys; spelling distance cannot find these.
ALIASES = {"learning_rate": "lr", "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
           "train_micro_batch_size_per_gpu": "micro_batch_size", "gradient_accumulation_steps": "grad_accum",
           "num_train_epochs": "epochs", "max_seq_length": "max_length", "model_name_or_path": "name_or_path"}


def _closest(name: str, options: list[str]) -> str:
    initials = "".join(part[:1] for part in name.split("_"))  # learning_rate -> lr
    match = [m for m in (ALIASES.get(name), initials if "_" in name else None) if m in options]
    match = match or difflib.get_close_matches(name, options, n=1, cutoff=0.4)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(options)}"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("null", "none"))):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[-1]
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return _sections(value, args[0], key)
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value] if not isinstance(value, str) else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value] if args else list(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if hint in (int, float):
        return _number(value, hint, key)
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return str(value)
    return value


def _number(value: Any, kind: type, key: str) -> int | float:
    """value as an int (no fractional part) or a float; never from a bool."""
    wanted = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"config key '{key}' expects {wanted}, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}' expects {wanted}, got {value!r}") from None


def _sections(value: Any, cls: type, key: str) -> list[Any]:
    """A list of `cls` sections from a list of mappings (on the command line, a YAML string of one)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"config key '{key}' is not valid YAML; give a list of mappings, e.g. "
                              "'[{path: a.jsonl, weight: 3}, {path: b.jsonl}]'") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, dict) for item in value):
        raise ConfigError(f"config key '{key}' expects a list of mappings, e.g. [{{path: a.jsonl, weight: 3}}], "
                          f"got {value!r}")
    sections = [cls() for _ in value]
    for i, (section, item) in enumerate(zip(sections, value)):
        _merge(section, item, f"{key}[{i}].")
    return sections


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> list[str]:
    """Set `updates` (nested mappings) on the dataclass `obj`; returns the dotted keys it set."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    keys = []
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"unknown config key '{key}'{_closest(name, names)}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; give it a mapping, not {value!r}")
            keys += _merge(current, value, f"{key}.")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))
            keys.append(key)
    return keys


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = key.replace("-", "_").split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}' conflicts with another override")
        node[parts[-1]] = value
    return nested


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; pass an existing YAML file or use a packaged recipe name")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, data:, ...)")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build a Config from defaults, an optional YAML file and dotted overrides, then validate it."""
    return load_with_sources(path, overrides)[0]


def load_with_sources(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                      label: str | None = None) -> tuple[Config, dict[str, str]]:
    """load_config, plus which layer last set each dotted key: `label` (default: the YAML path) or "command line"."""
    cfg, sources = Config(), {}
    if path is not None:
        sources.update(dict.fromkeys(_merge(cfg, read_yaml(path)), label or str(path)))
    sources.update(dict.fromkeys(_merge(cfg, _nest(overrides or {})), "command line"))
    return validate(cfg), sources


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in data.items():
        flat.update(_flat(value, f"{prefix}{name}.") if isinstance(value, dict) else {f"{prefix}{name}": value})
    return flat


def changed_values(cfg: Config, sources: dict[str, str]) -> list[str]:
    """`key = value (source)` for every value of cfg that differs from the library default."""
    defaults = _flat(Config().to_dict())
    return [f"{key} = {value if isinstance(value, str) else json.dumps(value)} ({sources.get(key, 'resolved')})"
            for key, value in _flat(cfg.to_dict()).items() if value != defaults[key]]


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Merge dotted overrides (`{"optim.lr": 1e-4}`) into cfg and validate the result."""
    _merge(cfg, _nest(overrides))
    return validate(cfg)


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    _merge(cfg, data)
    return validate(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
