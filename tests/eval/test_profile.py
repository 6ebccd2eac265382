"""Dataset profile (plrm/eval/profile.py): the §4.2 / Table 2 statistics of When Personalization Meets Reality
(Dong et al., arXiv 2502.19158) on hand-made and synthetic data."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from matplotlib.image import imread

from plrm.data.lowrank import LowRankWorld
from plrm.data.schema import DataValidationError
from plrm.data.source import PreferenceData
from plrm.eval.profile import profile, run_profile, write_report
from plrm.recipe import RecipeError

NO_SHARED = "no item is labelled by two or more users"

# Five users, four shared items and two items of one user each. (user, item, chosen, rejected):
#   p1  all five choose "p1 long"; the rows list it first, but "p1 long" < "p1 short", the canonical order
#   p2  u1-u4 choose "p2 a", u5 chooses "p2 b"               -> controversial, 1/5 = 20% dissent: not highly
#   p3  u1-u3 choose "p3 b" (the canonical second), u4 u5 "p3 a" -> controversial, 2/5 = 40%: highly
#   p4  u1 u4 choose "p4 a", u2 u3 choose "p4 b": a 2-2 tie   -> controversial, 50%: highly; scored 0.5
#   p5  u5 only, p6 u1 only: not shared, outside every shared-item statistic
# Votes are read on the canonical order (alphabetical texts), never on the row's order: in p2 and p3 the
# dissenters list the pair the other way round from the majority, and p3's majority row order is the reverse
# of the canonical order.
ROWS = [
    ("u1", "p1", "p1 long", "p1 short"), ("u2", "p1", "p1 long", "p1 short"), ("u3", "p1", "p1 long", "p1 short"),
    ("u4", "p1", "p1 long", "p1 short"), ("u5", "p1", "p1 long", "p1 short"),
    ("u1", "p2", "p2 a", "p2 b"), ("u2", "p2", "p2 a", "p2 b"), ("u3", "p2", "p2 a", "p2 b"),
    ("u4", "p2", "p2 a", "p2 b"), ("u5", "p2", "p2 b", "p2 a"),
    ("u1", "p3", "p3 b", "p3 a"), ("u2", "p3", "p3 b", "p3 a"), ("u3", "p3", "p3 b", "p3 a"),
    ("u4", "p3", "p3 a", "p3 b"), ("u5", "p3", "p3 a", "p3 b"),
    ("u1", "p4", "p4 a", "p4 b"), ("u4", "p4", "p4 a", "p4 b"), ("u2", "p4", "p4 b", "p4 a"),
    ("u3", "p4", "p4 b", "p4 a"),
    ("u5", "p5", "p5 a", "p5 b"), ("u1", "p6", "p6 a", "p6 b"),
]
# MV-ACC = agreement with the majority over the user's rows on shared items (tie: 0.5):
#   u1: p1 1, p2 1, p3 1, p4 0.5 = 3.5/4 = 0.875 (p6 is not shared)
#   u2: p1 1, p2 1, p3 1, p4 0.5 = 0.875;  u3: the same, 0.875
#   u4: p1 1, p2 1, p3 0, p4 0.5 = 2.5/4 = 0.625
#   u5: p1 1, p2 0, p3 0          = 1/3  -> the one minority user (< 0.5)
MV_ACC = {"u1": 0.875, "u2": 0.875, "u3": 0.875, "u4": 0.625, "u5": 1 / 3}
MEAN_MV_ACC = (3 * 0.875 + 0.625 + 1 / 3) / 5  # 0.716667


def table(rows, pair_id: bool = True) -> dict:
    columns = {"user_id": [r[0] for r in rows], "prompt": [f"prompt of {r[1]}" for r in rows],
               "chosen": [r[2] for r in rows], "rejected": [r[3] for r in rows]}
    if pair_id:
        columns["pair_id"] = [r[1] for r in rows]
    return columns


def data_of(rows, pair_id: bool = True, **kwargs) -> PreferenceData:
    return PreferenceData("toy", datasets.Dataset.from_dict(table(rows, pair_id)), provides=frozenset(), **kwargs)


def test_hand_made_table():
    """21 rows, 19 on the 4 shared items. Divergence: p2, p3, p4 of 4 = 0.75. Highly controversial: p3 (2/5 =
    40%) and p4 (the tie, 50%) of 4 = 0.5. Pairs per user: u1 5 (p1-p4, p6), the others 4: min 4, median 4,
    mean 21/5 = 4.2, max 5, one bin per count: [4, 5) holds 4 users, [5, 6) holds 1."""
    stats = profile(data_of(ROWS))
    assert stats["n_samples"] == 21 and stats["n_users"] == 5
    assert stats["pairs_per_user"] == {"min": 4, "median": 4.0, "mean": 4.2, "max": 5,
                                       "histogram": {"bin_edges": [4.0, 5.0, 6.0], "counts": [4, 1]}}
    assert stats["items"]["n_items"] == 6 and stats["items"]["n_shared_items"] == 4
    assert stats["items"]["fraction_rows_on_shared_items"] == pytest.approx(19 / 21)
    assert stats["items"]["users_per_shared_item"] == {"min": 4, "median": 5.0, "mean": 4.75, "max": 5}
    assert stats["preference_divergence_rate"] == pytest.approx(0.75)
    assert stats["highly_controversial_rate"] == pytest.approx(0.5)
    assert stats["tied_items"] == 1
    assert stats["mv_acc"]["per_user"] == pytest.approx(MV_ACC)
    assert stats["mv_acc"]["n_shared_pairs"] == {"u1": 4, "u2": 4, "u3": 4, "u4": 4, "u5": 3}
    assert stats["mv_acc"]["range"] == pytest.approx([1 / 3, 0.875])
    assert stats["minority_users"] == ["u5"]
    room = stats["room_for_personalization"]
    # no oracle, no repeated label: consistency and the room are unknown; the bound with consistency 1 is not
    assert room["majority_vote_accuracy"] == pytest.approx(MEAN_MV_ACC)
    assert room["room_if_fully_consistent"] == pytest.approx(1 - MEAN_MV_ACC)
    assert room["consistency"] is None and room["room"] is None
    assert "no personal oracle" in stats["undefined"]["room_for_personalization.consistency"]


def test_statistics_do_not_depend_on_the_texts_order_or_the_rows_order():
    """Renaming each item's responses so that their alphabetical order flips, and shuffling the rows, changes
    the canonical orientation of every vote but none of the statistics."""
    flip = {"p1 long": "p1 z", "p1 short": "p1 a", "p2 a": "p2 z", "p3 a": "p3 z", "p4 a": "p4 z"}
    renamed = [(u, i, flip.get(c, c), flip.get(r, r)) for u, i, c, r in ROWS]
    shuffled = [renamed[i] for i in np.random.default_rng(0).permutation(len(renamed))]
    stats, base = profile(data_of(shuffled)), profile(data_of(ROWS))
    for key in ("preference_divergence_rate", "highly_controversial_rate", "tied_items", "minority_users"):
        assert stats[key] == base[key]
    assert stats["mv_acc"]["per_user"] == pytest.approx(MV_ACC)


def test_oracles_give_consistency_room_and_gap():
    """oracle/personal: right (> 0) on every row but u5's p5 row: u5 3/4, the others 1 -> mean 0.95.
    oracle/non-personalized: +1 where the row agrees with its item's majority (and on the unshared rows), -1
    where it does not, 0 on the tied p4 (a tie counts as wrong): u1 4/5, u2 3/4, u3 3/4, u4 2/4, u5 2/4 ->
    mean 3.3/5 = 0.66. Gap 0.95 - 0.66 = 0.29; room = consistency 0.95 - MV accuracy 0.716667 = 0.233333."""
    personal = np.ones(len(ROWS), dtype=np.float32)
    personal[19] = -1.0  # u5's p5 row
    population = np.array([1, 1, 1, 1, 1,  1, 1, 1, 1, -1,  1, 1, 1, -1, -1,  0, 0, 0, 0,  1, 1], dtype=np.float32)
    room = profile(data_of(ROWS, oracle_logits={"oracle/personal": personal,
                                                "oracle/non-personalized": population}))["room_for_personalization"]
    assert room["consistency_source"] == "oracle/personal"
    assert room["consistency"] == pytest.approx(0.95)
    assert room["oracle_personal_accuracy"] == pytest.approx(0.95)
    assert room["oracle_non_personalized_accuracy"] == pytest.approx(0.66)
    assert room["oracle_gap"] == pytest.approx(0.29)
    assert room["room"] == pytest.approx(0.95 - MEAN_MV_ACC)


def test_highly_controversial_threshold_is_inclusive():
    """q1: 10 users, 3 dissent: 3/10 = 30% -> highly controversial ("at least 30%"); q2: 2 of 10 = 20%: not.
    Both are controversial: divergence 2/2 = 1.0, highly 1/2 = 0.5."""
    rows = [(f"u{k}", "q1", "q1 a", "q1 b") if k >= 3 else (f"u{k}", "q1", "q1 b", "q1 a") for k in range(10)]
    rows += [(f"u{k}", "q2", "q2 a", "q2 b") if k >= 2 else (f"u{k}", "q2", "q2 b", "q2 a") for k in range(10)]
    stats = profile(data_of(rows))
    assert stats["preference_divergence_rate"] == 1.0
    assert stats["highly_controversial_rate"] == 0.5


def test_a_user_labelling_an_item_twice_casts_one_vote():
    """Item r: u1 chooses a twice, u2 a then b, u3 a, u4 b. Votes for a: u1 1, u2 1/2, u3 1, u4 0 -> 2.5 of 4
    users: majority a, dissent 1.5/4 = 37.5% -> highly controversial (counting rows instead, 1 of 5 = 20%,
    it would not be). MV-ACC: u1 1, u2 (1 + 0)/2 = 0.5, u3 1, u4 0 -> mean 0.625. Consistency from the repeats:
    u1's rows agree with u1's own majority (1.0); u2's own vote is a tie (0.5) -> mean 0.75; room 0.125."""
    rows = [("u1", "r", "r a", "r b"), ("u1", "r", "r a", "r b"), ("u2", "r", "r a", "r b"),
            ("u2", "r", "r b", "r a"), ("u3", "r", "r a", "r b"), ("u4", "r", "r b", "r a")]
    stats = profile(data_of(rows))
    assert stats["highly_controversial_rate"] == 1.0
    assert stats["mv_acc"]["per_user"] == pytest.approx({"u1": 1.0, "u2": 0.5, "u3": 1.0, "u4": 0.0})
    room = stats["room_for_personalization"]
    assert room["consistency_source"] == "repeated annotations"
    assert room["consistency"] == pytest.approx(0.75)
    assert room["room"] == pytest.approx(0.125)


