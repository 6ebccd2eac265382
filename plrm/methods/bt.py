"""Global RM: one Bradley-Terry reward model for everyone (LoRe, Bose et al., arXiv 2504.14439, §5 "BT"; "When
Personalization Meets Reality", Dong et al., arXiv 2502.19158, "Vanilla RM").

    r(x, y) = v^T e(x, y)        trained with -log sigmoid(r(x, y+) - r(x, y-))

(No bias: it cancels in every pairwise difference, so the data cannot determine it.)

Nothing is learned per user, so it ignores user ids and a new user is served by the same model
(``adapts_new_users = 'generic'``). Its accuracy should sit near the non-personalized oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from plrm.methods.base import MethodConfig, PersonalizedRewardModel, QuasiNewtonConfig
from plrm.registry import methods


@methods.register("bt")
class GlobalBT(PersonalizedRewardModel):
    """Global reward model: linear scalar head, Bradley-Terry loss."""

    adapts_new_users = "generic"
    linear_in_features = True
    trains_on_differences = True  # loss and penalty read pairs only as e+ - e- (difference_cache)

    @dataclass
    class Config(MethodConfig, QuasiNewtonConfig):
        pass

    def __init__(self, config: MethodConfig, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        self.head_linear = nn.Linear(feature_dim, 1, bias=False)  # v: (1, D)

    def item_embedding(self, h: Tensor) -> Tensor:
        return self.head_linear(h)  # (N, 1)

    def user_reward(self, z: Tensor, user_idx: Tensor) -> Tensor:
        return z[:, 0]  # the same reward for every user

    def export_head(self) -> tuple[list[nn.Module], Tensor]:
        """``plrm export``: g = the linear head v, W = ones: r_u = 1 * v^T h for every user."""
        return [self.head_linear], self.head_linear.weight.detach().new_ones(self.n_users, 1)
