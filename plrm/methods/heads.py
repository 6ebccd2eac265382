"""Stacked per-user reward heads: one head per user as ``(U, ...)`` parameter tensors, never a module per user.

    linear   r_u(z) = v_u . z                                   v: (U, D)
    mlp      r_u(z) = w2_u . act(W1_u^T z + b1_u) + b2_u        W1: (U, D, H), b1: (U, H), w2: (U, H), b2: (U,)

Individual RM, MPU / MPU-Avg, Similar-user RM and Further-FT (the baselines of "When Personalization Meets
Reality", Dong et al., arXiv 2502.19158, §3.2 and §5, and "The Reward Model Selection Crisis in Personalized
Alignment", Rezk et al., arXiv 2512.23067, §6) are these heads on different backbones and training regimes.

How rows are scored, without a Python loop over users:

* linear heads gather each row's ``v_u`` and take a row-wise dot product, O(N D); every user on every item is one
  ``(N, D) @ (D, U)`` GEMM (:meth:`PerUserHeads.all_users`);
* MLP heads group the rows by user, pad them to ``(U_b, S, D)`` and apply each user's first layer with one
  ``bmm`` against ``W1[users]`` ``(U_b, D, H)``. Gathering ``W1`` per row instead would hold N x D x H numbers
  (4096 x 64 floats, 1 MiB, per row at D = 4096).

Every head starts from one seeded initialisation shared by all users (``shared_init``), so that a parameter
average over users (MPU-Avg's new-user head) is an average of heads trained from the same point. Memory:
U (D H + 2 H + 1) parameters, three times that with Adam's state: 1,000 users x 4096 x 64 is 1 GiB in fp32.

Measured against a ModuleList of per-user heads (benchmarks/bench_heads.py, 1,000 users, D = 4096, H = 16):
scoring every user is 1.3x faster, but a training step is slower -- 0.9x on random batches (padding each user's
few rows), 0.2x on 32-user batches (Adam, even torch's fused one, updates every user's row; before plrm used the
fused kernel: 0.7x and 0.1x) -- so row-sparse Adam is the next step.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plrm.methods.meta import pad_groups
from plrm.methods.peruser import fit_per_user_sets

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh,
                                                       "leaky_relu": lambda x: F.leaky_relu(x, 0.2)}

Heads = dict[str, Tensor]  # parameter name -> (U_b, ...) rows of some users


def group_rows(user_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The distinct users of ``user_idx`` (U_b,) and each one's row positions padded to (U_b, S) with a mask."""
    users, group = torch.unique(user_idx, return_inverse=True)
    index, mask = pad_groups(group, len(users))
    return users, index, mask


