"""dist_tune.estimate against hand-computed values: parameter counts, shard factors, model-state bytes per
engine (ZeRO paper accounting), the activation model, and the estimate-memory command."""
from __future__ import annotations

import pytest

from dist_tune.cli import main as cli_main
from dist_tune.config import load_config
from dist_tune.estimate import GIB, bytes_per_param, estimate, meta_model, shard_factors
from dist_tune.models import count_parameters

# tiny-llama with the shipped 1606-token tokenizer: hidden 64, 2 layers, 4 heads of 16, 2 KV heads, MLP 176.
# per layer: q 64·64 + k 64·32 + v 64·32 + o 64·64 = 12288, MLP 3·64·176 = 33792, 2 norms 128 → 46208
TINY_N = 2 * 46208 + 2 * 1606 * 64 + 64  # layers, untied embedding + lm_head, final norm = 298048
# llama-3-8b: the published 8,030,261,248 parameters; LoRA r=8 on peft's Llama default targets q_proj, v_proj:
# per layer 8·(4096 + 4096) + 8·(4096 + 1024) = 106496, × 32 layers (the well-known "3,407,872 trainable")
L8B_N, L8B_LORA = 8_030_261_248, 32 * (8 * (4096 + 4096) + 8 * (4096 + 1024))


def cfg_for(**overrides):
    """A config in fp32 unless overridden (the `auto` default is estimated as on a bf16 GPU)."""
    return load_config(None, {"model.dtype": "float32", "engine.mixed_precision": "fp32", **overrides})


def state_bytes(e) -> float:
    """Weights + grads + optimizer bytes of an Estimate."""
    return (e.weights_gib + e.grads_gib + e.optimizer_gib) * GIB


@pytest.mark.parametrize("kind, stage, expected", [
    ("single", 2, (1, 1, 1)),
    ("ddp", 2, (1, 1, 1)),
    ("fsdp", 2, (1 / 4, 1 / 4, 1 / 4)),
    ("deepspeed", 1, (1, 1, 1 / 4)),       # ZeRO-1: optimizer states
    ("deepspeed", 2, (1, 1 / 4, 1 / 4)),   # ZeRO-2: + gradients
    ("deepspeed", 3, (1 / 4, 1 / 4, 1 / 4)),  # ZeRO-3: + parameters
])
def test_shard_factors_follow_the_zero_stages(kind, stage, expected):
    assert shard_factors(kind, stage, 4) == pytest.approx(expected)
    assert shard_factors(kind, stage, 1) == (1.0, 1.0, 1.0)


def test_tiny_llama_parameter_count_matches_the_hand_count():
    model, hf_cfg = meta_model(cfg_for(**{"model.name_or_path": "tiny-llama"}))
    total, trainable = count_parameters(model)
    assert total == trainable == TINY_N == 298_048
    assert (hf_cfg.hidden_size, hf_cfg.num_hidden_layers, hf_cfg.vocab_size) == (64, 2, 1606)


@pytest.mark.parametrize("kind, stage, per_param", [
    # fp32 AdamW, world 2: 4 weights + 4 grads + 8 (m, v) = 16 B/param unsharded
    ("ddp", 2, (4, 4, 8)),
    ("fsdp", 2, (4 / 2, 4 / 2, 8 / 2)),                # everything sharded: 8 B/param
    # DeepSpeed adds its fp32 master partition (4 B) to the optimizer state, in fp32 too
    ("deepspeed", 1, (4, 4, 12 / 2)),
    ("deepspeed", 2, (4, 4 / 2, 12 / 2)),
    ("deepspeed", 3, (4 / 2, 4 / 2, 12 / 2)),
])
def test_tiny_llama_full_fp32_model_state_per_rank(kind, stage, per_param):
    e = estimate(cfg_for(**{"model.name_or_path": "tiny-llama", "engine.kind": kind, "engine.zero_stage": stage}), 2)
    weights, grads, optimizer = per_param
    assert e.params == e.trainable == TINY_N
    assert e.weights_gib * GIB == pytest.approx(weights * TINY_N)
    assert e.grads_gib * GIB == pytest.approx(grads * TINY_N)
    assert e.optimizer_gib * GIB == pytest.approx(optimizer * TINY_N)


def test_ddp_holds_16n_and_fsdp_8n_at_world_2():
    ddp = estimate(cfg_for(**{"model.name_or_path": "tiny-llama", "engine.kind": "ddp"}), 2)
    fsdp = estimate(cfg_for(**{"model.name_or_path": "tiny-llama", "engine.kind": "fsdp"}), 2)
    assert state_bytes(ddp) == pytest.approx(16 * TINY_N)
    assert state_bytes(fsdp) == pytest.approx(8 * TINY_N)
    zero3 = estimate(cfg_for(**{"model.name_or_path": "tiny-llama", "engine.kind": "deepspeed",
                                "engine.zero_stage": 3}), 2)
    assert state_bytes(zero3) == pytest.approx(20 * TINY_N / 2)  # (4 + 4 + 4 master + 8) / 2


