"""Loss functions: global-sum semantics, packed-document boundaries, target-only logits, the chunked LM head."""
import pytest
import torch

from dist_tune.config import Config
from dist_tune.errors import UserError
from dist_tune.loss import (IGNORE, ChunkedHeadLoss, aligned_targets, causal_lm_loss_sum, chunked_head_ce_sum,
                            chunked_head_loss, shifted_labels, target_positions)
from dist_tune.models import check_logits_to_keep


def test_packed_rows_do_not_predict_across_document_boundaries():
    labels = torch.tensor([[10, 11, 12, 20, 21, 22]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert shifted_labels(labels, position_ids).tolist() == [[11, 12, IGNORE, 21, 22]]
    assert shifted_labels(labels, None).tolist() == [[11, 12, 20, 21, 22]]


def test_loss_is_a_sum_over_target_tokens():
    logits = torch.zeros(1, 4, 8)  # uniform: every token costs log(8)
    labels = torch.tensor([[1, IGNORE, 3, 4]])
    loss, count = causal_lm_loss_sum(logits, labels)
    assert int(count) == 2
    assert float(loss) == float(2 * torch.log(torch.tensor(8.0)))


def test_target_positions_are_where_any_row_predicts_a_target():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE], [IGNORE, 7, IGNORE, IGNORE, IGNORE]])
    assert target_positions(labels, None).tolist() == [0, 1, 2]  # position t predicts token t + 1
    packed = torch.tensor([[IGNORE, 4, 5, IGNORE, 6]])
    assert target_positions(packed, torch.tensor([[0, 1, 2, 0, 1]])).tolist() == [0, 1, 3]


def test_loss_from_target_logits_only_equals_loss_from_all_logits():
    """logits_to_keep=target_positions gives the same loss and parameter gradients with fewer logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    ids = torch.randint(0, 50, (2, 12))
    labels = ids.clone()
    labels[0, :7], labels[1, :4], labels[1, 10:] = IGNORE, IGNORE, IGNORE
    full, n_full = causal_lm_loss_sum(model(input_ids=ids).logits, labels)
    full_grads = torch.autograd.grad(full, list(model.parameters()))
    positions = target_positions(labels, None)
    logits = model(input_ids=ids, logits_to_keep=positions).logits
    assert logits.shape[1] == len(positions) == 8 < ids.shape[1]
    kept, n_kept = causal_lm_loss_sum(logits, labels, positions=positions)
    kept_grads = torch.autograd.grad(kept, list(model.parameters()))
    assert int(n_full) == int(n_kept) == 5 + 6
    assert torch.allclose(full, kept, rtol=1e-6)
    for a, b in zip(full_grads, kept_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_model_without_logits_to_keep_is_refused_with_the_fix():
    cfg = Config()
    with pytest.raises(UserError, match="Linear.*has no logits_to_keep argument; set train.target_logits_only=false"):
        check_logits_to_keep(cfg, torch.nn.Linear(2, 2))
    cfg.train.target_logits_only = False
    check_logits_to_keep(cfg, torch.nn.Linear(2, 2))


def tiny_llama(tie: bool = False, vocab: int = 50):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie))


def masked_labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0, :7], labels[1, :4], labels[1, 10:] = IGNORE, IGNORE, IGNORE
    return labels


def test_chunked_head_matches_the_whole_logits_in_value_and_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    targets = torch.randint(0, 40, (3, 7))  # two leading positions without targets (virtual tokens)
    targets[1, :3] = IGNORE
    reference = torch.nn.functional.cross_entropy(head(hidden[:, 2:]).reshape(-1, 40), targets.reshape(-1),
                                                  ignore_index=IGNORE, reduction="sum")
    want = torch.autograd.grad(reference, [hidden, head.weight])
    for chunk in (1, 5, 18, 100):
        got = chunked_head_ce_sum(head, hidden, targets, chunk)
        assert torch.allclose(got, reference, rtol=1e-6), chunk
        for a, b in zip(torch.autograd.grad(got, [hidden, head.weight]), want):
            assert torch.allclose(a, b, atol=1e-6), chunk


def model_loss_and_grads(model, ids, labels, chunk=0, positions=None):
    """(loss sum, parameter gradients) with the head chunked (chunk > 0) or from the model's whole logits."""
    params = [p for p in model.parameters() if p.requires_grad]
    if chunk:
        head = chunked_head_loss(model) or ChunkedHeadLoss(model.get_output_embeddings(), chunk)
        with head.computing(aligned_targets(labels, None, positions)):
            loss = model(input_ids=ids, logits_to_keep=0 if positions is None else positions).logits
        assert loss.dim() == 0
    else:
        logits = model(input_ids=ids, logits_to_keep=0 if positions is None else positions).logits
        loss, _ = causal_lm_loss_sum(logits, labels, positions=positions)
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("variant", ["untied", "tied", "target-positions", "lora-on-head"])
def test_a_model_with_a_chunked_head_has_the_loss_and_gradients_of_its_logits(variant):
    """The model's own forward with a chunked head (3 positions per chunk): same loss and gradients to 1e-5,
    with tied embeddings, logits only at target positions, and LoRA on the head; without targets (generation)
    the head still returns logits."""
    model = tiny_llama(tie=variant == "tied")
    if variant == "lora-on-head":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    ids = torch.randint(0, 50, (2, 12))
    labels = masked_labels(ids)
    positions = target_positions(labels, None) if variant == "target-positions" else None
    want, want_grads = model_loss_and_grads(model, ids, labels, positions=positions)
    got, got_grads = model_loss_and_grads(model, ids, labels, chunk=3, positions=positions)
    assert torch.allclose(got, want, rtol=1e-5)
    assert len(got_grads) == len(want_grads) > 0
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, atol=1e-5)
    assert model(input_ids=ids).logits.shape == (2, 12, 50)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_liger_fused_head_matches_the_chunked_head_on_cuda():
    """On CUDA with liger-kernel installed a plain linear head takes Liger's fused kernel: same loss and
    gradients as the chunked path."""
    from dist_tune.loss import liger_loss

    pytest.importorskip("liger_kernel")
    model = tiny_llama().cuda()
    ids = torch.randint(0, 50, (2, 12), device="cuda")
    labels = masked_labels(ids)
    want, want_grads = model_loss_and_grads(model, ids, labels, chunk=3)
    head = chunked_head_loss(model)
    head.fused = liger_loss(model.get_output_embeddings(), torch.device("cuda"))
    assert head.fused is not None
    got, got_grads = model_loss_and_grads(model, ids, labels, chunk=3)
    assert torch.allclose(got, want, rtol=1e-4)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, atol=1e-4)
