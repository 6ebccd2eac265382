"""P-DPO: personalized DPO with soft user tokens (Li et al., "Personalized Language Modeling from Personalized
Human Feedback", arXiv 2402.05133, §3; the setting of the Selection Crisis paper, arXiv 2512.23067, §6 and
App. F.1).

A LoRA policy pi_theta reads each user's T_u soft tokens e_u in front of the prompt (plrm.methods.user_tokens):

    h(u)  = beta [log pi_theta(y+ | u, x) - log pi_ref(y+ | x) - log pi_theta(y- | u, x) + log pi_ref(y- | x)]
    L     = -alpha mean log sigmoid(h(u_i)) - (1 - alpha) mean log sigmoid(h(u_0))

with the generic user u_0 (tokens e_0) in the second term and pi_ref the base model (adapter off, no tokens). The
authors' code duplicates every training pair with user 0 and runs the reference model at every step; here both
terms come from the same batch in one forward, and each item's reference log-probability is computed once.
Defaults: beta 0.5, alpha 0.5, T_u 8 (P-RLHF scripts; Selection Crisis App. F.1).

Its reward under plrm's protocol is the implicit DPO reward r_u(x, y) = beta (log pi_theta(y | u, x) - log
pi_ref(y | x)), so it gets seen / unseen / few-shot accuracy like every method; new users fit their own tokens
(``adapt: fit``) or get the generic user's (``adapt: generic``).
"""

from __future__ import annotations

from dataclasses import dataclass

from plrm.config import opt
from plrm.methods.base import MethodConfig
from plrm.methods.user_tokens import UserTokenConfig, UserTokenRewardModel
from plrm.registry import methods


@methods.register("pdpo")
class PDPO(UserTokenRewardModel):
    """P-DPO: a LoRA policy with soft user tokens, trained with personal + generic DPO; reward = implicit DPO."""

    uses_reference = True

    @dataclass
    class Config(MethodConfig, UserTokenConfig):
        beta: float = opt(0.5, "beta of DPO's implicit reward (P-RLHF scripts: 0.5).", gt=0)
        label_smoothing: float = opt(0.0, "Conservative DPO: each label taken as flipped with this probability.",
                                     min=0, lt=0.5)
        lr: float = opt(5e-5, "AdamW learning rate of the user tokens (the LoRA adapter's is backbone.lr; P-RLHF: "
                              "5e-5 for both).", gt=0)
        batch_size: int = opt(32, "Training pairs per step (P-RLHF: 32).", min=1)
        max_epochs: int = opt(1, "Epochs over the seen users' train pairs (P-RLHF: 1 on PRISM, 2 on TL;DR).",
                              min=1, also=(-1,))
