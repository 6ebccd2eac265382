"""PReF: personalized reward factorization (Shenfeld et al., "Language Model Personalization via Reward
Factorization", arXiv 2503.06358, §4, Algorithm 1, eq. 4-5, Table 3; Rezk et al., arXiv 2512.23067, App. D).

    P(y1 > y2 | x, user i) = sigmoid(lambda_i^T (phi(x, y1) - phi(x, y2)))       phi(x, y) = W e(x, y) in R^J

Training (Algorithm 1):
1. the users x item-pairs matrix A of observed preferences (+1 / -1, 0 where unobserved) gets a rank-J
   truncated SVD A ~ U S V^T; Lambda = U S^1/2 (user vectors) and Phi = S^1/2 V^T (a J-vector per pair);
2. the pointwise head W is fit to Phi by bias-free least squares, W (e(y1) - e(y2)) ~ Phi_p (Rezk et al.
   app. D), so phi(x, y) scores a single response, as accuracy and reward-guided decoding need;
3. W and Lambda are refined jointly by maximum likelihood (eq. 4) with an L2 penalty beta/2 ||lambda||^2 on
   the user vectors, which fixes the scale ambiguity Lambda^T Phi = Lambda^T R^-1 R Phi (§4.1).
New users: L2-regularized logistic regression for lambda with phi frozen (concave), solved for all users at
once by Newton's method on the stacked (U, J) problem -- batched J x J solves, no loop over users.

Shared: ``phi`` (W). Per user: ``user_vectors`` (U, J). ``init: random`` is the paper's "No SVD" ablation and
``beta: 0`` its "No Reg." one (Figure 3A). ``rank: elbow`` picks J at the elbow of the training matrix's
singular-value spectrum (§5.4: the best J "aligns with the elbow point" of Figure 9); the spectrum is computed
in every run and reported in results.json (``diagnostics``).

Active learning (Algorithm 2, Lemma 4.3): :meth:`PReF.uncertainty` scores a new user's candidate pairs
d = phi(x, y1) - phi(x, y2) with H = sum sigma'(lambda^T d_s) d_s d_s^T + beta I over the pairs they have
answered, at the current estimate lambda: ||d||_{H^-1} (eq. 8) or, by default, the information gain
log(1 + sigma'(lambda^T d) ||d||^2_{H^-1}) (see ``acquisition``); plrm.eval.active runs the session.
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
from plrm.methods.base import MethodConfig, PersonalizedRewardModel, SeenUsersData
from plrm.registry import methods

DENSE_SVD_MAX_ENTRIES = 4_000_000  # users x item pairs up to which the sign matrix is decomposed densely (32 MB)


def svd_factors(user_idx: np.ndarray, pair_idx: np.ndarray, sign: np.ndarray, n_users: int, n_pairs: int,
                rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-J SVD of the sparse sign matrix: (Lambda (U, J), Phi (J, P), singular values (J,), descending)."""
    matrix = scipy.sparse.csr_matrix((sign.astype(np.float64), (user_idx, pair_idx)), shape=(n_users, n_pairs))
    if rank >= min(n_users, n_pairs):
        raise ValueError(f"rank J={rank} must be smaller than both the number of users ({n_users}) and of "
                         f"item pairs ({n_pairs}) in the training matrix")
    # Deterministic solvers only: ARPACK (svds' default) returns different vectors on identical input from one call
    # to the next when singular values repeat -- as on sparse data, where every user labels their own pairs and
    # each user's row gives sqrt(their pair count) -- which made PReF's results depend on what ran before it.
    if n_users * n_pairs <= DENSE_SVD_MAX_ENTRIES:  # LAPACK on the dense matrix: exact and reproducible
        u, s, vt = np.linalg.svd(matrix.toarray(), full_matrices=False)
        u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    else:  # PROPACK (sparse-aware; seeded start vector, same output for the same input)
        u, s, vt = _propack(matrix, rank)
    order = np.argsort(s)[::-1]
    u, s, vt = u[:, order], s[order], vt[order]
    root = np.sqrt(s)
    return (u * root).astype(np.float32), (root[:, None] * vt).astype(np.float32), s.astype(np.float32)


