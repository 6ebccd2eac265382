"""Guides: what reward-guided decoding and policy accuracy ask of a reward model, on token ids it shares with
the policy.

At each step ARGS holds, per prompt, k candidate next tokens of the policy and needs each one's reward
r(x, [y_<t, v]); policy accuracy needs the reward of every prefix of a whole response. A guide serves both:

* :class:`SequenceGuide` -- any factored method (LoRe, PReF, MRM, BT, plugins) on a causal ``transformer``
  backbone that reads the last token's hidden state. Its KV cache holds the prompt and the tokens chosen so far;
  a step expands it to the B*k candidates (``DynamicCache.batch_repeat_interleave``), runs one token per row,
  reads ``head(h, u)`` and collapses it to the chosen rows (``batch_select_indices``). Because nothing is
  appended after a response when the RM is trained or scored, the hidden state at each response position of one
  forward is the last-token feature of that prefix: all prefix rewards come out of one forward.
* :class:`MeanTokenGuide` -- a method whose reward is the mean of per-position rewards (Global RM-v2): the same
  cached steps, with the running sum of the chosen tokens' rewards carried in the state.
* :class:`TokenGuide` -- a token-level method (GenARM: beta_r log pi_r; P-DPO: beta log pi_theta / pi_ref), which
  rewards every vocabulary item of the next position in one cached forward of B rows: no k-fold expansion.
* :class:`TextGuide` -- a factored method on a bidirectional encoder's features (MiniLM): each candidate prefix
  decoded to text with the policy's tokenizer and encoded afresh.

Candidates that end the response (the policy's stop ids) get, under a sequence guide, the reward of the response
without them, r(x, y_<t): the RM never saw a state at an end-of-turn token, and the response it would judge is
the one already there (``eos_reward: prefix``). A token guide rewards them like any token (its LM was trained
with EOS appended).

Each guide also has a naive mode -- the whole prefix re-run for every candidate, no cache, through the method's
ordinary ``reward`` -- which is the exactness oracle of the tests and the baseline of ``benchmarks/args_cache.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from plrm.backbones.causal_lm import left_pad
from plrm.backbones.text import pad, pool
from plrm.backbones.transformer import HFEncoder
from plrm.errors import RecipeError
from plrm.methods.base import FACTORED, PersonalizedRewardModel


def check_same_tokenizer(policy_tokenizer, guide_tokenizer, policy_name: str, guide_name: str) -> None:
    """ARGS feeds the policy's candidate ids to the reward model: both must map text to the same ids (the
    embedding matrices may be padded to different sizes; the vocabularies may not differ)."""
    if policy_tokenizer.get_vocab() != guide_tokenizer.get_vocab():
        raise RecipeError(f"reward-guided decoding needs the policy and the reward model to share a tokenizer: "
                          f"policy {policy_name!r} and reward model {guide_name!r} map text to different token ids "
                          "(pick a policy of the reward model's family, e.g. SmolLM2 with SmolLM2, Qwen2.5 with "
                          "Qwen2.5)")


def append_tokens(prompts: dict, generated: list[list[int]], extra: Tensor | None = None) -> dict:
    """Ragged rows prompt ++ generated[b] (++ extra[b, i] for each of the k columns of ``extra``, one row per
    (b, i), row b*k + i): the full sequences the naive mode re-runs."""
    starts = torch.cumsum(prompts["lengths"], 0) - prompts["lengths"]
    ids = prompts["ids"].tolist()
    rows = []
    for b, (s, n) in enumerate(zip(starts.tolist(), prompts["lengths"].tolist())):
        base = ids[s:s + n] + generated[b]
        rows.extend([base] if extra is None else [base + [v] for v in extra[b].tolist()])
    device = prompts["ids"].device
    return {"ids": torch.tensor([t for r in rows for t in r], dtype=torch.long, device=device),
            "lengths": torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)}


class Guide:
    """What a reward model serves to decoding (see the module docstring). ``backbone``: the RM's backbone, which
    renders its prompts (the RM may read the prompt in its own chat template; only response ids are shared)."""

    name = "guide"

    def __init__(self, method: PersonalizedRewardModel, backbone) -> None:
        self.method, self.backbone = method, backbone

    @property
    def device(self) -> torch.device:
        return next(self.method.parameters()).device

    def tokenize(self, prompts, responses=None) -> dict:
        return {k: v.to(self.device) for k, v in self.backbone.tokenize(prompts, responses).items()}

    # ---- cached decoding ----
    def prefill(self, prompts: dict, users: Tensor) -> Any:
        raise NotImplementedError

    def candidate_rewards(self, state: Any, candidates: Tensor, stop: Tensor) -> Tensor:
        """r(x, [y_<t, v]) (B, k) of each row's candidates (B, k); ``stop`` (B, k) marks candidates that end the
        response."""
        raise NotImplementedError

    def advance(self, state: Any, candidates: Tensor, choice: Tensor) -> Any:
        """Keep candidate ``choice[b]`` of each row (B,) after :meth:`candidate_rewards`."""
        raise NotImplementedError

    # ---- naive decoding (no cache) ----
    def naive_candidate_rewards(self, prompts: dict, generated: list[list[int]], candidates: Tensor, stop: Tensor,
                                users: Tensor) -> Tensor:
        raise NotImplementedError

    # ---- whole responses ----
    def response_rewards(self, items: dict, users: Tensor) -> tuple[Tensor, Tensor]:
        """r(y_t | x, y_<t) of every response token of ragged ``items`` (from the RM's ``tokenize(prompts,
        responses)``), (N, T) left-aligned, and the (N, T) mask: one forward per response."""
        raise NotImplementedError

    def sequence_reward(self, items: dict, users: Tensor) -> Tensor:
        """The reward of whole responses (N,): the judge of the circular win rate."""
        return self.method.reward(items, users)


@dataclass
class SequenceState:
    """A sequence guide's cache (B rows, or B*k between ``candidate_rewards`` and ``advance``), mask, last
    positions, the reward of each row's response so far (``prev``, (B,)) and of its candidates (B, k)."""

    cache: Any
    mask: Tensor
    positions: Tensor
    users: Tensor
    prev: Tensor
    rewards: Tensor | None = None


