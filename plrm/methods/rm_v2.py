"""Global RM-v2: a non-personalized reward model whose sequence reward is the mean of per-token rewards ("The
Reward Model Selection Crisis in Personalized Alignment", Rezk et al., arXiv 2512.23067, §6 and App. F.1: "a
sequence reward is average reward for all tokens").

    r_t          = MLP(h_t)                          every position t of a transformer's last hidden states
    r(x, y)      = (1 / |S|) sum_{t in S} r_t         S: the response's positions (``pool_over: response``) or
                                                     every non-pad position, prompt included (``all``)
    trained with -log sigmoid(r(x, y+) - r(x, y-)) on every seen user's pairs, like the Global RM.

As a guide for reward-guided decoding its prefix reward is the running mean r(x, y_<=t) = sum_{s<=t, s in S}
r_s / |S_<=t|: one new token per candidate, the running sum carried in the guide's state
(plrm.decoding.guides.MeanTokenGuide). The paper reports the best policy accuracy on Pref-LaMP for this model and,
with VPL, the worst ROUGE-1 (Tables 9-12): prefix means rank pairs well and are easy to exploit in generation.

Paper-unspecified choices (recipe keys): the MLP's shape (d -> 256 -> 1, ReLU; ``hidden``) and which positions
count (``pool_over``). Defaults: decoder learning rate 1e-4 and the backbone's LoRA at 5e-5 (App. F.1; the
backbone's own ``lr``). It needs every token's hidden state, so it runs on a ``transformer`` backbone, where the
transformer runs inside the method; pooled or cached features hold one vector per item and cannot give them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from plrm import capabilities as cap
from plrm.config import opt
from plrm.errors import RecipeError
from plrm.methods.base import MethodConfig, PersonalizedRewardModel
from plrm.registry import methods


@methods.register("rm_v2")
class GlobalRMv2(PersonalizedRewardModel):
    """Global RM-v2: the mean of per-token MLP rewards over the response (or every token), Bradley-Terry loss."""

    needs = frozenset({cap.TOKEN_STATES, cap.USERS})
    adapts_new_users = "generic"
    pools_positions = True  # its prefix reward is a running mean of position rewards (plrm.decoding.guides)

    @dataclass
    class Config(MethodConfig):
        hidden: int = opt(256, "Hidden width of the per-token reward MLP d -> hidden -> 1 (ReLU); 0: a linear map. "
                               "The paper does not give the shape.", min=0)
        pool_over: str = opt("response", "Which positions' rewards are averaged: 'response' (the response's "
                                         "tokens) or 'all' (every non-pad token, prompt included).",
                             choices=("response", "all"))
        lr: float = opt(1e-4, "Learning rate of the reward MLP (Selection Crisis App. F.1: decoder 1e-4; the "
                              "backbone's LoRA learns at backbone.lr).", gt=0)
        batch_size: int = opt(8, "Training pairs per step.", min=1)
        max_epochs: int = opt(1, "Epochs over the seen users' train pairs.", min=1, also=(-1,))

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        if config.pool_over not in ("response", "all"):
            raise RecipeError(f"methods.rm_v2.pool_over must be 'response' or 'all', got {config.pool_over!r}")
        if encoder is not None and not hasattr(encoder, "model"):
            raise RecipeError("rm_v2 averages per-token rewards, so it needs every token's hidden state: use "
                              f"backbone 'transformer' (got an encoder of type {type(encoder).__name__})")
        h = config.hidden
        self.token_head = (nn.Linear(feature_dim, 1) if h == 0 else
                           nn.Sequential(nn.Linear(feature_dim, h), nn.ReLU(), nn.Linear(h, 1)))

    def position_rewards(self, hidden: Tensor) -> Tensor:
        """r_t = MLP(h_t) of every position: hidden (..., D) -> (...)."""
        return self.token_head(hidden).squeeze(-1)

    def pooled_positions(self, mask: Tensor, prompt_lengths: Tensor | None) -> Tensor:
        """S as a (N, L) mask of right-padded rows: the response's positions, or every non-pad one."""
        if self.config.pool_over == "all":
            return mask.bool()
        if prompt_lengths is None:
            raise RecipeError("rm_v2 with pool_over: response needs each item's prompt length (backbone "
                              "'transformer' gives it)")
        column = torch.arange(mask.shape[1], device=mask.device)
        return mask.bool() & (column[None, :] >= prompt_lengths.to(mask.device)[:, None])

    def running_means(self, hidden: Tensor, mask: Tensor, prompt_lengths: Tensor | None) -> Tensor:
        """r(x, y_<=t) at every position t of right-padded rows (N, L): the mean of r_s over the positions s <= t
        in S (0 before the first). The last valid position's value is the sequence reward."""
        counted = self.pooled_positions(mask, prompt_lengths)
        r = self.position_rewards(hidden) * counted                                   # (N, L)
        return r.cumsum(1) / counted.cumsum(1).clamp_min(1)

    def _mean_reward(self, hidden: Tensor, mask: Tensor, items: dict) -> Tensor:
        counted = self.pooled_positions(mask, items.get("prompt_lengths"))
        r = (self.position_rewards(hidden) * counted).sum(1) / counted.sum(1).clamp_min(1)
        return r[:, None]                                                              # (N, 1)

    def encode(self, items: Any) -> Tensor:
        """The sequence reward of each item (N, 1), from the transformer's every-token states (the masked mean
        is taken in the encoder's chunks: the (N, L, D) states of a whole evaluation never exist at once)."""
        return self.encoder(items, reduce=self._mean_reward)

    def user_reward(self, z: Tensor, user_idx: Tensor) -> Tensor:
        return z[:, 0]  # the same reward for every user

    def prefix_rewards(self, h: Tensor, user_idx: Tensor) -> Tensor:
        raise NotImplementedError("rm_v2's prefix reward is a running mean over positions, which needs the prompt's "
                                  "states too: guide it with plrm.decoding.guides.MeanTokenGuide")
