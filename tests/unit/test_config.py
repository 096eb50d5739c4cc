import pytest

from dist_tune.cli import resolve_recipe
from dist_tune.config import (ConfigError, dump_config, flattened, load_config, read_yaml, resolve_padding_free,
                              resolve_precision)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_dotted_overrides_merge_with_types(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-3\ntrain:\n  max_steps: 7\n")
    cfg = load_config(path, {"optim.lr": "2e-4", "peft.target_modules": "q_proj,v_proj", "train.resume": "none",
                             "engine.activation_checkpointing": "true", "log.wandb.tags": ["a", "b"]})
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.train.max_steps == 7
    assert cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert cfg.engine.activation_checkpointing is True
    assert cfg.log.wandb.tags == ["a", "b"]


def test_unknown_key_names_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rat'.*"):
        load_config(write(tmp_path, "optim:\n  learning_rat: 0.1\n"))
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'; did you mean 'train'"):
        load_config(None, {"trian.max_steps": 3})
    with pytest.raises(ConfigError, match=r"'train.max_step'; did you mean 'max_steps'"):
        load_config(None, {"train.max_step": 3})


@pytest.mark.parametrize("override, message", [
    ({"train.max_steps": "ten"}, "train.max_steps' expects an integer"),
    ({"optim.lr": "fast"}, "optim.lr' expects a number"),
    ({"engine.kind": "megatron"}, "engine.kind' is 'megatron'; choose one of single, ddp, fsdp, deepspeed"),
    ({"engine.zero_stage": 4}, "engine.zero_stage' is 4"),
    ({"train.micro_batch_size": 0}, "micro_batch_size must be >= 1"),
    ({"engine.offload_optimizer": True}, "DeepSpeed options"),
    ({"engine.kind": "ddp", "engine.cpu_offload": True}, "cpu_offload is an FSDP option"),
    ({"engine.kind": "deepspeed", "engine.sync_each_batch": False}, "engine.sync_each_batch=false is an FSDP option"),
    ({"engine.kind": "deepspeed", "engine.offload_params": True, "engine.zero_stage": 2}, "needs engine.zero_stage=3"),
    ({"data.format": "classification"}, "needs model.task=classification"),
    ({"peft.load_in_4bit": True}, "needs peft.method=lora or dora"),
    ({"data.padding_free": True, "model.task": "classification", "data.format": "classification"},
     "data.padding_free concatenates causal-LM rows; set data.padding_free=false"),
    ({"data.padding_free": True, "peft.method": "prompt_tuning"}, "examples sharing a row cannot be kept apart"),
    ({"data.pack": True, "peft.method": "prefix_tuning"}, "set data.pack=false and data.padding_free=false"),
    ({"data.padding_free": "fast"}, "'data.padding_free' is 'fast'; choose one of auto, true, false"),
    ({"peft.method": "lora", "peft.load_in_4bit": True, "engine.kind": "fsdp"},
     "peft.load_in_4bit (QLoRA) cannot be sharded by engine.kind=fsdp; use engine.kind=single or ddp, or drop "
     "peft.load_in_4bit"),
    ({"peft.method": "lora", "peft.load_in_4bit": True, "engine.kind": "deepspeed"}, "engine.kind=deepspeed"),
    ({"eval.generate_samples": -1}, "eval.generate_samples must be >= 0 (0 turns generation metrics off)"),
    ({"eval.max_new_tokens": 0}, "eval.max_new_tokens must be >= 1"),
    ({"eval.generate_sample": 4}, "unknown config key 'eval.generate_sample'; did you mean 'generate_samples'?"),
])
def test_bad_values_raise_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"not valid YAML at line 3"):
        read_yaml(write(tmp_path, "train:\n  max_steps: 1\n    seed: 2\n"))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'nope.yaml' not found"):
        load_config("nope.yaml")


def test_section_given_a_scalar_is_rejected():
    with pytest.raises(ConfigError, match="'optim' is a section"):
        load_config(None, {"optim": 3})


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, {"optim.lr": 0.5, "train.run_name": "x"})
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg


def test_packaged_demo_recipe_resolves_and_loads():
    path = resolve_recipe("demo")
    assert path.name == "demo.yaml" and path.is_file()
    cfg = load_config(path)
    assert cfg.data.path.startswith("bundled:")