class PerUserHeads(nn.Module):
    """``n_users`` reward heads on ``dim``-dimensional inputs: linear (``hidden=0``) or a one-hidden-layer MLP."""

    def __init__(self, n_users: int, dim: int, hidden: int = 0, activation: str = "relu", init: str = "shared",
                 seed: int = 0) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if init not in ("shared", "zeros"):
            raise ValueError(f"init must be 'shared' (one seeded head copied to every user) or 'zeros', got {init!r}")
        if init == "zeros" and hidden:
            raise ValueError("init='zeros' is for linear heads only: an all-zero MLP head has zero gradients")
        self.n_users, self.dim, self.hidden, self.activation = n_users, dim, hidden, activation
        self.act = ACTIVATIONS[activation]
        one = self.initial_head(seed) if init == "shared" else {n: torch.zeros(s) for n, s in self.shapes().items()}
        for name, value in one.items():
            stacked = value.expand(n_users, *value.shape).clone()
            if name in self.FIXED:
                self.register_buffer(name, stacked)
            else:
                self.register_parameter(name, nn.Parameter(stacked))

    # b2 cancels in r_u(z+) - r_u(z-): every loss these heads train on is pairwise, so its gradient is zero up to
    # rounding, and Adam, which divides by the gradient's running scale, turns that noise into steps of about lr
    # (a random walk of each user's offset). It stays at the shared initialisation, a buffer (same state-dict
    # name), so the reward keeps the MLP's form without a parameter no data determines.
    FIXED = ("b2",)

    @property
    def is_linear(self) -> bool:
        return self.hidden == 0

    @property
    def names(self) -> tuple[str, ...]:
        """The per-user parameter names (each (U, ...)), in the order of :meth:`shapes`."""
        return tuple(self.shapes())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """One user's parameter shapes."""
        if self.is_linear:
            return {"weight": (self.dim,)}
        return {"w1": (self.dim, self.hidden), "b1": (self.hidden,), "w2": (self.hidden,), "b2": ()}

    def initial_head(self, seed: int) -> Heads:
        """One head drawn as ``nn.Linear`` draws its weights (uniform, bound 1/sqrt(fan_in)), from ``seed``."""
        g = torch.Generator().manual_seed(seed)

        def uniform(shape: tuple[int, ...], fan_in: int) -> Tensor:
            bound = 1.0 / math.sqrt(fan_in)
            return (torch.rand(shape, generator=g) * 2 - 1) * bound

        return {name: uniform(shape, self.dim if name in ("weight", "w1", "b1") else self.hidden)
                for name, shape in self.shapes().items()}

    # ---- reading heads --------------------------------------------------------------------------------------
    def rows(self, users: Tensor) -> Heads:
        """The heads of ``users`` (U_b,): name -> (U_b, ...)."""
        return {name: getattr(self, name)[users] for name in self.names}

    def mean_head(self, users: Tensor | None = None) -> Heads:
        """The element-wise mean of the heads of ``users`` (all users when None): name -> one user's shape."""
        return {name: (getattr(self, name) if users is None else getattr(self, name)[users]).mean(0)
                for name in self.names}

    @torch.no_grad()
    def write(self, users: Tensor, heads: Heads) -> None:
        """Set the heads of ``users``; ``heads`` holds (U_b, ...) rows or one head broadcast to all of them."""
        for name in self.names:
            getattr(self, name)[users] = heads[name].to(getattr(self, name).dtype)

    # ---- scoring -----------------------------------------------------------------------------------------
    def score(self, heads: Heads, z: Tensor) -> Tensor:
        """Rewards (U_b, S) of padded inputs z (U_b, S, D) under the heads (U_b, ...) of U_b users: the one
        formula, used by :meth:`forward` and by fitting."""
        if self.is_linear:
            return torch.bmm(z, heads["weight"].unsqueeze(-1)).squeeze(-1)            # (U_b, S)
        hidden = self.act(torch.bmm(z, heads["w1"]) + heads["b1"].unsqueeze(1))      # (U_b, S, H)
        return torch.bmm(hidden, heads["w2"].unsqueeze(-1)).squeeze(-1) + heads["b2"].unsqueeze(1)

    def forward(self, z: Tensor, user_idx: Tensor) -> Tensor:
        """Reward (N,) of rows z (N, D) for users ``user_idx`` (N,)."""
        if self.is_linear:
            return (z * self.weight[user_idx]).sum(-1)
        users, index, mask = group_rows(user_idx)
        if 2 * len(users) > self.n_users:
            # most users are present (a random batch): pad over every user and use the parameters themselves;
            # gathering their rows would copy nearly all of them (U_b x D x H) and scatter the gradient back
            index, mask = pad_groups(user_idx, self.n_users)                          # (U, S)
            padded = self.score({name: getattr(self, name) for name in self.names}, z[index])
        else:
            padded = self.score(self.rows(users), z[index])                           # (U_b, S)
        out = z.new_empty(len(z), dtype=padded.dtype)
        out[index[mask]] = padded[mask]
        return out

    def all_users(self, z: Tensor, users: Tensor | None = None) -> Tensor:
        """Rewards (N, U) of every row of z (N, D) under the heads of ``users`` (all when None)."""
        users = torch.arange(self.n_users, device=z.device) if users is None else users
        heads = self.rows(users)
        if self.is_linear:
            return z @ heads["weight"].T                                              # (N, D) @ (D, U)
        n_users, dim, width = heads["w1"].shape
        w1 = heads["w1"].permute(1, 0, 2).reshape(dim, n_users * width)              # (D, U*H): one 2-D GEMM
        hidden = self.act((z @ w1).view(len(z), n_users, width) + heads["b1"])      # (N, U, H)
        return (hidden * heads["w2"]).sum(-1) + heads["b2"]                          # (N, U)

    # ---- fitting -------------------------------------------------------------------------------------------
    def fit(self, init: Heads, users: Tensor, chosen: Tensor, rejected: Tensor, owner: Tensor, steps: int,
            lr: float, l2: float = 0.0) -> Heads:
        """Heads (U_b, ...) of ``users`` fitted from ``init`` (U_b, ...) on their pairs, every other tensor
        untouched (and ``b2``, which no pair loss sees, kept at ``init``): each user's mean Bradley-Terry NLL
        -log sigmoid(r_u(z+) - r_u(z-)) + l2 ||theta_u||^2, all users at once, full batch
        (plrm.methods.peruser.fit_per_user_sets). ``chosen`` / ``rejected``: (P, D) inputs of the pairs;
        ``owner`` (P,): each pair's position in ``users``."""
        index, mask = pad_groups(owner, len(users))                                   # (U_b, S)
        both = torch.cat([chosen[index], rejected[index]], 1)                         # (U_b, 2S, D)
        s = index.shape[1]
        weight = mask / mask.sum(1, keepdim=True).clamp_min(1)                        # per-user mean

        def user_losses(heads: Heads) -> Tensor:
            r = self.score(heads, both)                                               # (U_b, 2S)
            return (-F.logsigmoid(r[:, :s] - r[:, s:]) * weight).sum(1)               # (U_b,)

        fixed = {name: init[name] for name in self.FIXED if name in init}
        fitted = fit_per_user_sets({name: v for name, v in init.items() if name not in fixed},
                                   lambda heads: user_losses({**heads, **fixed}), steps=steps, lr=lr, l2=l2)
        return {**fitted, **{name: v.detach() for name, v in fixed.items()}}