@pytest.mark.parametrize("pair_id", [False, True])
def test_without_shared_items_the_statistics_are_undefined_not_zero(pair_id, tmp_path):
    """Without a pair_id column, or with pair ids that no two users share, every shared-item statistic is None
    with its reason, in JSON and in Markdown; the counts that need no shared item are still there."""
    rows = [(u, f"{u}-{i}", f"{u}-{i} a", f"{u}-{i} b") for u in ("u1", "u2") for i in range(3)]
    stats = profile(data_of(rows, pair_id=pair_id))
    assert stats["n_samples"] == 6 and stats["n_users"] == 2 and stats["items"]["n_shared_items"] == 0
    for key in ("preference_divergence_rate", "highly_controversial_rate", "tied_items", "mv_acc", "minority_users"):
        assert stats[key] is None
        assert stats["undefined"][key].startswith(NO_SHARED)
    assert ("no pair_id column" in stats["undefined"]["mv_acc"]) is not pair_id
    assert stats["room_for_personalization"]["room_if_fully_consistent"] is None
    write_report(stats, tmp_path, "no shared items")
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved["preference_divergence_rate"] is None and saved["mv_acc"] is None
    markdown = (tmp_path / "profile.md").read_text()
    assert f"| toy | 6 | 2 | undefined: {NO_SHARED}" in markdown
    assert f"## Minority users (MV-ACC < 0.5)\n\nundefined: {NO_SHARED}" in markdown


