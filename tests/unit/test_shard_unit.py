"""engine.shard_unit: which modules FSDP shards as units, how much ZeRO-3 keeps gathered, and where it is refused."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from dist_tune.config import ConfigError, load_config
from dist_tune.engines.deepspeed import ds_config
from dist_tune.engines.fsdp import apply_fsdp, fsdp_mesh, linear_layers, untied_ends
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


def test_an_untied_embedding_and_head_are_units_of_their_own_with_their_adapters():
    cfg = load_config(None, {"model.name_or_path": "tiny-llama", "peft.method": "lora",
                             "peft.target_modules": ["q_proj", "embed_tokens", "lm_head"]})
    model = build_model(cfg, load_tokenizer(cfg), torch.device("cpu"))
    embedding, head = untied_ends(model)
    assert hasattr(embedding, "lora_embedding_A") and isinstance(embedding.get_base_layer(), torch.nn.Embedding)
    assert hasattr(head, "lora_A") and head.get_base_layer().out_features == embedding.get_base_layer().num_embeddings


def test_tied_embeddings_stay_in_the_root_unit():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert untied_ends(model) == []


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield fsdp_mesh(torch.device("cpu"), world_size=1, replicate_degree=1)
    dist.destroy_process_group()


@pytest.mark.parametrize("tied", [False, True])
def test_fsdp_gathers_an_untied_embedding_and_head_on_their_own(one_rank_group, tied):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, tie_word_embeddings=tied))
    apply_fsdp(model, mesh=one_rank_group, param_dtype=None, reshard_after_forward=True, cpu_offload=False,
               shard_unit="block")
    ends = [model.get_input_embeddings(), model.get_output_embeddings()]
    assert [isinstance(end, FSDPModule) for end in ends] == [not tied, not tied]
    assert sum(isinstance(m, FSDPModule) for m in model.modules()) == 2 + 1 + (0 if tied else 2)  # blocks, root


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
