"""GenARM: an autoregressive reward model (Xu et al., "GenARM: Reward Guided Generation with Autoregressive
Reward Model for Test-time Alignment", ICLR 2025, arXiv 2410.08193, §4).

The reward model pi_r is a causal LM (a LoRA on the base LM, backbone ``causal_lm``) whose sequence reward is its
log-likelihood and whose token-level reward is its next-token log-probability:

    r(x, y)          = beta_r sum_t log pi_r(y_t | x, y_<t)
    L                = -log sigmoid(beta_r (log pi_r(y+ | x) - log pi_r(y- | x)) - gamma)

DPO without a reference model: no reference forward is made. ``label_smoothing`` as conservative DPO.
Defaults: beta_r 0.05, lr 5e-4 with LoRA r 8 / alpha 16 (the authors' HH-RLHF scripts), gamma 0.

GenARM is a global model (one reward for every user). ``personalized: true`` is plrm's own extension, in no paper:
P-DPO's user model on the reward LM (soft user tokens e_u in front of the prompt, loss alpha L(u) + (1 - alpha)
L(u_0), new users fit their own tokens), which gives a token-level personalized reward.

The token-level reward that guides decoding (GenARM samples from pi_decode ~ pi_base pi_r^alpha) is
``next_token_rewards``: beta_r log pi_r(v | x, y_<t) for every vocabulary item v, one KV-cached forward per step
(``prefill`` then ``advance``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from plrm import capabilities as cap
from plrm.config import opt
from plrm.methods.base import MethodConfig, PersonalizedRewardModel
from plrm.methods.losses import dpo_loss
from plrm.methods.user_tokens import TokenRewards, UserTokenConfig, UserTokenRewardModel, require_causal_lm
from plrm.registry import methods


@methods.register("genarm")
class GenARM(TokenRewards, PersonalizedRewardModel):
    """GenARM: an autoregressive reward LM, r = beta_r sum_t log pi_r(y_t | x, y_<t); global unless personalized."""

    needs = frozenset({cap.LM, cap.USERS})
    adapts_new_users = "generic"

    @dataclass
    class Config(MethodConfig, UserTokenConfig):
        beta: float = opt(0.05, "beta_r: the reward is beta_r sum_t log pi_r (GenARM's HH-RLHF scripts: 0.05).",
                          gt=0)
        margin: float = opt(0.0, "gamma, the target margin of the loss -log sigmoid(beta_r delta - gamma).")
        label_smoothing: float = opt(0.0, "Conservative DPO: each label taken as flipped with this probability.",
                                     min=0, lt=0.5)
        personalized: bool = opt(False, "plrm's extension (no paper): soft user tokens on the reward LM, P-DPO's "
                                        "user model and loss (n_tokens, user_model, alpha, adapt, ...).")
        lr: float = opt(5e-4, "AdamW learning rate of the user tokens when personalized (the LoRA adapter's is "
                              "backbone.lr; GenARM's scripts: 5e-4).", gt=0)
        batch_size: int = opt(32, "Training pairs per step (GenARM's scripts: 32).", min=1)
        max_epochs: int = opt(1, "Epochs over the seen users' train pairs (GenARM's scripts: 1).", min=1, also=(-1,))

    def __new__(cls, config: Config | None = None, *args, **kwargs):
        # the personalized variant is its own class (a user-conditioned reward; not a GenARM subclass, so Python
        # does not run GenARM.__init__ on it): recipes write `personalized: true` under genarm
        if cls is GenARM and config is not None and config.personalized:
            return PersonalizedGenARM(config, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder=None):
        super().__init__(config, n_users, feature_dim, encoder)
        require_causal_lm(self)

    def item_embedding(self, h: Tensor) -> Tensor:
        return h  # (N, 1): sum_t log pi_r(y_t | x, y_<t), the causal_lm backbone's feature

    def user_reward(self, z: Tensor, user_idx: Tensor) -> Tensor:
        return self.config.beta * z[:, 0]

    def nll(self, logit: Tensor, batch: dict) -> Tensor:
        weight = batch["pair_weight"] if self.config.balance_users else None
        return dpo_loss(logit, self.config.label_smoothing, self.config.margin, weight)

    def token_rewards(self, items: dict, user_idx: Tensor) -> Tensor:
        """beta_r log pi_r(y_t | x, y_<t) of every response token (B, T), left-aligned (0 past the end)."""
        logps, mask = self.encoder.response_logprobs(items)
        return self.config.beta * logps * mask

    def prefix_rewards(self, h: Tensor, user_idx: Tensor) -> Tensor:
        raise NotImplementedError("genarm is a token-level reward: use token_rewards")


class PersonalizedGenARM(UserTokenRewardModel):
    """GenARM with P-DPO's soft user tokens on the reward LM (``personalized: true``; no reference model)."""

    uses_reference = False
    adapts_new_users = "yes"
    Config = GenARM.Config

    def pair_loss(self, logits: Tensor, pair_weight: Tensor | None) -> Tensor:
        return dpo_loss(logits, self.config.label_smoothing, self.config.margin, pair_weight)