PROPACK_WORK_BYTES = 2 * 2**30  # the Lanczos bases PROPACK allocates: (users + pairs) x steps float64 numbers


def _propack(matrix, rank: int):
    """PROPACK's rank-J SVD. Its default budget of 10 J Lanczos steps runs out on spectra with a long flat tail
    (a dense world of 2,000 users x 6,000 pairs, each pair labelled by 100 users, needs more for J = 20); then it
    runs again with 4, 16 and 64 times that budget, capped by the matrix's smaller side and by the memory of the
    Lanczos bases (PROPACK_WORK_BYTES)."""
    m, n = matrix.shape
    cap = min(m, n, PROPACK_WORK_BYTES // (8 * (m + n)))
    default = 10 * rank  # svds' own budget (maxiter=None)
    budgets = [None, *sorted(b for b in {min(cap, default * f) for f in (4, 16, 64)} if b > default)]
    for budget in budgets:
        try:
            return scipy.sparse.linalg.svds(matrix, k=rank, solver="propack", random_state=0, maxiter=budget)
        except np.linalg.LinAlgError as exc:
            error = exc
    raise np.linalg.LinAlgError(
        f"PReF's SVD init: the top {rank} singular vectors of the {m} x {n} training sign matrix did not converge "
        f"in {budgets[-1] or default} Lanczos steps ({error}); set a smaller rank (method option rank: J) or "
        "init: random")


def elbow(values: np.ndarray) -> int:
    """Components before the elbow of a descending spectrum: the point farthest below the chord joining the
    first and last values, on axes scaled to [0, 1] (the "kneedle" rule, Satopaa et al. 2011), so a spectrum
    [10, 9, 8, 7, 1, 1, 1] keeps 4. Hand-written: ten lines do not justify a dependency on ``kneed``."""
    s = np.asarray(values, dtype=np.float64)
    if len(s) < 3 or s[0] <= s[-1]:
        return len(s)
    x = np.linspace(0.0, 1.0, len(s))
    y = (s - s[-1]) / (s[0] - s[-1])
    return max(1, int(np.argmax((1.0 - x) - y)))


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


def logistic_hessian(diffs: Tensor, owner: Tensor, lam: Tensor, beta: float) -> Tensor:
    """H_u = sum_{i of u} sigma'(lambda_u^T d_i) d_i d_i^T + beta I for every user at once: (U, J, J), float64
    (PReF eq. 7)."""
    d = diffs.double()
    s = torch.sigmoid((lam.double()[owner] * d).sum(-1))
    weighted = (s * (1.0 - s))[:, None] * d                                   # (P, J)
    outer = weighted[:, :, None] * d[:, None, :]                             # (P, J, J)
    j = diffs.shape[1]
    return torch.zeros(len(lam), j, j, dtype=torch.float64).index_add_(0, owner, outer) \
        + beta * torch.eye(j, dtype=torch.float64)


def newton_logistic(diffs: Tensor, owner: Tensor, n_users: int, beta: float, steps: int) -> Tensor:
    """argmin over lambda_u of sum_i -log sigmoid(lambda_u^T d_i) + beta/2 ||lambda_u||^2, for all users at once.

    diffs (P, J): phi(x, y+) - phi(x, y-) of each pair; owner (P,) its user in [0, n_users). Newton steps with
    the per-user Hessian sum_i s_i (1 - s_i) d_i d_i^T + beta I, stacked as (U, J, J) and solved together.
    """
    lam = torch.zeros(n_users, diffs.shape[1], dtype=torch.float64)
    d = diffs.double()
    for _ in range(steps):
        s = torch.sigmoid((lam[owner] * d).sum(-1))                         # (P,)
        grad = torch.zeros_like(lam).index_add_(0, owner, (s - 1.0)[:, None] * d) + beta * lam
        lam = lam - torch.linalg.solve(logistic_hessian(d, owner, lam, beta), grad)
    return lam.float()


@methods.register("pref")
class PReF(PersonalizedRewardModel):
    """PReF: SVD-initialized logistic reward factorization with L2 user vectors; new users by Newton."""

    needs = frozenset({cap.FEATURES, cap.USERS, cap.SHARED_PAIRS})
    linear_in_features = True
    trains_on_differences = True  # loss and penalty read pairs only as e+ - e- (difference_cache)
    user_state = ("user_vectors",)

    @dataclass
    class Config(MethodConfig):
        rank: int | Literal["elbow"] = opt(
            8, "J, the number of base reward functions (Rezk et al. App. F: 8 on PRISM), or 'elbow': the elbow "
            "of the training matrix's singular-value spectrum (PReF §5.4, Figure 9).", min=1)
        spectrum_size: int = opt(20, "Leading singular values of the training sign matrix computed and "
                                 "reported (results.json diagnostics); rank: elbow searches among them.", min=1)
        init: Literal["svd", "random"] = opt("svd", "Algorithm 1's SVD initialization, or 'random' (the "
                                             "paper's 'No SVD' ablation).")
        beta: float = opt(0.02, "L2 weight beta/2 ||lambda||^2 on user vectors (PReF Table 3: 0.02); "
                          "0 is the 'No Reg.' ablation.", min=0)
        lr: float = opt(1e-3, "Adam learning rate of the MLE refinement (PReF Table 3).", gt=0)
        batch_size: int = opt(32, "Training pairs per step (PReF Table 3: 32; 64 on PRISM).", min=1)
        max_steps: int = opt(500, "Optimizer steps of the MLE refinement (PReF Table 3: 500; 1000 on "
                             "PRISM); -1: max_epochs decides.", min=1, also=(-1,))
        max_epochs: int = opt(-1, "Epochs over the seen users' train pairs (-1: max_steps decides).", min=1, also=(-1,))
        head_ridge: float = opt(1e-3, "Ridge of the least-squares fit of the head W to the SVD pair factors.", min=0)
        adapt_beta: float = opt(0.02, "L2 weight of new users' logistic regression (eq. 5); > 0 keeps the "
                                "solution finite when a user's few pairs are separable.", gt=0)
        acquisition: Literal["information", "hessian_norm"] = opt(
            "information", "Active-learning score of a candidate pair d. 'hessian_norm': ||d||_{H^-1}, PReF "
            "eq. 8 as written. 'information' (default): log(1 + sigma'(lambda^T d) ||d||^2_{H^-1}), the growth of "
            "log det H if d were answered -- eq. 7's Hessian with the candidate's own sigma' weight. Eq. 8 omits "
            "that weight, so once a user's answers are separable it prefers the largest-||d|| pairs, whose answers "
            "are already predictable; on the dense low-rank world it never reaches random selection's 40-answer "
            "accuracy within 40 answers, 'information' does in 12 (benchmarks/results/pref_dense.md).")
        adapt_steps: int = opt(20, "Newton steps of new-user adaptation (the problem is concave).", min=0)

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        self.spectrum: list[float] = []  # leading singular values of the training matrix (set by before_fit)
        self._set_rank(1 if config.rank == "elbow" else config.rank)  # elbow: resized in before_fit()

    def _set_rank(self, rank: int) -> None:
        self.n_basis = rank
        self.phi = nn.Linear(self.feature_dim, rank, bias=False)                        # W: (J, D)
        self.user_vectors = nn.Parameter(0.1 * torch.randn(self.n_users, rank))         # Lambda: (U, J)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A checkpoint of ``rank: elbow`` has the J its run chose: take that size before loading."""
        if self.config.rank == "elbow" and "phi.weight" in state_dict:
            rank = state_dict["phi.weight"].shape[0]
            if rank != self.n_basis:
                self._set_rank(rank)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def item_embedding(self, h: Tensor) -> Tensor:
        return self.phi(h)  # phi(x, y): (N, J)

    def user_reward(self, z: Tensor, user_idx: Tensor) -> Tensor:
        return (z * self.user_vectors[user_idx]).sum(-1)  # lambda_u^T phi: (N,)

    def export_head(self) -> tuple[list[nn.Module], Tensor]:
        """``plrm export``: g = phi (W), W = the user vectors Lambda (U, J)."""
        return [self.phi], self.user_vectors.detach()

    def regularization(self, batch: dict) -> Tensor:
        return 0.5 * self.config.beta * self.user_vectors[batch["user_idx"]].pow(2).sum(-1).mean()

    def diagnostics(self) -> dict:
        return {"rank": self.n_basis, "rank_rule": "elbow" if self.config.rank == "elbow" else "fixed",
                "init": self.config.init, "singular_values": self.spectrum}

    @torch.no_grad()
    def before_fit(self, seen: SeenUsersData) -> None:
        """Algorithm 1, steps 2-5, on the seen users' train pairs, before the optimizer exists (``rank: elbow``
        resizes the parameters); with init: random only the spectrum (and the elbow) is taken from the SVD."""
        pm = seen.pair_matrix()
        c = self.config
        size = min(c.spectrum_size, min(pm.n_users, pm.n_pairs) - 1)
        if c.rank != "elbow":
            size = max(size, c.rank)  # svd_factors says so when J itself does not fit the matrix
        user_vectors, pair_factors, singular = svd_factors(pm.user_idx, pm.pair_idx, pm.sign, pm.n_users,
                                                           pm.n_pairs, size)               # (U, J'), (J', P), (J',)
        self.spectrum = [float(v) for v in singular]
        rank = elbow(singular) if c.rank == "elbow" else c.rank
        if rank != self.n_basis:
            self._set_rank(rank)
        if c.init != "svd":
            return
        y1 = self.encode(seen.item_inputs(torch.from_numpy(pm.y1_item)))                   # (P, D)
        y2 = self.encode(seen.item_inputs(torch.from_numpy(pm.y2_item)))                   # (P, D)
        head = ridge_head((y1 - y2).cpu(), torch.from_numpy(pair_factors[:rank]).T, c.head_ridge)  # W: (J, D)
        self.phi.weight.copy_(head)
        self.user_vectors.copy_(torch.from_numpy(user_vectors[:, :rank]))

    @torch.no_grad()
    def uncertainty(self, answered: dict, users: Tensor, candidates: dict) -> Tensor:
        """Acquisition score of each candidate pair d for its user (candidates' ``user_idx``), from H_u, the
        regularized Hessian (eq. 7) at the user's current lambda over the pairs in ``answered``: ||d||_{H_u^-1}
        (eq. 8, Lemma 4.3) or the log-det information gain (``acquisition``); ``users`` (sorted) are the
        users in the session."""
        lam = self.user_vectors[users].detach().cpu()
        d_answered = self.embedding_difference(answered).cpu() if len(answered["user_idx"]) else \
            torch.zeros(0, self.n_basis)
        owner = torch.searchsorted(users, answered["user_idx"]).cpu()
        hess = logistic_hessian(d_answered, owner, lam, self.config.adapt_beta)              # (U, J, J)
        chol = torch.linalg.cholesky(hess)
        d = self.embedding_difference(candidates).cpu().double()                               # (C, J)
        who = torch.searchsorted(users, candidates["user_idx"]).cpu()
        # ||d||^2_{H^-1} = ||L^-1 d||^2 with H = L L^T: one triangular solve per candidate, batched
        solved = torch.linalg.solve_triangular(chol[who], d[:, :, None], upper=False)[..., 0]
        sq_norm = solved.pow(2).sum(-1)                                                        # ||d||^2_{H^-1}
        if self.config.acquisition == "hessian_norm":
            return sq_norm.sqrt().float()
        p = torch.sigmoid((lam.double()[who] * d).sum(-1))
        return torch.log1p(p * (1.0 - p) * sq_norm).float()  # log det H_{t+1} - log det H_t

    @torch.no_grad()
    def adapt(self, support: dict, users: Tensor) -> None:
        """L2-regularized logistic regression for every user in ``users`` (sorted) at once, phi frozen."""
        diffs = self.embedding_difference(support).cpu()                  # phi(x, y+) - phi(x, y-): (P, J)
        owner = torch.searchsorted(users, support["user_idx"]).cpu()
        fitted = newton_logistic(diffs, owner, len(users), self.config.adapt_beta, self.config.adapt_steps)
        self.user_vectors[users] = fitted.to(self.user_vectors.device)
