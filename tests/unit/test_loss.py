"""Loss functions: global-sum semantics, packed-document boundaries, chunked cross-entropy, target-only logits."""
import pytest
import torch

from dist_tune.config import Config
from dist_tune.errors import UserError
from dist_tune.loss import IGNORE, causal_lm_loss_sum, shifted_labels, target_positions
from dist_tune.models import check_logits_to_keep


def test_chunked_cross_entropy_matches_full_in_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 17, 50, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 17))
    labels[0, :5] = IGNORE
    full, n_full = causal_lm_loss_sum(logits, labels)
    (grad_full,) = torch.autograd.grad(full, logits)
    chunked, n_chunked = causal_lm_loss_sum(logits, labels, chunk=7)
    (grad_chunked,) = torch.autograd.grad(chunked, logits)
    assert n_full == n_chunked == 3 * 16 - 4
    assert torch.allclose(full, chunked, rtol=1e-6)
    assert torch.allclose(grad_full.float(), grad_chunked.float(), atol=1e-6)


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
