"""Global RM: one Bradley-Terry reward model for everyone (papers/004 §5 "BT"; papers/000 "Vanilla RM").

    r(x, y) = v^T e(x, y)        trained with -log sigmoid(r(x, y+) - r(x, y-))

(No bias: it cancels in every pairwise difference, so the data cannot determine it.)

Nothing is learned per user, so it ignores user ids and a new user is served by the same model
(``adapts_new_users = 'generic'``). Its accuracy should sit near the non-personalized oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from plrm.config import opt
from plrm.methods.base import MethodConfig, PersonalizedRewardModel
from plrm.registry import methods


@methods.register("bt")
class GlobalBT(PersonalizedRewardModel):
    """Global reward model: linear scalar head, Bradley-Terry loss."""

    adapts_new_users = "generic"
    linear_in_features = True

    @dataclass
    class Config(MethodConfig):
        lr: float = opt(1e-3, "Adam learning rate of the head.")
        weight_decay: float = opt(0.0, "Decoupled weight decay of the head.")

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        self.head_linear = nn.Linear(feature_dim, 1, bias=False)  # v: (1, D)

    def item_embedding(self, h: Tensor) -> Tensor:
        return self.head_linear(h)  # (N, 1)

    def user_reward(self, z: Tensor, user_idx: Tensor) -> Tensor:
        return z[:, 0]  # the same reward for every user

    def export_head(self) -> tuple[list[nn.Module], Tensor]:
        """``plrm export``: g = the linear head v, W = ones: r_u = 1 * v^T h for every user."""
        return [self.head_linear], self.head_linear.weight.detach().new_ones(self.n_users, 1)
