"""MPU and MPU-Avg: a shared backbone and one MLP reward head per user ("The Reward Model Selection Crisis in
Personalized Alignment", Rezk et al., arXiv 2512.23067, §6 "MPU/MPU-Avg (a simple baselines of per-user MLPs)";
App. F.1 hyperparameters).

    r_u(x, y) = MLP_u(h(x, y)) = w2_u . act(W1_u^T h + b1_u) + b2_u    W1: (U, D, H), b1: (U, H), w2: (U, H), b2: (U,)

Seen users: the backbone h (a frozen encoder, or a LoRA transformer whose adapters train jointly at the
backbone's own lr, ``backbone.lr``; the paper: 5e-5) and every seen user's head minimize the Bradley-Terry NLL
-log sigmoid(r_u(x, y+) - r_u(x, y-)) of each user's own pairs. All heads start from one seeded initialisation
(``nn.Linear``'s, drawn once and copied to every user), which makes a parameter average over users meaningful.
New users: a head fitted on the support pairs with the backbone and every other head frozen, started from

* ``shared`` (MPU): that shared initialisation;
* ``mean_params`` (MPU-Avg): the element-wise mean of the SEEN users' trained heads.

``adapt_steps: 0`` serves the starting head itself (MPU-Avg: the plain averaged head). The two registered names
differ only in the default of ``new_user_init``; on seen users they are the same model.

Heads are stacked tensors (plrm.methods.heads.PerUserHeads), scored with one ``bmm`` over user-grouped rows and
fitted for all new users at once; per-user state: ``heads.w1``, ``heads.b1``, ``heads.w2``, ``heads.b2``. Shared
buffers: ``init_head.*`` (the shared initialisation) and ``seen_mean_head.*`` (the seen users' mean head, set
after training and before each validation epoch from the seen users the runner names), so that a checkpoint
alone adapts new users (``plrm adapt --pairs`` builds a model of the new users only).

Beyond the paper, whose MPU description is the one sentence above and whose code is not public:
the head shape (one hidden layer of ``hidden`` units, ReLU) is not published, and MPU-Avg's meaning (a warm start
at the mean head, then the same adaptation) is our reading: it predicts the paper's pattern, MPU-Avg ahead of
MPU most where users have the fewest pairs (PRISM 60.43 vs 52.76; TL;DR 77.83 vs 76.76, Tables 2 and 3). The
alternative reading, the mean of the seen heads' *outputs* with no training, is not offered: that reward is a
head of U_seen x H hidden units, which neither fits a user's row nor survives a checkpoint of new users only.
Training draws random pair batches; with Adam, a seen user's head absent from a batch still moves by its momentum.

Measured on the low-rank world (D = 16, K = 4, Dirichlet(0.05) users, 100 seen users x 50 pairs, H = 16, lr 1e-2,
50 epochs; tests/methods/test_mpu.py): seen 0.984 vs Global RM 0.778; unseen at k = 3: MPU 0.765, MPU-Avg 0.846,
MPU-Avg with 0 steps 0.795 vs the non-personalized oracle 0.789.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from plrm.config import opt
from plrm.methods.base import AdaptConfig, MethodConfig, PersonalizedRewardModel, SeenUsersData
from plrm.methods.heads import ACTIVATIONS, Heads, PerUserHeads
from plrm.registry import methods

NEW_USER_INIT_HELP = ("Where a new user's head starts before adaptation: 'shared' (MPU: the initialisation every "
                      "head started from) or 'mean_params' (MPU-Avg: the element-wise mean of the seen users' "
                      "trained heads).")


def head_buffers(head: Heads) -> nn.Module:
    """One head held as persistent buffers of a small module (state-dict names ``<module>.w1`` ...)."""
    holder = nn.Module()
    for name, value in head.items():
        holder.register_buffer(name, value.clone())
    return holder


def buffers_of(holder: nn.Module) -> Heads:
    return dict(holder.named_buffers())


@methods.register("mpu")
class MPU(PersonalizedRewardModel):
    """MPU: shared backbone + per-user MLP heads from one initialisation; new users from that initialisation."""

    user_state = ("heads.w1", "heads.b1", "heads.w2", "heads.b2")
    joint_pair_scoring = True  # both sides in one grouped bmm

    @dataclass
    class Config(MethodConfig, AdaptConfig):
        hidden: int = opt(64, "H, hidden units of each user's MLP head (not published by Rezk et al.; 64 is our "
                              "choice: the head holds D H + 2 H + 1 numbers per user, three times that with "
                              "Adam's state).", min=1)
        activation: str = opt("relu", "Activation of the heads' hidden layer (not published; ReLU).",
                              choices=tuple(ACTIVATIONS))
        lr: float = opt(1e-3, "Adam learning rate of the heads (Rezk et al. App. F.1: decoder LR 1e-3); a LoRA "
                              "backbone's adapters train at backbone.lr (the paper: 5e-5).", gt=0)
        new_user_init: Literal["shared", "mean_params"] = opt("shared", NEW_USER_INIT_HELP)
        adapt_lr: float = opt(1e-3, "Adam learning rate of a new user's head (the decoder LR of Rezk et al. App. "
                                    "F.1, 1e-3). On the 16-d low-rank world (k = 3) 1e-2 was about 1 point better: "
                                    "MPU 0.776 vs 0.765, MPU-Avg 0.858 vs 0.846.", gt=0)
        adapt_steps: int = opt(100, "Full-batch Adam steps of a new user's head on their support pairs (not "
                                    "published; 0: the starting head itself). At lr 1e-3 on the 16-d low-rank "
                                    "world (k = 3), 30 / 100 / 300 steps: MPU 0.687 / 0.765 / 0.773, MPU-Avg "
                                    "0.824 / 0.846 / 0.860.", min=0)

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        seed = int(torch.randint(2**31 - 1, ()))  # from the run's seeded RNG: one head init per training seed
        self.heads = PerUserHeads(n_users, feature_dim, config.hidden, config.activation, seed=seed)
        first = self.heads.initial_head(seed)
        self.init_head = head_buffers(first)       # the shared initialisation, kept for new users
        self.seen_mean_head = head_buffers(first)  # the seen users' mean head; before training, the same head

    def user_reward(self, z: Tensor, user_idx: Tensor) -> Tensor:
        return self.heads(z, user_idx)  # MLP_u(h): (N,)

    def reward_table(self, z: Tensor, users: Tensor) -> Tensor:
        return self.heads.all_users(z, users)  # (I, U_b): one GEMM (D x U*H) instead of a gather per row

    @torch.no_grad()
    def fit_seen_users(self, seen: SeenUsersData) -> None:
        """The mean of the seen users' heads (theirs only: other rows are unseen users, at the initialisation
        or adapted), for MPU-Avg's new users."""
        if len(seen.users):
            for name, value in self.heads.mean_head(seen.users).items():
                getattr(self.seen_mean_head, name).copy_(value)

    def start_head(self) -> Heads:
        """The head a new user starts from (``new_user_init``)."""
        return buffers_of(self.seen_mean_head if self.config.new_user_init == "mean_params" else self.init_head)

    @torch.no_grad()
    def adapt(self, support: dict, users: Tensor) -> None:
        """Each new user's head (``users`` sorted), from the starting head, on their support pairs' mean BT NLL,
        the backbone and every other head frozen; all users at once (PerUserHeads.fit)."""
        c = self.config
        start = {name: value.expand(len(users), *value.shape) for name, value in self.start_head().items()}
        if c.adapt_steps:
            z_chosen, z_rejected = self.embed_pairs(support)                          # (P, D) each
            owner = torch.searchsorted(users, support["user_idx"])                    # position in `users`
            start = self.heads.fit(start, users, z_chosen, z_rejected, owner, c.adapt_steps, c.adapt_lr, c.adapt_l2)
        self.heads.write(users, start)


@methods.register("mpu_avg")
class MPUAvg(MPU):
    """MPU-Avg: MPU whose new users start from the mean of the seen users' heads."""

    @dataclass
    class Config(MPU.Config):
        new_user_init: Literal["shared", "mean_params"] = opt("mean_params", NEW_USER_INIT_HELP)
