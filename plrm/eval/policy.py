"""Policy accuracy: how often the scoring function used at generation time prefers the chosen response.

The Reward Model Selection Crisis in Personalized Alignment (Rezk et al., arXiv 2512.23067), Def. 2 and eq. 3-7,
App. F.2. Everything here works on four numbers per (user, chosen, rejected) pair, produced elsewhere by one
policy forward and one guide forward per response:

- ``dll``: ΔLL, the chosen minus the rejected summed policy log-likelihood, Σ_t log π(y_t | x, y_<t);
- ``dlln``: the same difference of length-normalised means, (1/|y|) Σ_t log π(y_t | x, y_<t);
- ``dr``: ΔR, the chosen minus the rejected sum of per-token guide rewards, Σ_t r(y_t | x, y_<t);
- ``drm``: the reward model's full-response reward difference, r(x, y_w) - r(x, y_l).

The scores are then ``rm``: 1[drm > 0] (reward-model accuracy); ``base``: 1[dlln > 0] (eq. 4, the "Prior" of
Table 2, a mean, not a sum); ``rgd``: 1[dll + λ dr > 0] (eq. 5 with the global RM, eq. 6 with a personalized one,
sums). Every comparison is strict, as in eq. 3: a tie (identical responses, or λ sitting exactly on a pair's
breakpoint) counts as wrong, and is counted. Accuracy is per user first (eq. 3), then the mean over users
(macro, the paper's number); the pooled (micro) accuracy over pairs is reported beside it, as plrm.eval.metrics
does for reward models.

λ is chosen to maximise policy accuracy on the seen users' test pairs (App. F.2). Because the RGD score is linear
in λ, each pair's correctness changes only at its breakpoint λ_i = -ΔLL_i / ΔR_i, so the best λ is found exactly
by one sorted sweep over the breakpoints (``best_lambda``), without a grid and without re-running any model.
Pref-LaMP chooses λ instead by the harmonic mean of ROUGE-1, inverse perplexity and policy accuracy, which needs
generation at each candidate, hence a small grid (``lambda_grid_default``, ``harmonic_mean``,
``inverse_perplexity``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

# Relative offset past a breakpoint for tie="smallest": far above float64 rounding of dll + λ dr (~1e-16
# relative), so the pairs whose breakpoint is the interval's left end really score > 0 at the returned λ.
_SMALLEST_OFFSET = 1e-9
# Macro accuracies are sums of float weights 1/(n_u U); two intervals whose accuracies agree to this tolerance
# are the same accuracy, so round-off cannot make tie="smallest" skip the first best interval.
_ACCURACY_TOL = 1e-12


@dataclass(frozen=True, eq=False)
class LambdaChoice:
    """The λ of ``best_lambda`` and what it was chosen from.

    ``accuracy`` is the objective (pooled, or macro over users) evaluated directly at ``lam``, not read off the
    sweep, so it is exactly what RGD scores there. ``breakpoints`` are the distinct λ_i inside the search range
    (0, lambda_max), sorted. ``curve = (lams, accs)`` is the whole step function for logging: ``accs[0]`` is the
    accuracy at λ = 0, ``accs[k]`` (k >= 1) the accuracy on the open interval between breakpoints k - 2 and
    k - 1 (0 and the range's end at either side), and ``lams[k]`` a λ inside that interval where it is attained.
    """

    lam: float
    accuracy: float
    n_pairs: int
    breakpoints: np.ndarray
    curve: tuple[np.ndarray, np.ndarray]


def _pair_array(name: str, values, n: int | None = None) -> np.ndarray:
    """A 1-D float64 array of finite per-pair values, of length n when given."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one value per pair (1-D), got shape {array.shape}")
    if n is not None and len(array) != n:
        raise ValueError(f"{name} has {len(array)} values but there are {n} pairs")
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise ValueError(f"{name} must be finite; pair {bad} has {array[bad]}")
    return array


