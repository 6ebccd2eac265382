"""LoRe: low-rank reward modeling (LoRe, Bose et al., arXiv 2504.14439, §3, Example 1; eq. 8, 10, 11; App. B.1
hyperparameters).

    R_phi(x, y) = A e(x, y)                 A in R^{B x D}: the shared reward basis  (eq. 8)
    r_u(x, y)   = w_u^T R_phi(x, y)          w_u on the simplex Delta^{B-1}: user u's weights

Seen users: A and {w_u} jointly minimize sum_u 1/|D_u| sum_i -log sigmoid(w_u^T (R(x, y+) - R(x, y-)))
(eq. 10). New users: w_new = argmin over the simplex of the same loss on their few-shot pairs, A frozen
(eq. 11), solved for all new users at once by plrm.methods.peruser. The simplex is parameterized by a
softmax over per-user logits (zero logits = uniform weights).

Shared: ``basis`` (A). Per user: ``user_logits`` (U, B).
Regularization (not in the paper, whose basis overfits 45 pairs per user): ``basis_l2``, an L2 penalty on A.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from plrm.config import opt
from plrm.methods.base import AdaptConfig, MethodConfig, PersonalizedRewardModel, QuasiNewtonConfig
from plrm.methods.simplex import fit_simplex
from plrm.registry import methods


@methods.register("lore")
class LoRe(PersonalizedRewardModel):
    """LoRe: shared linear reward basis, per-user simplex weights; new users by eq. 11."""

    linear_in_features = True
    trains_on_differences = True  # loss and penalty read pairs only as e+ - e- (difference_cache)
    user_state = ("user_logits",)

    @dataclass
    class Config(MethodConfig, AdaptConfig, QuasiNewtonConfig):
        rank: int = opt(10, "B, the number of basis reward functions (LoRe: cross-validated in {2,..,50}).", min=1)
        lr: float = opt(0.01, "Adam learning rate of the basis A. LoRe App. B.1 uses 0.5 on its reward-model "
                              "embeddings; on N(0, 1) 4096-d features 0.5 diverges (57% unseen accuracy, "
                              "recipes/lowrank_personalllm.yaml), 0.01 was tuned there.", gt=0)
        user_lr: float | None = opt(None, "Adam learning rate of the seen users' weights (null: same as lr).", gt=0)
        basis_l2: float = opt(0.01, "L2 penalty basis_l2 * ||A||_F^2 on the basis (0: the paper's objective, "
                                    "which overfits 45 pairs per user: 82% vs 95% unseen at PersonalLLM size; "
                                    "tuned over {0.001, 0.01, 0.03, 0.1}, see recipes/lowrank_personalllm.yaml).",
                                    min=0)
        adapt_solver: Literal["adam", "newton"] = opt(
            "adam", "How eq. 11 is solved for new users. 'adam': adapt_steps full-batch Adam steps on softmax "
                    "logits from uniform weights (LoRe App. B.1's procedure; the step budget regularizes). "
                    "'newton': every user's weights solved on the simplex to its KKT conditions by batched "
                    "projected Newton (plrm.methods.simplex), with adapt_ridge; benchmarks/bench_adapt.py "
                    "compares the two.")
        adapt_ridge: float = opt(1e-4, "adapt_solver 'newton' only: adapt_ridge * ||w - 1/B||^2 added to eq. 11, "
                                       "so that each user's weights are unique even with fewer pairs than B.",
                                 gt=0)

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        self.basis = nn.Linear(feature_dim, config.rank, bias=False)         # A: (B, D)
        self.user_logits = nn.Parameter(torch.zeros(n_users, config.rank))   # (U, B); softmax -> w_u

    def user_weights(self, user_idx: Tensor) -> Tensor:
        return torch.softmax(self.user_logits[user_idx], dim=-1)  # (N, B), rows on the simplex

    def item_embedding(self, h: Tensor) -> Tensor:
        return self.basis(h)  # R_phi(x, y): (N, B)

    def reward_with(self, z: Tensor, logits: Tensor) -> Tensor:
        return (z * torch.softmax(logits, dim=-1)).sum(-1)  # w_u^T R_phi with w_u = softmax(logits_u): (N,)

    def export_head(self) -> tuple[list[nn.Module], Tensor]:
        """``plrm export``: g = the basis A, W = the simplex weights softmax(user_logits) (U, B)."""
        return [self.basis], torch.softmax(self.user_logits.detach(), dim=-1)

    def regularization(self, batch: dict) -> Tensor | float:
        return self.config.basis_l2 * self.basis.weight.pow(2).sum() if self.config.basis_l2 else 0.0

    def parameter_groups(self) -> list[dict]:
        shared = [p for n, p in self.named_parameters() if p.requires_grad and n != "user_logits"]
        user_lr = self.config.user_lr if self.config.user_lr is not None else self.config.lr
        return [{"params": shared}, {"params": [self.user_logits], "lr": user_lr, "weight_decay": 0.0}]

    @torch.no_grad()
    def adapt(self, support: dict, users: Tensor) -> None:
        """Eq. 11 for every user in ``users`` (sorted) at once, with the basis frozen; zero logits = uniform w."""
        if self.config.adapt_solver == "newton":
            owner = torch.searchsorted(users, support["user_idx"])
            fit = fit_simplex(self.embedding_difference(support), owner, len(users), ridge=self.config.adapt_ridge)
            # logits whose softmax is w; a weight of exactly 0 becomes a logit of log(1e-30), not -inf
            self.user_logits[users] = fit.weights.clamp_min(1e-30).log().to(self.user_logits.dtype)
            return
        init = torch.zeros(len(users), self.config.rank, device=self.user_logits.device)    # (U_new, B)
        self.user_logits[users] = self.fit_user_state(support, users, init, self.config.adapt_steps,
                                                      self.config.adapt_lr, self.config.adapt_l2)
