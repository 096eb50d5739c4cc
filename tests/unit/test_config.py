import pytest

from dist_tune.cli import resolve_recipe
from dist_tune.config import ConfigError, dump_config, load_config, read_yaml


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
    ({"engine.kind": "deepspeed", "engine.offload_params": True, "engine.zero_stage": 2}, "needs engine.zero_stage=3"),
    ({"data.format": "classification"}, "needs model.task=classification"),
    ({"peft.load_in_4bit": True}, "needs peft.method=lora or dora"),
    ({"data.padding_free": True, "model.task": "classification", "data.format": "classification"},
     "data.padding_free concatenates causal-LM rows; set data.padding_free=false"),
    ({"data.padding_free": True, "peft.method": "prompt_tuning"}, "examples sharing a row cannot be kept apart"),
    ({"data.pack": True, "peft.method": "prefix_tuning"}, "set data.pack=false and data.padding_free=false"),
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
    path = resolve_recipe(None)
    assert path.name == "demo.yaml" and path.is_file()
    cfg = load_config(path)
    assert cfg.data.path.startswith("bundled:")