def _user_groups(users, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(group index of each pair (n,) in 0..U-1, pair count of each group (U,)); user ids may be any ints."""
    users = np.asarray(users)
    if users.ndim != 1 or len(users) != n:
        raise ValueError(f"users must hold one user id per pair ({n}), got shape {users.shape}")
    if n and not np.issubdtype(users.dtype, np.integer):
        raise ValueError(f"users must be integer user ids, got dtype {users.dtype}")
    _, group, count = np.unique(users, return_inverse=True, return_counts=True)
    return group.reshape(-1), count


def _macro_micro(correct: np.ndarray, group: np.ndarray, count: np.ndarray) -> tuple[float, float]:
    """Mean over users of each user's accuracy (eq. 3), and the accuracy pooled over pairs."""
    if len(correct) == 0:
        return float("nan"), float("nan")
    right = np.bincount(group, weights=correct.astype(np.float64), minlength=len(count))  # (U,)
    return float(np.mean(right / count)), float(np.mean(correct))


def per_user_accuracy(correct: np.ndarray, users: np.ndarray) -> tuple[float, float, int]:
    """(macro, micro, number of users): macro weighs every user alike, however many pairs they have.

    Users appear through their pairs only, so a user without pairs is not counted here; with no pairs at all
    both accuracies are NaN and the count 0, as in plrm.eval.metrics.
    """
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 1:
        raise ValueError(f"correct must be one flag per pair (1-D), got shape {correct.shape}")
    group, count = _user_groups(users, len(correct))
    macro, micro = _macro_micro(correct, group, count)
    return macro, micro, len(count)


def rgd_correct(dll: np.ndarray, dr: np.ndarray, lam: float) -> np.ndarray:
    """1[ΔLL + λ ΔR > 0] per pair (eq. 5/6); strict, so a pair on its breakpoint is wrong."""
    return np.asarray(dll, dtype=np.float64) + lam * np.asarray(dr, dtype=np.float64) > 0


def _interval_points(lo: np.ndarray, hi: np.ndarray, tie: str) -> np.ndarray:
    """A λ inside each open interval (lo, hi): its smallest attainable value or its midpoint.

    At lo itself the pairs whose breakpoint is lo tie, so "smallest" steps a relative 1e-9 past it (never more
    than half the interval). An unbounded interval (lo, ∞) has no midpoint: 2·lo keeps the choice
    scale-equivariant (ΔR scaled by c scales every λ by 1/c); with lo = 0 any λ > 0 is the same, and 1 is used.
    """
    bounded = np.isfinite(hi)
    width = np.where(bounded, hi - lo, np.inf)
    if tie == "midpoint":
        return np.where(bounded, lo + width / 2, np.where(lo > 0, 2 * lo, 1.0))
    scale = np.where(lo > 0, lo, np.where(bounded, hi, 1.0))
    return lo + np.minimum(_SMALLEST_OFFSET * scale, width / 2)


def best_lambda(dll: np.ndarray, dr: np.ndarray, users: np.ndarray | None = None, lambda_max: float | None = None,
                tie: Literal["smallest", "midpoint"] = "smallest") -> LambdaChoice:
    """The λ >= 0 that maximises RGD policy accuracy, found exactly (App. F.2, with a sweep instead of a grid).

    score_i(λ) = ΔLL_i + λ ΔR_i is linear in λ, so pair i changes state only at λ_i = -ΔLL_i / ΔR_i: a pair with
    ΔR_i > 0 becomes right after it, one with ΔR_i < 0 wrong. Accuracy is therefore a step function: constant on
    the open intervals between sorted breakpoints, and no higher at a breakpoint than on either side (pairs on
    it tie). Sorting the breakpoints and summing the ±weight events in order gives the accuracy of every
    interval in O(n log n), plus λ = 0 itself, where pairs with ΔLL = 0 < ΔR still tie.

    ``users`` given: the objective is the macro accuracy (mean over users of each user's accuracy), so a pair of
    user u weighs 1 / (n_u U); without it every pair weighs 1 / n. ``lambda_max`` bounds the search to
    [0, lambda_max]. Among equally good intervals the first (smallest λ) wins; ``tie`` then picks the λ inside
    it: "smallest" (the least intervention: 0 when λ = 0 is best, else just past the interval's left breakpoint)
    or "midpoint". When no pair changes state in the range (e.g. every ΔR = 0), every λ scores the same and 0
    is returned.
    """
    if tie not in ("smallest", "midpoint"):
        raise ValueError(f"tie must be 'smallest' or 'midpoint', got {tie!r}")
    dll = _pair_array("dll", dll)
    dr = _pair_array("dr", dr, len(dll))
    n = len(dll)
    if n == 0:
        raise ValueError("best_lambda needs at least one pair to choose λ from; got none")
    if lambda_max is not None and not lambda_max >= 0:  # `not >=` also refuses NaN
        raise ValueError(f"lambda_max must be >= 0 (or None for no bound), got {lambda_max}")
    lam_end = np.inf if lambda_max is None else float(lambda_max)

    if users is None:
        # Integer weights keep the pooled sweep exact; divided by n at the end.
        weight, total = np.ones(n), float(n)
    else:
        group, count = _user_groups(users, n)
        weight, total = 1.0 / count[group], float(len(count))  # (n,); macro = Σ weight·correct / U

    lam_break = np.divide(-dll, dr, out=np.full(n, np.nan), where=dr != 0)  # (n,) λ_i; NaN where ΔR = 0
    acc_zero = weight[dll > 0].sum()
    zero_event = (dll == 0) & (dr > 0)  # tie at λ = 0, right for every λ > 0
    moves = (lam_break > 0) & (lam_break < lam_end)  # NaN compares False
    order = np.argsort(lam_break[moves], kind="stable")
    lam_sorted = lam_break[moves][order]
    event = np.where(dr[moves] > 0, weight[moves], -weight[moves])[order]  # (m,) ±weight when λ passes λ_i
    # Pairs sharing a breakpoint change state together: one summed step per distinct λ_i.
    breaks, first = np.unique(lam_sorted, return_index=True)  # (b,)
    step = np.add.reduceat(event, first) if len(breaks) else np.zeros(0)  # (b,)
    acc_open = acc_zero + weight[zero_event].sum() + np.concatenate([[0.0], np.cumsum(step)])  # (b + 1,)

    if lam_end == 0:  # the range is the single point λ = 0
        lam, lams, accs = 0.0, np.zeros(1), np.array([acc_zero / total])
    else:
        lo = np.concatenate([[0.0], breaks])  # (b + 1,) interval k is (lo[k], hi[k])
        hi = np.concatenate([breaks, [lam_end]])
        lams = np.concatenate([[0.0], _interval_points(lo, hi, "midpoint")])
        accs = np.concatenate([[acc_zero], acc_open]) / total
        best = accs.max()
        if len(breaks) == 0 and not zero_event.any():
            lam = 0.0  # accuracy is flat on the whole range: no reason to intervene
        elif tie == "smallest" and accs[0] >= best - _ACCURACY_TOL:
            lam = 0.0
        else:
            # accs[1] >= accs[0] always (the only events at 0 are gains), so the best open interval is as good.
            k = int(np.flatnonzero(accs[1:] >= best - _ACCURACY_TOL)[0])
            lam = float(_interval_points(lo[k:k + 1], hi[k:k + 1], tie)[0])

    correct = rgd_correct(dll, dr, lam)
    accuracy = float(weight[correct].sum() / total)
    return LambdaChoice(lam=lam, accuracy=accuracy, n_pairs=n, breakpoints=breaks, curve=(lams, accs))


def lambda_grid_default(r_std: float) -> np.ndarray:
    """{0, 0.1, 0.3, 1, 3, 10} / std(r): the Pref-LaMP λ candidates, in units of the guide's reward spread.

    Dividing by the reward std of the seen pairs makes the grid mean the same guidance strength for any RM
    scale; each candidate costs a full generation run, hence six points.
    """
    if not (np.isfinite(r_std) and r_std > 0):
        raise ValueError(f"r_std must be a finite reward standard deviation > 0, got {r_std}")
    return np.array([0.0, 0.1, 0.3, 1.0, 3.0, 10.0]) / r_std


def harmonic_mean(*terms: float) -> float:
    """n / Σ 1/t over the terms, 0 if any term is 0: Pref-LaMP's λ criterion over ROUGE-1, inverse perplexity and
    policy accuracy (App. F.2), which rewards a λ only when all of them are good at once."""
    values = np.asarray(terms, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("harmonic_mean needs at least one term")
    if not (np.isfinite(values).all() and (values >= 0).all()):
        raise ValueError(f"harmonic_mean terms must be finite and >= 0, got {list(terms)}")
    if (values == 0).any():
        return 0.0
    return float(len(values) / np.sum(1.0 / values))


def inverse_perplexity(token_logprobs_sum: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """exp((1/|ŷ|) Σ_t log π_base(ŷ_t | x, ŷ_<t)) per example, in (0, 1]: the coherence term of Pref-LaMP's λ
    criterion (App. F.2), the geometric-mean token probability of a generation under the base policy."""
    logprob_sum = np.asarray(token_logprobs_sum, dtype=np.float64)
    n_tokens = np.asarray(n_tokens)
    if (n_tokens <= 0).any():
        raise ValueError("inverse_perplexity needs n_tokens >= 1 for every example; an empty generation has none")
    return np.exp(logprob_sum / n_tokens)


def policy_accuracies(dll: np.ndarray, dlln: np.ndarray, dr: np.ndarray, drm: np.ndarray, users: np.ndarray,
                      lam: float) -> dict:
    """Macro (``<name>_accuracy``) and pooled (``<name>_accuracy_pooled``) accuracy and tie count of each score.

    "rm": 1[ΔRM > 0]; "base": 1[ΔLLn > 0] (eq. 4); "rgd": 1[ΔLL + λ ΔR > 0] (eq. 5/6). The three are read on the
    same pairs, so the gaps between them (RM accuracy well above policy accuracy) are not a sampling effect.
    """
    dll = _pair_array("dll", dll)
    n = len(dll)
    dlln, dr, drm = _pair_array("dlln", dlln, n), _pair_array("dr", dr, n), _pair_array("drm", drm, n)
    if not (np.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite λ >= 0, got {lam}")
    group, count = _user_groups(users, n)
    out: dict = {"lambda": float(lam), "n_users": int(len(count)), "n_pairs": int(n)}
    for name, delta in (("rm", drm), ("base", dlln), ("rgd", dll + lam * dr)):
        macro, micro = _macro_micro(delta > 0, group, count)
        out[f"{name}_accuracy"] = macro
        out[f"{name}_accuracy_pooled"] = micro
        out[f"{name}_ties"] = int(np.count_nonzero(delta == 0))
    return out