class SequenceGuide(Guide):
    """A factored method whose features are a causal LM's last-token hidden state, guided prefix by prefix: on a
    ``transformer`` backbone (the LM is the method's encoder, LoRA included) or a ``frozen_encoder`` over a
    decoder (the frozen LM is loaded for decoding, and its states go through the same normalisation and
    standardization as the cached features)."""

    name = "sequence"

    def __init__(self, method: PersonalizedRewardModel, backbone) -> None:
        super().__init__(method, backbone)
        encoder = method.encoder
        if method.reward_shape != FACTORED:
            raise RecipeError(f"{type(method).__name__} conditions the encoder on the user; it has no "
                              "user-independent features to guide decoding prefix by prefix")
        if isinstance(encoder, HFEncoder) and encoder.pooling == "last":
            self.model, self.pad_id, self.transform = encoder.model, encoder.pad_id, lambda h: h.float()
        elif (hasattr(backbone, "feature_transform") and getattr(backbone, "decoder", False)
              and backbone.pooling == "last"):
            self.model, self.pad_id, self.transform = backbone.load_model(), backbone.pad_id, \
                backbone.feature_transform
        else:
            what = (f"backbone {getattr(backbone, 'registry_name', type(backbone).__name__)!r}"
                    + (f" with pooling {backbone.pooling!r}" if hasattr(backbone, "pooling") else ""))
            raise RecipeError(
                f"{type(method).__name__} on {what} cannot guide decoding prefix by prefix: a sequence guide needs "
                "features read at the last token of a causal LM (backbone 'transformer' or 'frozen_encoder' over "
                "a decoder such as SmolLM2 or Qwen2.5, pooling: last); a bidirectional encoder would need one "
                "forward per prefix")
        self.model_device = next(self.model.parameters()).device

    def _reward(self, hidden: Tensor, users: Tensor) -> Tensor:
        return self.method.head(self.transform(hidden).to(users.device), users)

    @torch.no_grad()
    def prefill(self, prompts: dict, users: Tensor) -> SequenceState:
        input_ids, mask = left_pad(_on(prompts, self.model_device), self.pad_id)
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        prev = self._reward(out.last_hidden_state[:, -1], users)          # r(x, empty response)
        return SequenceState(out.cache, mask, positions[:, -1], users, prev)

    def _extend(self, state: SequenceState, candidates: Tensor) -> Tensor:
        """Run each row's k candidates as one token of B*k rows on the expanded cache: their hidden states
        (B*k, D); ``state.mask`` grows to the B*k rows."""
        b, k = candidates.shape
        state.cache.batch_repeat_interleave(k)                              # row b*k + i continues prompt b
        state.mask = torch.cat([state.mask.repeat_interleave(k, 0), state.mask.new_ones(b * k, 1)], dim=1)
        positions = state.positions.repeat_interleave(k) + 1
        out = self.model(input_ids=candidates.reshape(b * k, 1).to(self.model_device), attention_mask=state.mask,
                         position_ids=positions[:, None], cache=state.cache, use_cache=True)
        return out.last_hidden_state[:, -1]

    def _candidate_values(self, state: SequenceState, hidden: Tensor, k: int) -> Tensor:
        """r(x, [y_<t, v]) (B*k,) from the candidates' hidden states (B*k, D)."""
        return self._reward(hidden, state.users.repeat_interleave(k))

    @torch.no_grad()
    def candidate_rewards(self, state: SequenceState, candidates: Tensor, stop: Tensor) -> Tensor:
        b, k = candidates.shape
        rewards = self._candidate_values(state, self._extend(state, candidates), k).view(b, k)
        rewards = torch.where(stop.to(rewards.device), state.prev[:, None], rewards)  # ending now: r of y_<t
        state.rewards = rewards
        return rewards

    @torch.no_grad()
    def advance(self, state: SequenceState, candidates: Tensor, choice: Tensor) -> SequenceState:
        b, k = candidates.shape
        rows = torch.arange(b, device=self.model_device) * k + choice.to(self.model_device)
        state.cache.batch_select_indices(rows)
        return SequenceState(state.cache, state.mask[rows], state.positions + 1, state.users,
                             state.rewards.gather(1, choice[:, None].to(state.rewards.device))[:, 0])

    def _hidden(self, items: dict) -> tuple[Tensor, Tensor]:
        input_ids, mask = pad(_on(items, self.model_device), self.pad_id)
        return self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state, mask    # (N, L, D)

    @torch.no_grad()
    def sequence_reward(self, items: dict, users: Tensor) -> Tensor:
        """The reward of whole (prompt, response) sequences (N,): one forward, the last token's feature."""
        hidden, mask = self._hidden(items)
        return self._reward(pool(hidden, mask, "last"), users)

    @torch.no_grad()
    def naive_candidate_rewards(self, prompts: dict, generated: list[list[int]], candidates: Tensor, stop: Tensor,
                                users: Tensor) -> Tensor:
        b, k = candidates.shape
        rewards = self.sequence_reward(append_tokens(prompts, generated, candidates),  # B*k full sequences
                                       users.repeat_interleave(k)).view(b, k)
        if stop.any():
            prev = self.sequence_reward(append_tokens(prompts, generated), users)
            rewards = torch.where(stop.to(rewards.device), prev[:, None], rewards)
        return rewards

    @torch.no_grad()
    def response_rewards(self, items: dict, users: Tensor) -> tuple[Tensor, Tensor]:
        """r(x, y_<=t) of every response prefix, from the hidden states of one forward over prompt ++ response
        (right-padded: position t of row i is token t of the sequence)."""
        hidden, _ = self._hidden(items)
        responses = (items["lengths"] - items["prompt_lengths"]).to(hidden.device)
        width = int(responses.max()) if len(responses) else 0
        column = torch.arange(width, device=hidden.device)
        valid = column[None, :] < responses[:, None]                                          # (N, T)
        at = (items["prompt_lengths"].to(hidden.device)[:, None] + column[None, :]).clamp_max(hidden.shape[1] - 1)
        h = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[2]))                    # (N, T, D)
        feats = self.transform(h).to(users.device)
        valid = valid.to(users.device)
        return self.method.prefix_rewards(feats, users) * valid, valid


