"""Loss functions: global-sum semantics, packed-document boundaries, chunked cross-entropy."""
import torch

from dist_tune.loss import IGNORE, causal_lm_loss_sum, shifted_labels


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
