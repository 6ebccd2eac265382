"""The personalization tax (When Personalization Meets Reality, Dong et al., arXiv 2502.19158, §4.3) on the
RewardBench fixture, from a run on the attribute text world with the offline MiniLM encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from plrm import cli, runner
from plrm.data.sources.reward_bench import section_scores
from plrm.tax import TaxError, personalization_tax, section_matrix

REPO = Path(__file__).resolve().parents[1]
RB = REPO / "tests" / "data" / "sources" / "fixtures" / "reward_bench"
SECTIONS = ["Chat", "Chat Hard", "Safety", "Reasoning"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    recipe = {
        "run": {"name": "tax", "output_dir": str(out)},
        "data": {"name": "attribute_world", "n_users": 24, "pairs_per_user": 8, "n_train_prompts": 40,
                 "n_test_prompts": 12, "test_pairs_per_user": 4},
        "backbone": {"name": "frozen_encoder", "model": "offline:minilm"},
        "methods": {"bt": {"max_epochs": 3, "lr": 0.01}, "lore": {"rank": 2, "max_epochs": 5, "lr": 0.05}},
        "split": {"k": 2}, "eval": {"k_list": [2]}, "logger": {"kind": "none"}, "trainer": {"progress_bar": False},
    }
    return runner.fit(recipe, show=False).run_dir


def test_section_matrix_reproduces_rewardbench_scores():
    rng = np.random.default_rng(0)
    subsets = np.array(["alpacaeval-easy", "mt-bench-med", "llmbar-natural", "math-prm", "hep-go", "hep-python",
                        "donotanswer", "refusals-dangerous"] * 3, dtype=object)
    correct = rng.integers(0, 2, len(subsets)).astype(float)
    names = sorted(set(subsets))
    sections, mat = section_matrix(names)
    acc = np.array([correct[subsets == n].mean() for n in names])
    expected = section_scores(correct, subsets)["sections"]
    assert sections == SECTIONS
    np.testing.assert_allclose(acc @ mat, [expected[s] for s in sections])


def test_a_global_model_pays_no_tax(text_run, tmp_path):
    """bt has no per-user state: every user's reward is the non-personalized one, so the change is exactly 0."""
    tax = personalization_tax(text_run, "bt", overrides=[f"path={RB}"], out=tmp_path, show=False)
    assert tax["n_rows"] == 8 and tax["n_users"] == 12  # the fixture's 8 rows; the run's 12 seen users
    assert list(tax["personalized"]) == SECTIONS
    for s in SECTIONS:
        assert tax["change"][s]["mean"] == 0.0 and tax["change"][s]["worst"] == 0.0
        assert tax["personalized"][s]["std"] == 0.0
        assert tax["personalized"][s]["mean"] == pytest.approx(tax["non_personalized"]["sections"][s])


def test_personalized_scores_match_each_users_own_reward(text_run, tmp_path):
    """lore: the section scores of a user equal RewardBench's scoring of that user's reward, computed here from
    the model's public API; the non-personalized reward is the mean of the seen users' rewards."""
    tax = personalization_tax(text_run, "lore", overrides=[f"path={RB}"], out=tmp_path, show=False)
    written = json.loads((tmp_path / "tax-lore-seed0.json").read_text())
    assert written["per_user"] == tax["per_user"]
    assert (tmp_path / "tax-lore-seed0.md").read_text().startswith("# Personalization tax of `lore`")

    # the same numbers from scratch: the run's model on the fixture's rows
    from plrm import registry
    from plrm.checkpoint import load_checkpoint
    from plrm.data.datamodule import PreparedData
    from plrm.recipe import build_dataset, load_recipe

    recipe = load_recipe(str(text_run / "recipe.yaml"))
    bench = build_dataset("reward_bench", [f"path={RB}"]).load()
    prepared = PreparedData(bench, registry.backbones.get("frozen_encoder")(recipe.backbone.config))
    import pandas as pd

    all_ids = sorted(pd.read_parquet(text_run / "seed-0" / "split.parquet")["user_id"].unique())  # vocabulary
    model = runner.build_model(recipe, "lore", prepared, n_users=24)
    model.load_checkpoint_state(load_checkpoint(text_run / "seed-0" / "lore.ckpt")["state_dict"])
    model.eval()
    subsets = np.asarray(bench.pairs["group_id"], dtype=object)
    rows = torch.arange(len(subsets))
    batch = {"chosen": prepared.backbone.inputs(prepared.chosen_item[rows]),
             "rejected": prepared.backbone.inputs(prepared.rejected_item[rows])}
    for row in tax["per_user"][:3]:
        idx = torch.full((len(rows),), all_ids.index(row["user_id"]))
        with torch.no_grad():
            correct = (model.preference_logit({**batch, "user_idx": idx}) > 0).numpy()
        expected = section_scores(correct, subsets)["sections"]
        assert {s: row[s] for s in SECTIONS} == pytest.approx(expected)
    seen = [all_ids.index(row["user_id"]) for row in tax["per_user"]]
    with torch.no_grad():  # non-personalized: the mean over seen users of their reward margins
        mean_margin = torch.stack([model.preference_logit({**batch, "user_idx": torch.full((len(rows),), u)})
                                   for u in seen]).mean(0)
    assert tax["non_personalized"]["sections"] == pytest.approx(
        section_scores((mean_margin > 0).numpy(), subsets)["sections"])


def test_tax_errors_name_the_problem(text_run, tmp_path):
    with pytest.raises(TaxError, match=r"trained \['bt', 'lore'\]; choose one with --method"):
        personalization_tax(text_run, overrides=[f"path={RB}"], show=False)
    with pytest.raises(TaxError, match="has no method 'mrm'"):
        personalization_tax(text_run, "mrm", overrides=[f"path={RB}"], show=False)
    with pytest.raises(TaxError, match=r"no checkpoint .*seed-3/bt.ckpt \(split seeds of the run: \[0\]\)"):
        personalization_tax(text_run, "bt", seed=3, overrides=[f"path={RB}"], show=False)
    assert cli.main(["tax", "--run", str(text_run), "--method", "bt", "--seed", "3", f"path={RB}"]) == 2


def test_a_feature_run_cannot_pay_a_text_tax(tmp_path, tiny_overrides):
    run = runner.fit("quickstart", tiny_overrides, show=False).run_dir
    with pytest.raises(TaxError, match="backbone 'precomputed' reads precomputed features, so it cannot score "
                                       "RewardBench's text"):
        personalization_tax(run, "lore", overrides=[f"path={RB}"], show=False)


def test_a_user_conditioned_method_has_no_tax_to_pay(text_run, tmp_path, monkeypatch):
    """The tax compares users' rewards with their mean over one item embedding; a method that conditions its
    encoder on the user has none, and says so before anything is written."""
    from plrm.methods.bt import GlobalBT

    monkeypatch.setattr(GlobalBT, "reward_shape", "conditioned")
    out = tmp_path / "tax-out"
    with pytest.raises(TaxError, match=r"method 'bt' \(GlobalBT\) conditions its encoder on the user: it has no "
                                       "user-independent item embedding"):
        personalization_tax(text_run, "bt", overrides=[f"path={RB}"], out=out, show=False)
    assert not out.exists()
