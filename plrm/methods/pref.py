"""PReF: personalized reward factorization (papers/002 §4, Algorithm 1, eq. 4-5, Table 3; papers/001 app. D).

    P(y1 > y2 | x, user i) = sigmoid(lambda_i^T (phi(x, y1) - phi(x, y2)))       phi(x, y) = W e(x, y) in R^J

Training (Algorithm 1):
1. the users x item-pairs matrix A of observed preferences (+1 / -1, 0 where unobserved) gets a rank-J
   truncated SVD A ~ U S V^T; Lambda = U S^1/2 (user vectors) and Phi = S^1/2 V^T (a J-vector per pair);
2. the pointwise head W is fit to Phi by bias-free least squares, W (e(y1) - e(y2)) ~ Phi_p (papers/001
   app. D), so phi(x, y) scores a single response, as accuracy and reward-guided decoding need;
3. W and Lambda are refined jointly by maximum likelihood (eq. 4) with an L2 penalty beta/2 ||lambda||^2 on
   the user vectors, which fixes the scale ambiguity Lambda^T Phi = Lambda^T R^-1 R Phi (§4.1).
New users: L2-regularized logistic regression for lambda with phi frozen (concave), solved for all users at
once by Newton's method on the stacked (U, J) problem -- batched J x J solves, no loop over users.

Shared: ``phi`` (W). Per user: ``user_vectors`` (U, J). ``init: random`` is the paper's "No SVD" ablation and
``beta: 0`` its "No Reg." one (Figure 3A).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
from torch import Tensor, nn

from plrm import capabilities as cap
from plrm.config import opt
from plrm.methods.base import MethodConfig, PersonalizedRewardModel
from plrm.registry import methods


def svd_factors(user_idx: np.ndarray, pair_idx: np.ndarray, sign: np.ndarray, n_users: int, n_pairs: int,
                rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-J SVD of the sparse sign matrix: (Lambda (U, J), Phi (J, P), singular values (J,), descending)."""
    matrix = scipy.sparse.csr_matrix((sign.astype(np.float64), (user_idx, pair_idx)), shape=(n_users, n_pairs))
    if rank >= min(n_users, n_pairs):
        raise ValueError(f"rank J={rank} must be smaller than both the number of users ({n_users}) and of "
                         f"item pairs ({n_pairs}) in the training matrix")
    u, s, vt = scipy.sparse.linalg.svds(matrix, k=rank, random_state=0)  # ARPACK: sparse-aware
    order = np.argsort(s)[::-1]
    u, s, vt = u[:, order], s[order], vt[order]
    root = np.sqrt(s)
    return (u * root).astype(np.float32), (root[:, None] * vt).astype(np.float32), s.astype(np.float32)


def ridge_head(pair_features: Tensor, targets: Tensor, ridge: float) -> Tensor:
    """W (J, D) minimizing ||pair_features W^T - targets||^2 + ridge ||W||^2; pair_features (P, D), targets (P, J).

    Solved in whichever of the primal (D x D) or dual (P x P) forms is smaller.
    """
    x = pair_features.double()
    p, d = x.shape
    if d <= p:
        gram = x.T @ x + ridge * torch.eye(d, dtype=x.dtype)
        return torch.linalg.solve(gram, x.T @ targets.double()).T.float()
    gram = x @ x.T + ridge * torch.eye(p, dtype=x.dtype)
    return (x.T @ torch.linalg.solve(gram, targets.double())).T.float()


def newton_logistic(diffs: Tensor, owner: Tensor, n_users: int, beta: float, steps: int) -> Tensor:
    """argmin over lambda_u of sum_i -log sigmoid(lambda_u^T d_i) + beta/2 ||lambda_u||^2, for all users at once.

    diffs (P, J): phi(x, y+) - phi(x, y-) of each pair; owner (P,) its user in [0, n_users). Newton steps with
    the per-user Hessian sum_i s_i (1 - s_i) d_i d_i^T + beta I, stacked as (U, J, J) and solved together.
    """
    j = diffs.shape[1]
    lam = torch.zeros(n_users, j, dtype=torch.float64)
    d = diffs.double()
    outer = d[:, :, None] * d[:, None, :]                                   # (P, J, J)
    eye = torch.eye(j, dtype=torch.float64)
    for _ in range(steps):
        s = torch.sigmoid((lam[owner] * d).sum(-1))                         # (P,)
        grad = torch.zeros_like(lam).index_add_(0, owner, (s - 1.0)[:, None] * d) + beta * lam
        hess = torch.zeros(n_users, j, j, dtype=torch.float64).index_add_(
            0, owner, (s * (1.0 - s))[:, None, None] * outer) + beta * eye   # (U, J, J)
        lam = lam - torch.linalg.solve(hess, grad)
    return lam.float()


