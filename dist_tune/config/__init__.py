"""The run configuration: its typed schema (schema.py), loading from YAML and dotted overrides (load.py), validation
(checks.py) and the run-time decisions it implies (resolve.py). Everything is importable from here."""
from dist_tune.config.checks import validate
from dist_tune.config.load import (ALIASES, apply_overrides, changed_values, config_from_dict, dump_config,
                                   load_config, load_with_sources, read_yaml)
from dist_tune.config.resolve import (LOGIT_TRANSFORMS, LOGITS_CHUNK_BYTES, bf16_device, data_formats, flattened,
                                      loss_chunk_positions, padding_free, padding_free_blocker, qlora_compute_dtype,
                                      resolve_padding_free, resolve_precision, shards_parameters, uses_target_logits)
from dist_tune.config.schema import (CHOICES, FP32_ADAPTER_METHODS, VIRTUAL_TOKEN_METHODS, CheckpointConfig, Config,
                                     ConfigError, DataConfig, EngineConfig, EvalConfig, LogConfig, ModelConfig,
                                     OptimConfig, PeftConfig, SourceConfig, TrainConfig, WandbConfig)

__all__ = ["ALIASES", "CHOICES", "FP32_ADAPTER_METHODS", "LOGITS_CHUNK_BYTES", "LOGIT_TRANSFORMS",
           "VIRTUAL_TOKEN_METHODS", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EngineConfig",
           "EvalConfig", "LogConfig", "ModelConfig", "OptimConfig", "PeftConfig", "SourceConfig", "TrainConfig",
           "WandbConfig", "apply_overrides", "bf16_device", "changed_values", "config_from_dict", "data_formats",
           "dump_config", "flattened", "load_config", "load_with_sources", "loss_chunk_positions", "padding_free",
           "padding_free_blocker", "qlora_compute_dtype", "read_yaml", "resolve_padding_free", "resolve_precision",
           "shards_parameters", "uses_target_logits", "validate"]
