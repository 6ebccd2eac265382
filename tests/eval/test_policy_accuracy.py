"""Policy accuracy and the exact λ sweep (plrm/eval/policy.py) against brute force and hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest

from plrm.eval.policy import (
    best_lambda,
    harmonic_mean,
    inverse_perplexity,
    lambda_grid_default,
    per_user_accuracy,
    policy_accuracies,
    rgd_correct,
)

# Four pairs, one user. Breakpoints λ_i = -ΔLL_i / ΔR_i:
#   pair 0: ΔLL -1, ΔR  1 -> λ_0 = 1, right for λ > 1
#   pair 1: ΔLL -3, ΔR  1 -> λ_1 = 3, right for λ > 3
#   pair 2: ΔLL  2, ΔR -1 -> λ_2 = 2, right for λ < 2
#   pair 3: ΔLL  1, ΔR  0 -> no breakpoint, always right
# Accuracy: λ = 0: pairs 2, 3 = 0.5; (0, 1): 0.5; at λ = 1 pair 0 ties (wrong): 0.5; (1, 2): pairs 0, 2, 3 = 0.75;
# (2, 3): pairs 0, 3 = 0.5; (3, ∞): pairs 0, 1, 3 = 0.75. Best 0.75, first reached on (1, 2).
HAND_DLL = np.array([-1.0, -3.0, 2.0, 1.0])
HAND_DR = np.array([1.0, 1.0, -1.0, 0.0])


def objective(dll, dr, lam, users=None):
    """RGD accuracy at λ, pooled or macro, written independently of the module's sweep."""
    correct = dll + lam * dr > 0
    if users is None:
        return correct.mean()
    return np.mean([correct[users == u].mean() for u in np.unique(users)])


def grid_objective(dll, dr, lams, users=None):
    """Accuracy at every λ of a grid at once: (G,)."""
    correct = dll[None, :] + lams[:, None] * dr[None, :] > 0  # (G, n)
    if users is None:
        return correct.mean(axis=1)
    onehot = users[None, :] == np.unique(users)[:, None]  # (U, n)
    return (correct @ onehot.T / onehot.sum(axis=1)).mean(axis=1)


def random_pairs(seed: int, kind: str):
    """~300 pairs of ~12 unbalanced users (ids sparse). "integer": small integers, so many pairs share a
    breakpoint and some have ΔLL = 0 or ΔR = 0 (ties and λ-independent pairs)."""
    rng = np.random.default_rng(seed)
    n = 300
    users = rng.choice(12, size=n, p=np.arange(1, 13) / 78) * 7 + 3
    if kind == "integer":
        dll = rng.integers(-3, 4, n).astype(float)
        dr = rng.integers(-2, 3, n).astype(float)
    else:
        dll = rng.normal(0.0, 5.0, n)
        dr = rng.normal(0.5, 2.0, n)
    return dll, dr, users


