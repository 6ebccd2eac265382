"""ARGS: reward-guided decoding (Khanov et al., "ARGS: Alignment as Reward-Guided Search", ICLR 2024,
arXiv 2402.01694, Alg. 1), batched over prompts and KV-cached in both models.

At step t, for each prompt b of the batch (its user u_b):

    V_t      = top-k tokens of pi(. | x_b, y_<t)                     (candidates from the policy only)
    score(v) = log pi(v | x_b, y_<t) + w * r_u(x_b, [y_<t, v])       (log-softmax, not raw logits: the per-step
                                                                      score is then the summand of policy
                                                                      accuracy, Selection Crisis eq. 5-6)
    greedy:  y_t = argmax score;     sample: y_t ~ softmax(score / temperature) over V_t

``w = 0`` or ``k = 1`` is the policy's greedy decoding; ``guide=None`` is zero-shot (the same loop, no reward).
A row stops at the first of the policy's stop ids (EOS, end-of-turn) or after ``max_new_tokens``; finished rows
keep being fed their stop token so the batch keeps its shape (rows never see each other), and their later
outputs are discarded. The authors' code decodes one prompt at a time and never stops at EOS; plrm batches
prompts with per-row selection.

``cached=False`` is the naive implementation: both models re-run on the whole prefix at every step (the reward
model on all B*k candidate sequences), with the same selection. It is what the cached loop is tested against
token for token and what ``benchmarks/args_cache.py`` measures it against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from plrm.decoding.guides import Guide, append_tokens
from plrm.decoding.policy import Policy


@dataclass
class Decoded:
    """What a decoding run produced: each row's new token ids (up to and including its stop token), and per
    step the chosen token's policy log-probability, reward and score (B, T; 0 where ``alive`` is False)."""

    tokens: list[list[int]]
    logprobs: Tensor
    rewards: Tensor
    scores: Tensor
    alive: Tensor
    seconds: float = 0.0
    step_probabilities: list[Tensor] = field(default_factory=list)  # sampling: each step's (B, k) distribution

    @property
    def n_tokens(self) -> int:
        return int(self.alive.sum())

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("nan")


class Trajectory:
    """The rows of a decoding batch as they grow: each row's tokens, which rows have stopped, and per step the
    chosen token's log-probability, reward and score (what :class:`Decoded` returns). Shared by every decoder."""

    def __init__(self, users: Tensor, stop_ids: Tensor) -> None:
        self.start = time.perf_counter()
        self.device, self.stop_ids = users.device, stop_ids.to(users.device)
        self.tokens: list[list[int]] = [[] for _ in range(len(users))]
        self.finished = torch.zeros(len(users), dtype=torch.bool, device=users.device)
        self.last = torch.zeros(len(users), dtype=torch.long, device=users.device)
        self.steps: dict[str, list[Tensor]] = {"lp": [], "r": [], "s": [], "alive": []}

    def append(self, token: Tensor, lp: Tensor, reward: Tensor, score: Tensor) -> Tensor:
        """Record one step's chosen token per row (B,) and its numbers (B,); a finished row keeps its stop token
        (rows never see each other, so what it is fed changes nothing). Returns the tokens to feed."""
        alive = ~self.finished
        token = torch.where(alive, token, self.last)
        for name, value in (("lp", lp), ("r", reward), ("s", score)):
            self.steps[name].append(value * alive)
        self.steps["alive"].append(alive)
        for row in torch.nonzero(alive)[:, 0].tolist():
            self.tokens[row].append(int(token[row]))
        self.finished = self.finished | torch.isin(token, self.stop_ids)
        self.last = token
        return token

    @property
    def done(self) -> bool:
        return bool(self.finished.all())

    def result(self, probabilities: list[Tensor] | None = None) -> Decoded:
        b = len(self.tokens)
        stacked = {n: torch.stack(v, 1) if v else torch.zeros(b, 0, device=self.device) for n, v in self.steps.items()}
        return Decoded(self.tokens, stacked["lp"], stacked["r"], stacked["s"], stacked["alive"].bool(),
                       time.perf_counter() - self.start, probabilities or [])


def _select(scores: Tensor, mode: str, temperature: float, generator: torch.Generator | None
            ) -> tuple[Tensor, Tensor | None]:
    if mode == "greedy":
        return scores.argmax(-1), None
    if mode != "sample":
        raise ValueError(f"decoding mode {mode!r}: choose greedy or sample")
    probs = torch.softmax(scores / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0], probs


@torch.no_grad()
def args_decode(policy: Policy, guide: Guide | None, policy_prompts: dict, guide_prompts: dict | None,
                users: Tensor, k: int = 10, weight: float = 1.5, max_new_tokens: int = 128, mode: str = "greedy",
                temperature: float = 0.7, generator: torch.Generator | None = None, cached: bool = True,
                keep_distributions: bool = False) -> Decoded:
    """ARGS over a batch of prompts: ``policy_prompts`` rendered by the policy, ``guide_prompts`` by the reward
    model (ragged {'ids', 'lengths'}; the same prompts, each in its model's template), ``users`` (B,)."""
    if k < 1 or max_new_tokens < 0:
        raise ValueError(f"ARGS needs k >= 1 and max_new_tokens >= 0; got k={k}, max_new_tokens={max_new_tokens}")
    guide = None if weight == 0 else guide  # w = 0: the policy alone (its greedy decoding when k = 1 or greedy)
    path = Trajectory(users, policy.stop_ids)
    probabilities = []
    p_state = g_state = None
    for t in range(max_new_tokens):
        if cached:
            p_state = policy.prefill(policy_prompts, users) if t == 0 else policy.advance(p_state, path.last)
            if guide is not None and t == 0:
                g_state = guide.prefill(guide_prompts, users)
            logprobs = p_state.logprobs
        else:
            logprobs = policy.prefill(append_tokens(policy_prompts, path.tokens), users).logprobs
        lp, candidates = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)                         # (B, k)
        if guide is None:
            rewards = torch.zeros_like(lp)
        else:
            stop = torch.isin(candidates, path.stop_ids)
            rewards = (guide.candidate_rewards(g_state, candidates, stop) if cached
                       else guide.naive_candidate_rewards(guide_prompts, path.tokens, candidates, stop, users))
        scores = lp + weight * rewards
        choice, probs = _select(scores, mode, temperature, generator)
        if keep_distributions and probs is not None:
            probabilities.append(probs)
        pick = choice[:, None]
        path.append(candidates.gather(1, pick)[:, 0], lp.gather(1, pick)[:, 0], rewards.gather(1, pick)[:, 0],
                    scores.gather(1, pick)[:, 0])
        if path.done:
            break
        if cached and guide is not None:
            g_state = guide.advance(g_state, candidates, choice)
    return path.result(probabilities)