def test_a_pair_id_naming_two_different_items_is_an_error():
    rows = [("u1", "p", "x a", "x b"), ("u2", "p", "x b", "x a"), ("u3", "p", "y a", "x b")]
    with pytest.raises(DataValidationError, match=r"pair_id 'p' names 2 different \(prompt, response, response\) "
                                                  r"triples \(rows \[0, 1, 2\]\); 1 pair_id\(s\) do"):
        profile(data_of(rows))


def test_planted_minority_of_one_hot_users_is_found():
    """Low-rank world with K = 2 true functions, alpha = 0.001 (every user leans on one function with weight
    > 0.9) and function_prevalence [0.8, 0.2]: about 20% of users hold function 1, the planted minority.
    users_per_pair = 20: each of the 300 pool pairs is labelled by ~20 users, the 20 test pairs by all 200.

    A one-hot user of function k chooses by sign(d . v_k), d the feature difference of the pair, isotropic
    Gaussian; the majority vote is function 0's choice (it needs >= half of ~20 voters from a 20% group to flip:
    P(Bin(20, 0.2) >= 10) = 0.003). So a minority user's MV-ACC is P(sign(d . v_0) = sign(d . v_1)) = 1 -
    theta/pi, theta the angle between v_0 and v_1, and a majority user's is ~1. MV-ACC < 0.5 flags the group only
    when its preference is anti-correlated with the majority's, theta > 90 deg: we take the first seed whose
    theta >= 135 deg, so the minority's expected MV-ACC is <= 0.25. Each user has 50 shared pairs: binomial sd
    sqrt(0.25 * 0.75 / 50) = 0.06, plus ~0.04 from the 20 test pairs every user shares; 0.5 lies > 2.5 sd
    above the minority and far below the majority's ~1, so precision and recall are both exactly 1; the
    minority's mean MV-ACC is within 0.1 (2.5 sd) of 1 - theta/pi.
    """
    for seed in range(20):
        config = LowRankWorld.Config(
            n_users=200, pairs_per_user=30, n_train_prompts=300, n_test_prompts=20, n_responses=4, feature_dim=2,
            n_functions=2, alpha=0.001, function_prevalence=[0.8, 0.2], users_per_pair=20, seed=seed)
        data = LowRankWorld(config).load()
        v = data.truth["directions"]  # (D, K)
        theta = np.arccos(v[:, 0] @ v[:, 1] / np.linalg.norm(v[:, 0]) / np.linalg.norm(v[:, 1]))
        if theta >= np.radians(135):
            break
    assert theta >= np.radians(135), "no seed in range(20) gives two functions at >= 135 deg"
    weights = data.truth["user_weights"]  # (U, K)
    assert (weights.max(axis=1) > 0.9).all()  # one-hot users
    planted = {f"user{u:03d}" for u in np.flatnonzero(weights.argmax(axis=1) == 1)}
    assert 0.1 < len(planted) / 200 < 0.3

    stats = profile(data)
    found = set(stats["minority_users"])
    precision, recall = len(found & planted) / len(found), len(found & planted) / len(planted)
    assert precision == 1.0 and recall == 1.0
    minority_mean = np.mean([stats["mv_acc"]["per_user"][u] for u in planted])
    assert abs(minority_mean - (1 - theta / np.pi)) < 0.1
    room = stats["room_for_personalization"]
    assert room["consistency"] == 1.0  # labels: extremes -> every label is the user's truly preferred response
    assert room["oracle_gap"] > 0 and room["room"] > 0


