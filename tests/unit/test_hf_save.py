"""The streaming HF writer: transformers' own sharded layout, each file written by one rank, loadable back."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from dist_tune import hf_save
from dist_tune.config import ConfigError, load_config

LIMIT = 40_000  # bytes: several files for these models, one embedding bigger than a file


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()


def save(model, out, world_size=1, ranks=None):
    tensors = [hf_save.FullTensor(n, tuple(t.shape), t.dtype, t.detach)
               for n, t in hf_save.state_tensors(model).items()]
    for rank in range(world_size) if ranks is None else ranks:
        hf_save.write_sharded(out, tensors, rank=rank, world_size=world_size, max_shard_size=LIMIT,
                              total_parameters=model.num_parameters())
    hf_save.write_config(model, out, torch.float32)
    return tensors


def logits(model):
    with torch.no_grad():
        return model(torch.arange(1, 17).reshape(2, 8)).logits


@pytest.mark.parametrize("build", [llama, gpt2])
def test_index_and_files_are_those_save_pretrained_writes(build, tmp_path):
    build().save_pretrained(tmp_path / "pretrained")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pretrained")  # as a fine-tuned model is loaded
    save(model, tmp_path / "mine", world_size=3)
    model.save_pretrained(tmp_path / "theirs", max_shard_size=LIMIT)
    mine = json.loads((tmp_path / "mine" / hf_save.INDEX).read_text())
    assert mine == json.loads((tmp_path / "theirs" / hf_save.INDEX).read_text())
    assert len(set(mine["weight_map"].values())) > 2
    for name in set(mine["weight_map"].values()):
        ours, theirs = load_file(tmp_path / "mine" / name), load_file(tmp_path / "theirs" / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("build", [llama, gpt2])
def test_shards_stay_under_the_limit_and_load_back_with_the_same_logits(build, tmp_path):
    model = build()
    tensors = save(model, tmp_path, world_size=2)
    index = json.loads((tmp_path / hf_save.INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors)
    assert set(index["weight_map"]) == {t.name for t in tensors}
    for name in set(index["weight_map"].values()):
        shard = load_file(tmp_path / name)
        size = sum(t.numel() * t.element_size() for t in shard.values())
        assert size <= LIMIT or len(shard) == 1, (name, size)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded), logits(model))


def test_tied_embedding_is_written_once_under_the_input_name(tmp_path):
    model = gpt2()
    save(model, tmp_path)
    weight_map = json.loads((tmp_path / hf_save.INDEX).read_text())["weight_map"]
    assert "transformer.wte.weight" in weight_map and "lm_head.weight" not in weight_map
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()


def test_each_rank_writes_only_its_files(tmp_path):
    model = llama()
    save(model, tmp_path / "all", world_size=3)
    files = sorted(set(json.loads((tmp_path / "all" / hf_save.INDEX).read_text())["weight_map"].values()))
    save(model, tmp_path / "rank1", world_size=3, ranks=[1])
    assert sorted(p.name for p in (tmp_path / "rank1").glob("model-*.safetensors")) == files[1::3]
    assert not (tmp_path / "rank1" / hf_save.INDEX).exists()  # rank 0 writes the index


def test_a_model_under_the_limit_is_one_file_without_index(tmp_path):
    model = llama()
    tensors = [hf_save.FullTensor(n, tuple(t.shape), t.dtype, t.detach)
               for n, t in hf_save.state_tensors(model).items()]
    hf_save.write_sharded(tmp_path, tensors, max_shard_size="1GB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_max_shard_size_must_be_a_size():
    with pytest.raises(ConfigError, match=r"checkpoint.max_shard_size='lots' is not a size; write it like 1GB"):
        load_config(None, {"checkpoint.max_shard_size": "lots"})