@pytest.mark.parametrize("tie", ["smallest", "midpoint"])
@pytest.mark.parametrize("macro", [False, True])
@pytest.mark.parametrize("kind", ["normal", "integer"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_exact_sweep_equals_brute_force(seed, kind, macro, tie):
    """The sweep's best is attained at the returned λ, equals the best over every interval found by brute force
    (λ = 0, each midpoint between sorted breakpoints, a point past the last), and no λ of a fine grid beats it."""
    dll, dr, users = random_pairs(seed, kind)
    lambda_max = 2.0 if seed == 3 else None
    choice = best_lambda(dll, dr, users=users if macro else None, lambda_max=lambda_max, tie=tie)
    groups = users if macro else None

    breaks = np.unique((-dll / np.where(dr == 0, np.nan, dr)))
    breaks = breaks[(breaks > 0) & (breaks < (lambda_max or np.inf))]
    end = lambda_max if lambda_max is not None else (breaks[-1] + 1 if len(breaks) else 1.0)
    edges = np.concatenate([[0.0], breaks, [end]])
    candidates = np.concatenate([[0.0], (edges[:-1] + edges[1:]) / 2])
    cand_acc = np.array([objective(dll, dr, lam, groups) for lam in candidates])
    best = cand_acc.max()

    assert choice.accuracy == pytest.approx(best, abs=1e-12)
    assert objective(dll, dr, choice.lam, groups) == pytest.approx(best, abs=1e-12)
    assert 0 <= choice.lam <= (lambda_max or np.inf)
    np.testing.assert_allclose(choice.breakpoints, breaks)
    grid = np.concatenate([[0.0], np.geomspace(1e-4, 1e3, 3000)])
    grid = grid[grid <= (lambda_max or np.inf)]
    assert grid_objective(dll, dr, grid, groups).max() <= choice.accuracy + 1e-12

    lams, accs = choice.curve
    assert accs.max() == pytest.approx(best, abs=1e-12)
    np.testing.assert_allclose(accs, [objective(dll, dr, lam, groups) for lam in lams], atol=1e-12)
    if tie == "smallest":  # every smaller candidate is strictly worse
        assert (cand_acc[candidates < choice.lam] < best - 1e-12).all()


def test_hand_example_both_tie_modes():
    """Best 0.75 first on (1, 2): "smallest" returns just past λ_0 = 1, "midpoint" 1.5."""
    smallest = best_lambda(HAND_DLL, HAND_DR, tie="smallest")
    assert smallest.accuracy == 0.75
    assert 1.0 < smallest.lam <= 1.0 + 1e-8
    midpoint = best_lambda(HAND_DLL, HAND_DR, tie="midpoint")
    assert midpoint.lam == 1.5 and midpoint.accuracy == 0.75
    assert midpoint.n_pairs == 4
    np.testing.assert_array_equal(midpoint.breakpoints, [1.0, 2.0, 3.0])
    lams, accs = midpoint.curve  # λ = 0, then (0, 1), (1, 2), (2, 3), (3, ∞) with 2·3 = 6 as its point
    np.testing.assert_array_equal(lams, [0.0, 0.5, 1.5, 2.5, 6.0])
    np.testing.assert_array_equal(accs, [0.5, 0.5, 0.75, 0.5, 0.75])


def test_unbounded_last_interval():
    """One pair ΔLL -1, ΔR 2: λ_0 = 0.5, right only on (0.5, ∞): midpoint 2·0.5 = 1, smallest just past 0.5."""
    assert best_lambda([-1.0], [2.0], tie="midpoint").lam == 1.0
    smallest = best_lambda([-1.0], [2.0])
    assert 0.5 < smallest.lam <= 0.5 + 1e-8 and smallest.accuracy == 1.0


def test_ties_count_as_wrong():
    """On its breakpoint a pair scores exactly 0: wrong. Identical responses (ΔLL = ΔR = 0) are wrong at every λ.
    A pair with ΔLL = 0 < ΔR ties at λ = 0 only, so the sweep must step off 0 to win it."""
    assert not rgd_correct(np.array([-1.0]), np.array([1.0]), 1.0)[0]
    assert rgd_correct(np.array([-1.0]), np.array([1.0]), 1.0 + 1e-9)[0]
    assert best_lambda([0.0], [0.0]).accuracy == 0.0
    choice = best_lambda([0.0], [1.0])
    assert choice.lam > 0 and choice.accuracy == 1.0
    assert choice.curve[1].tolist() == [0.0, 1.0]
    assert best_lambda([0.0], [1.0], tie="midpoint").lam == 1.0


def test_lambda_max_is_respected():
    """Hand example bounded to [0, 1.5]: best 0.75 on (1, 1.5], midpoint 1.25. Bounded to [0, 0.5]: no breakpoint
    inside, accuracy flat 0.5, so λ = 0 in both modes. Bounded to 0: only λ = 0."""
    assert best_lambda(HAND_DLL, HAND_DR, lambda_max=1.5, tie="midpoint").lam == 1.25
    assert 1.0 < best_lambda(HAND_DLL, HAND_DR, lambda_max=1.5).lam <= 1.0 + 1e-8
    low = best_lambda(HAND_DLL, HAND_DR, lambda_max=0.5)
    assert low.lam == 0.0 and low.accuracy == 0.5 and len(low.breakpoints) == 0
    assert best_lambda(HAND_DLL, HAND_DR, lambda_max=0.5, tie="midpoint").lam == 0.0
    # a breakpoint equal to lambda_max closes the last interval: (2, 3) is out of range, (1, 2) still best
    assert best_lambda(HAND_DLL, HAND_DR, lambda_max=2.0, tie="midpoint").lam == 1.5
    assert best_lambda(HAND_DLL, HAND_DR, lambda_max=0.0, tie="midpoint").lam == 0.0


def test_all_rewards_equal_gives_lambda_zero():
    choice = best_lambda([1.0, -1.0, 2.0], [0.0, 0.0, 0.0], tie="midpoint")
    assert choice.lam == 0.0 and choice.accuracy == pytest.approx(2 / 3)


def test_macro_objective_chooses_differently_from_pooled():
    """User 5: one pair ΔLL -1, ΔR 1 (right for λ > 1). User 9: two pairs ΔLL 1, ΔR -1 (right for λ < 1) and one
    always wrong (ΔLL -1, ΔR 0).
    Pooled: [0, 1): 2/4 = 0.5, (1, ∞): 1/4 -> λ = 0.
    Macro: [0, 1): (0 + 2/3) / 2 = 1/3, (1, ∞): (1 + 0) / 2 = 0.5 -> just past 1."""
    dll = np.array([-1.0, 1.0, 1.0, -1.0])
    dr = np.array([1.0, -1.0, -1.0, 0.0])
    users = np.array([5, 9, 9, 9])
    pooled = best_lambda(dll, dr)
    assert pooled.lam == 0.0 and pooled.accuracy == 0.5
    macro = best_lambda(dll, dr, users=users)
    assert 1.0 < macro.lam <= 1.0 + 1e-8 and macro.accuracy == pytest.approx(0.5)
    np.testing.assert_allclose(macro.curve[1], [1 / 3, 1 / 3, 0.5])


def test_per_user_accuracy_macro_vs_micro():
    """User 7: 3 of 4 right = 0.75; user 2: 0 of 1. Macro (0.75 + 0) / 2 = 0.375; micro 3 / 5 = 0.6."""
    correct = np.array([True, True, False, True, False])
    users = np.array([7, 7, 7, 7, 2])
    assert per_user_accuracy(correct, users) == (0.375, 0.6, 2)
    macro, micro, n_users = per_user_accuracy(np.zeros(0, bool), np.zeros(0, int))
    assert np.isnan(macro) and np.isnan(micro) and n_users == 0


def test_policy_accuracies():
    """Users 0 (pairs 0, 1) and 1 (pair 2), λ = 2.
    rm  ΔRM   0.5, 0.0, -1 -> right, tie, wrong: macro (0.5 + 0) / 2 = 0.25, pooled 1/3, 1 tie.
    base ΔLLn 0.1, -0.2, 0.3 -> macro (0.5 + 1) / 2 = 0.75, pooled 2/3, no tie.
    rgd ΔLL + 2 ΔR: -1 + 2·0.5 = 0 (tie), 1 + 0 = 1, -1 + 2·1 = 1 -> macro (0.5 + 1) / 2 = 0.75, pooled 2/3, 1 tie."""
    out = policy_accuracies(dll=[-1.0, 1.0, -1.0], dlln=[0.1, -0.2, 0.3], dr=[0.5, 0.0, 1.0],
                            drm=[0.5, 0.0, -1.0], users=np.array([0, 0, 1]), lam=2.0)
    assert out["rm_accuracy"] == 0.25 and out["rm_accuracy_pooled"] == pytest.approx(1 / 3) and out["rm_ties"] == 1
    assert out["base_accuracy"] == 0.75 and out["base_accuracy_pooled"] == pytest.approx(2 / 3)
    assert out["base_ties"] == 0
    assert out["rgd_accuracy"] == 0.75 and out["rgd_accuracy_pooled"] == pytest.approx(2 / 3)
    assert out["rgd_ties"] == 1
    assert (out["lambda"], out["n_users"], out["n_pairs"]) == (2.0, 2, 3)


def test_harmonic_mean_zero_rule():
    """3 / (1/0.5 + 1/0.25 + 1/1) = 3 / 7; any zero term makes the mean 0 (not a division by zero)."""
    assert harmonic_mean(0.5, 0.25, 1.0) == pytest.approx(3 / 7)
    assert harmonic_mean(1.0, 0.5) == pytest.approx(2 / 3)
    assert harmonic_mean(0.5, 0.5, 0.5, 0.5) == pytest.approx(0.5)
    assert harmonic_mean(0.9, 0.0, 0.8) == 0.0


def test_lambda_grid_and_inverse_perplexity():
    np.testing.assert_allclose(lambda_grid_default(2.0), [0.0, 0.05, 0.15, 0.5, 1.5, 5.0])
    # 3 tokens of probability 0.5 -> 0.5; one token of probability 1 -> 1
    np.testing.assert_allclose(inverse_perplexity(np.array([3 * np.log(0.5), 0.0]), np.array([3, 1])), [0.5, 1.0])


@pytest.mark.parametrize(("call", "match"), [
    (lambda: best_lambda([], []), r"best_lambda needs at least one pair to choose λ from; got none"),
    (lambda: best_lambda([1.0], [1.0], tie="largest"), r"tie must be 'smallest' or 'midpoint', got 'largest'"),
    (lambda: best_lambda([1.0], [1.0], lambda_max=-1.0), r"lambda_max must be >= 0 \(or None for no bound\), got -1.0"),
    (lambda: best_lambda([1.0, 2.0], [1.0]), r"dr has 1 values but there are 2 pairs"),
    (lambda: best_lambda([[1.0]], [[1.0]]), r"dll must be one value per pair \(1-D\), got shape \(1, 1\)"),
    (lambda: best_lambda([1.0, np.nan], [1.0, 1.0]), r"dll must be finite; pair 1 has nan"),
    (lambda: best_lambda([1.0], [1.0], users=[0, 1]), r"users must hold one user id per pair \(1\), got shape \(2,\)"),
    (lambda: best_lambda([1.0], [1.0], users=[0.5]), r"users must be integer user ids, got dtype float64"),
    (lambda: per_user_accuracy(np.ones((2, 2), bool), [0, 0]), r"correct must be one flag per pair \(1-D\), got shape \(2, 2\)"),
    (lambda: policy_accuracies([1.0], [1.0], [1.0], [1.0], [0], lam=-1.0), r"lam must be a finite λ >= 0, got -1.0"),
    (lambda: lambda_grid_default(0.0), r"r_std must be a finite reward standard deviation > 0, got 0.0"),
    (lambda: harmonic_mean(), r"harmonic_mean needs at least one term"),
    (lambda: harmonic_mean(0.5, -0.1), r"harmonic_mean terms must be finite and >= 0, got \[0.5, -0.1\]"),
    (lambda: inverse_perplexity([-1.0], [0]), r"inverse_perplexity needs n_tokens >= 1 for every example"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
