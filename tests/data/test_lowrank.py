"""The low-rank synthetic world (plrm/data/lowrank.py) against its own ground truth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from plrm import capabilities as cap
from plrm.data.lowrank import LowRankWorld, dirichlet
from plrm.data.source import item_keys

TINY = LowRankWorld.Config(n_users=40, pairs_per_user=10, n_train_prompts=100, n_test_prompts=20,
                           test_prompts_per_user=5, feature_dim=16, n_functions=3)


def world(**changes):
    return LowRankWorld(dataclasses.replace(TINY, **changes)).load()


@pytest.fixture(scope="module")
def extremes():
    return world()


def response_number(responses: list[str]) -> np.ndarray:
    return np.asarray([int(r.rsplit("#", 1)[1]) for r in responses])


def item_features(data, prompts: list[str], responses: list[str]) -> np.ndarray:
    """(rows, D) features of each (prompt, response) item, looked up by its key."""
    rows = data.features.rows_of(item_keys(prompts, responses))
    assert (rows >= 0).all()
    return data.features.matrix[rows]


def user_reward_weights(data) -> np.ndarray:
    """(rows, D) V w_u of each row's user: its true reward is e . (V w_u)."""
    users = np.asarray([int(u.removeprefix("user")) for u in data.pairs["user_id"]])
    return (data.truth["directions"] @ data.truth["user_weights"].T).T[users]


def true_logit(data, weights_per_row: np.ndarray) -> np.ndarray:
    """(e_chosen - e_rejected) . weights, per row."""
    prompts = data.pairs["prompt"]
    diff = item_features(data, prompts, data.pairs["chosen"]) - item_features(data, prompts, data.pairs["rejected"])
    return np.einsum("nd,nd->n", diff.astype(np.float64), weights_per_row)


def test_size_and_provides(extremes):
    """40 users x (10 train + 5 test) pairs = 600 rows; 120 prompts x 8 responses = 960 items."""
    assert extremes.n_rows == 40 * (10 + 5)
    assert extremes.features.matrix.shape == (960, 16)
    assert extremes.provides == {cap.FEATURES, cap.ORACLE, cap.SHARED_PAIRS, cap.USERS}
    assert set(extremes.oracle_logits) == {"oracle/personal", "oracle/non-personalized"}


def test_every_test_prompt_by_default():
    """test_prompts_per_user: null gives each user all 20 test prompts: 40 x (10 + 20) = 1200 rows."""
    data = world(test_prompts_per_user=None)
    assert data.n_rows == 1200
    assert data.pairs["split"].count("test") == 800


def test_each_user_judges_distinct_prompts(extremes):
    table = extremes.pairs.to_pandas()
    per_user = table.groupby(["user_id", "split"])["prompt"].agg(["size", "nunique"]).reset_index()
    assert (per_user["size"] == per_user["nunique"]).all()
    assert (per_user.loc[per_user["split"] == "train", "size"] == 10).all()
    assert (per_user.loc[per_user["split"] == "test", "size"] == 5).all()
    test_prompt_numbers = table.loc[table["split"] == "test", "prompt"].str.removeprefix("prompt ").astype(int)
    assert (test_prompt_numbers >= 100).all()  # test prompts come after the 100 train prompts


def test_extremes_are_the_users_best_and_worst_responses(extremes):
    """Score all 8 responses of each row's prompt with e . (V w_u): chosen is the argmax, rejected the argmin."""
    prompts, chosen = extremes.pairs["prompt"], extremes.pairs["chosen"]
    weights = user_reward_weights(extremes)
    prefixes = [c.rsplit("#", 1)[0] + "#" for c in chosen]
    scores = np.stack([
        np.einsum("nd,nd->n", item_features(extremes, prompts, [p + str(r) for p in prefixes]).astype(np.float64),
                  weights)
        for r in range(TINY.n_responses)], axis=1)  # (rows, R)
    np.testing.assert_array_equal(response_number(chosen), scores.argmax(axis=1))
    np.testing.assert_array_equal(response_number(extremes.pairs["rejected"]), scores.argmin(axis=1))


def test_personal_oracle_is_the_users_true_logit_and_always_right(extremes):
    personal = extremes.oracle_logits["oracle/personal"]
    np.testing.assert_allclose(personal, true_logit(extremes, user_reward_weights(extremes)), rtol=1e-4, atol=1e-4)
    assert (personal > 0).all()