@methods.register("pref")
class PReF(PersonalizedRewardModel):
    """PReF: SVD-initialized logistic reward factorization with L2 user vectors; new users by Newton."""

    needs = frozenset({cap.FEATURES, cap.SHARED_PAIRS})
    linear_in_features = True
    user_state = ("user_vectors",)

    @dataclass
    class Config(MethodConfig):
        rank: int = opt(8, "J, the number of base reward functions (papers/001 app. F: 8 on PRISM).")
        init: Literal["svd", "random"] = opt("svd", "Algorithm 1's SVD initialization, or 'random' (the "
                                             "paper's 'No SVD' ablation).")
        beta: float = opt(0.02, "L2 weight beta/2 ||lambda||^2 on user vectors (papers/002 Table 3: 0.02); "
                          "0 is the 'No Reg.' ablation.")
        lr: float = opt(1e-3, "Adam learning rate of the MLE refinement (papers/002 Table 3).")
        head_ridge: float = opt(1e-3, "Ridge of the least-squares fit of the head W to the SVD pair factors.")
        adapt_beta: float = opt(0.02, "L2 weight of new users' logistic regression (eq. 5); > 0 keeps the "
                                "solution finite when a user's few pairs are separable.")
        adapt_steps: int = opt(20, "Newton steps of new-user adaptation (the problem is concave).")

        def __post_init__(self) -> None:
            if self.adapt_beta <= 0:
                raise ValueError(f"adapt_beta must be > 0, got {self.adapt_beta}")

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        self.phi = nn.Linear(feature_dim, config.rank, bias=False)                   # W: (J, D)
        self.user_vectors = nn.Parameter(0.1 * torch.randn(n_users, config.rank))   # Lambda: (U, J)
        self.register_buffer("singular_values", torch.zeros(config.rank))          # the SVD spectrum

    def item_embedding(self, h: Tensor) -> Tensor:
        return self.phi(h)  # phi(x, y): (N, J)

    def user_reward(self, z: Tensor, user_idx: Tensor) -> Tensor:
        return (z * self.user_vectors[user_idx]).sum(-1)  # lambda_u^T phi: (N,)

    def regularization(self, batch: dict) -> Tensor:
        return 0.5 * self.config.beta * self.user_vectors[batch["user_idx"]].pow(2).sum(-1).mean()

    def on_fit_start(self) -> None:
        if self.config.init == "svd":
            self.initialize_from_svd(self.trainer.datamodule)

    @torch.no_grad()
    def initialize_from_svd(self, dm) -> None:
        """Algorithm 1, steps 2-5, on the seen users' train pairs."""
        from plrm.data.splits import TRAIN

        pm = dm.pair_matrix(dm.split.rows(TRAIN))
        user_vectors, pair_factors, singular = svd_factors(pm.user_idx, pm.pair_idx, pm.sign, pm.n_users,
                                                           pm.n_pairs, self.config.rank)
        backbone = dm.prepared.backbone
        y1 = self.encode(backbone.inputs(torch.from_numpy(pm.y1_item)).to(self.device))
        y2 = self.encode(backbone.inputs(torch.from_numpy(pm.y2_item)).to(self.device))
        head = ridge_head((y1 - y2).cpu(), torch.from_numpy(pair_factors).T, self.config.head_ridge)  # (J, D)
        self.phi.weight.copy_(head)
        self.user_vectors.copy_(torch.from_numpy(user_vectors))
        self.singular_values.copy_(torch.from_numpy(singular))

    @torch.no_grad()
    def adapt(self, support: dict, users: Tensor) -> None:
        """L2-regularized logistic regression for every user in ``users`` (sorted) at once, phi frozen."""
        diffs = self.embedding_difference(support).cpu()                  # phi(x, y+) - phi(x, y-): (P, J)
        owner = torch.searchsorted(users, support["user_idx"]).cpu()
        fitted = newton_logistic(diffs, owner, len(users), self.config.adapt_beta, self.config.adapt_steps)
        self.user_vectors[users] = fitted.to(self.user_vectors.device)
