"""GenARM's own decoding (Xu et al., "GenARM: Reward Guided Generation with Autoregressive Reward Model for
Test-time Alignment", ICLR 2025, arXiv 2410.08193, eq. 6): the next-token distribution over the whole vocabulary

    log pi_decode(v) = log pi_base(v | x, y_<t) + alpha log pi_r(v | x, y_<t) - log Z

one cached forward of each model per token. With a token guide's reward r = beta_r log pi_r (P-DPO's:
beta log pi_theta / pi_ref) that is ``log pi_base + (alpha / beta) r``, written so that ARGS with the same guide,
k = |V| and w = alpha / beta chooses exactly the same tokens. The authors' code combines the models through
language-model-arithmetic, which divides by (1 + alpha) before renormalising (hence their sampling temperature
1 / (1 + alpha)); plrm implements the formula itself, temperature 1 meaning pi_decode.
"""

from __future__ import annotations

import torch
from torch import Tensor

from plrm.decoding.args import Decoded, Trajectory
from plrm.decoding.guides import TokenGuide
from plrm.decoding.policy import Policy


@torch.no_grad()
def genarm_decode(policy: Policy, guide: TokenGuide, policy_prompts: dict, guide_prompts: dict, users: Tensor,
                  alpha: float = 1.0, max_new_tokens: int = 128, mode: str = "greedy", temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> Decoded:
    """Decode from pi_base * pi_r^alpha (greedy or sampled at ``temperature``); ``Decoded.rewards`` holds the
    guide's reward of each chosen token, ``scores`` its log pi_decode."""
    path = Trajectory(users, policy.stop_ids)
    p_state, g_state = policy.prefill(policy_prompts, users), guide.prefill(guide_prompts, users)
    for _ in range(max_new_tokens):
        base, rewards = p_state.logprobs, guide.next_token_rewards(g_state)
        v = min(base.shape[1], rewards.shape[1])  # embedding matrices may be padded to different sizes
        base, rewards = base[:, :v], rewards[:, :v]
        scores = base + (alpha / guide.beta) * rewards
        if mode == "greedy":
            token = scores.argmax(-1)
        elif mode == "sample":
            token = torch.multinomial(torch.softmax(scores / temperature, -1), 1, generator=generator)[:, 0]
        else:
            raise ValueError(f"decoding mode {mode!r}: choose greedy or sample")
        pick = token[:, None]
        token = path.append(token, base.gather(1, pick)[:, 0], rewards.gather(1, pick)[:, 0],
                            torch.log_softmax(scores, -1).gather(1, pick)[:, 0])
        if path.done:
            break
        p_state, g_state = policy.advance(p_state, token), guide.advance_tokens(g_state, token)
    return path.result()