@pytest.mark.parametrize("kind, model_dtype, expected", [
    # ZeRO paper mixed-precision Adam: 2 (bf16 weights) + 2 (bf16 grads) + 12 (fp32 master, m, v) = 16
    ("deepspeed", "float32", (2, 2, 12)),
    # autocast keeps the fp32 weights as the master: 4 + 4 + 8, the same 16 B/param
    ("ddp", "float32", (4, 4, 8)),
    ("fsdp", "float32", (4, 4, 8)),
    # a bf16 model under autocast: bf16 weights, grads and torch AdamW states
    ("ddp", "bfloat16", (2, 2, 4)),
])
def test_mixed_precision_bytes_per_param(kind, model_dtype, expected):
    per = bytes_per_param(cfg_for(**{"engine.kind": kind, "engine.mixed_precision": "bf16",
                                     "model.dtype": model_dtype}))
    assert (per.weights, per.grads, per.optimizer) == expected
    assert per.frozen == expected[0]


def test_sgd_keeps_one_momentum_buffer_or_none():
    assert bytes_per_param(cfg_for(**{"optim.name": "sgd"})).optimizer == 4
    assert bytes_per_param(cfg_for(**{"optim.name": "sgd", "optim.momentum": 0.0})).optimizer == 0
    assert bytes_per_param(cfg_for(**{"optim.name": "sgd", "engine.kind": "deepspeed"})).optimizer == 8


def lora_8b(**overrides):
    return cfg_for(**{"model.name_or_path": "llama-3-8b", "peft.method": "lora", "peft.r": 8, "peft.alpha": 16,
                      "engine.activation_checkpointing": True, "engine.mixed_precision": "bf16",
                      "train.micro_batch_size": 8, "data.max_length": 256, **overrides})