def test_non_personalized_oracle_uses_the_mean_weights(extremes):
    mean_direction = extremes.truth["directions"] @ extremes.truth["user_weights"].mean(axis=0)  # (D,)
    expected = true_logit(extremes, np.broadcast_to(mean_direction, (extremes.n_rows, TINY.feature_dim)))
    np.testing.assert_allclose(extremes.oracle_logits["oracle/non-personalized"], expected, rtol=1e-4, atol=1e-4)
    # the population reward disagrees with some users: that gap is the room for personalization
    assert (extremes.oracle_logits["oracle/non-personalized"] <= 0).any()


def test_same_seed_same_world(extremes):
    again = world()
    assert again.pairs.data.table.equals(extremes.pairs.data.table)
    np.testing.assert_array_equal(again.features.matrix, extremes.features.matrix)
    for key, logits in extremes.oracle_logits.items():
        np.testing.assert_array_equal(again.oracle_logits[key], logits)
    other = world(seed=1)
    assert not np.array_equal(other.features.matrix, extremes.features.matrix)


def test_dirichlet_stays_finite_for_tiny_alpha():
    """alpha = 1e-3 puts almost all mass on one function: rows sum to 1 and are nearly one-hot."""
    weights = dirichlet(np.random.default_rng(0), alpha=1e-3, n=500, k=5)
    assert weights.shape == (500, 5)
    assert np.isfinite(weights).all()
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)
    assert (weights.max(axis=1) > 0.99).mean() > 0.95


def test_dirichlet_mean_for_moderate_alpha():
    """Dirichlet(alpha) has mean 1/k in every coordinate: 1/4 here, within sampling noise of 20000 rows."""
    weights = dirichlet(np.random.default_rng(0), alpha=0.5, n=20000, k=4)
    np.testing.assert_allclose(weights.mean(axis=0), 0.25, atol=0.01)


def test_bradley_terry_labels_flip_some_extremes_reproducibly(extremes):
    """The same seed draws the same world, then flips each pair with P = 1 - sigmoid(delta / T).

    So every row is the extremes row or that row swapped (same pair_id), and the personal oracle is
    right exactly on the rows that were not flipped. T = 5 makes flips common enough for 600 rows.
    """
    bt = world(labels="bradley_terry", bt_temperature=5.0)
    personal = bt.oracle_logits["oracle/personal"]
    accuracy = (personal > 0).mean()
    assert 0.5 < accuracy < 1.0
    assert bt.pairs["pair_id"] == extremes.pairs["pair_id"]
    flipped = np.asarray(bt.pairs["chosen"]) != np.asarray(extremes.pairs["chosen"])
    np.testing.assert_array_equal(np.asarray(bt.pairs["chosen"])[flipped], np.asarray(extremes.pairs["rejected"])[flipped])
    np.testing.assert_array_equal(personal <= 0, flipped)
    np.testing.assert_allclose(np.abs(personal), extremes.oracle_logits["oracle/personal"], rtol=1e-6)
    np.testing.assert_array_equal(world(labels="bradley_terry", bt_temperature=5.0).oracle_logits["oracle/personal"],
                                  personal)


@pytest.mark.parametrize(("changes", "message"), [
    ({"labels": "foo"}, "labels must be 'extremes' or 'bradley_terry', got 'foo'"),
    ({"pairs_per_user": 101}, "pairs_per_user=101 exceeds n_train_prompts=100"),
    ({"test_prompts_per_user": 21}, "test_prompts_per_user=21 exceeds n_test_prompts=20"),
    ({"n_responses": 1}, "n_responses must be >= 2"),
    ({"users_per_pair": 0}, "users_per_pair must be >= 1, got 0"),
    ({"users_per_pair": 8, "pair_choice": "random"}, "pair_choice='random' applies without users_per_pair only"),
    ({"pair_choice": "best"}, "pair_choice must be .extremes. or .random., got .best."),
    ({"users_per_pair": 2}, r"needs a pool of n_users \* pairs_per_user / users_per_pair = 200 item pairs, one per "
                            r"train prompt, but n_train_prompts=100"),
    ({"function_prevalence": [0.5, 0.5]}, r"function_prevalence has 2 entries; it needs one per true function "
                                          r"\(n_functions=3\)"),
    ({"function_prevalence": [0.5, 0.5, 0.0]}, "function_prevalence entries must be > 0"),
])
def test_config_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **changes)


