"""Per-architecture support: the blocks FSDP shards one by one, and peft's default LoRA targets, for Llama, GPT-2
(transposed Conv1D weights) and BERT (sequence classification)."""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

from dist_tune.config import load_config
from dist_tune.engines.parallelize import load_trainable_state
from dist_tune.models import decoder_layers
from dist_tune.peft import apply_peft

LAYERS = 3


def llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=LAYERS, num_attention_heads=2))


def gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=LAYERS, n_head=2))


def bert():
    return BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=LAYERS, num_attention_heads=2,
                                                    max_position_embeddings=64, num_labels=2))


# family: (model builder, dist_tune overrides, where its blocks live, peft's default LoRA targets)
FAMILIES = {
    "llama": (llama, {}, "model.layers", {"q_proj", "v_proj"}),
    "gpt2": (gpt2, {"data.format": "text"}, "transformer.h", {"c_attn"}),
    "bert": (bert, {"model.task": "classification", "data.format": "classification"}, "bert.encoder.layer",
             {"query", "value"}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoder_layers_are_the_models_blocks_before_and_after_lora(family):
    build, overrides, blocks, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = build()
    expected = list(model.get_submodule(blocks))
    assert len(expected) == LAYERS
    assert decoder_layers(model) == expected
    wrapped = apply_peft(model, load_config(None, {**overrides, "peft.method": "lora"}))
    assert decoder_layers(wrapped) == expected


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_default_targets_resolve_per_architecture_and_learn(family):
    build, overrides, _, targets = FAMILIES[family]
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply_peft(build(), load_config(None, {**overrides, "peft.method": "lora"}))
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    lora = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert {name.rsplit(".", 1)[-1] for name in lora} == targets
    assert len(lora) == LAYERS * len(targets)
    assert all(m.fan_in_fan_out == (family == "gpt2") for m in lora.values())

    ids = torch.randint(0, 128, (2, 16))
    out = model(input_ids=ids, labels=ids if family != "bert" else torch.tensor([0, 1]))
    out.loss.backward()
    assert all(m.lora_B["default"].weight.grad.abs().sum() > 0 for m in lora.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)


def test_a_sharded_checkpoint_listing_gpt2s_tied_lm_head_loads():
    """FSDP and ZeRO-3 state dicts name the tied head (`lm_head.weight`) beside `transformer.wte.weight`."""
    torch.manual_seed(0)
    source, target = gpt2(), gpt2()
    state = {name: p.detach() for name, p in source.named_parameters(remove_duplicate=False)}
    assert "lm_head.weight" in state
    load_trainable_state(target, state)
    assert torch.equal(target.lm_head.weight, source.transformer.wte.weight)
    assert torch.equal(target.transformer.h[0].attn.c_attn.weight, source.transformer.h[0].attn.c_attn.weight)