@pytest.mark.parametrize("bf16, overrides, expected", [
    (True, {}, ("float32", "bf16")),  # full tuning: fp32 master weights, bf16 compute
    (True, {"peft.method": "lora"}, ("bfloat16", "bf16")),  # frozen base in bf16, adapter fp32 (peft)
    (True, {"peft.method": "prompt_tuning"}, ("bfloat16", "bf16")),
    (True, {"peft.method": "adapter"}, ("float32", "bf16")),  # adaption prompts would take the base's dtype
    (True, {"peft.method": "freeze"}, ("float32", "bf16")),
    (True, {"peft.method": "lora", "engine.mixed_precision": "fp32"}, ("float32", "fp32")),
    (True, {"peft.method": "lora", "model.dtype": "float16"}, ("float16", "bf16")),
    (False, {}, ("float32", "fp32")),  # CPU
    (False, {"peft.method": "lora"}, ("float32", "fp32")),
    (False, {"engine.mixed_precision": "bf16"}, ("float32", "bf16")),
])
def test_auto_precision_resolves_per_device_and_method(bf16, overrides, expected):
    cfg = load_config(None, overrides)
    resolve_precision(cfg, bf16)
    assert (cfg.model.dtype, cfg.engine.mixed_precision) == expected


def test_engine_settles_auto_precision_for_a_bf16_gpu_and_turns_on_tf32(monkeypatch):
    import torch

    from dist_tune.cluster import ClusterEnv
    from dist_tune.engines.single import SingleEngine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        cfg = load_config(None, {"peft.method": "lora"})
        SingleEngine(cfg, ClusterEnv(), torch.device("cuda", 0))
        assert (cfg.model.dtype, cfg.engine.mixed_precision) == ("bfloat16", "bf16")
        assert torch.get_float32_matmul_precision() == "high"
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
        cfg = load_config(None, {"peft.method": "lora"})
        SingleEngine(cfg, ClusterEnv(), torch.device("cuda", 0))
        assert (cfg.model.dtype, cfg.engine.mixed_precision) == ("float32", "fp32")
    finally:
        torch.set_float32_matmul_precision(previous)


def test_engine_on_cpu_trains_in_fp32_and_leaves_tf32_alone():
    import torch

    from dist_tune.cluster import ClusterEnv
    from dist_tune.engines.single import SingleEngine

    cfg = load_config(None, {"peft.method": "lora"})
    before = torch.get_float32_matmul_precision()
    SingleEngine(cfg, ClusterEnv(), torch.device("cpu"))
    assert (cfg.model.dtype, cfg.engine.mixed_precision) == ("float32", "fp32")
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.parametrize("overrides, window, on, reason", [
    ({}, None, True, None),
    ({"data.format": "text"}, 4096, True, None),
    ({"model.task": "classification", "data.format": "classification"}, None, False,
     "model.task=classification batches whole sequences"),
    ({"peft.method": "prefix_tuning"}, None, False, "peft.method=prefix_tuning puts virtual tokens in front"),
    ({"peft.method": "prompt_tuning"}, None, False, "peft.method=prompt_tuning puts virtual tokens in front"),
    ({"data.max_length": 256}, 128, False, "sliding attention window (128 tokens) is shorter than data.max_length=256"),
])
def test_padding_free_auto_is_on_wherever_valid_and_says_why_not(caplog, overrides, window, on, reason):
    cfg = load_config(None, overrides)
    assert cfg.data.padding_free == "auto"
    with caplog.at_level("INFO", logger="dist_tune.config"):
        resolve_padding_free(cfg, window)
    assert cfg.data.padding_free is on
    assert flattened(cfg) is on
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == (1 if reason else 0)
    if reason:
        assert lines[0].startswith("data.padding_free=auto is off: ") and reason in lines[0] and "\n" not in lines[0]


def test_explicit_padding_free_keeps_its_meaning():
    padded = load_config(None, {"data.padding_free": "false"})
    resolve_padding_free(padded, None)
    assert padded.data.padding_free is False and not flattened(padded)
    flat = load_config(None, {"data.padding_free": True})
    resolve_padding_free(flat, 128)  # an explicit true is checked (and refused) where the model is loaded
    assert flat.data.padding_free is True and flattened(flat)
