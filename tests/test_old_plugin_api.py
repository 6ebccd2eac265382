"""A method written against the plugin API of before the architecture refactor still loads, trains, adapts and is
evaluated unchanged: it overrides ``user_reward``, fits new users with ``fit_per_user`` and an inline reward,
moves tensors with ``plrm.data.datamodule.to_device`` and reads the seen users' pairs in ``on_train_end`` through
``self.trainer.datamodule`` (today: the ``fit_seen_users`` hook, CONTRIBUTING "Data hooks")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from plrm import registry, runner
from plrm.data.datamodule import to_device
from plrm.methods.base import AdaptConfig, MethodConfig, PersonalizedRewardModel
from plrm.methods.peruser import fit_per_user


class OldStyleIndividual(PersonalizedRewardModel):
    """r_u = (v + delta_u)^T h; delta_u of seen users re-fitted on their train pairs after training."""

    user_state = ("delta",)
    seen_users_refit = 0

    class Config(MethodConfig, AdaptConfig):
        pass

    def __init__(self, config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        self.shared = nn.Linear(feature_dim, 1, bias=False)
        self.delta = nn.Parameter(torch.zeros(n_users, feature_dim))

    def user_reward(self, z: Tensor, user_idx: Tensor) -> Tensor:
        return self.shared(z)[:, 0] + (z * self.delta[user_idx]).sum(-1)

    def on_train_end(self) -> None:
        dm = self.trainer.datamodule
        batch = to_device(dm.batch(torch.from_numpy(dm.seen_train_rows())), self.device)
        type(self).seen_users_refit += 1
        self.adapt(batch, torch.unique(batch["user_idx"]))

    @torch.no_grad()
    def adapt(self, support: dict, users: Tensor) -> None:
        z_chosen, z_rejected = self.embed_pairs(support)
        diff = z_chosen - z_rejected
        v = self.shared.weight[0]
        owner = torch.searchsorted(users, support["user_idx"])
        fitted = fit_per_user(torch.zeros(len(users), self.feature_dim), owner,
                              lambda d, pos: -nn.functional.logsigmoid((diff[pos] * (v + d)).sum(-1)),
                              steps=self.config.adapt_steps, lr=self.config.adapt_lr, l2=self.config.adapt_l2)
        self.delta.data[users] = fitted


def test_a_method_written_against_the_old_api_runs_unchanged(monkeypatch, tiny_overrides):
    from dataclasses import dataclass

    OldStyleIndividual.Config = dataclass(OldStyleIndividual.Config)
    monkeypatch.setitem(registry.methods._entries, "old_style", OldStyleIndividual)
    monkeypatch.setitem(registry.methods._origins, "old_style", registry.methods.origin("bt"))
    overrides = [o for o in tiny_overrides if not o.startswith("methods.")] + [
        "methods={old: {name: old_style, max_epochs: 3, lr: 0.01, adapt_steps: 50}, bt: {max_epochs: 3}}"]
    result = runner.fit("quickstart", overrides, show=False)
    res = result.per_seed[0]
    assert OldStyleIndividual.seen_users_refit == 1
    assert res["old"]["unseen"] is not None and res["old"]["seen"]["accuracy"] > 0.6
