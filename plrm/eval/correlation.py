"""Rank correlations between metrics across methods: does ranking methods by one metric rank them by another?

The Reward Model Selection Crisis in Personalized Alignment (Rezk et al., arXiv 2512.23067) Tables 2 and 6 and
Fig. 1 correlate reward-model accuracy with policy accuracy and with ROUGE-1 across methods, with Kendall's tau.
Its coefficients cannot be recomputed from its tables' method means (with 8 untied methods tau-b is a multiple
of 1/28, and the published 0.31 is not), so it must have correlated finer points. Here the point is always
named, by ``unit``:

- ``method``: one point per method, each metric averaged over users within a seed, then over seeds;
- ``method_seed``: one point per (method, seed), averaged over users;
- ``user``: one point per (method, seed, user).

Kendall's tau-b (ties handled, ``scipy.stats.kendalltau``), Spearman's rho and Pearson's r come with their
p-values and ``n``. With the 8-10 methods of a paper table they are very noisy: :func:`bootstrap_ci` gives an
interval by resampling seeds within each method.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

from plrm.errors import RecipeError

UNITS = ("method", "method_seed", "user")
STATISTICS = ("kendall_tau_b", "spearman", "pearson")
MIN_POINTS = 3  # below 3 points every ranking agrees or disagrees perfectly: no correlation is reported


def rank_correlations(x: Sequence[float], y: Sequence[float]) -> dict:
    """Kendall tau-b, Spearman and Pearson of paired values, each with its two-sided p-value.

    Pairs where either value is NaN are dropped (a method without that metric); ``n`` counts the pairs used
    and ``n_dropped`` the others. With fewer than 3 pairs, or a constant side, the values are NaN and ``note``
    says why (otherwise ``note`` is empty), so a table of many metric pairs never stops at one of them.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x {x.shape} and y {y.shape} must be 1-d and of one length (one value per point)")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = len(x)
    out = {"n": n, "n_dropped": int((~keep).sum()), "note": ""}
    out.update({key: float("nan") for key in ("kendall_tau_b", "kendall_p", "spearman", "spearman_p",
                                              "pearson", "pearson_p")})
    if n < MIN_POINTS:
        out["note"] = f"n={n} point(s) with both values: at least {MIN_POINTS} are needed for a correlation"
        return out
    constant = [name for name, values in (("x", x), ("y", y)) if np.all(values == values[0])]
    if constant:
        out["note"] = f"{' and '.join(constant)} constant over the {n} points: no ranking to correlate"
        return out
    kendall = stats.kendalltau(x, y, variant="b")
    spearman = stats.spearmanr(x, y)
    pearson = stats.pearsonr(x, y)
    out.update(kendall_tau_b=float(kendall.statistic), kendall_p=float(kendall.pvalue),
               spearman=float(spearman.statistic), spearman_p=float(spearman.pvalue),
               pearson=float(pearson.statistic), pearson_p=float(pearson.pvalue))
    return out


def metric_correlations(table: list[dict], metrics: list[str], unit: str) -> list[dict]:
    """One row per unordered pair of ``metrics``: {"x", "y", "unit", "n", "kendall_tau_b", "kendall_p", ...}.

    ``table`` holds records {"method", "seed", "user" (optional), metric: value, ...}. A metric a record lacks
    (or holds as None or NaN) is left out of the means it would enter; a point left without a value is dropped from
    that pair's correlation and counted in ``n_dropped``.
    """
    _check_table(table, metrics, unit)
    points = _points(table, metrics, unit)  # (P, M)
    rows = []
    for (i, x_name), (j, y_name) in itertools.combinations(enumerate(metrics), 2):
        rows.append({"x": x_name, "y": y_name, "unit": unit, **rank_correlations(points[:, i], points[:, j])})
    return rows