def is_causal(model) -> bool:
    """Whether a transformer's hidden state at a position ignores later tokens: two rows that differ only in
    their second token must agree at the first (dropout off while checking)."""
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    try:
        with torch.no_grad():
            ids = torch.tensor([[1, 2], [1, 3]], device=device)
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    finally:
        model.train(was_training)
    return torch.allclose(hidden[0, 0], hidden[1, 0], atol=1e-5)


@dataclass
class MeanState(SequenceState):
    """A :class:`MeanTokenGuide`'s cache plus each row's running sum of counted position rewards and their number
    (B,), and the candidates' own position rewards (B, k) between ``candidate_rewards`` and ``advance``."""

    total: Tensor | None = None
    count: Tensor | None = None
    steps: Tensor | None = None


class MeanTokenGuide(SequenceGuide):
    """A method whose sequence reward is the mean of per-position rewards (Global RM-v2, ``pools_positions``): the
    prefix reward r(x, y_<=t) is the running mean over the counted positions so far, so a step still runs one
    token per candidate, and the state carries the running sum (no re-run of the prefix). A response with no
    counted position yet (``pool_over: response`` before the first token) has reward 0."""

    name = "mean"

    def __init__(self, method: PersonalizedRewardModel, backbone) -> None:
        Guide.__init__(self, method, backbone)
        encoder = method.encoder
        if not isinstance(encoder, HFEncoder) or not is_causal(encoder.model):
            raise RecipeError(f"{type(method).__name__} averages per-token rewards; guiding decoding with it needs "
                              "a causal transformer backbone (backbone 'transformer' with a decoder such as SmolLM2 "
                              "or Qwen2.5): a bidirectional encoder's states change with every later token")
        self.model, self.pad_id, self.transform = encoder.model, encoder.pad_id, lambda h: h.float()
        self.model_device = next(self.model.parameters()).device

    @torch.no_grad()
    def prefill(self, prompts: dict, users: Tensor) -> MeanState:
        input_ids, mask = left_pad(_on(prompts, self.model_device), self.pad_id)
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        device = users.device
        if self.method.config.pool_over == "all":  # the prompt's positions count
            r = self.method.position_rewards(self.transform(out.last_hidden_state).to(device)) * mask.to(device)
            total, count = r.sum(1), mask.sum(1).to(device, r.dtype)
        else:
            total = count = torch.zeros(len(users), device=device)
        return MeanState(out.cache, mask, positions[:, -1], users, total / count.clamp_min(1), total=total,
                         count=count)

    def _candidate_values(self, state: MeanState, hidden: Tensor, k: int) -> Tensor:
        steps = self.method.position_rewards(self.transform(hidden).to(state.users.device))      # (B*k,)
        state.steps = steps.view(-1, k)
        return (state.total.repeat_interleave(k) + steps) / (state.count.repeat_interleave(k) + 1)

    @torch.no_grad()
    def advance(self, state: MeanState, candidates: Tensor, choice: Tensor) -> MeanState:
        b, k = candidates.shape
        rows = torch.arange(b, device=self.model_device) * k + choice.to(self.model_device)
        state.cache.batch_select_indices(rows)
        pick = choice[:, None].to(state.steps.device)
        return MeanState(state.cache, state.mask[rows], state.positions + 1, state.users,
                         state.rewards.gather(1, pick)[:, 0], total=state.total + state.steps.gather(1, pick)[:, 0],
                         count=state.count + 1)

    def _running_means(self, items: dict) -> tuple[Tensor, Tensor]:
        hidden, mask = self._hidden(items)
        device = next(self.method.parameters()).device
        return (self.method.running_means(self.transform(hidden).to(device), mask.to(device),
                                          items["prompt_lengths"].to(device)), mask.to(device))

    @torch.no_grad()
    def sequence_reward(self, items: dict, users: Tensor) -> Tensor:
        means, mask = self._running_means(items)
        return means.gather(1, (mask.sum(1) - 1)[:, None])[:, 0]

    @torch.no_grad()
    def naive_candidate_rewards(self, prompts: dict, generated: list[list[int]], candidates: Tensor, stop: Tensor,
                                users: Tensor) -> Tensor:
        b, k = candidates.shape
        items = {**append_tokens(prompts, generated, candidates),
                 "prompt_lengths": prompts["lengths"].repeat_interleave(k)}
        rewards = self.sequence_reward(items, users.repeat_interleave(k)).view(b, k)
        if stop.any():
            prev = self.sequence_reward({**append_tokens(prompts, generated), "prompt_lengths": prompts["lengths"]},
                                        users)
            rewards = torch.where(stop.to(rewards.device), prev[:, None], rewards)
        return rewards

    @torch.no_grad()
    def response_rewards(self, items: dict, users: Tensor) -> tuple[Tensor, Tensor]:
        """r(x, y_<=t) of every response prefix: the running means at the response's positions, one forward."""
        means, _ = self._running_means(items)
        device = means.device
        responses = (items["lengths"] - items["prompt_lengths"]).to(device)
        width = int(responses.max()) if len(responses) else 0
        column = torch.arange(width, device=device)
        valid = column[None, :] < responses[:, None]                                          # (N, T)
        at = (items["prompt_lengths"].to(device)[:, None] + column[None, :]).clamp_max(means.shape[1] - 1)
        return means.gather(1, at) * valid, valid