def peft_trainable_count() -> tuple[int, int]:
    """(trainable, total) as peft itself counts them for the 8B shape, built on the meta device."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dist_tune.models import PRESETS

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**PRESETS["llama-3-8b"]))
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16))
    return model.get_nb_trainable_parameters()


def test_lora_8b_trainable_count_equals_peft_and_weights_are_2_bytes_in_bf16():
    e = estimate(lora_8b(**{"model.dtype": "bfloat16", "engine.kind": "ddp"}), 1)
    assert (e.trainable, e.params - e.trainable) == (L8B_LORA, L8B_N) == (3_407_872, 8_030_261_248)
    assert (e.trainable, e.params) == peft_trainable_count()
    assert e.weights_gib == pytest.approx(2 * 8.03e9 / GIB, rel=1e-3)  # ≈ 2 B × N: 14.96 GiB
    assert e.weights_gib * GIB == pytest.approx(2 * L8B_N + 4 * L8B_LORA)  # peft keeps the adapter in fp32
    assert e.grads_gib * GIB == pytest.approx(4 * L8B_LORA)
    assert e.optimizer_gib * GIB == pytest.approx(8 * L8B_LORA)  # fp32 AdamW m, v

    # DeepSpeed casts the model to bf16 itself and keeps fp32 master + m + v for the adapter only
    ds = estimate(lora_8b(**{"engine.kind": "deepspeed", "engine.zero_stage": 2}), 1)
    assert ds.weights_gib * GIB == pytest.approx(2 * ds.params)
    assert ds.grads_gib * GIB == pytest.approx(2 * L8B_LORA)
    assert ds.optimizer_gib * GIB == pytest.approx(12 * L8B_LORA)

    # an fp32 model under autocast keeps its frozen weights in fp32
    fp32_model = estimate(lora_8b(**{"engine.kind": "ddp"}), 1)
    assert fp32_model.weights_gib * GIB == pytest.approx(4 * fp32_model.params)


def test_lora_8b_activations_with_and_without_checkpointing():
    b, s, h, layers, vocab = 8, 256, 4096, 32, 128256
    per_layer = 34 * s * b * h  # bf16: 34·s·b·h·2/2 bytes per layer
    with_ckpt = estimate(lora_8b(**{"engine.kind": "ddp"}), 1)
    without = estimate(lora_8b(**{"engine.kind": "ddp", "engine.activation_checkpointing": False}), 1)
    assert with_ckpt.activations_gib * GIB == pytest.approx(layers * 2 * s * b * h + per_layer)  # 0.77 GiB
    assert without.activations_gib * GIB == pytest.approx(layers * per_layer)  # 8.5 GiB
    chunk = 128 * 2**20 // (4 * vocab)  # positions whose fp32 logits make 128 MiB: 261
    assert with_ckpt.logits_gib * GIB == pytest.approx(2 * 4 * chunk * vocab)  # fp32 logits + their gradient
    whole = estimate(lora_8b(**{"engine.kind": "ddp", "train.chunked_loss": False}), 1)
    assert whole.logits_gib * GIB == pytest.approx(2 * 4 * b * s * vocab)  # 8.0 GiB
    assert with_ckpt.total_gib == pytest.approx(with_ckpt.weights_gib + with_ckpt.grads_gib + with_ckpt.optimizer_gib
                                                + with_ckpt.activations_gib + with_ckpt.logits_gib)


def test_qlora_and_offload():
    q = estimate(lora_8b(**{"engine.kind": "ddp", "peft.load_in_4bit": True}), 1)
    assert q.weights_gib * GIB == pytest.approx(0.5 * L8B_N + 4 * L8B_LORA)  # 4-bit base, fp32 adapter
    off = estimate(lora_8b(**{"engine.kind": "deepspeed", "engine.zero_stage": 3, "engine.offload_optimizer": True,
                              "engine.offload_params": True}), 8)
    assert (off.weights_gib, off.optimizer_gib) == (0.0, 0.0)
    fsdp_off = estimate(cfg_for(**{"model.name_or_path": "tiny-llama", "engine.kind": "fsdp",
                                   "engine.cpu_offload": True}), 2)
    assert (fsdp_off.weights_gib, fsdp_off.grads_gib, fsdp_off.optimizer_gib) == (0.0, 0.0, 0.0)


def test_estimate_memory_command_prints_the_estimate(capsys):
    cli_main(["estimate-memory", "--world_size", "2", "--model.name_or_path=tiny-llama", "--engine.kind=fsdp"])
    out = capsys.readouterr().out
    assert "parameters" in out and "298,048" in out
    assert f"{4 * TINY_N / 2 / GIB:.3f} GiB" in out  # fsdp weights: 4 B × N / 2


def test_auto_precision_is_estimated_as_on_a_bf16_gpu():
    lora = estimate(load_config(None, {"model.name_or_path": "llama-3-8b", "peft.method": "lora"}), 1)
    assert lora.weights_gib * GIB == pytest.approx(2 * L8B_N + 4 * L8B_LORA)  # bf16 base, fp32 adapter
    assert lora.activations_gib == pytest.approx(estimate(lora_8b(**{
        "engine.activation_checkpointing": False, "train.micro_batch_size": 8}), 1).activations_gib)
    full = bytes_per_param(load_config(None, {"engine.kind": "deepspeed"}))
    assert (full.weights, full.grads, full.optimizer) == (2, 2, 12)  # bf16 module, fp32 master + m + v


def test_fsdp_keeps_whole_fp32_gradients_between_micro_batches_only_without_sync_each_batch():
    base = {"model.name_or_path": "tiny-llama", "engine.kind": "fsdp", "train.grad_accum": 4}
    assert estimate(cfg_for(**base), 2).grads_gib * GIB == 4 * TINY_N / 2  # reduce-scattered every micro-batch
    assert estimate(cfg_for(**base, **{"engine.sync_each_batch": False}), 2).grads_gib * GIB == 4 * TINY_N
    no_accum = {**base, "train.grad_accum": 1, "engine.sync_each_batch": False}
    assert estimate(cfg_for(**no_accum), 2).grads_gib * GIB == 4 * TINY_N / 2


def test_host_ram_per_node_to_load_and_save_follows_each_engine():
    """Llama-3-8B in bf16 on 2 nodes × 8 processes: FSDP reads a sixteenth of the weights per process,
    ZeRO-3 builds it partitioned (a sixteenth too) and ZeRO-2 whole in every process; a LoRA save holds only the adapter, full tuning one file of
    checkpoint.max_shard_size per process."""
    base = 0.6 * 8  # process baseline
    full = {"model.name_or_path": "llama-3-8b", "model.dtype": "bfloat16", "engine.mixed_precision": "bf16"}
    fsdp = estimate(load_config(None, {**full, "engine.kind": "fsdp"}), 16, 8).host
    assert fsdp.load_gib == pytest.approx(base + 8 * 2 * L8B_N / 16 / GIB)
    assert fsdp.save_gib == pytest.approx(base + 8 * 1e9 / GIB)  # max_shard_size 1GB
    zero3 = estimate(load_config(None, {**full, "engine.kind": "deepspeed", "engine.zero_stage": 3}), 16, 8).host
    assert zero3.load_gib == pytest.approx(fsdp.load_gib)
    zero2 = estimate(load_config(None, {**full, "engine.kind": "deepspeed", "engine.zero_stage": 2}), 16, 8).host
    assert zero2.load_gib == pytest.approx(base + 8 * 2 * L8B_N / GIB)
    lora = estimate(load_config(None, {**full, "engine.kind": "fsdp", "peft.method": "lora"}), 16, 8).host
    assert lora.save_gib == pytest.approx(base + 4 * L8B_LORA / GIB)  # fp32 adapter on rank 0 only
    small = estimate(cfg_for(**{"model.name_or_path": "tiny-llama", "engine.kind": "fsdp"}), 2).host
    assert small.procs_per_node == 2 and small.save_gib == pytest.approx(2 * 0.6 + 4 * TINY_N / GIB)  # one file


def test_estimate_memory_command_prints_host_ram_per_node(capsys):
    cli_main(["estimate-memory", "--world_size", "4", "--procs_per_node", "2", "--model.name_or_path=tiny-llama",
              "--engine.kind=fsdp", "--model.dtype=float32"])
    out = capsys.readouterr().out
    assert f"host RAM per node, load  {2 * (0.6 + 4 * TINY_N / 4 / GIB):.3f} GiB (2 processes)" in out
    assert f"host RAM per node, save  {2 * 0.6 + 4 * TINY_N / GIB:.3f} GiB (2 processes)" in out


# tiny-llama's FSDP units in module order: embedding 1606·64 = 102784, two blocks of 46208, head 102784; the root
# keeps the final norm (64). With shard_unit linear each block keeps only its 2 norms (128) and the largest linear
# unit is an MLP projection (64·176 = 11264).
@pytest.mark.parametrize("overrides, gathered", [
    ({"engine.kind": "fsdp"}, 64 + 102784 + 46208),  # root + the embedding or head next to a block
    ({"engine.kind": "fsdp", "engine.shard_unit": "linear"}, 64 + 11264 + 102784),  # down_proj, then the head
    ({"engine.kind": "fsdp", "engine.reshard_after_forward": False}, TINY_N),  # every unit stays gathered
    # ZeRO-3 (auto values at hidden 64): 5 norms of 64 persist (<= 640 elements), 24·64² live, + the head
    ({"engine.kind": "deepspeed", "engine.zero_stage": 3}, 5 * 64 + 24 * 64 * 64 + 102784),
    ({"engine.kind": "deepspeed", "engine.zero_stage": 3, "engine.shard_unit": "linear"},
     5 * 64 + 3 * 64 * 64 + 102784),
    ({"engine.kind": "deepspeed", "engine.zero_stage": 2}, 0),  # weights whole already: nothing gathered
    ({"engine.kind": "ddp"}, 0),
])
def test_sharded_engines_add_the_weights_they_gather_for_compute(overrides, gathered):
    e = estimate(cfg_for(**{"model.name_or_path": "tiny-llama", **overrides}), 2)
    assert e.gathered_gib * GIB == 4 * gathered  # fp32
    assert e.total_gib == pytest.approx(state_bytes(e) / GIB + e.gathered_gib + e.activations_gib + e.logits_gib)


def test_fsdp_on_llama_3_8b_gathers_the_head_with_the_last_block_in_bf16():
    block = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096 + L8B_LORA // 32  # with its adapters
    head = 128256 * 4096
    cfg = load_config(None, {"model.name_or_path": "meta-llama/Meta-Llama-3-8B", "engine.kind": "fsdp",
                             "peft.method": "lora", "model.dtype": "bfloat16", "engine.mixed_precision": "bf16"})
    assert estimate(cfg, 8).gathered_gib * GIB == 2 * (4096 + head + block)  # final norm + head + last block


def test_hsdp_shards_within_groups_and_hpz_adds_its_in_group_copy():
    """16 ranks, replicate_degree 2: HSDP holds what plain FSDP holds at 8 ranks (its shard group), reading an eighth
    of the weights per process; ZeRO-3 keeps its 16-way partition and adds hpZ's 8-way bf16 copy of the weights."""
    bf16 = {"model.name_or_path": "tiny-llama", "model.dtype": "bfloat16", "engine.mixed_precision": "bf16"}
    hsdp = estimate(load_config(None, {**bf16, "engine.kind": "fsdp", "engine.replicate_degree": 2}), 16, 8)
    fsdp8 = estimate(load_config(None, {**bf16, "engine.kind": "fsdp"}), 8, 8)
    assert (hsdp.weights_gib, hsdp.grads_gib, hsdp.optimizer_gib, hsdp.gathered_gib, hsdp.host) == (
        fsdp8.weights_gib, fsdp8.grads_gib, fsdp8.optimizer_gib, fsdp8.gathered_gib, fsdp8.host)
    zero3 = {**bf16, "engine.kind": "deepspeed", "engine.zero_stage": 3}
    hpz = estimate(load_config(None, {**zero3, "engine.replicate_degree": 2}), 16)
    flat = estimate(load_config(None, zero3), 16)
    assert hpz.weights_gib == flat.weights_gib
    assert (hpz.gathered_gib - flat.gathered_gib) * GIB == pytest.approx(2 * TINY_N / 8)
