"""Padding-free (varlen) attention: a row of concatenated examples behaves exactly like the examples alone."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from dist_tune.attention import VARLEN_SDPA, cu_seq_lens_from_positions, register
from dist_tune.config import Config
from dist_tune.errors import UserError
from dist_tune.models import check_sliding_window

LENGTHS = (5, 9, 3)
SHAPE = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)


def twin_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same weights under plain SDPA and under dist_tune's varlen SDPA (separate configs)."""
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(SHAPE), attn_implementation="sdpa")
    varlen = AutoModelForCausalLM.from_config(copy.deepcopy(SHAPE), attn_implementation=register())
    varlen.load_state_dict(plain.state_dict())
    return plain, varlen


def examples() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, SHAPE.vocab_size, (1, n), generator=generator) for n in LENGTHS]


def flat_row(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat(rows, 1), torch.cat([torch.arange(r.shape[1]) for r in rows]).unsqueeze(0)


def test_sequence_boundaries_from_restarting_positions():
    cu = cu_seq_lens_from_positions(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    assert cu.tolist() == [0, 3, 5, 6] and cu.dtype == torch.int32
    assert cu_seq_lens_from_positions(torch.tensor([[0, 1], [0, 1]])).tolist() == [0, 2, 4]  # rows end to end


@pytest.mark.parametrize("boundaries", ["cu_seq_lens", "position_ids"])
def test_flattened_row_matches_each_example_alone_in_logits_and_gradients(boundaries):
    plain, varlen = twin_models()
    rows = examples()
    ids, positions = flat_row(rows)
    extra = {}
    if boundaries == "cu_seq_lens":
        cu = cu_seq_lens_from_positions(positions)
        extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(LENGTHS), "max_length_k": max(LENGTHS)}
    alone = torch.cat([plain(input_ids=r).logits for r in rows], 1)
    joint = varlen(input_ids=ids, position_ids=positions, **extra).logits
    assert torch.allclose(joint, alone, atol=1e-5)
    alone.square().mean().backward()
    joint.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), varlen.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_changing_one_example_leaves_the_others_untouched():
    _, varlen = twin_models()
    rows = examples()
    ids, positions = flat_row(rows)
    changed = ids.clone()
    changed[0, :LENGTHS[0]] = (changed[0, :LENGTHS[0]] + 1) % SHAPE.vocab_size
    with torch.no_grad():
        before = varlen(input_ids=ids, position_ids=positions).logits
        after = varlen(input_ids=changed, position_ids=positions).logits
    assert not torch.allclose(before[0, :LENGTHS[0]], after[0, :LENGTHS[0]])
    assert torch.equal(before[0, LENGTHS[0]:], after[0, LENGTHS[0]:])


def test_padded_batches_and_generation_are_plain_sdpa():
    plain, varlen = twin_models()
    rows = examples()
    ids = torch.zeros(2, 9, dtype=torch.long)
    ids[0, :5], ids[1] = rows[0][0], rows[1][0]
    mask = (torch.arange(9) < torch.tensor([[5], [9]])).long()
    with torch.no_grad():
        assert torch.equal(varlen(input_ids=ids, attention_mask=mask).logits,
                           plain(input_ids=ids, attention_mask=mask).logits)
        kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(varlen.generate(rows[1], **kwargs), plain.generate(rows[1], **kwargs))


def test_saved_model_does_not_depend_on_dist_tune(tmp_path):
    _, varlen = twin_models()
    varlen.save_pretrained(tmp_path)
    assert VARLEN_SDPA not in (tmp_path / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_several_packed_rows_without_padding_keep_every_example_apart():
    plain, varlen = twin_models()
    rows = examples()
    first, second = torch.cat([rows[0], rows[2][:, :3]], 1), rows[1][:, :8]  # two rows of 8 tokens
    positions = torch.tensor([list(range(5)) + list(range(3)), list(range(8))])
    with torch.no_grad():
        joint = varlen(input_ids=torch.cat([first, second]), position_ids=positions).logits
        alone = [plain(input_ids=x).logits[0] for x in (rows[0], rows[2][:, :3], rows[1][:, :8])]
    assert torch.allclose(joint, torch.stack([torch.cat(alone[:2]), alone[2]]), atol=1e-5)


def test_padding_free_rows_refuse_a_sliding_window_shorter_than_an_example():
    cfg = Config()
    cfg.data.padding_free, cfg.data.max_length = True, 256
    with pytest.raises(UserError, match=r"sliding-window attention \(128 tokens\).*data.max_length<=128"):
        check_sliding_window(cfg, MistralConfig(sliding_window=128))
    check_sliding_window(cfg, MistralConfig(sliding_window=4096))  # never reached: no difference
    check_sliding_window(cfg, SHAPE)
    cfg.data.padding_free = False
    check_sliding_window(cfg, MistralConfig(sliding_window=128))
