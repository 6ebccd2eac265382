"""The policy stage inside `plrm fit` and `plrm generate`, on the attribute world with tiny random LMs: what it
records, that lambda is chosen on seen users only, that its RM accuracy is the protocol's, and the generate
command's table and errors."""

import json

import numpy as np
import pandas as pd
import pytest

from plrm import runner
from plrm.errors import RecipeError
from plrm.eval import policy as policy_math

TINY = "tiny-random:qwen2"


def recipe(out, **policy) -> dict:
    return {
        "description": "policy stage test",
        "run": {"name": "pol", "output_dir": str(out)},
        "data": {"name": "attribute_world", "n_users": 8, "pairs_per_user": 6, "n_train_prompts": 20,
                 "n_test_prompts": 6, "test_pairs_per_user": 3, "attributes": ["formality"],
                 "attributes_per_user": 1, "fixed_poles": ["short"], "n_responses": 2, "seed": 0},
        "backbone": {"name": "transformer", "model": TINY, "dtype": "float32", "max_length": 512,
                     "lora_dropout": 0.0},
        "split": {"seeds": [0], "k": 2}, "eval": {"k_list": [2]},
        "methods": {"bt": {"max_epochs": 2}, "lore": {"rank": 2, "max_epochs": 2}},
        "logger": {"kind": "none"}, "trainer": {"progress_bar": False},
        "policy": {"model": TINY, "dtype": "float32", "max_new_tokens": 5, "prompts_per_user": 2, "k": 4,
                   "baselines": ["icl", "icl_rag"], "icl_shots": 8, **policy},
    }


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    seen_users = []
    original = policy_math.best_lambda

    def spy(dll, dr, users=None, **kwargs):  # which users' pairs lambda is chosen on
        seen_users.append(np.asarray(users))
        return original(dll, dr, users, **kwargs)

    from plrm.eval import policy_stage

    policy_stage.best_lambda = spy
    try:
        result = runner.fit(recipe(tmp_path_factory.mktemp("runs")), show=False)
    finally:
        policy_stage.best_lambda = original
    return result, seen_users


def test_fit_records_the_policy_stage_of_every_method(fitted):
    result, _ = fitted
    saved = json.loads((result.run_dir / "results.json").read_text())
    for label in ("bt", "lore"):
        m = saved["per_seed"]["0"][label]
        policy = m["policy"]
        assert policy["rm_accuracy"] == pytest.approx(m["unseen"]["accuracy"])  # the same pairs, the same reward
        assert 0 <= policy["policy_accuracy"] <= 1 and policy["lambda"] >= 0 and policy["generations"] == 8
        assert policy["win_rate"] + policy["tie_rate"] + policy["loss_rate"] == pytest.approx(1.0)
        assert m["policy_settings"]["decoder"] == "args" and m["policy_settings"]["guide"] == "sequence"
        curve = m["policy_settings"]["lambda_curve"]
        assert max(curve["seen_policy_accuracy"]) == pytest.approx(policy["lambda_seen_policy_accuracy"])
        seed_dir = result.run_dir / "seed-0"
        gen = pd.read_parquet(seed_dir / f"{label}.generations.parquet")
        assert len(gen) == 8 and set(gen["user_id"]) <= set(result.per_user.query("group == 'unseen'")["user_id"])
        assert (gen["reference"].str.len() > 0).all() and gen["win"].isin([-1, 0, 1]).all()
        pairs = pd.read_parquet(seed_dir / f"{label}.policy_pairs.parquet")
        assert {"dll", "dlln", "dr", "drm"} <= set(pairs.columns) and len(pairs) == policy["policy_pairs"]
        # every accuracy is a function of the stored differences
        users = np.unique(pairs["user_id"].to_numpy(), return_inverse=True)[1]
        again = policy_math.policy_accuracies(pairs["dll"], pairs["dlln"], pairs["dr"], pairs["drm"], users,
                                              policy["lambda"])
        assert again["rgd_accuracy"] == pytest.approx(policy["policy_accuracy"])
    # rank correlations across the rows that have both metrics: the baselines have no RM accuracy (dropped)
    corr = {(r["x"], r["y"]): r for r in saved["policy_correlations"]}
    assert corr[("rm_accuracy", "policy_accuracy")]["n"] == 2 and corr[("policy_accuracy", "rouge1")]["n"] == 5
    assert all(r["unit"] == "method" for r in corr.values())
    for name in ("zero_shot", "icl", "icl_rag"):  # the rows of no reward model, once per seed
        row = saved["per_seed"]["0"][name]["policy"]
        assert 0 <= row["policy_accuracy"] <= 1 and row["generations"] == 8 and "win_rate" not in row
    # ICL reads the first split.k = 2 support pairs of each unseen user (none shares the query's prompt here)
    assert saved["per_seed"]["0"]["icl"]["policy"]["demonstrations"] == pytest.approx(2.0)
    zs = saved["per_seed"]["0"]["zero_shot"]["policy"]
    assert zs["rouge1"] == pytest.approx(saved["per_seed"]["0"]["bt"]["policy"]["zero_shot_rouge1"])
    assert zs["policy_accuracy"] == pytest.approx(saved["per_seed"]["0"]["bt"]["policy"]["base_policy_accuracy"])