@dataclass
class TextState:
    """A text guide's prompts, each row's response so far (policy token ids), users, and rewards."""

    prompts: list[str]
    prefix: list[list[int]]
    users: Tensor
    prev: Tensor
    rewards: Tensor | None = None


class TextGuide(Guide):
    """Any factored method on a ``frozen_encoder`` whose features cannot be read prefix by prefix from one
    forward (a bidirectional encoder such as all-MiniLM-L6-v2, mean pooling): every candidate prefix is decoded to
    text with the *policy's* tokenizer and encoded afresh. The slow, general guide -- one encoder call per
    candidate per step, and per response prefix when scoring -- but it needs no shared tokenizer, and with a small
    encoder it is cheap. Its candidates that end the response get the reward of the response without them, as a
    sequence guide's do."""

    name = "text"

    def __init__(self, method: PersonalizedRewardModel, backbone, policy_tokenizer) -> None:
        super().__init__(method, backbone)
        if method.reward_shape != FACTORED or not hasattr(backbone, "encode_texts"):
            raise RecipeError(f"{type(method).__name__} cannot guide decoding: a text guide needs a factored method "
                              "on backbone 'frozen_encoder'")
        self.tok = policy_tokenizer

    @property
    def device(self) -> torch.device:
        return next(iter(self.method.parameters()), torch.zeros(0)).device

    def tokenize(self, prompts, responses=None) -> dict:
        """Text items: the guide reads text, split into the policy's tokens where it needs prefixes."""
        return {"prompts": [str(p) for p in prompts],
                "responses": None if responses is None else [str(r) for r in responses]}

    def _rewards(self, prompts: list[str], responses: list[str], users: Tensor) -> Tensor:
        feats = self.backbone.encode_texts(prompts, responses).to(users.device)
        return self.method.head(feats, users)

    def _text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def prefill(self, prompts: dict, users: Tensor) -> TextState:
        texts = prompts["prompts"]
        return TextState(texts, [[] for _ in texts], users, self._rewards(texts, [""] * len(texts), users))

    @torch.no_grad()
    def candidate_rewards(self, state: TextState, candidates: Tensor, stop: Tensor) -> Tensor:
        b, k = candidates.shape
        cand = candidates.tolist()
        prompts = [state.prompts[i] for i in range(b) for _ in range(k)]
        responses = [self._text(state.prefix[i] + [v]) for i in range(b) for v in cand[i]]
        rewards = self._rewards(prompts, responses, state.users.repeat_interleave(k)).view(b, k)
        state.rewards = torch.where(stop.to(rewards.device), state.prev[:, None], rewards)
        return state.rewards

    def advance(self, state: TextState, candidates: Tensor, choice: Tensor) -> TextState:
        chosen = candidates.gather(1, choice[:, None])[:, 0].tolist()
        prefix = [row + [v] for row, v in zip(state.prefix, chosen)]
        return TextState(state.prompts, prefix, state.users,
                         state.rewards.gather(1, choice[:, None].to(state.rewards.device))[:, 0])

    @torch.no_grad()
    def naive_candidate_rewards(self, prompts: dict, generated: list[list[int]], candidates: Tensor, stop: Tensor,
                                users: Tensor) -> Tensor:
        state = self.prefill(prompts, users)
        state.prefix = [list(g) for g in generated]
        if stop.any():
            state.prev = self._rewards(state.prompts, [self._text(g) for g in generated], users)
        return self.candidate_rewards(state, candidates, stop)

    @torch.no_grad()
    def response_rewards(self, items: dict, users: Tensor) -> tuple[Tensor, Tensor]:
        """r(x, y_<=t) at every policy token t of each response: each prefix decoded and encoded (each distinct
        (prompt, prefix) text once)."""
        ids = [self.tok(r, add_special_tokens=False)["input_ids"] for r in items["responses"]]
        width = max((len(i) for i in ids), default=0)
        at = [(n, t) for n, row in enumerate(ids) for t in range(len(row))]       # (response, token) positions
        keys = [(items["prompts"][n], self._text(ids[n][:t + 1]), int(users[n])) for n, t in at]
        index = {key: j for j, key in enumerate(dict.fromkeys(keys))}           # each distinct text once
        uniq = list(index)
        flat = self._rewards([k[0] for k in uniq], [k[1] for k in uniq],
                             torch.tensor([k[2] for k in uniq], dtype=torch.long, device=users.device))
        out = torch.zeros(len(ids), width, device=users.device)
        valid = torch.zeros(len(ids), width, dtype=torch.bool, device=users.device)
        if at:
            n, t = torch.tensor(at, device=users.device).T
            out[n, t] = flat[torch.tensor([index[k] for k in keys], device=users.device)]
            valid[n, t] = True
        return out, valid

    @torch.no_grad()
    def sequence_reward(self, items: dict, users: Tensor) -> Tensor:
        return self._rewards(items["prompts"], items["responses"], users)


