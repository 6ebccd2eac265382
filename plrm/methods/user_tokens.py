"""Soft user tokens: P-DPO's user model (Li et al., "Personalized Language Modeling from Personalized Human
Feedback", arXiv 2402.05133, §3), shared by P-DPO and the personalized GenARM.

Each user is T_u vectors in the LM's input-embedding space, put in front of the prompt (``inputs_embeds``):

    individual   e_u = e_0 + o_u          e_0 (T_u, d): the generic user; o_u (T_u, d): user u's offset
    cluster      e_u = sum_c softmax(w_u)_c V_c     V_c (C, T_u, d): cluster tokens; w_u (C,): user u's logits

The generic user (what an unseen user gets without adaptation, and the second term of P-DPO's loss) is e_0, or
in the cluster model the mixture of its own logits w_0. Initialization as the authors' code
(``initialize_from_vocab``): rows copied from the LM's input embeddings of distinct random vocabulary ids (seed
123), else uniform in [-0.5, 0.5].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plrm import capabilities as cap
from plrm.backbones.causal_lm import LMState, select_rows
from plrm.config import opt
from plrm.errors import RecipeError
from plrm.methods.base import CONDITIONED, PersonalizedRewardModel, SeenUsersData, concat_inputs
from plrm.methods.losses import dpo_logits, dpo_loss
from plrm.methods.optim import adam

VOCAB_INIT_SEED = 123


def vocabulary_rows(embeddings: Tensor, n: int, seed: int = VOCAB_INIT_SEED) -> Tensor:
    """``n`` rows of the embedding matrix (V, d) at distinct random vocabulary ids (with repeats only when n > V)."""
    g = torch.Generator().manual_seed(seed)
    vocab = embeddings.shape[0]
    ids = torch.cat([torch.randperm(vocab, generator=g) for _ in range(-(-n // vocab))])[:n]
    return embeddings.detach()[ids.to(embeddings.device)].float().clone()


class SoftUserTokens(nn.Module):
    """The soft tokens of every user, (N, T_u, d) for a batch of user ids (:meth:`forward`) or of the generic
    user (:meth:`generic`). ``user_state``: the names (in this module) of the per-user tensors (first dim U) that
    new users' adaptation writes."""

    def __init__(self, n_users: int, n_tokens: int, dim: int, model: Literal["individual", "cluster"] = "individual",
                 n_clusters: int = 4, embeddings: Tensor | None = None) -> None:
        super().__init__()
        self.kind, self.n_tokens, self.dim = model, n_tokens, dim

        def init(*shape: int) -> Tensor:
            rows = int(torch.Size(shape).numel() // dim)
            if embeddings is not None:
                return vocabulary_rows(embeddings, rows).view(*shape)
            g = torch.Generator().manual_seed(VOCAB_INIT_SEED)
            return torch.rand(*shape, generator=g) - 0.5

        if model == "individual":
            both = init(n_users + 1, n_tokens, dim)                 # row block 0: e_0; blocks 1..U: o_u
            self.generic_tokens = nn.Parameter(both[0].clone())     # (T_u, d)
            self.offsets = nn.Parameter(both[1:].clone())           # (U, T_u, d)
            self.user_state: tuple[str, ...] = ("offsets",)
        elif model == "cluster":
            self.cluster_tokens = nn.Parameter(init(n_clusters, n_tokens, dim))         # (C, T_u, d)
            self.logits = nn.Parameter(torch.zeros(n_users, n_clusters))               # (U, C): uniform mixture
            self.generic_logits = nn.Parameter(torch.zeros(n_clusters))                # (C,)
            self.user_state = ("logits",)
        else:
            raise ValueError(f"unknown user model {model!r}; choose individual or cluster")

    def forward(self, user_idx: Tensor) -> Tensor:
        """e_u (N, T_u, d) of users ``user_idx`` (N,)."""
        if self.kind == "individual":
            return self.generic_tokens.unsqueeze(0) + self.offsets[user_idx]
        weights = torch.softmax(self.logits[user_idx], dim=-1)                       # (N, C)
        return (weights @ self.cluster_tokens.flatten(1)).view(-1, self.n_tokens, self.dim)

    def generic(self, n: int) -> Tensor:
        """e_0 (n, T_u, d): the generic user, n times."""
        if self.kind == "individual":
            return self.generic_tokens.unsqueeze(0).expand(n, -1, -1)
        weights = torch.softmax(self.generic_logits, dim=-1)
        return (weights @ self.cluster_tokens.flatten(1)).view(1, self.n_tokens, self.dim).expand(n, -1, -1)

    def with_state(self, state: Tensor) -> Tensor:
        """e_u (N, T_u, d) with candidate per-user parameters ``state`` (N, ...) in place of the table's rows:
        what adaptation optimizes (an offset o_u, or cluster logits w_u)."""
        if self.kind == "individual":
            return self.generic_tokens.unsqueeze(0) + state
        weights = torch.softmax(state, dim=-1)
        return (weights @ self.cluster_tokens.flatten(1)).view(-1, self.n_tokens, self.dim)

    def adaptation_start(self, n: int) -> Tensor:
        """Where a new user's parameters start: the generic user (o_u = 0, or w_u = w_0)."""
        if self.kind == "individual":
            return torch.zeros(n, self.n_tokens, self.dim, device=self.offsets.device)
        return self.generic_logits.detach().unsqueeze(0).repeat(n, 1)


def require_causal_lm(model: PersonalizedRewardModel) -> None:
    """Refuse a method built on an encoder that serves no log-probabilities (the runner's capability check stops
    a recipe earlier; this one is for code that builds the method itself)."""
    if not hasattr(model.encoder, "response_logprobs"):
        raise RecipeError(f"{type(model).__name__} needs backbone causal_lm (a causal LM's log-probabilities); got "
                          f"{type(model.encoder).__name__}")


@dataclass
class UserTokenConfig:
    """Options of the soft-token user model (P-DPO; GenARM with ``personalized: true``)."""

    n_tokens: int = opt(8, "T_u, soft tokens per user (Selection Crisis, arXiv 2512.23067, App. F.1: 8; the "
                           "P-RLHF scripts use 10).", min=1)
    user_model: Literal["individual", "cluster"] = opt(
        "individual", "individual: e_u = e_0 + o_u (what the Selection Crisis paper uses); cluster: e_u = sum_c "
                      "softmax(w_u)_c V_c over n_clusters cluster tokens (P-RLHF's second user model).")
    n_clusters: int = opt(4, "C, cluster tokens of user_model: cluster.", min=1)
    init: Literal["vocab", "uniform"] = opt("vocab", "Initial soft tokens: rows of the LM's input embeddings at "
                                                     "distinct random vocabulary ids (P-RLHF's default), or U(-0.5, "
                                                     "0.5).")
    alpha: float = opt(0.5, "alpha of the loss alpha * L(u) + (1 - alpha) * L(u_0): the personal term against "
                            "the generic user's (P-RLHF: 0.5). 1: personal only; 0: a global model.", min=0, max=1)
    adapt: Literal["fit", "generic"] = opt(
        "fit", "New users: 'fit' trains their own tokens (o_u from 0, or w_u from the generic user's) on their "
               "support pairs with the LM frozen, all users at once; 'generic' gives them the generic user e_0 "
               "(P-RLHF's unseen users).")
    adapt_lr: float = opt(1e-3, "Adam learning rate of adapt: fit.", gt=0)
    adapt_steps: int = opt(50, "Full-batch Adam steps of adapt: fit.", min=0)


@dataclass
class TokenRewardState:
    """Decoding state of a token-level reward: the reward LM's (after the user's tokens, if any) and, for a
    reward relative to the frozen reference (P-DPO's implicit reward), the reference model's."""

    lm: LMState
    reference: LMState | None = None


class TokenRewards:
    """The token-level reward of a causal-LM reward model over the whole vocabulary, for reward-guided decoding:

        r(v | x, y_<t) = beta (log pi(v | [e_u,] x, y_<t) [- log pi_ref(v | x, y_<t)])    for every token v

    one cached forward per generated token (two with a reference): ``state = prefill(prompts, users)``, then
    ``next_token_rewards(state)`` (B, V) and ``state = advance(state, tokens)`` for each chosen token. Summed along
    a response it is the sequence reward (``token_rewards`` scores a whole response in one forward)."""

    uses_reference: ClassVar[bool] = False

    def token_prefix(self, user_idx: Tensor) -> Tensor | None:
        """The soft-token prefix of each row's user (B, T, d), or None for a reward that ignores the user."""
        return None

    def prefill(self, prompts: dict, user_idx: Tensor) -> TokenRewardState:
        """Run ragged prompts ({'ids', 'lengths'}, the backbone's token ids) for users ``user_idx`` (B,) once."""
        lm = self.encoder.prefill(prompts, self.token_prefix(user_idx))
        if not self.uses_reference:
            return TokenRewardState(lm)
        with self.encoder.reference():
            return TokenRewardState(lm, self.encoder.prefill(prompts))

    def advance(self, state: TokenRewardState, tokens: Tensor) -> TokenRewardState:
        """Append the chosen token of each row (B,); the old state is consumed (its caches grow in place)."""
        lm = self.encoder.advance(state.lm, tokens)
        if state.reference is None:
            return TokenRewardState(lm)
        with self.encoder.reference():
            return TokenRewardState(lm, self.encoder.advance(state.reference, tokens))

    def next_token_rewards(self, state: TokenRewardState) -> Tensor:
        """r(v | x, y_<t) for every vocabulary item v: (B, V) float32."""
        logps = state.lm.logprobs if state.reference is None else state.lm.logprobs - state.reference.logprobs
        return self.config.beta * logps


class UserTokenRewardModel(TokenRewards, PersonalizedRewardModel):
    """Base of methods whose user is a soft-token prefix of a causal LM (backbone ``causal_lm``): the reward
    r_u(x, y) = beta (log pi(y | e_u, x) [- log pi_ref(y | x)]), trained with alpha * L(u) + (1 - alpha) * L(u_0)
    where both terms come from the same batch (one forward of 4B sequences: chosen and rejected, each with the
    user's and the generic user's tokens). ``uses_reference``: whether the reward subtracts the frozen base model's
    log-probability (P-DPO) or not (GenARM's reward LM); the reference log-probabilities are computed once per item
    and kept (the base model never changes)."""

    needs = frozenset({cap.LM, cap.USERS})
    reward_shape = CONDITIONED
    uses_reference: ClassVar[bool] = True

    def __init__(self, config: Any, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        require_causal_lm(self)
        embeddings = self.encoder.input_embeddings().weight if config.init == "vocab" else None
        self.user_tokens = SoftUserTokens(n_users, config.n_tokens, self.encoder.hidden_size, config.user_model,
                                          config.n_clusters, embeddings)
        self.user_state = tuple(f"user_tokens.{name}" for name in self.user_tokens.user_state)
        # summed reference log-probability of each item (by backbone item id), NaN until computed
        self.register_buffer("reference_logps", torch.empty(0), persistent=False)
        self.reference_ready = False  # before_fit cached every training item: training steps only index the cache

    # ---- the reward -----------------------------------------------------------------------------------------
    def before_fit(self, seen: SeenUsersData) -> None:
        """The reference log-probability of every training item, once, in item order: training then reads it
        from the cache, and a resumed run computes exactly the same values (the batches a value is first computed
        in would otherwise change its last bits through padding)."""
        if not self.uses_reference:
            return
        pairs = seen.pairs()
        items = concat_inputs(pairs["chosen"], pairs["rejected"])
        _, first = np.unique(items["item"].cpu().numpy(), return_index=True)  # each item once, in item order
        self.item_statistics(select_rows(items, torch.from_numpy(first).to(items["item"].device)))
        self.reference_ready = True

    def item_statistics(self, items: dict) -> Tensor | None:
        """log pi_ref(y | x) (N, 1) of each item, with the adapter off and no soft tokens: computed once per item
        id and kept. None when the method has no reference. The ids are the backbone's item ids of the data this
        model was built for (the runner builds a new model for other data, e.g. `plrm adapt --pairs`)."""
        if not self.uses_reference:
            return None
        ids = items["item"]
        need = int(ids.max()) + 1 if len(ids) else 0
        if len(self.reference_logps) < need:
            grown = torch.full((need,), float("nan"), device=ids.device)
            grown[:len(self.reference_logps)] = self.reference_logps
            self.reference_logps = grown
        missing = torch.isnan(self.reference_logps[ids])
        if missing.any():
            rows = torch.nonzero(missing).squeeze(1)
            with torch.no_grad(), self.encoder.reference():
                self.reference_logps[ids[rows]] = self.encoder.sequence_logprob(select_rows(items, rows))
        return self.reference_logps[ids].unsqueeze(1)

    def token_prefix(self, user_idx: Tensor) -> Tensor:
        return self.user_tokens(user_idx)

    def conditioned_reward(self, items: dict, user_idx: Tensor, item_stats: Tensor | None) -> Tensor:
        logps = self.encoder.sequence_logprob(items, self.user_tokens(user_idx))
        if item_stats is not None:
            logps = logps - item_stats[:, 0]
        return self.config.beta * logps

    def token_rewards(self, items: dict, user_idx: Tensor) -> Tensor:
        """beta log pi(y_t | e_u, x, y_<t) (B, T) [- beta log pi_ref(y_t | x, y_<t)]: the per-token reward, left
        aligned (0 past a response's end)."""
        logps, mask = self.encoder.response_logprobs(items, self.user_tokens(user_idx))
        if self.uses_reference:
            with torch.no_grad(), self.encoder.reference():
                ref, _ = self.encoder.response_logprobs(items)
            logps = logps - ref
        return self.config.beta * logps * mask

    # ---- training -------------------------------------------------------------------------------------------
    def pair_loss(self, logits: Tensor, pair_weight: Tensor | None) -> Tensor:
        """The loss of a batch of DPO logits (P,); GenARM adds its target margin."""
        return dpo_loss(logits, self.config.label_smoothing, 0.0, pair_weight)

    def loss(self, batch: dict) -> Tensor:
        users, n = batch["user_idx"], len(batch["user_idx"])
        items = concat_inputs(batch["chosen"], batch["rejected"])                 # (2B): chosen, then rejected
        if self.uses_reference and self.reference_ready:  # a plain index: no host sync in the training step
            ref = self.reference_logps[items["item"]].unsqueeze(1)
        else:
            ref = self.item_statistics(items)
        alpha = self.config.alpha
        prefixes = ([self.user_tokens(users).repeat(2, 1, 1)] if alpha > 0 else []) + \
                   ([self.user_tokens.generic(2 * n)] if alpha < 1 else [])
        k = len(prefixes)                                                        # 2: personal and generic terms
        logps = self.encoder.sequence_logprob(concat_inputs(*[items] * k), torch.cat(prefixes)).view(k, 2, n)
        weight = batch["pair_weight"] if self.config.balance_users else None
        ref_c, ref_r = (None, None) if ref is None else (ref[:n, 0], ref[n:, 0])
        terms = [self.pair_loss(dpo_logits(lp[0], lp[1], ref_c, ref_r, self.config.beta), weight) for lp in logps]
        weights = ([alpha] if alpha > 0 else []) + ([1.0 - alpha] if alpha < 1 else [])
        return sum(w * t for w, t in zip(weights, terms))

    # ---- new users ------------------------------------------------------------------------------------------
    def adapt(self, support: dict, users: Tensor) -> None:
        """``adapt: fit``: each new user's own parameters (o_u from 0, or cluster logits from the generic user's),
        minimizing the mean personal loss on their support pairs with everything else frozen, all users at once
        (each pair reads its user's parameters; Adam is elementwise, so users do not interact). ``generic``: the
        generic user's."""
        tokens, name = self.user_tokens, self.user_tokens.user_state[0]
        state = tokens.adaptation_start(len(users))
        if self.config.adapt == "fit" and self.config.adapt_steps > 0 and len(support["user_idx"]):
            state = self._fit_users(support, users, state)
        with torch.no_grad():
            getattr(tokens, name)[users] = state.to(getattr(tokens, name).dtype)

    def _fit_users(self, support: dict, users: Tensor, start: Tensor) -> Tensor:
        owner = torch.searchsorted(users, support["user_idx"])                  # each pair's user, in `users`
        p = len(owner)
        items = concat_inputs(support["chosen"], support["rejected"])
        with torch.no_grad():
            ref = self.item_statistics(items)
        ref_c, ref_r = (None, None) if ref is None else (ref[:p, 0], ref[p:, 0])
        per_user = torch.bincount(owner, minlength=len(users)).clamp_min(1).to(start.dtype)
        trainable = [q for q in self.parameters() if q.requires_grad]
        for q in trainable:  # only the new users' parameters move (and get gradients)
            q.requires_grad_(False)
        state = start.clone().requires_grad_(True)
        optimizer = adam([state], lr=self.config.adapt_lr)
        try:
            with torch.enable_grad():
                for _ in range(self.config.adapt_steps):
                    prefix = self.user_tokens.with_state(state[owner]).repeat(2, 1, 1)
                    logps = self.encoder.sequence_logprob(items, prefix)
                    logits = dpo_logits(logps[:p], logps[p:], ref_c, ref_r, self.config.beta)
                    loss = (-F.logsigmoid(logits) / per_user[owner]).sum()   # sum over users of their mean
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        finally:
            for q in trainable:
                q.requires_grad_(True)
        return state.detach()