def test_write_report_files_and_images(tmp_path):
    stats = profile(data_of(ROWS))
    paths = write_report(stats, tmp_path / "out", "toy")
    assert [p.name for p in paths] == ["profile.json", "profile.md", "mv_acc_per_user.png", "pairs_per_user.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)  # no .tmp left
    assert json.loads(paths[0].read_text())["mv_acc"]["per_user"]["u5"] == pytest.approx(1 / 3)
    markdown = paths[1].read_text()
    assert "| toy | 21 | 5 | 75.0% | 50.0% | [0.33-0.88] | undefined: no personal oracle" in markdown
    assert "| u5 | 0.333 | 3 |" in markdown
    for png in paths[2:]:
        image = imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_run_profile_builds_the_registered_dataset(tmp_path, monkeypatch):
    """Overrides with or without the data. prefix; the report goes to profiles/<dataset> by default."""
    monkeypatch.chdir(tmp_path)
    stats = run_profile("lowrank_world", ["n_users=30", "data.pairs_per_user=4", "n_train_prompts=20",
                                          "n_test_prompts=3", "feature_dim=4", "users_per_pair=6"], None)
    assert stats["n_users"] == 30 and stats["n_samples"] == 30 * (4 + 3)
    assert stats["room_for_personalization"]["consistency"] == 1.0
    assert (tmp_path / "profiles" / "lowrank_world" / "profile.json").is_file()


def test_run_profile_names_the_bad_key(tmp_path):
    with pytest.raises(RecipeError, match=r"data.n_userz: unknown key; did you mean 'n_users'\?"):
        run_profile("lowrank_world", ["n_userz=30"], str(tmp_path))
    with pytest.raises(RecipeError, match=r"data.n_users: expected int, got 'many'"):
        run_profile("lowrank_world", ["n_users=many"], str(tmp_path))
    with pytest.raises(RecipeError, match=r"data.name: the dataset is 'lowrank_world', named on its own"):
        run_profile("lowrank_world", ["name=other"], str(tmp_path))
