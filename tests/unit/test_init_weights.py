"""Initialisation by parameter name (the same on every engine) and the HF checkpoint names of peft parameters."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dist_tune import init_weights
from dist_tune.config import load_config
from dist_tune.errors import UserError
from dist_tune.models import load_model, load_tokenizer, model_config
from dist_tune.peft import build_model


def cfg_for(**overrides):
    return load_config(None, {"model.name_or_path": "tiny-llama", **overrides})


def test_values_follow_peft_and_transformers_rules_and_depend_only_on_seed_and_name():
    value = init_weights.initial_value
    lora_a = value("model.layers.0.self_attn.q_proj.lora_A.default.weight", torch.Size([8, 64]), 42, 0.02)
    assert lora_a.abs().max() <= 1 / math.sqrt(64) and lora_a.std() > 0.5 / math.sqrt(3 * 64)
    assert not value("model.layers.0.self_attn.q_proj.lora_B.default.weight", torch.Size([64, 8]), 42, 0.02).any()
    assert torch.equal(value("model.layers.0.mlp.down_proj.ia3_l.default", torch.Size([1, 176]), 42, 0.02),
                       torch.ones(1, 176))
    assert torch.equal(value("model.norm.weight", torch.Size([64]), 42, 0.02), torch.ones(64))
    assert not value("classifier.bias", torch.Size([2]), 42, 0.02).any()
    weight = value("model.layers.0.mlp.up_proj.weight", torch.Size([176, 64]), 42, 0.02)
    assert weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(weight, value("model.layers.0.mlp.up_proj.weight", torch.Size([176, 64]), 42, 0.02))
    assert not torch.equal(weight, value("model.layers.1.mlp.up_proj.weight", torch.Size([176, 64]), 42, 0.02))
    assert not torch.equal(weight, value("model.layers.0.mlp.up_proj.weight", torch.Size([176, 64]), 7, 0.02))


def test_peft_parameters_map_to_checkpoint_names():
    cfg = load_config(None, {"model.name_or_path": "tiny-llama", "peft.method": "lora", "model.task": "classification",
                             "model.num_labels": 2, "data.format": "classification"})
    model = build_model(cfg, load_tokenizer(cfg), torch.device("meta"))
    names = init_weights.hf_names(model)
    assert names["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == (
        "model.layers.0.self_attn.q_proj.weight", False)
    assert names["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] == (
        "model.layers.0.self_attn.q_proj.lora_A.default.weight", True)
    assert names["base_model.model.score.original_module.weight"] == ("score.weight", False)
    assert names["base_model.model.score.modules_to_save.default.weight"] == ("score.weight", False)


def test_preset_weights_do_not_depend_on_the_global_random_state():
    cfg = cfg_for(**{"peft.method": "lora"})
    tokenizer = load_tokenizer(cfg)
    first = build_model(cfg, tokenizer, torch.device("cpu")).state_dict()
    torch.manual_seed(123)
    torch.rand(1000)
    second = build_model(cfg, tokenizer, torch.device("cpu")).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert any(k.endswith("lora_A.default.weight") and first[k].abs().sum() > 0 for k in first)


def test_a_checkpoint_missing_a_weight_is_one_line(tmp_path):
    cfg = cfg_for()
    tokenizer = load_tokenizer(cfg)
    load_model(cfg, tokenizer).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError) as err:
        load_model(cfg_for(**{"model.name_or_path": str(tmp_path)}), tokenizer)
    assert str(err.value) == (f"checkpoint '{tmp_path}' has no tensor 'model.layers.0.self_attn.k_proj.weight' "
                              "(1 weights missing); point model.name_or_path at a complete save_pretrained directory")


def test_a_preset_with_tied_embeddings_stays_tied():
    cfg = cfg_for()
    hf_cfg = model_config(cfg, load_tokenizer(cfg))
    hf_cfg.tie_word_embeddings = True
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    init_weights.materialise(model, torch.device("cpu"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = AutoModelForCausalLM.from_config(hf_cfg)
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
