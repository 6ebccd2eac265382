"""LoRe-Alt: LoRe trained by alternating updates (The Reward Model Selection Crisis in Personalized Alignment,
Rezk et al., arXiv 2512.23067, App. E.3).

For each batch: one step on the user weights with the basis frozen, then one step on the basis with the user
weights frozen -- Lightning manual optimization with two optimizers. New users: LoRe's eq. 11, unchanged.
``trainer.gradient_clip_val`` clips the basis step's gradient norm (the user step is a small convex problem).

Optional reference penalty (the LoRe authors' code keeps the basis reward near an off-the-shelf reward model;
App. E.3 drops it when no pretrained RM exists): ``reference_weight * mean((r_u(x, y) - r_ref(x, y))^2)``
over the batch's responses, where r_ref is the linear head of a trained ``bt`` checkpoint
(``reference_checkpoint``) on the same features, which the runner loads and hands in (``load_reference``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from plrm.config import Forbid, Not, opt
from plrm.errors import RecipeError
from plrm.methods.lore import LoRe
from plrm.methods.optim import adam
from plrm.registry import methods


@methods.register("lore_alt")
class LoReAlt(LoRe):
    """LoRe with alternating user-weight / basis steps and an optional reference-RM penalty."""

    manual_optimization = True  # a user step, then a basis step, each with its own optimizer
    trains_on_differences = False  # the reference penalty scores each side of a pair
    clips_gradients = True  # the basis step clips with trainer.gradient_clip_val (self.gradient_clip_val)

    @dataclass
    class Config(LoRe.Config):
        reference_checkpoint: str | None = opt(
            None, "A `bt` checkpoint (<run>/seed-<s>/<label>.ckpt) whose head is the reference reward.", path=True)
        reference_weight: float = opt(0.0, "Weight of the penalty keeping user rewards near the reference.", min=0)

        forbid = (Forbid({"reference_weight": Not(0.0), "reference_checkpoint": (None, "")},
                         "reference_weight: > 0 needs reference_checkpoint (the `bt` checkpoint of the reference "
                         "reward)"),)

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        self.reference = None
        if config.reference_checkpoint:  # r_ref: (1, D), filled by load_reference before training
            self.reference = nn.Linear(feature_dim, 1, bias=False).requires_grad_(False)

    def reference_checkpoints(self) -> dict[str, str]:
        return {"reference": self.config.reference_checkpoint} if self.config.reference_checkpoint else {}

    def load_reference(self, name: str, state_dict: dict) -> None:
        weight = state_dict.get("head_linear.weight")
        if weight is None or weight.shape != (1, self.feature_dim):
            raise RecipeError(f"reference_checkpoint {self.config.reference_checkpoint}: not a `bt` checkpoint over "
                              f"{self.feature_dim}-d features")
        self.reference.weight.data.copy_(weight)

    def configure_optimizers(self):
        user_lr = self.config.user_lr if self.config.user_lr is not None else self.config.lr
        mixed = self.mixed_precision()
        user_opt = adam([self.user_logits], lr=user_lr, mixed_precision=mixed)
        # the basis step trains everything but the user weights (the backbone's adapters in their own group)
        groups = [{**g, "params": [p for p in g["params"] if p is not self.user_logits]}
                  for g in self.optimizer_groups()]
        basis_opt = adam([g for g in groups if g["params"]], lr=self.config.lr,
                         weight_decay=self.config.weight_decay, mixed_precision=mixed)
        return [user_opt, basis_opt]

    def reference_penalty(self, batch: dict) -> Tensor | float:
        if self.reference is None or not self.config.reference_weight:
            return 0.0
        users = batch["user_idx"]
        z_chosen, z_rejected = self.embed_pairs(batch)
        gap_c = self.user_reward(z_chosen, users) - self.reference(self.encode(batch["chosen"]))[:, 0]
        gap_r = self.user_reward(z_rejected, users) - self.reference(self.encode(batch["rejected"]))[:, 0]
        return self.config.reference_weight * 0.5 * (gap_c.pow(2).mean() + gap_r.pow(2).mean())

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        user_opt, basis_opt = self.optimizers()
        users = batch["user_idx"]
        # 1) user weights, basis frozen
        with torch.no_grad():
            basis_diff = self.embedding_difference(batch)                 # R(x, y+) - R(x, y-): (B, K)
        user_loss = self.nll(self.user_reward(basis_diff, users), batch)
        user_opt.zero_grad()
        self.manual_backward(self.global_loss(user_loss, batch))
        user_opt.step()
        # 2) basis, user weights frozen
        nll = self.nll(self.reward_with(self.embedding_difference(batch), self.user_logits[users].detach()), batch)
        basis_loss = nll + self.regularization(batch) + self.reference_penalty(batch)
        basis_opt.zero_grad()
        self.manual_backward(self.global_loss(basis_loss, batch))
        if self.gradient_clip_val is not None:
            self.clip_gradients(basis_opt, gradient_clip_val=self.gradient_clip_val)
        basis_opt.step()
        n = len(users)
        self.log("train/loss", basis_loss, prog_bar=True, batch_size=n)
        self.log("train/nll", nll, batch_size=n)
        self.log("train/user_step_nll", user_loss, batch_size=n)
        return basis_loss
