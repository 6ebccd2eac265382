"""The two reward shapes of the base class: a user-conditioned method trains, is evaluated, adapts, is
checkpointed and re-tested through the same plumbing as the factored ones, and its scores equal a brute-force
row-by-row computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from plrm import registry, runner
from plrm.data.datamodule import PreferenceDataModule
from plrm.data.splits import make_split
from plrm.errors import ExportError
from plrm.eval.protocol import score_rows
from plrm.export import export
from plrm.methods.base import FACTORED, MethodConfig, PersonalizedRewardModel
from plrm.methods.bt import GlobalBT
from plrm.methods.lore import LoRe
from plrm.methods.losses import bradley_terry_nll


class UserShiftedMLP(PersonalizedRewardModel):
    """A toy user-conditioned reward: the user's vector shifts the *input* of a nonlinear network, so no
    user-independent item embedding exists, plus a user-independent per-item term (like P-DPO's reference
    log-probability) that evaluation must compute once per unique item:

        r_u(h) = MLP(h + s_u) + 0.1 * sum(h)
    """

    reward_shape = "conditioned"
    user_state = ("shift",)
    statistics_calls: list[int] = []  # rows passed to item_statistics, per call (class-level: survives rebuilds)

    def __init__(self, config: MethodConfig, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        self.net = nn.Sequential(nn.Linear(feature_dim, 8), nn.Tanh(), nn.Linear(8, 1))
        self.shift = nn.Parameter(torch.zeros(n_users, feature_dim))        # (U, D)

    def item_statistics(self, items: Tensor) -> Tensor:
        self.statistics_calls.append(len(items))
        return 0.1 * items.sum(-1, keepdim=True)                            # (N, 1)

    def conditioned_reward(self, items: Tensor, user_idx: Tensor, item_stats: Tensor | None) -> Tensor:
        stats = self.item_statistics(items) if item_stats is None else item_stats
        return self.net(self.encode(items) + self.shift[user_idx])[:, 0] + stats[:, 0]

    @torch.no_grad()
    def adapt(self, support: dict, users: Tensor) -> None:
        """A closed-form stand-in: each new user's shift is the mean of their pairs' h+ - h-."""
        owner = torch.searchsorted(users, support["user_idx"])
        total = torch.zeros(len(users), self.feature_dim).index_add_(0, owner, support["chosen"] - support["rejected"])
        count = torch.bincount(owner, minlength=len(users)).clamp_min(1)[:, None]
        self.shift[users] = total / count


@pytest.fixture
def conditioned(monkeypatch):
    monkeypatch.setitem(registry.methods._entries, "user_shifted", UserShiftedMLP)
    monkeypatch.setitem(registry.methods._origins, "user_shifted", registry.methods.origin("bt"))
    UserShiftedMLP.statistics_calls.clear()
    return UserShiftedMLP


def _overrides(tmp_path, tiny_overrides) -> list[str]:
    return [o for o in tiny_overrides if not o.startswith("methods.")] + [
        "methods={cond: {name: user_shifted, max_epochs: 3, lr: 0.01}}", "run.name=cond"]


def test_factored_is_the_default_shape():
    assert LoRe.reward_shape == GlobalBT.reward_shape == FACTORED


def test_conditioned_scores_equal_row_by_row_rewards_and_item_statistics_run_once_per_unique_item(
        conditioned, tiny_overrides, tmp_path):
    from plrm.recipe import load_recipe

    recipe = load_recipe("quickstart", _overrides(tmp_path, tiny_overrides))
    prepared = runner.prepare(recipe)
    split = make_split(prepared.data.pairs.data.table, 0, unseen_fraction=0.5, test_fraction=0.5, val_fraction=0.0,
                       need_support=3, source="lowrank_world")
    dm = PreferenceDataModule(prepared, split)
    torch.manual_seed(0)
    model = UserShiftedMLP(MethodConfig(), dm.n_users, dm.feature_dim)
    with torch.no_grad():
        model.shift.normal_()
    rows = dm.test_rows(unseen=False)
    conditioned.statistics_calls.clear()
    logits = score_rows(model, dm, rows, max_pairs=7)  # many chunks of rows
    n_unique = len(np.unique(np.concatenate([prepared.items.chosen_item[rows], prepared.items.rejected_item[rows]])))
    assert sum(conditioned.statistics_calls) == n_unique  # once per unique item, never per (user, pair) row
    batch = dm.batch(torch.from_numpy(rows))
    with torch.no_grad():
        expected = torch.stack([
            model.reward(batch["chosen"][i:i + 1], batch["user_idx"][i:i + 1])
            - model.reward(batch["rejected"][i:i + 1], batch["user_idx"][i:i + 1]) for i in range(len(rows))])[:, 0]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_conditioned_training_loss_is_the_bradley_terry_nll_of_its_own_rewards(conditioned):
    torch.manual_seed(1)
    model = UserShiftedMLP(MethodConfig(), n_users=3, feature_dim=4)
    h_c, h_r = torch.randn(5, 4), torch.randn(5, 4)
    users = torch.tensor([0, 2, 1, 2, 0])
    batch = {"chosen": h_c, "rejected": h_r, "user_idx": users, "pair_weight": torch.ones(5)}
    expected = bradley_terry_nll(model.reward(h_c, users) - model.reward(h_r, users))
    torch.testing.assert_close(model.loss(batch), expected)


@pytest.mark.slow
def test_conditioned_method_fits_evaluates_adapts_and_retests_through_the_runner(conditioned, tiny_overrides,
                                                                                  tmp_path):
    result = runner.fit("quickstart", _overrides(tmp_path, tiny_overrides), show=False)
    metrics = result.per_seed[0]["cond"]
    assert metrics["seen"]["accuracy"] > 0.6                   # it learned something through the conditioned loss
    assert metrics["unseen"] is not None and len(metrics["fewshot"]) == 2
    again = runner.test(result.run_dir, show=False)
    assert again.per_seed[0]["cond"]["seen"]["accuracy"] == pytest.approx(metrics["seen"]["accuracy"])
    assert again.per_seed[0]["cond"]["unseen"]["accuracy"] == pytest.approx(metrics["unseen"]["accuracy"])
    adapted = runner.adapt(result.run_dir, k=3, show=False)    # `plrm adapt`: the same k-shot state, the same score
    assert adapted.per_seed[0]["cond"]["unseen"]["accuracy"] == pytest.approx(metrics["unseen"]["accuracy"])
    session = runner.active(result.run_dir, budget=3, strategies=("random",), show=False)  # interactive sessions
    assert len(session["summary"]["cond"]["random"]) == 3
    with pytest.raises(ExportError, match=r"has no export_head\(\)|not of the form W\[u\] . g\(h\)"):
        export(result.run_dir, tmp_path / "exported", method="cond", show=False)  # not W[u] . g(h)


def test_conditioned_method_joins_a_benchmark(conditioned, tmp_path):
    from plrm.bench.run import run_bench
    from plrm.bench.spec import load_bench

    spec = load_bench("bench/quick", [
        "dataset_options.lowrank_world.n_users=60", "dataset_options.lowrank_world.pairs_per_user=10",
        "dataset_options.lowrank_world.n_train_prompts=300", "dataset_options.lowrank_world.n_test_prompts=20",
        "dataset_options.lowrank_world.test_prompts_per_user=10", "dataset_options.lowrank_world.feature_dim=16",
        "bench.methods=[user_shifted]", "bench.seeds=[0]", "bench.k=3", "bench.k_list=[1,3]",
        "cell.logger.kind=none", f"bench.output_dir={tmp_path}"])
    outcome = run_bench(spec, show=False)
    assert [r["status"] for r in outcome.records] == ["done"]
    assert outcome.records[0]["metrics"]["unseen"]["accuracy"] > 0.5


def test_population_reward_is_refused_for_a_conditioned_method():
    with pytest.raises(NotImplementedError, match="no item embedding to average users' rewards over"):
        UserShiftedMLP(MethodConfig(), 3, 4).population_reward(torch.randn(2, 4), torch.arange(3))


def test_prefix_rewards_are_the_head_at_every_position():
    """prefix_rewards(h (B, T, D), users) reads the head at each position as if that position's state were the
    last token's: position t of user b equals head(h[b, t], b)."""
    torch.manual_seed(2)
    model = LoRe(LoRe.Config(rank=3), n_users=4, feature_dim=5)
    with torch.no_grad():
        model.user_logits.normal_()
    h, users = torch.randn(2, 6, 5), torch.tensor([3, 1])
    out = model.prefix_rewards(h, users)
    assert out.shape == (2, 6)
    for b in range(2):
        for t in range(6):
            torch.testing.assert_close(out[b, t], model.head(h[b, t][None], users[b:b + 1])[0])
    with pytest.raises(NotImplementedError, match="conditions the encoder on the user"):
        UserShiftedMLP(MethodConfig(), 4, 5).prefix_rewards(h, users)


