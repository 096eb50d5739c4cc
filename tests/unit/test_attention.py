"""Padding-free (varlen) attention: a row of concatenated examples behaves exactly like the examples alone."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from dist_tune.attention import VARLEN_SDPA, cu_seq_lens_from_positions, register
from dist_tune.config import Config, load_config
from dist_tune.errors import UserError
from dist_tune.models import check_sliding_window, load_model, load_tokenizer

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


def test_unmasked_batch_of_whole_rows_is_plain_causal_attention():
    """Without a mask transformers passes one row of position_ids for the whole batch: every row is a sequence."""
    plain, varlen = twin_models()
    ids = torch.arange(1, 33).reshape(2, 16)
    with torch.no_grad():
        assert torch.allclose(varlen(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)


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


def test_default_padding_free_turns_off_for_a_sliding_window_model_instead_of_failing(tmp_path):
    tokenizer = load_tokenizer(Config())
    window = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=16)
    AutoModelForCausalLM.from_config(window).save_pretrained(tmp_path)
    cfg = load_config(None, {"model.name_or_path": str(tmp_path), "data.max_length": 64})
    model = load_model(cfg, tokenizer)
    assert cfg.data.padding_free is False
    assert model.config._attn_implementation == "sdpa"


def count_host_copies(monkeypatch) -> list[str]:
    """Record every Tensor.tolist()/.item() call (a device→host sync on CUDA)."""
    calls: list[str] = []
    for name in ("tolist", "item"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _o=original, _n=name: calls.append(_n) or _o(self))
    return calls


def deep_varlen_model(layers: int) -> torch.nn.Module:
    shape = copy.deepcopy(SHAPE)
    shape.num_hidden_layers = layers
    return AutoModelForCausalLM.from_config(shape, attn_implementation=register())


@pytest.mark.parametrize("boundaries", ["cu_seq_lens", "position_ids"])
def test_boundaries_reach_the_host_once_per_batch_not_once_per_layer(monkeypatch, boundaries):
    model = deep_varlen_model(layers=4)
    ids, positions = flat_row(examples())
    calls = count_host_copies(monkeypatch)
    with torch.no_grad():
        for _ in range(2):  # two batches: the second must not reuse the first one's boundaries
            cu = cu_seq_lens_from_positions(positions.clone())
            extra = {"cu_seq_lens_q": cu, "max_length_q": max(LENGTHS)} if boundaries == "cu_seq_lens" else {}
            model(input_ids=ids, position_ids=positions.clone(), **extra)
    assert calls == ["tolist", "tolist"]


def sequence_by_sequence(q, k, v, cu, longest, scale, dropout):
    """A stand-in varlen kernel with flash-attn's interface: (tokens, heads, dim) in and out."""
    bounds = cu.tolist()
    assert cu.dtype == torch.int32 and longest == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    out = [torch.nn.functional.scaled_dot_product_attention(
        q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True, scale=scale,
        enable_gqa=True).transpose(0, 1) for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(out)


@pytest.mark.parametrize("boundaries", ["cu_seq_lens", "position_ids"])
def test_varlen_kernel_path_matches_each_example_alone(monkeypatch, boundaries):
    """The layout a varlen kernel sees (tokens first, grouped KV heads, int32 boundaries, longest sequence) and
    the way its output is put back, checked on CPU with a stand-in kernel."""
    from dist_tune import attention

    monkeypatch.setattr(attention, "varlen_kernel", lambda *args: "stand_in")
    monkeypatch.setitem(attention.KERNELS, "stand_in", sequence_by_sequence)
    plain, varlen = twin_models()
    rows = examples()
    ids, positions = flat_row(rows)
    cu = cu_seq_lens_from_positions(positions)
    extra = {"cu_seq_lens_q": cu, "max_length_q": max(LENGTHS)} if boundaries == "cu_seq_lens" else {}
    with torch.no_grad():
        joint = varlen(input_ids=ids, position_ids=positions, **extra).logits
        alone = torch.cat([plain(input_ids=r).logits for r in rows], 1)
    assert torch.allclose(joint, alone, atol=1e-5)


@pytest.mark.parametrize("device, dtype, dropout, flash, torch_varlen, expected", [
    ("cpu", torch.bfloat16, 0.0, True, True, "sdpa_loop"),
    ("cuda", torch.float32, 0.0, True, True, "sdpa_loop"),
    ("cuda", torch.bfloat16, 0.0, True, True, "flash_attn"),
    ("cuda", torch.float16, 0.1, True, False, "flash_attn"),
    ("cuda", torch.bfloat16, 0.0, False, True, "torch_varlen"),
    ("cuda", torch.bfloat16, 0.1, False, True, "sdpa_loop"),  # torch's varlen_attn has no dropout
    ("cuda", torch.bfloat16, 0.0, False, False, "sdpa_loop"),
])
def test_kernel_choice(monkeypatch, device, dtype, dropout, flash, torch_varlen, expected):
    from dist_tune import attention

    monkeypatch.setattr(attention, "flash_attn_installed", lambda: flash)
    monkeypatch.setattr(attention, "torch_varlen_available", lambda: torch_varlen)
    assert attention.varlen_kernel(device, dtype, dropout) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen kernels need CUDA")
@pytest.mark.parametrize("kernel", ["flash_attn", "torch_varlen"])
def test_cuda_varlen_kernels_match_the_sdpa_loop(kernel):
    from dist_tune import attention

    available = {"flash_attn": attention.flash_attn_installed(), "torch_varlen": attention.torch_varlen_available()}
    if not available[kernel]:
        pytest.skip(f"{kernel} is not available in this environment")
    generator = torch.Generator(device="cuda").manual_seed(0)
    lengths, heads, kv_heads, dim = (37, 5, 120, 64), 8, 2, 64
    total = sum(lengths)
    q, k, v = (torch.randn(1, h, total, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
               for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    module.training = False
    loop = attention.sdpa_loop(module, q, k, v, cu.tolist(), scaling=dim ** -0.5)
    out = attention.KERNELS[kernel](attention._tokens_first(q), attention._tokens_first(k),
                                    attention._tokens_first(v), cu, max(lengths), dim ** -0.5, 0.0)
    difference = (out.reshape(loop.shape).float() - loop.float()).abs()
    assert difference.max() < 5e-2 and difference.mean() < 5e-3, (difference.max(), difference.mean())  # bf16