def test_function_prevalence_plants_minority_groups_and_uniform_changes_nothing():
    """Dirichlet(alpha K p): with alpha = 0.05 users lean on function k about p_k of the time; a uniform
    prevalence is the default world, array for array."""
    base = dict(n_users=4000, pairs_per_user=2, n_train_prompts=20, n_test_prompts=2, test_prompts_per_user=1,
                feature_dim=4, n_functions=4, alpha=0.05)
    planted = LowRankWorld(LowRankWorld.Config(**base, function_prevalence=[7, 2, 0.7, 0.3])).load()
    share = np.bincount(planted.truth["user_weights"].argmax(1), minlength=4) / 4000
    np.testing.assert_allclose(share, [0.7, 0.2, 0.07, 0.03], atol=0.025)
    default = LowRankWorld(LowRankWorld.Config(**base)).load()
    uniform = LowRankWorld(LowRankWorld.Config(**base, function_prevalence=[1.0] * 4)).load()
    np.testing.assert_array_equal(default.truth["user_weights"], uniform.truth["user_weights"])
    assert default.pairs.data.table.equals(uniform.pairs.data.table)


def test_minority_inverts_the_shared_preference():
    """minority_fraction = 0.25: a quarter of the users have negated true weights; the non-personalized oracle
    (the signed population mean) is right for the majority and wrong for the minority, the personal oracle right
    for both; the option at 0 leaves the world as it was."""
    inverted = world(minority_fraction=0.25, alpha=0.05)
    minority = inverted.truth["minority"]
    assert minority.sum() == 10                                                   # round(0.25 * 40)
    assert (inverted.truth["user_weights"][minority] <= 0).all()
    assert (inverted.truth["user_weights"][~minority] >= 0).all()
    user = np.asarray([int(u[4:]) for u in inverted.pairs["user_id"]])
    personal = inverted.oracle_logits["oracle/personal"]
    population = inverted.oracle_logits["oracle/non-personalized"]
    assert (personal > 0).all()
    assert (population[~minority[user]] > 0).mean() > 0.8
    assert (population[minority[user]] > 0).mean() < 0.2
    plain = world()
    assert not plain.truth["minority"].any()
    assert plain.pairs.data.table.equals(world(minority_fraction=0.0).pairs.data.table)


# ---- dense overlap (PReF's setting) -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense():
    return world(users_per_pair=8)  # a pool of 40 * 10 / 8 = 50 item pairs


def test_dense_pool_pairs_are_shared_by_about_users_per_pair_users(dense):
    df = dense.pairs.to_pandas()
    train = df[df["split"] == "train"]
    per_pair = train.groupby("pair_id")["user_id"].nunique()
    assert len(per_pair) == 50                                  # M = n_users * pairs_per_user / users_per_pair
    assert per_pair.mean() == pytest.approx(8.0)                 # 400 labels over 50 pairs
    assert (train.groupby("user_id")["pair_id"].nunique() == 10).all()  # distinct pairs per user
    assert train.groupby("pair_id")["prompt"].nunique().eq(1).all()     # one prompt per pair
    assert train["prompt"].nunique() == 50                       # one pool pair per prompt


def test_dense_test_pairs_are_one_shared_pair_per_test_prompt(dense):
    test = dense.pairs.to_pandas().query("split == 'test'")
    assert (test.groupby("prompt")["pair_id"].nunique() == 1).all()
    assert (test.groupby("user_id").size() == 5).all()


def test_dense_label_is_the_users_truly_preferred_response(dense):
    personal = true_logit(dense, user_reward_weights(dense))
    assert (personal >= 0).all()
    np.testing.assert_allclose(personal, dense.oracle_logits["oracle/personal"], rtol=1e-4, atol=1e-4)
    # users disagree about shared pairs: the same pair_id is chosen in both orders by different users
    train = dense.pairs.to_pandas().query("split == 'train'")
    orders = train.groupby("pair_id")["chosen"].nunique()
    assert (orders == 2).any()


def test_sparse_default_pairs_are_rarely_shared(extremes):
    train = extremes.pairs.to_pandas().query("split == 'train'")
    assert train.groupby("pair_id")["user_id"].nunique().mean() < 3


def test_sparse_random_pairs_are_the_users_own_and_labeled_by_the_truth():
    data = world(pair_choice="random")
    personal = true_logit(data, user_reward_weights(data))
    assert (personal >= 0).all()
    np.testing.assert_allclose(personal, data.oracle_logits["oracle/personal"], rtol=1e-4, atol=1e-4)
    df = data.pairs.to_pandas()
    train = df[df["split"] == "train"]
    assert train.groupby("pair_id")["user_id"].nunique().mean() < 1.5
    # not the extremes: some pair is neither the user's best nor worst response
    extremes = world()
    assert (np.asarray(data.pairs["chosen"]) != np.asarray(extremes.pairs["chosen"])).mean() > 0.5
