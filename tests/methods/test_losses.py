"""The losses as pure functions of tensors, against numbers worked out by hand."""

import math

import torch

from plrm.methods.losses import bradley_terry_nll, masked_bradley_terry_nll, reduce_nll, robust_objective


def test_bradley_terry_nll_by_hand():
    """logits (0, ln 3): -log sigmoid(0) = ln 2, -log sigmoid(ln 3) = -log(3/4) = ln 4/3; mean = (ln 2 + ln 4/3)/2.
    Weights (0.5, 1.5), as 1/|D_u| scaled to mean 1: (0.5 ln 2 + 1.5 ln 4/3) / 2."""
    logits = torch.tensor([0.0, math.log(3.0)])
    torch.testing.assert_close(bradley_terry_nll(logits), torch.tensor((math.log(2) + math.log(4 / 3)) / 2))
    torch.testing.assert_close(bradley_terry_nll(logits, torch.tensor([0.5, 1.5])),
                               torch.tensor((0.5 * math.log(2) + 1.5 * math.log(4 / 3)) / 2))


def test_masked_nll_sums_or_averages_the_unmasked_pairs_only():
    """Pairs with logits (0, ln 3, -100), the last one padding: sum ln 2 + ln 4/3 = ln 8/3, mean half of it; a
    user with no unmasked pair has loss 0, never NaN."""
    logits = torch.tensor([0.0, math.log(3.0), -100.0])
    mask = torch.tensor([True, True, False])
    torch.testing.assert_close(masked_bradley_terry_nll(logits, mask, "sum"), torch.tensor(math.log(8 / 3)))
    torch.testing.assert_close(masked_bradley_terry_nll(logits, mask, "mean"), torch.tensor(math.log(8 / 3) / 2))
    assert masked_bradley_terry_nll(logits, torch.zeros(3, dtype=torch.bool), "mean") == 0.0
    torch.testing.assert_close(reduce_nll(torch.tensor([1.0, 3.0]), "sum"), torch.tensor(4.0))
    torch.testing.assert_close(reduce_nll(torch.tensor([1.0, 3.0]), "mean"), torch.tensor(2.0))


def test_robust_objective_by_hand():
    """Losses (1, 2, 3, 4), rho 0.5: tau = the 0.5 quantile = 2.5. gamma = 0 keeps users above tau: (3 + 4) / 4.
    gamma = 1: sum sigmoid(L - 2.5) L / 4. population given: tau and the count come from it."""
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(robust_objective(losses, 0.5, 0.0), torch.tensor(7.0 / 4))
    expected = sum(torch.sigmoid(torch.tensor(v - 2.5)) * v for v in (1.0, 2.0, 3.0, 4.0)) / 4
    torch.testing.assert_close(robust_objective(losses, 0.5, 1.0), expected)
    part = robust_objective(losses[:2], 0.5, 1.0, population=losses) + robust_objective(losses[2:], 0.5, 1.0,
                                                                                        population=losses)
    torch.testing.assert_close(part, expected)
