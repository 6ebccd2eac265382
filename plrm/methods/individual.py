"""Individual RM: one reward model per user, nothing shared ("When Personalization Meets Reality", Dong et al.,
arXiv 2502.19158, §3.2 "Individual RM"; App. A.1; Table 4's "Individual RM with full dataset" upper bound).

    r_u(x, y) = v_u^T h(x, y)                                  linear head (default); h: frozen features
    r_u(x, y) = w2_u^T act(W1_u^T h(x, y) + b1_u) + b2_u        ``hidden`` > 0: an MLP head per user

Each user's head minimizes their own objective, whatever the other users' data:

    L_u(theta_u) = mean_{(x, y+, y-) in D_u} -log sigmoid(r_u(x, y+) - r_u(x, y-)) + l2 ||theta_u||^2

Seen users: the heads are one stacked (U, ...) table (plrm.methods.heads.PerUserHeads) trained by Lightning. With
``balance_users`` each pair weighs 1/|D_u| (plrm.methods.losses.bradley_terry_nll) and the penalty is weighted
the same way, so the loss of a batch holding every train pair is (1/U_seen) sum_u L_u: each head gets exactly
its own gradient, scaled. The defaults make training the per-user routine (plrm.methods.peruser: Adam, lr 0.05,
l2 1e-2, 300 full-batch steps, zero-initialized linear heads): ``batch_size`` exceeds any dataset (one batch of
every pair per epoch) and ``max_steps`` is 300. Adam is invariant to the loss scale but for its epsilon, so the
trajectory is the per-user one with epsilon 1e-8 acting as 1e-8 * U_seen; measured on 100 users x 50 pairs
(D = 16) against PerUserHeads.fit: max |delta v| 3e-7 after 300 steps, for head entries up to 1.5
(tests/methods/test_individual.py). Smaller batches train on random pairs and are no longer independent per
user (dense Adam keeps moving the heads of users absent from a batch on their momentum).

New users: a fresh head (zeros for a linear head, the seeded shared initial head for an MLP) fitted on their k
support pairs by the same objective, ``adapt_steps`` full-batch Adam steps at ``lr`` with ``l2``
(PerUserHeads.fit, all users at once). No information comes from other users: this is "an Individual RM trained
on k pairs" (the paper gives Individual RM no cold-start protocol).

Deviation from the paper: its Individual RM is a LoRA-fine-tuned LLaMA-2-7B per user (their code trains one
adapter per user in a loop). Here the backbone is frozen and only the heads are per user, which scales to many
users; a trainable (LoRA) backbone is refused because it would be shared by all users.

Per-user state: ``heads.weight`` (U, D) (linear) or ``heads.w1``, ``heads.b1``, ``heads.w2``, ``heads.b2`` (MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from plrm.config import opt
from plrm.errors import RecipeError
from plrm.methods.base import MethodConfig, PersonalizedRewardModel
from plrm.methods.heads import ACTIVATIONS, Heads, PerUserHeads
from plrm.registry import methods

FULL_BATCH = 2**30  # more training pairs than any dataset holds: every pair in one batch


@dataclass
class HeadsConfig(MethodConfig):
    """Training of per-user heads on frozen features as the per-user routine (Individual RM, Similar-user RM)."""

    lr: float = opt(0.05, "Adam learning rate of the heads (calibrated on the low-rank world with l2 1e-2 and 300 "
                          "full-batch steps; Dong et al. App. A.1 train LoRA RMs at 3e-4).", gt=0)
    l2: float = opt(1e-2, "L2 penalty l2 ||theta_u||^2 on each user's head (calibrated with lr 0.05 on the "
                          "low-rank world; keeps a head finite on separable pairs).", min=0)
    batch_size: int = opt(FULL_BATCH, "Training pairs per step. The default exceeds any dataset: every train pair "
                                      "in one step, which makes training the per-user routine (each head its own "
                                      "problem).", min=1)
    max_steps: int = opt(300, "Adam steps (full-batch: epochs) of the seen users' heads (calibrated on the "
                              "low-rank world: 300).", min=1, also=(-1,))
    max_epochs: int = opt(-1, "Epochs over the seen users' train pairs (-1: max_steps decides).", min=1, also=(-1,))
    hidden: int = opt(0, "0: a linear head v_u per user; H > 0: a one-hidden-layer MLP head of H units per user "
                         "(U (D H + 2 H + 1) parameters, three times that with Adam's state).", min=0)
    activation: str = opt("relu", "Activation of the MLP heads' hidden layer.", choices=tuple(ACTIVATIONS))


@dataclass
class IndividualConfig(HeadsConfig):
    """Individual RM's options: the heads' training, and a new user's fresh head."""

    adapt_steps: int = opt(300, "Full-batch Adam steps fitting a new user's fresh head on their support pairs, at "
                                "lr with l2 (the seen users' 300: the same per-user problem on fewer pairs).", min=0)


