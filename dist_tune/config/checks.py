"""Validation of a whole config: choices, ranges and combinations of settings that cannot work together, each
refused with one line naming the key and the fix."""
from __future__ import annotations

import re
from typing import Any

from dist_tune.config.resolve import data_formats, flattened, shards_parameters
from dist_tune.config.schema import CHOICES, VIRTUAL_TOKEN_METHODS, Config, ConfigError


def validate(cfg: Config) -> Config:
    for dotted, options in CHOICES.items():
        section, *rest = dotted.split(".")
        value = getattr(getattr(cfg, section), rest[0])
        if len(rest) == 2:
            value = getattr(value, rest[1])
        if value not in options:
            words = ", ".join(map(_yaml_word, options))
            raise ConfigError(f"config key '{dotted}' is {value!r}; choose one of {words}")
    checks = [
        (cfg.train.micro_batch_size >= 1, "train.micro_batch_size must be >= 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (cfg.train.ce_chunk_tokens >= 0, "train.ce_chunk_tokens must be >= 0 (0: sized from the vocabulary)"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.data.max_length >= 8, "data.max_length must be >= 8"),
        (0.0 <= cfg.data.validation_split < 1.0, "data.validation_split must be in [0, 1)"),
        (cfg.data.num_proc is None or cfg.data.num_proc >= 1,
         "data.num_proc must be >= 1 or null (the CPUs available)"),
        (cfg.train.max_steps is None or cfg.train.max_steps >= 1, "train.max_steps must be >= 1 or null"),
        (cfg.train.epochs > 0, "train.epochs must be > 0"),
        (cfg.eval.generate_samples >= 0, "eval.generate_samples must be >= 0 (0 turns generation metrics off)"),
        (cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens must be >= 1"),
        (re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]B\s*", cfg.checkpoint.max_shard_size, re.IGNORECASE) is not None,
         f"checkpoint.max_shard_size={cfg.checkpoint.max_shard_size!r} is not a size; write it like 1GB or 500MB"),
        (not (cfg.model.task == "causal_lm" and "classification" in data_formats(cfg)),
         "data.format=classification needs model.task=classification or regression"),
        (not (cfg.model.task != "causal_lm" and data_formats(cfg) != {"classification"}),
         f"model.task={cfg.model.task} needs data.format=classification"),
        (not ((cfg.engine.offload_optimizer or cfg.engine.offload_params) and cfg.engine.kind != "deepspeed"),
         "engine.offload_optimizer/offload_params are DeepSpeed options; set engine.kind=deepspeed or use engine.cpu_offload with fsdp"),
        (not (cfg.engine.cpu_offload and cfg.engine.kind != "fsdp"),
         "engine.cpu_offload is an FSDP option; set engine.kind=fsdp or use offload_optimizer with deepspeed"),
        (cfg.engine.sync_each_batch or cfg.engine.kind == "fsdp",
         "engine.sync_each_batch=false is an FSDP option (DDP and DeepSpeed reduce at the last micro-batch already); "
         "remove it or set engine.kind=fsdp"),
        (not (cfg.engine.offload_params and cfg.engine.zero_stage != 3),
         "engine.offload_params needs engine.zero_stage=3"),
        (cfg.engine.shard_unit == "block" or shards_parameters(cfg),
         "engine.shard_unit=linear sets how much of a sharded model is gathered at once; it needs engine.kind=fsdp, "
         "or deepspeed with engine.zero_stage=3; remove it"),
        (cfg.engine.replicate_degree >= 1, "engine.replicate_degree must be >= 1"),
        (cfg.engine.replicate_degree == 1 or shards_parameters(cfg),
         "engine.replicate_degree (hierarchical sharding) needs engine.kind=fsdp, or deepspeed with "
         "engine.zero_stage=3; set engine.replicate_degree=1"),
        (not (cfg.data.padding_free is True and cfg.model.task != "causal_lm"),
         "data.padding_free concatenates causal-LM rows; set data.padding_free=false for classification"),
        (not (flattened(cfg) and cfg.peft.method in VIRTUAL_TOKEN_METHODS),
         f"peft.method={cfg.peft.method} puts virtual tokens in front of the whole row, so examples sharing a row "
         "cannot be kept apart; set data.pack=false and data.padding_free=false"),
        (not (cfg.data.streaming and cfg.train.max_steps is None),
         "data.streaming reads rows as it trains, with no length to count epochs in; set train.max_steps"),
        (not (cfg.data.streaming and "classification" in data_formats(cfg)),
         "data.streaming reads causal-LM formats (text, instruction, chat); classification needs every label before "
         "training; set data.streaming=false"),
        (not (cfg.data.streaming and cfg.data.num_workers),
         "data.streaming reads the stream in the training process; set data.num_workers=0"),
        (not (cfg.peft.load_in_4bit and cfg.peft.method not in ("lora", "dora")),
         "peft.load_in_4bit (QLoRA) needs peft.method=lora or dora"),
        (not (cfg.peft.load_in_4bit and cfg.engine.kind in ("fsdp", "deepspeed")),
         f"peft.load_in_4bit (QLoRA) cannot be sharded by engine.kind={cfg.engine.kind}; use engine.kind=single "
         "or ddp, or drop peft.load_in_4bit"),
    ]
    for ok, message in checks + _source_checks(cfg):
        if not ok:
            raise ConfigError(message)
    return cfg


def _source_checks(cfg: Config) -> list[tuple[bool, str]]:
    checks = [(not (cfg.data.sources and cfg.data.validation_path),
               "data.validation_path does not apply to data.sources; set validation_path on each source instead")]
    for i, source in enumerate(cfg.data.sources):
        key = f"data.sources[{i}]"
        checks += [
            (bool(source.path), f"{key} has no path; give every source a path (a file, directory, hf:NAME or "
                                "bundled:NAME)"),
            (source.weight > 0, f"{key}.weight is {source.weight:g}; give every source a weight > 0"),
            (source.format in (None, *CHOICES["data.format"]),
             f"{key}.format is {source.format!r}; choose one of {', '.join(CHOICES['data.format'])}"),
            (source.train_on in (None, *CHOICES["data.train_on"]),
             f"{key}.train_on is {source.train_on!r}; choose one of {', '.join(CHOICES['data.train_on'])}"),
        ]
    return checks


def _yaml_word(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