def _on(items: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in items.items()}


class TokenGuide(Guide):
    """A token-level method (``TokenRewards``: GenARM, personalized GenARM, P-DPO): every vocabulary item's reward
    from one cached forward of B rows per step."""

    name = "token"

    def __init__(self, method: PersonalizedRewardModel, backbone) -> None:
        super().__init__(method, backbone)
        if not hasattr(method, "next_token_rewards"):
            raise RecipeError(f"{type(method).__name__} has no token-level reward (next_token_rewards)")
        self.beta = float(method.config.beta)

    def prefill(self, prompts: dict, users: Tensor) -> Any:
        return self.method.prefill(prompts, users)

    def next_token_rewards(self, state: Any) -> Tensor:
        return self.method.next_token_rewards(state)

    def candidate_rewards(self, state: Any, candidates: Tensor, stop: Tensor) -> Tensor:
        return self.method.next_token_rewards(state).gather(1, candidates)

    def advance(self, state: Any, candidates: Tensor, choice: Tensor) -> Any:
        return self.advance_tokens(state, candidates.gather(1, choice[:, None])[:, 0])

    def advance_tokens(self, state: Any, tokens: Tensor) -> Any:
        """Append one token per row (B,): the reward LM's cached step."""
        return self.method.advance(state, tokens)

    @torch.no_grad()
    def naive_candidate_rewards(self, prompts: dict, generated: list[list[int]], candidates: Tensor, stop: Tensor,
                                users: Tensor) -> Tensor:
        # the reward LM over the whole prefix, no cache kept: every candidate's reward is one of its outputs
        state = self.method.prefill(append_tokens(prompts, generated), users)
        return self.method.next_token_rewards(state).gather(1, candidates)

    @torch.no_grad()
    def response_rewards(self, items: dict, users: Tensor) -> tuple[Tensor, Tensor]:
        rewards = self.method.token_rewards(items, users)
        responses = items["lengths"] - items["prompt_lengths"]
        valid = torch.arange(rewards.shape[1], device=rewards.device)[None, :] < responses[:, None]
        return rewards, valid

    @torch.no_grad()
    def sequence_reward(self, items: dict, users: Tensor) -> Tensor:
        rewards, valid = self.response_rewards(items, users)
        return (rewards * valid).sum(1)


def guide_for(method: PersonalizedRewardModel, backbone, policy_tokenizer=None) -> Guide:
    """The guide a method serves: token-level if it has a token reward; prefix by prefix from a causal LM's
    states; else, on a frozen encoder given the policy's tokenizer, through text (:class:`TextGuide`)."""
    if method.pairwise_only:
        raise RecipeError(f"{type(method).__name__} is a pairwise-only method (it judges pairs, it has no reward of "
                          "one response); not usable for ARGS / policy evaluation")
    if hasattr(method, "next_token_rewards"):
        return TokenGuide(method, backbone)
    if getattr(method, "pools_positions", False):
        return MeanTokenGuide(method, backbone)
    try:
        return SequenceGuide(method, backbone)
    except RecipeError:
        if policy_tokenizer is None or not hasattr(backbone, "encode_texts") or method.reward_shape != FACTORED:
            raise
        return TextGuide(method, backbone, policy_tokenizer)