@methods.register("individual")
class IndividualRM(PersonalizedRewardModel):
    """Individual RM: an independent linear (or MLP) reward head per user on frozen features."""

    Config = IndividualConfig

    def __init__(self, config: IndividualConfig, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        if any(p.requires_grad for p in self.encoder.parameters()):
            raise RecipeError(f"{type(self).__name__} trains one head per user on frozen features and shares "
                              "nothing; this backbone has trainable (e.g. LoRA) weights, which every user would "
                              "share. Use a frozen backbone (frozen_encoder or precomputed features)")
        self.linear_in_features = config.hidden == 0  # v_u^T h is linear in h: pairs scored from h+ - h-
        self.trains_on_differences = self.linear_in_features  # loss and penalty read pairs only as e+ - e-
        self.joint_pair_scoring = config.hidden > 0  # MLP heads: both sides in one grouped bmm
        # an MLP head starts from one seeded head (the run's seeded RNG draws the seed); a linear one from zeros
        seed = int(torch.randint(2**31 - 1, ())) if config.hidden else 0
        self.heads = PerUserHeads(self.head_rows(n_users), feature_dim, config.hidden, config.activation,
                                  init="shared" if config.hidden else "zeros", seed=seed)
        self.register_buffer("head_seed", torch.tensor(seed))
        self.user_state = tuple(f"heads.{name}" for name in self.heads.names)

    def head_rows(self, n_users: int) -> int:
        """Rows of the head table: one per user."""
        return n_users

    def fresh_heads(self, n: int) -> Heads:
        """The heads (n, ...) a user starts from: zeros (linear), or the seeded shared initial head (MLP)."""
        if self.heads.is_linear:
            return {"weight": self.heads.weight.new_zeros(n, self.feature_dim)}
        one = self.heads.initial_head(int(self.head_seed))
        return {name: value.to(self.heads.w1).expand(n, *value.shape) for name, value in one.items()}

    # ---- the reward ----------------------------------------------------------------------------------------
    def user_reward(self, z: Tensor, user_idx: Tensor) -> Tensor:
        return self.heads(z, user_idx)  # r_u(h): (N,)

    def reward_table(self, z: Tensor, users: Tensor) -> Tensor:
        return self.heads.all_users(z, users)  # (I, U_b): one GEMM instead of a D-vector gathered per row

    def regularization(self, batch: dict) -> Tensor | float:
        """l2 ||theta_u||^2 of each user of the batch, weighted as the NLL weighs that user's pairs (the mean
        over the batch's pairs of each pair's weight times its user's penalty), so that a full batch's loss is
        (1/U_seen) sum_u L_u under ``balance_users`` (the pooled mean otherwise)."""
        if not self.config.l2:
            return 0.0
        users, pair_user = torch.unique(batch["user_idx"], return_inverse=True)
        weight = batch["pair_weight"] if self.config.balance_users else torch.ones_like(batch["pair_weight"])
        share = torch.zeros(len(users), device=weight.device).index_add_(0, pair_user, weight) / len(pair_user)
        rows = self.heads.n_users
        squares = sum(getattr(self.heads, n).pow(2).reshape(rows, -1).sum(1) for n in self.heads.names)  # (U,)
        return self.config.l2 * (share * squares[users]).sum()

    def export_head(self) -> tuple[list[nn.Module], Tensor]:
        """``plrm export``: g = the identity (the features themselves), W = the linear heads v_u (U, D)."""
        if not self.heads.is_linear:
            raise NotImplementedError("an MLP head per user is not W[u] . g(h) with a shared g (export a linear "
                                      "Individual RM, hidden: 0)")
        return [], self.heads.weight.detach()

    # ---- new users -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def adapt(self, support: dict, users: Tensor) -> None:
        """Each new user's fresh head fitted on their support pairs alone (``users`` sorted), all at once."""
        c = self.config
        start = self.fresh_heads(len(users))
        if c.adapt_steps:
            z_chosen, z_rejected = self.embed_pairs(support)                           # (P, D) each
            owner = torch.searchsorted(users, support["user_idx"])                     # position in `users`
            start = self.heads.fit(start, users, z_chosen, z_rejected, owner, c.adapt_steps, c.lr, c.l2)
        self.heads.write(users, start)
