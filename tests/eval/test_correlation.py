"""Rank correlations between metrics across methods (plrm/eval/correlation.py): hand-computed Kendall tau-b with
ties, the units of correlation, NaN handling and the seed bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from plrm.errors import RecipeError
from plrm.eval.correlation import bootstrap_ci, metric_correlations, rank_correlations


def test_monotone_and_reversed():
    x = [1, 2, 3, 4, 5]
    linear = rank_correlations(x, [3, 5, 7, 9, 11])
    assert linear["kendall_tau_b"] == pytest.approx(1) and linear["spearman"] == pytest.approx(1)
    assert linear["pearson"] == pytest.approx(1) and linear["n"] == 5 and linear["note"] == ""
    monotone = rank_correlations(x, [1, 2, 4, 50, 1000])  # ranks agree, values far from a line
    assert monotone["kendall_tau_b"] == pytest.approx(1) and monotone["spearman"] == pytest.approx(1)
    assert monotone["pearson"] < 0.9
    reversed_ = rank_correlations(x, [11, 9, 7, 5, 3])
    assert reversed_["kendall_tau_b"] == pytest.approx(-1) and reversed_["spearman"] == pytest.approx(-1)
    assert reversed_["pearson"] == pytest.approx(-1)
    assert 0 < linear["kendall_p"] < 0.05  # exact test, 5 untied points: p = 2/120


def test_kendall_tau_b_with_ties_by_hand():
    """x = [1, 2, 2, 3, 4], y = [2, 3, 1, 4, 4]; n0 = 5*4/2 = 10 pairs (i, j):

    (0,1) C  (0,2) D (y 2 > 1)  (0,3) C  (0,4) C  (1,2) tied in x  (1,3) C  (1,4) C  (2,3) C  (2,4) C
    (3,4) tied in y. nc = 7, nd = 1, n1 = 1 (x ties), n2 = 1 (y ties):
    tau_b = (nc - nd) / sqrt((n0 - n1)(n0 - n2)) = 6 / sqrt(9 * 9) = 2/3 (tau-a would be 6/10).
    """
    result = rank_correlations([1, 2, 2, 3, 4], [2, 3, 1, 4, 4])
    assert result["kendall_tau_b"] == pytest.approx(2 / 3)


def test_nan_pairs_are_dropped_and_too_few_points_give_nan_with_a_note():
    result = rank_correlations([1, 2, np.nan, 4, 5], [1, 2, 3, np.nan, 5])
    assert result["n"] == 3 and result["n_dropped"] == 2 and result["kendall_tau_b"] == pytest.approx(1)
    few = rank_correlations([1, 2, np.nan], [1, 2, 3])
    assert few["n"] == 2 and math.isnan(few["kendall_tau_b"]) and math.isnan(few["pearson_p"])
    assert "n=2 point(s) with both values: at least 3" in few["note"]
    constant = rank_correlations([1, 1, 1], [1, 2, 3])
    assert math.isnan(constant["spearman"]) and "x constant over the 3 points" in constant["note"]


def _table(y_of_method, n_seeds=3, users=("u1", "u2")):
    """Four methods; x = method index on every row; y from y_of_method(method index, seed, user index)."""
    return [{"method": f"m{m}", "seed": s, "user": u, "x": float(m), "y": y_of_method(m, s, k)}
            for m in range(4) for s in range(n_seeds) for k, u in enumerate(users)]


def test_units_count_their_points():
    table = _table(lambda m, s, k: m + 0.1 * s + 0.01 * k)
    for unit, n in (("method", 4), ("method_seed", 12), ("user", 24)):
        (row,) = metric_correlations(table, ["x", "y"], unit)
        assert (row["x"], row["y"], row["unit"], row["n"]) == ("x", "y", unit, n)


def test_method_unit_averages_users_within_a_seed_then_seeds():
    """Method m1: seed 0 has one user with y = 10, seed 1 three users with y = 0. Seed means 10 and 0 -> method
    mean 5; a flat mean over its four rows would be 2.5. The other methods' y: m0 = 3, m2 = 6, m3 = 7.
    Method means (x, y): (0, 3), (1, 5), (2, 6), (3, 7): monotone, tau-b = 1. With the flat mean m1 would rank
    below m0 and tau-b would be (5 - 1) / 6 = 2/3."""
    table = [{"method": "m0", "seed": 0, "x": 0, "y": 3}, {"method": "m2", "seed": 0, "x": 2, "y": 6},
             {"method": "m3", "seed": 0, "x": 3, "y": 7}, {"method": "m1", "seed": 0, "x": 1, "y": 10}]
    table += [{"method": "m1", "seed": 1, "x": 1, "y": 0} for _ in range(3)]
    (row,) = metric_correlations(table, ["x", "y"], "method")
    assert row["n"] == 4 and row["kendall_tau_b"] == pytest.approx(1)


def test_a_method_without_a_metric_is_dropped_and_every_pair_is_reported():
    table = _table(lambda m, s, k: m * m)
    for row in table:  # m3 has no "z" at all, m0 a NaN: both dropped from the pairs with z
        row["z"] = {0: float("nan"), 1: 2.0, 2: 1.0}.get(int(row["x"]))
        if row["z"] is None:
            del row["z"]
    rows = metric_correlations(table, ["x", "y", "z"], "method")
    assert [(r["x"], r["y"]) for r in rows] == [("x", "y"), ("x", "z"), ("y", "z")]
    assert rows[0]["n"] == 4 and rows[0]["kendall_tau_b"] == pytest.approx(1)
    assert rows[1]["n"] == 2 and rows[1]["n_dropped"] == 2 and math.isnan(rows[1]["kendall_tau_b"])


def test_bad_unit_metric_or_row_is_refused():
    table = _table(lambda m, s, k: m)
    with pytest.raises(RecipeError, match="correlation unit 'seed' is not one of: method, method_seed, user"):
        metric_correlations(table, ["x", "y"], "seed")
    with pytest.raises(RecipeError, match=r"metric\(s\) \['rogue1'\] are in no row of the table; metrics "
                                          r"present: \['x', 'y'\]"):
        metric_correlations(table, ["x", "rogue1"], "method")
    no_user = [{k: v for k, v in row.items() if k != "user"} for row in table]
    with pytest.raises(ValueError, match="table row 0 has no 'user' \\(unit 'user' needs method, seed, user\\)"):
        metric_correlations(no_user, ["x", "y"], "user")


def _noisy_table(seed=0, n_methods=8, n_seeds=5):
    """y follows x across methods, with seed noise comparable to the gap between neighbouring methods."""
    rng = np.random.default_rng(seed)
    return [{"method": f"m{m}", "seed": s, "x": m + rng.normal(0, 0.5), "y": m + rng.normal(0, 1.5)}
            for m in range(n_methods) for s in range(n_seeds)]


def test_bootstrap_ci_contains_the_estimate_and_is_deterministic():
    table = _noisy_table()
    (point,) = metric_correlations(table, ["x", "y"], "method")
    for statistic in ("kendall_tau_b", "spearman", "pearson"):
        low, high = bootstrap_ci(table, "x", "y", statistic, n_boot=1000, seed=3)
        assert low < point[statistic] < high, statistic
        assert high - low > 0.05  # five seeds of noise: the interval has width
        assert bootstrap_ci(table, "x", "y", statistic, n_boot=1000, seed=3) == (low, high)
    # tau's percentiles move in steps of 1/28 and can coincide across seeds; Pearson's are continuous
    assert bootstrap_ci(table, "x", "y", "pearson", seed=4) != bootstrap_ci(table, "x", "y", "pearson", seed=5)


def test_bootstrap_with_one_seed_per_method_is_the_point_estimate():
    """With one seed, every replicate is the data itself, so the interval collapses onto scipy's value: the
    vectorized statistics equal scipy's, with a tie in x, a tie in y and a method without y."""
    table = [{"method": f"m{i}", "seed": 0, "x": x, "y": y}
             for i, (x, y) in enumerate([(1, 2), (2, 3), (2, 1), (3, 4), (4, 4), (5, np.nan), (6, 7)])]
    (point,) = metric_correlations(table, ["x", "y"], "method")
    assert point["n"] == 6
    for statistic in ("kendall_tau_b", "spearman", "pearson"):
        low, high = bootstrap_ci(table, "x", "y", statistic, n_boot=10, seed=0)
        assert low == pytest.approx(point[statistic]) and high == pytest.approx(point[statistic])


def test_bootstrap_refuses_an_unknown_statistic():
    with pytest.raises(RecipeError, match="correlation statistic 'tau' is not one of: kendall_tau_b, spearman"):
        bootstrap_ci(_noisy_table(), "x", "y", "tau")
