"""Per-user preference metrics (plrm/eval/metrics.py) on small hand-made logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from plrm.eval.metrics import pct_key, per_user_accuracy, summarize, worst_fraction_mean

# Four users; user 3 has no pairs.
#   user 0: logits  1.0, -0.5       -> 1 of 2 right: 0.5
#   user 1: logits  2.0,  0.0, 0.3  -> the tie 0.0 counts as wrong: 2 of 3 = 0.6667
#   user 2: logit  -1.0             -> 0 of 1: 0.0
LOGITS = torch.tensor([1.0, -0.5, 2.0, 0.0, 0.3, -1.0])
USER_IDX = torch.tensor([0, 0, 1, 1, 1, 2])
N_USERS = 4


def test_per_user_accuracy():
    acc, count = per_user_accuracy(LOGITS, USER_IDX, N_USERS)
    assert count.tolist() == [2, 3, 1, 0]
    assert acc[:3].tolist() == pytest.approx([0.5, 2 / 3, 0.0])
    assert math.isnan(acc[3])


def test_summarize_averages_over_users_then_pairs():
    """accuracy = mean over users with pairs = (0.5 + 2/3 + 0) / 3 = 7/18 = 0.3889.

    accuracy_pooled = 3 right of 6 pairs = 0.5; one tie; user 3 has no pairs: excluded and counted.
    Worst 10% of 3 users: ceil(0.3) = 1 user, the worst, 0.0. Worst 50%: ceil(1.5) = 2 users,
    (0 + 0.5) / 2 = 0.25. Worst 100%: all three, = accuracy.
    """
    metrics, acc, count = summarize(LOGITS, USER_IDX, np.arange(N_USERS), N_USERS, [0.1, 0.5, 1.0])
    assert metrics["accuracy"] == pytest.approx(7 / 18)
    assert metrics["accuracy_pooled"] == pytest.approx(0.5)
    assert metrics["ties"] == 1
    assert metrics["n_users"] == 3
    assert metrics["n_users_without_pairs"] == 1
    assert metrics["n_pairs"] == 6
    assert metrics["accuracy_worst_10pct"] == pytest.approx(0.0)
    assert metrics["accuracy_worst_50pct"] == pytest.approx(0.25)
    assert metrics["accuracy_worst_100pct"] == pytest.approx(7 / 18)
    assert count.tolist() == [2, 3, 1, 0]
    assert acc[1].item() == pytest.approx(2 / 3)


def test_summarize_auroc_counts_both_orientations():
    """Positives are the logits s, negatives -s; AUROC = P(pos > neg) + P(pos = neg) / 2 over 6 x 6 pairs.

    positives  1, -0.5, 2,  0,  0.3, -1;  negatives -1, 0.5, -2, 0, -0.3, 1.
    Per positive, negatives below it (+ half the ties): 1 -> 5 + 0.5, -0.5 -> 2, 2 -> 6, 0 -> 3 + 0.5,
    0.3 -> 4, -1 -> 1 + 0.5. Sum 22.5, / 36 = 0.625.
    """
    metrics, _, _ = summarize(LOGITS, USER_IDX, np.arange(N_USERS), N_USERS, [])
    assert metrics["auroc"] == pytest.approx(0.625)


@pytest.mark.parametrize(("logits", "auroc"), [
    # all right: every positive above every negative
    ([0.5, 2.0, 3.0], 1.0),
    # positives 2, -1 and negatives -2, 1: 2 beats both, -1 beats -2 only: 3 / 4
    ([2.0, -1.0], 0.75),
    # positives 1, 0 and negatives -1, 0: 1 beats both, 0 beats -1 and ties 0: 3.5 / 4
    ([1.0, 0.0], 0.875),
])
def test_auroc_hand_cases(logits, auroc):
    logits = torch.tensor(logits)
    metrics, _, _ = summarize(logits, torch.zeros(len(logits), dtype=torch.long), np.arange(1), 1, [])
    assert metrics["auroc"] == pytest.approx(auroc)


def test_summarize_a_group_of_users():
    """Only users 0 and 2 (and 3, without pairs) form the group: accuracy (0.5 + 0) / 2 = 0.25."""
    metrics, _, _ = summarize(LOGITS, USER_IDX, np.array([0, 2, 3]), N_USERS, [0.1])
    assert metrics["accuracy"] == pytest.approx(0.25)
    assert metrics["n_users"] == 2
    assert metrics["n_users_without_pairs"] == 1
    assert metrics["accuracy_worst_10pct"] == pytest.approx(0.0)


def test_worst_fraction_mean_rounds_the_user_count_up():
    """Accuracies 0.9, 0.2, 0.6, 0.4: 10% of 4 -> ceil(0.4) = 1 user (0.2); 50% -> 2 users (0.2 + 0.4) / 2 = 0.3;
    30% -> ceil(1.2) = 2 users, also 0.3."""
    user_acc = torch.tensor([0.9, 0.2, 0.6, 0.4])
    assert worst_fraction_mean(user_acc, 0.1) == pytest.approx(0.2)
    assert worst_fraction_mean(user_acc, 0.5) == pytest.approx(0.3)
    assert worst_fraction_mean(user_acc, 0.3) == pytest.approx(0.3)
    assert worst_fraction_mean(user_acc, 1.0) == pytest.approx(0.525)
    assert worst_fraction_mean(user_acc, 0.0) == pytest.approx(0.2)  # at least one user
    assert math.isnan(worst_fraction_mean(torch.tensor([]), 0.1))


def test_pct_key():
    assert [pct_key(q) for q in (0.1, 0.2, 0.5)] == [
        "accuracy_worst_10pct", "accuracy_worst_20pct", "accuracy_worst_50pct"]


def test_summarize_a_group_without_pairs():
    """No test pairs at all: accuracy and AUROC are NaN, both users counted as without pairs."""
    metrics, acc, count = summarize(torch.tensor([]), torch.tensor([], dtype=torch.long), np.arange(2), 2, [0.1])
    assert math.isnan(metrics["accuracy"]) and math.isnan(metrics["auroc"])
    assert metrics["n_pairs"] == 0 and metrics["n_users"] == 0 and metrics["n_users_without_pairs"] == 2
    assert count.tolist() == [0, 0] and torch.isnan(acc).all()
