"""engine.shard_unit: which modules FSDP shards as units, how much ZeRO-3 keeps gathered, and where it is refused."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from dist_tune.config import ConfigError, load_config
from dist_tune.engines.deepspeed import ds_config
from dist_tune.engines.fsdp import linear_layers
from dist_tune.models import decoder_layers, load_tokenizer
from dist_tune.peft import build_model

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama_block() -> torch.nn.Module:
    cfg = load_config(None, {"model.name_or_path": "tiny-llama", "peft.method": "lora"})
    return decoder_layers(build_model(cfg, load_tokenizer(cfg), torch.device("cpu")))[0]


def test_linear_units_are_the_blocks_projections_each_with_its_lora_adapter():
    block = lora_llama_block()
    units = linear_layers(block)
    names = {id(m): n for n, m in block.named_modules()}
    assert [names[id(u)].rsplit(".", 1)[-1] for u in units] == LLAMA_PROJECTIONS
    q_proj = units[0]
    assert hasattr(q_proj, "lora_A") and hasattr(q_proj, "base_layer")  # the peft wrapper, adapter inside the unit
    assert type(units[1]) is torch.nn.Linear  # k_proj has no adapter (peft's Llama default: q_proj, v_proj)
    every_weight = {id(p) for u in units for p in u.parameters()}
    linear_weights = {id(m.weight) for m in block.modules() if isinstance(m, torch.nn.Linear)}
    assert linear_weights <= every_weight


def test_gpt2_blocks_split_into_their_conv1d_projections():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    units = linear_layers(decoder_layers(model)[0])
    assert len(units) == 4 and all(isinstance(u, Conv1D) for u in units)  # c_attn, attn c_proj, c_fc, mlp c_proj


def test_zero3_keeps_about_one_linear_layer_gathered_with_linear_units():
    def zero(unit):
        cfg = load_config(None, {"engine.kind": "deepspeed", "engine.zero_stage": 3, "engine.shard_unit": unit})
        return ds_config(cfg, world_size=2, hidden_size=64)["zero_optimization"]
    block, linear = zero("block"), zero("linear")
    assert block["stage3_max_live_parameters"] == block["stage3_max_reuse_distance"] == 24 * 64 * 64
    assert linear["stage3_max_live_parameters"] == linear["stage3_max_reuse_distance"] == 3 * 64 * 64


@pytest.mark.parametrize("engine", [{"engine.kind": "ddp"}, {"engine.kind": "deepspeed", "engine.zero_stage": 2}])
def test_linear_units_need_a_sharding_engine(engine):
    with pytest.raises(ConfigError) as err:
        load_config(None, {**engine, "engine.shard_unit": "linear"})
    assert str(err.value) == ("engine.shard_unit=linear sets how much of a sharded model is gathered at once; it "
                              "needs engine.kind=fsdp, or deepspeed with engine.zero_stage=3; remove it")
    with pytest.raises(ConfigError, match="engine.shard_unit"):
        load_config(None, {"engine.kind": "fsdp", "engine.shard_unit": "layer"})
