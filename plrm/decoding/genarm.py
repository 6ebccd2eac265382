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

import time

import torch
from torch import Tensor

from plrm.decoding.args import Decoded
from plrm.decoding.guides import TokenGuide
from plrm.decoding.policy import Policy


@torch.no_grad()
def genarm_decode(policy: Policy, guide: TokenGuide, policy_prompts: dict, guide_prompts: dict, users: Tensor,
                  alpha: float = 1.0, max_new_tokens: int = 128, mode: str = "greedy", temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> Decoded:
    """Decode from pi_base * pi_r^alpha (greedy or sampled at ``temperature``); ``Decoded.rewards`` holds the
    guide's reward of each chosen token, ``scores`` its log pi_decode."""
    start = time.perf_counter()
    b = len(users)
    stop_ids = policy.stop_ids.to(users.device)
    p_state, g_state = policy.prefill(policy_prompts, users), guide.prefill(guide_prompts, users)
    finished = torch.zeros(b, dtype=torch.bool, device=users.device)
    generated: list[list[int]] = [[] for _ in range(b)]
    steps: dict[str, list[Tensor]] = {"lp": [], "r": [], "s": [], "alive": []}
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
        alive = ~finished
        token = torch.where(alive, token, torch.tensor(generated_last(generated), device=token.device))
        decode = torch.log_softmax(scores, -1)
        for name, value in (("lp", base), ("r", rewards), ("s", decode)):
            steps[name].append(value.gather(1, token[:, None])[:, 0] * alive)
        steps["alive"].append(alive)
        for row in torch.nonzero(alive)[:, 0].tolist():
            generated[row].append(int(token[row]))
        finished = finished | torch.isin(token, stop_ids)
        if bool(finished.all()):
            break
        p_state, g_state = policy.advance(p_state, token), guide.advance_tokens(g_state, token)
    stacked = {n: torch.stack(v, 1) if v else torch.zeros(b, 0, device=users.device) for n, v in steps.items()}
    return Decoded(generated, stacked["lp"], stacked["r"], stacked["s"], stacked["alive"].bool(),
                   time.perf_counter() - start)


def generated_last(generated: list[list[int]]) -> list[int]:
    """Each row's last generated token (0 before any): what a finished row keeps being fed."""
    return [row[-1] if row else 0 for row in generated]