def test_lambda_is_chosen_on_seen_users_only(fitted):
    result, seen_users = fitted
    unseen = set(result.per_user.query("group == 'unseen'")["user_id"])
    ids = np.asarray(runner.Run.open(result.run_dir).split(0).user_ids)
    assert len(seen_users) == 2
    for users in seen_users:
        assert not set(ids[users]) & unseen and len(users) > 0


def test_generate_writes_one_table_and_names_bad_arguments(fitted, tmp_path):
    result, _ = fitted
    out = tmp_path / "gen.csv"
    table = runner.generate(result.run_dir, methods=["lore"], out=out, show=False, k=2, weight=0.5,
                            max_new_tokens=3)
    assert list(pd.read_csv(out)["method"].unique()) == ["zero_shot", "lore"]
    lore = table[table["method"] == "lore"]
    assert (lore["k"] == 2).all() and (lore["weight"] == 0.5).all() and len(lore) == 8
    some = str(lore["user_id"].iloc[0])
    one = runner.generate(result.run_dir, methods=["bt"], users=[some], zero_shot=False, out=tmp_path / "a.jsonl",
                          show=False, max_new_tokens=2)
    assert set(one["user_id"]) == {some} and set(one["method"]) == {"bt"}
    with pytest.raises(RecipeError, match="--method nope: the run has no such method; it has bt, lore"):
        runner.generate(result.run_dir, methods=["nope"], show=False)
    with pytest.raises(RecipeError, match=r"--users: \['nobody'\] are not users of"):
        runner.generate(result.run_dir, users=["nobody"], show=False)
    with pytest.raises(RecipeError, match="unknown policy setting"):
        runner.generate(result.run_dir, show=False, topk=3)
    with pytest.raises(RecipeError, match=r"--seed 7: the run's split seeds are \[0\]"):
        runner.generate(result.run_dir, seeds=[7], show=False)
    with pytest.raises(RecipeError, match="--out .*gen.txt: write .parquet, .csv or .jsonl"):
        runner.generate(result.run_dir, out=tmp_path / "gen.txt", show=False)
    assert not (tmp_path / "gen.txt").exists() and not (result.run_dir / "generations.parquet").exists()


def test_generate_refuses_a_weight_that_is_not_a_number(fitted, capsys):
    from plrm import cli

    result, _ = fitted
    assert cli.main(["generate", "--run", str(result.run_dir), "--weight", "abc"]) == 2
    assert "--weight 'abc': give a number >= 0 or auto" in capsys.readouterr().err
    assert cli.main(["generate", "--run", str(result.run_dir), "--weight", "-1"]) == 2
    assert "--weight '-1': must be >= 0" in capsys.readouterr().err
    assert not (result.run_dir / "generations.parquet").exists()


def test_a_policy_section_turns_the_stage_on_and_its_errors_name_their_keys(tmp_path):
    from plrm.recipe import load_recipe

    assert load_recipe(recipe(tmp_path)).policy.enabled
    assert not load_recipe(recipe(tmp_path, enabled=False)).policy.enabled
    assert not load_recipe("quickstart").policy.enabled                   # no section: no stage
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe(tmp_path), ["policy.weight=-1", "policy.k=0", "policy.baselines=[rag]"])
    for line in ("policy.k: must be >= 1, got 0", "policy.weight: must be >= 0, got -1.0",
                 "policy.baselines: expected list['icl' | 'icl_rag'], got ['rag']"):
        assert line in str(err.value)


def test_a_world_without_text_gets_the_reason_not_a_policy_stage(tmp_path):
    result = runner.fit("quickstart", ["policy.enabled=true", f"policy.model={TINY}", "logger.kind=none",
                                       f"run.output_dir={tmp_path}", "split.seeds=[0]", "trainer.progress_bar=false"],
                        show=False)
    for label in ("bt", "lore"):
        m = result.per_seed[0][label]
        assert m["policy"] is None and "provides no prompt and response text" in m["policy_skipped"]
    assert "zero_shot" not in result.per_seed[0]