def _head_methods(n_users: int, dim: int) -> dict[str, PersonalizedRewardModel]:
    """Every built-in method that offers a reward table, with random per-user heads (similar_user: users matched
    to a few shared heads, as after adaptation)."""
    from plrm.methods.further_ft import FurtherFineTunedRM
    from plrm.methods.individual import IndividualRM
    from plrm.methods.mpu import MPU
    from plrm.methods.similar_user import SimilarUserRM

    torch.manual_seed(0)
    models = {"individual": IndividualRM(IndividualRM.Config(), n_users, dim),
              "individual_mlp": IndividualRM(IndividualRM.Config(hidden=8), n_users, dim),
              "mpu": MPU(MPU.Config(hidden=8), n_users, dim),
              "further_ft": FurtherFineTunedRM(FurtherFineTunedRM.Config(), n_users, dim),
              "similar_user": SimilarUserRM(SimilarUserRM.Config(hidden=4), n_users, dim)}
    with torch.no_grad():
        for model in models.values():
            for p in model.heads.parameters():
                p.normal_()
        models["similar_user"].match.copy_(torch.randint(0, 5, (n_users,)))
    return models


def test_reward_tables_score_rows_as_the_rows_do(tiny_overrides, tmp_path, monkeypatch):
    """Evaluation from a method's (item x user) reward table, computed in several user chunks, gives the logits of
    per-row scoring; the table is used when it is small beside the rows, and rows are scored otherwise."""
    from plrm.eval import protocol
    from plrm.recipe import load_recipe

    prepared = runner.prepare(load_recipe("quickstart", tiny_overrides))
    split = make_split(prepared.data.pairs.data.table, 0, unseen_fraction=0.5, test_fraction=0.5, val_fraction=0.0,
                       need_support=3, source="lowrank_world")
    dm = PreferenceDataModule(prepared, split)
    rows = dm.test_rows(unseen=False)
    for name, model in _head_methods(dm.n_users, dm.feature_dim).items():
        monkeypatch.setattr(protocol, "TABLE_ENTRIES_PER_ROW", 0)      # per-row scoring
        by_rows = score_rows(model, dm, rows)
        calls = []
        table_of = model.reward_table
        monkeypatch.setattr(model, "reward_table", lambda z, users: calls.append(len(users)) or table_of(z, users))
        monkeypatch.setattr(protocol, "TABLE_ENTRIES_PER_ROW", 10**9)  # the table, in chunks of 7 users' columns
        monkeypatch.setattr(protocol, "TABLE_CHUNK_ENTRIES", 7 * len(np.unique(np.concatenate(
            [prepared.items.chosen_item[rows], prepared.items.rejected_item[rows]]))))
        by_table = score_rows(model, dm, rows)
        n_users = len(np.unique(dm.row_user[torch.from_numpy(rows)].numpy()))
        assert calls[0] == 7 and sum(calls) == n_users, name
        torch.testing.assert_close(by_table, by_rows, rtol=1e-5, atol=1e-5, msg=name)
        assert by_table.std() > 0.1, name


def test_methods_without_a_table_are_scored_by_rows():
    assert LoRe(LoRe.Config(), 3, 4).reward_table(torch.zeros(2, 4), torch.arange(3)) is None
