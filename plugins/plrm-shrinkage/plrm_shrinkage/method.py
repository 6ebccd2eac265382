"""Individual RM with shrinkage: per-user linear reward heads pulled toward a shared one.

    r_u(x, y) = (v + delta_u)^T e(x, y)      v in R^D: the shared head;  delta_u in R^D: user u's deviation

Seen users: v and {delta_u} jointly minimize the user-balanced Bradley-Terry loss plus a penalty that shrinks
every deviation toward zero, i.e. every user's head toward the shared one:

    sum_u 1/|D_u| sum_i -log sigmoid((v + delta_u)^T (e(x, y+) - e(x, y-)))  +  user_l2 * mean_u ||delta_u||^2

This is the regularized multi-task model of Evgeniou & Pontil (KDD 2004), or the MAP estimate of a
hierarchical Gaussian prior delta_u ~ N(0, I / (2 user_l2)). user_l2 -> infinity gives the global BT model;
user_l2 = 0 gives one independent reward model per user (which overfits 45 pairs in 64 dimensions).
New users: delta_new = argmin of the same loss on their few-shot pairs + adapt_l2 * ||delta_new||^2, with v
frozen, solved for all new users at once (fit_user_state, plrm.methods.peruser). A user with no pairs gets v.

Shared: ``shared`` (v). Per user: ``delta`` (U, D). The head is user-specific over the raw features, so
``item_embedding`` stays the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from plrm.config import opt
from plrm.methods.base import AdaptConfig, MethodConfig, PersonalizedRewardModel


# Registered by the entry point `shrunk_individual` in pyproject.toml, not by plrm's decorator.
class ShrunkIndividualRM(PersonalizedRewardModel):
    """Individual RM with shrinkage: r_u = (v + delta_u)^T e, deviations delta_u shrunk toward 0."""

    adapts_new_users = "yes"
    user_state = ("delta",)

    @dataclass
    class Config(MethodConfig, AdaptConfig):
        lr: float = opt(0.01, "Adam learning rate of v and the seen users' deviations.", gt=0)
        user_l2: float = opt(0.01, "Shrinkage user_l2 * mean ||delta_u||^2 over the batch's users "
                                   "(0: independent per-user models; large: the global BT model).", min=0)
        adapt_l2: float = opt(0.01, "L2 penalty adapt_l2 * ||delta_new||^2 of few-shot adaptation: with k "
                                    "pairs for D parameters, the prior toward v is what keeps the fit sane.", min=0)

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        self.shared = nn.Linear(feature_dim, 1)                           # v: (1, D), plus a bias
        self.delta = nn.Parameter(torch.zeros(n_users, feature_dim))      # (U, D); zeros = everyone is v

    def reward_with(self, z: Tensor, delta: Tensor) -> Tensor:
        return self.shared(z)[:, 0] + (z * delta).sum(-1)                 # (v + delta_u)^T e + b: (N,)

    def reward_table(self, z: Tensor, users: Tensor) -> Tensor:
        # Evaluation scores every item under every user at once: (I, D) @ (D, U_b) instead of one D-vector per row.
        return self.shared(z) + z @ self.delta[users].T                  # (I, U_b)

    def regularization(self, batch: dict) -> Tensor:
        # Only the batch's users: the others' rows do not move this step.
        users = batch["user_idx"].unique()                                # (U_b,)
        return self.config.user_l2 * self.delta[users].pow(2).sum(-1).mean()

    def parameter_groups(self) -> list[dict]:
        # user_l2 is the deviations' prior; weight decay would shrink them a second time.
        return [{"params": list(self.shared.parameters())}, {"params": [self.delta], "weight_decay": 0.0}]

    @torch.no_grad()
    def adapt(self, support: dict, users: Tensor) -> None:
        """Fit delta for every user in ``users`` (sorted) at once, v frozen: the base class's fit_user_state
        with this method's own reward_with (the bias cancels in each pair's r+ - r-)."""
        init = torch.zeros(len(users), self.feature_dim, device=self.delta.device)   # zeros: start at v
        self.delta.data[users] = self.fit_user_state(support, users, init, self.config.adapt_steps,
                                                     self.config.adapt_lr, self.config.adapt_l2)
