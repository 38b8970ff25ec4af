"""fusedce: the head and cross-entropy computed chunk by chunk, gradients in forward, equal the
plain head + torch cross-entropy in loss and in every gradient (states, weight, bias)."""

import pytest
import torch
import torch.nn.functional as F

from qlora_lab import fastpath, fusedce
from qlora_lab.data import IGNORE_INDEX, PackedCollator, PadCollator, supervised_positions


def _reference(states, weight, bias, targets, softcap):
    logits = F.linear(states, weight, bias).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def _leaves(n=11, h=12, v=37, bias=False, weight_grad=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype).requires_grad_(weight_grad)
    b = (torch.randn(v, generator=g) * 0.1).to(dtype).requires_grad_(weight_grad) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return states, weight, b, targets


@pytest.mark.parametrize("chunk", [1, 4, 11, 64])
@pytest.mark.parametrize("softcap", [None, 0.7])
@pytest.mark.parametrize("bias,weight_grad", [(False, False), (True, True)])
def test_loss_and_gradients_equal_the_plain_head(chunk, softcap, bias, weight_grad):
    states, weight, b, targets = _leaves(bias=bias, weight_grad=weight_grad)
    inputs = [t for t in (states, weight, b) if t is not None and t.requires_grad]
    total = fusedce.linear_cross_entropy(states, weight, b, targets, chunk, softcap)
    # An upstream gradient that is not 1: backward scales by it (on the device, no check).
    got = torch.autograd.grad(total * 3.0, inputs)
    reference = _reference(states, weight, b, targets, softcap)
    want = torch.autograd.grad(reference * 3.0, inputs)
    torch.testing.assert_close(total, reference)
    assert len(got) == len(inputs) == (3 if weight_grad else 1)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_16_bit_states_get_16_bit_gradients_close_to_an_fp32_reference():
    states, weight, _, targets = _leaves(n=20, h=16, v=50, dtype=torch.bfloat16)
    total = fusedce.linear_cross_entropy(states, weight, None, targets, 8)
    (got,) = torch.autograd.grad(total, states)
    ref_states = states.detach().float().requires_grad_(True)
    reference = _reference(ref_states, weight.float(), None, targets, None)
    (want,) = torch.autograd.grad(reference, ref_states)
    assert got.dtype == torch.bfloat16 and total.dtype == torch.float32
    torch.testing.assert_close(total, reference, rtol=2e-2, atol=0.0)
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=2e-2)


def test_without_grad_it_returns_the_loss_and_keeps_nothing():
    states, weight, _, targets = _leaves()
    with torch.no_grad():
        total = fusedce.linear_cross_entropy(states, weight, None, targets, 4)
    assert total.grad_fn is None
    torch.testing.assert_close(total, _reference(states, weight, None, targets, None))


def test_the_compiled_chunk_gives_the_eager_loss_and_gradients():
    """What train.compile runs on CUDA (one fused kernel per chunk), here compiled for the CPU."""
    torch._dynamo.reset()
    for softcap in (None, 0.7):
        states, weight, _, targets = _leaves(n=13)
        eager = fusedce.linear_cross_entropy(states, weight, None, targets, 5, softcap)
        (g_eager,) = torch.autograd.grad(eager, states)
        compiled = fusedce.linear_cross_entropy(states, weight, None, targets, 5, softcap,
                                                compiled=True)
        (g_compiled,) = torch.autograd.grad(compiled, states)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-6)


# --- the supervised positions the collators find on the host ----------------------------------


def _rows():
    return [{"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9],
             "position_ids": list(range(5))},
            {"input_ids": [3, 4, 5], "labels": [IGNORE_INDEX, 4, 5],
             "position_ids": list(range(3))},
            {"input_ids": [1, 2], "labels": [IGNORE_INDEX, IGNORE_INDEX],
             "position_ids": list(range(2))}]


@pytest.mark.parametrize("collator", [PadCollator(0, positions=True),
                                      PackedCollator(0, 8, positions=True),
                                      PackedCollator(0, 8, pad_to_multiple_of=8, positions=True)])
def test_collators_give_the_positions_the_loss_would_find_on_the_device(collator):
    batch = collator(_rows())
    labels = batch["labels"]
    found = (labels[:, 1:].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(-1)
    assert torch.equal(batch["supervised_positions"], found)
    assert torch.equal(supervised_positions(labels), found)
    # 3 answer tokens in row one, 2 in row two, none in row three
    assert batch["supervised_positions"].numel() == 5


def test_collators_add_no_positions_unless_asked():
    assert "supervised_positions" not in PadCollator(0)(_rows())
    assert "supervised_positions" not in PackedCollator(0, 8)(_rows())


def test_head_loss_with_the_collators_positions_equals_finding_them():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 8, 16, requires_grad=True)
    batch = PackedCollator(0, 8, pad_to_multiple_of=8, positions=True)(_rows())
    labels = batch["labels"]
    loss = fastpath.SupervisedHeadLoss(head, use_liger=False, chunk_tokens=2)
    given, n_given = loss(hidden[:labels.shape[0], :labels.shape[1]], labels,
                          batch["supervised_positions"])
    found, n_found = loss(hidden[:labels.shape[0], :labels.shape[1]], labels)
    assert n_given == n_found == 5
    torch.testing.assert_close(given, found)