def bootstrap_ci(table: list[dict], x: str, y: str, statistic: str = "kendall_tau_b", n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a unit-``method`` correlation, resampling seeds within each method.

    Each replicate draws, for every method, as many seeds as it has, with replacement, recomputes the method
    means of ``x`` and ``y`` and then the statistic: the interval covers the seed-to-seed noise of the method
    means, which is what decides the ranking. All replicates are computed at once as (n_boot, n_methods)
    arrays. Replicates whose statistic is undefined (fewer than 3 methods with both values, or every method
    tied) are left out of the percentiles; (NaN, NaN) if none is defined. Deterministic for a given ``seed``.
    """
    if statistic not in STATISTICS:
        raise RecipeError(f"correlation statistic {statistic!r} is not one of: {', '.join(STATISTICS)}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    _check_table(table, [x, y], "method")
    # per (method, seed) means, as a (methods, max seeds) grid padded with NaN
    seed_points = _points(table, [x, y], "method_seed")  # (P, 2)
    seed_methods = [method for method, _ in _groups(table, "method_seed")]
    methods = list(dict.fromkeys(seed_methods))
    n_seeds = np.array([seed_methods.count(method) for method in methods])  # (M,)
    grid = np.full((len(methods), n_seeds.max(), 2), np.nan)  # (M, S, 2)
    for m, method in enumerate(methods):
        rows = [p for p, name in enumerate(seed_methods) if name == method]
        grid[m, :len(rows)] = seed_points[rows]

    rng = np.random.default_rng(seed)
    # draw index s in [0, n_seeds[m]) for every replicate, method and seed slot; slots >= n_seeds[m] unused
    draws = rng.integers(0, n_seeds[:, None], size=(n_boot, len(methods), grid.shape[1]))  # (B, M, S)
    used = np.arange(grid.shape[1])[None, :] < n_seeds[:, None]  # (M, S)
    resampled = grid[np.arange(len(methods))[None, :, None], draws]  # (B, M, S, 2)
    resampled = np.where(used[None, :, :, None], resampled, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of an all-NaN slice: a method without the metric
        means = np.nanmean(resampled, axis=2)  # (B, M, 2)
    values = _batched_statistic(means[..., 0], means[..., 1], statistic)  # (B,)
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def _batched_statistic(x: np.ndarray, y: np.ndarray, statistic: str) -> np.ndarray:
    """The statistic of each row of (B, M) arrays over the columns where both values exist; NaN if undefined.

    Equal to scipy's on every row (checked in the tests), written with (B, M, M) pair arrays so that a thousand
    replicates of ten methods cost one vectorized pass instead of a thousand scipy calls.
    """
    valid = ~(np.isnan(x) | np.isnan(y))  # (B, M)
    x, y = np.where(valid, x, 0.0), np.where(valid, y, 0.0)
    if statistic == "kendall_tau_b":
        # over pairs i != j of valid points: sum sx*sy = 2(nc - nd); sum sx^2 = 2(n0 - n1) (pairs not tied in x)
        pair = valid[:, :, None] & valid[:, None, :]  # (B, M, M)
        sx = np.sign(x[:, :, None] - x[:, None, :]) * pair
        sy = np.sign(y[:, :, None] - y[:, None, :]) * pair
        numerator = (sx * sy).sum(axis=(1, 2))
        denominator = np.sqrt((sx**2).sum(axis=(1, 2)) * (sy**2).sum(axis=(1, 2)))
    else:
        if statistic == "spearman":
            x, y = _masked_ranks(x, valid), _masked_ranks(y, valid)
        n = valid.sum(axis=1, keepdims=True).clip(min=1)
        dx = (x - (x * valid).sum(axis=1, keepdims=True) / n) * valid
        dy = (y - (y * valid).sum(axis=1, keepdims=True) / n) * valid
        numerator = (dx * dy).sum(axis=1)
        denominator = np.sqrt((dx**2).sum(axis=1) * (dy**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = numerator / denominator
    out[(valid.sum(axis=1) < MIN_POINTS) | (denominator == 0)] = np.nan
    return np.clip(out, -1.0, 1.0)


def _masked_ranks(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Ranks 1..n among the valid entries of each row, ties given their average rank (as scipy's rankdata)."""
    other = valid[:, None, :]  # (B, 1, M): compare each point with the valid points of its row
    below = ((values[:, None, :] < values[:, :, None]) & other).sum(axis=2)  # (B, M)
    equal = ((values[:, None, :] == values[:, :, None]) & other).sum(axis=2)  # includes the point itself
    return below + (equal + 1) / 2


def _check_table(table: list[dict], metrics: list[str], unit: str) -> None:
    if unit not in UNITS:
        raise RecipeError(f"correlation unit {unit!r} is not one of: {', '.join(UNITS)}")
    keys = ("method", "seed", "user") if unit == "user" else ("method", "seed")
    for number, row in enumerate(table):
        missing = [key for key in keys if key not in row]
        if missing:
            raise ValueError(f"table row {number} has no {' or '.join(map(repr, missing))} (unit {unit!r} needs "
                             f"{', '.join(keys)}); row keys: {sorted(row)}")
    absent = [metric for metric in metrics if not any(metric in row for row in table)]
    if absent:
        present = sorted({key for row in table for key in row} - {"method", "seed", "user"})
        raise RecipeError(f"metric(s) {absent} are in no row of the table; metrics present: {present}")


def _groups(table: list[dict], unit: str) -> list[tuple]:
    """The points of ``unit`` in first-appearance order: (method, seed) or (method, seed, user) keys."""
    keys = ("method", "seed", "user") if unit == "user" else ("method", "seed")
    return list(dict.fromkeys(tuple(row[key] for key in keys) for row in table))


def _points(table: list[dict], metrics: list[str], unit: str) -> np.ndarray:
    """(points, metrics) means: over the rows of each (method, seed[, user]), then over seeds for ``method``."""
    finest = "user" if unit == "user" else "method_seed"
    groups = _groups(table, finest)
    index = {group: g for g, group in enumerate(groups)}
    keys = ("method", "seed", "user") if finest == "user" else ("method", "seed")
    sums = np.zeros((len(groups), len(metrics)))
    counts = np.zeros((len(groups), len(metrics)))
    for row in table:
        g = index[tuple(row[key] for key in keys)]
        values = np.array([np.nan if row.get(metric) is None else float(row[metric]) for metric in metrics])
        sums[g] += np.nan_to_num(values)
        counts[g] += ~np.isnan(values)
    with np.errstate(invalid="ignore"):
        points = sums / counts  # 0 / 0 = NaN: no value for that point
    if unit != "method":
        return points
    methods = list(dict.fromkeys(group[0] for group in groups))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a method without the metric: NaN, dropped later
        return np.stack([np.nanmean(points[[g for g, group in enumerate(groups) if group[0] == method]], axis=0)
                         for method in methods])
