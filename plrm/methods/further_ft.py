"""Further-fine-tuned RM: the Global RM, then a short fine-tuning on each user's own pairs ("When Personalization
Meets Reality", Dong et al., arXiv 2502.19158, §5 "Further fine-tuned RM": "take the Vanilla RM trained on
aggregated existing users' preference data and fine-tune it for one epoch using the new user's limited data";
Table 4).

    global:    v = argmin_v mean_i -log sigmoid(v^T (h(x, y+) - h(x, y-)))     over every seen user's train pair
    per user:  v_u = v, then ``ft_epochs`` epochs of ceil(|D_u| / ft_batch_size) Adam steps on
               mean_{i in D_u} -log sigmoid(v_u^T (h(x, y+) - h(x, y-)))
    reward:    r_u(x, y) = v_u^T h(x, y)

The Global RM is plrm's ``bt`` (same head, loss, defaults and initialization: with ``ft_lr: 0`` every user's
head is exactly the Global RM's). Training is its training; the per-user heads are then fitted from data, for
every user at once (plrm.methods.heads.PerUserHeads.fit), with a fresh Adam optimizer, as the paper's code
starts a new trainer from the saved Vanilla RM. Why it barely moves: with the Vanilla batch of 32 to 64 pairs,
one epoch over k = 30 pairs is a single optimizer step, hence Table 4's flat numbers (0.71 / 0.73 / 0.72 at
30 / 100 / 300 pairs against the Vanilla RM's 0.74).

Seen users get the same treatment on their train pairs (after training and before each validation epoch), so
that seen and new users are served by one kind of model, the Global RM plus an epoch on the user's own pairs,
and the seen accuracy measures this method rather than the Global RM. (The paper defines the method for new
users only.)

Deviations from the paper:

* Its RM is a LoRA-fine-tuned LLaMA-2-7B whose adapter is fine-tuned too; here only the linear head moves per
  user (over frozen features, or over a backbone trained with the Global RM and then frozen).
* Each of an epoch's ceil(k / ft_batch_size) steps takes the gradient of all of the user's k pairs instead of
  one minibatch of them: the same number of steps, a less noisy gradient (identical when k <= ft_batch_size, as
  for the paper's k = 30 with its batch of 32 or more). Users with different numbers of pairs take different
  numbers of steps: one vectorized fit per distinct step count.
* Adam at a constant learning rate, without the Vanilla RM's schedule (3% warmup, then linear decay) and weight
  decay (0.001): a schedule over one to a few steps is degenerate, and the decay moves nothing in that time.

Per-user state: ``heads.weight`` (U, D). Shared: ``global_head`` (v).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from plrm.config import opt
from plrm.methods.base import MethodConfig, PersonalizedRewardModel, SeenUsersData
from plrm.methods.heads import PerUserHeads
from plrm.registry import methods


@methods.register("further_ft")
class FurtherFineTunedRM(PersonalizedRewardModel):
    """The Global RM's linear head, fine-tuned for an epoch on each user's own pairs."""

    linear_in_features = True
    trains_on_differences = True  # loss and penalty read pairs only as e+ - e- (difference_cache)
    user_state = ("heads.weight",)

    @dataclass
    class Config(MethodConfig):
        ft_epochs: int = opt(1, "Epochs of fine-tuning on a user's own pairs (Dong et al. §5: one).", min=0)
        ft_batch_size: int = opt(32, "Pairs per fine-tuning step: an epoch over k pairs is ceil(k / ft_batch_size) "
                                     "steps (Dong et al.'s scripts: 32 to 64 pairs per step).", min=1)
        ft_lr: float | None = opt(None, "Adam learning rate of the fine-tuning (null: lr, the Global RM's, as "
                                        "Dong et al. reuse the Vanilla RM's hyperparameters; 0: the Global RM "
                                        "itself for everyone).", min=0)

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        self.global_head = nn.Linear(feature_dim, 1, bias=False)               # v: (1, D), initialized as bt's
        self.heads = PerUserHeads(n_users, feature_dim, init="zeros")          # v_u: (U, D), set from data
        self.heads.requires_grad_(False)  # Lightning trains v only; the heads are fitted in adapt

    def user_reward(self, z: Tensor, user_idx: Tensor) -> Tensor:
        return self.heads(z, user_idx)  # v_u^T h: (N,)

    def reward_table(self, z: Tensor, users: Tensor) -> Tensor:
        return self.heads.all_users(z, users)  # (I, U_b) = z V^T: one GEMM instead of a gather per row

    def loss(self, batch: dict) -> Tensor:
        """The Global RM's loss: Bradley-Terry NLL of v on the batch's pooled pairs."""
        return self.nll(self.global_head(self.embedding_difference(batch))[:, 0], batch)

    def export_head(self) -> tuple[list[nn.Module], Tensor]:
        """``plrm export``: g = the identity (the features themselves), W = the fine-tuned heads v_u (U, D)."""
        return [], self.heads.weight.detach()

    def fit_seen_users(self, seen: SeenUsersData) -> None:
        """Seen users: the same fine-tuning from v, on all their train pairs."""
        self.adapt(seen.pairs(), seen.users)

    def finetune_steps(self, n_pairs: Tensor) -> Tensor:
        """Optimizer steps of each user with ``n_pairs`` pairs: ft_epochs * ceil(n_pairs / ft_batch_size)."""
        c = self.config
        return c.ft_epochs * torch.div(n_pairs + c.ft_batch_size - 1, c.ft_batch_size, rounding_mode="floor")

    @torch.no_grad()
    def adapt(self, support: dict, users: Tensor) -> None:
        """Each user's head (``users`` sorted) from v, fine-tuned on their pairs; all users with the same number
        of steps in one vectorized fit (a user without pairs keeps v)."""
        c = self.config
        lr = c.lr if c.ft_lr is None else c.ft_lr
        v = self.global_head.weight.detach()[0]                                   # (D,)
        self.heads.write(users, {"weight": v})
        owner = torch.searchsorted(users, support["user_idx"])                    # position in `users`
        steps = self.finetune_steps(torch.bincount(owner, minlength=len(users)))  # (U_new,)
        if not bool((steps > 0).any()):
            return
        z_chosen, z_rejected = self.embed_pairs(support)                          # (P, D) each
        for n_steps in torch.unique(steps[steps > 0]).tolist():  # a few distinct step counts, not users
            group = torch.nonzero(steps == n_steps)[:, 0]                         # positions in `users`
            rows = torch.isin(owner, group)
            start = {"weight": v.expand(len(group), -1)}
            fitted = self.heads.fit(start, users[group], z_chosen[rows], z_rejected[rows],
                                    torch.searchsorted(group, owner[rows]), n_steps, lr)
            self.heads.write(users[group], fitted)
