"""PRM: the personalized reward model of P-RLHF (Li et al., "Personalized Language Modeling from Personalized Human
Feedback", arXiv 2402.05133, §3), as the baseline "Personalized RM" of "When Personalization Meets Reality" (Dong et
al., arXiv 2502.19158, §3.2).

A user encoder f_P(u) = e_u is read together with the input, and the reward model is trained on the personal and
the generic user's preferences at once (Dong et al. §3.2):

    e_u = e_0 + o_u   (u != 0),    e_{u_0} = e_0          e_0: the generic user; o_u: user u's offset (T x dim)
    L   = -alpha mean_i log sigma(r(x, y+, u_i) - r(x, y-, u_i)) - (1 - alpha) mean_i log sigma(r(x, y+, u_0)
          - r(x, y-, u_0))

The user model is P-RLHF's (plrm.methods.user_tokens.SoftUserTokens, shared with P-DPO), individual as above or
the cluster model e_u = sum_c softmax(w_u)_c V_c. The reward depends on the backbone:

* a ``transformer`` backbone (the faithful model): the T soft tokens e_u go in front of the tokens of prompt and
  response (``inputs_embeds``, attention on them), and r = v^T h_last, a linear head on the hidden state of the
  last response token (mean / first token for an encoder). The user changes the encoder's forward, so the reward is
  ``conditioned``; one forward scores chosen and rejected under the users' and the generic user's tokens (4B
  sequences). Defaults of Dong et al.'s PRM code and scripts: alpha 0.5, T 1 (P-RLHF's DPO scripts use 10).
* frozen features phi(x, y) (plrm's variant, in neither paper): r = w_2^T relu(W_phi phi + W_e vec(e_u) + b_1), an
  MLP on the concatenation [phi; e_u] with small tokens (T x user_dim). The feature part W_phi phi + b_1 does not
  depend on the user, so it is the item embedding and evaluation computes it once per item. A linear head is
  refused: v^T [phi; e_u] = v_phi^T phi + v_e^T e_u, and the user's term is the same for y+ and y-, so it cancels
  in every preference and the model is the generic one for every user.

Deviations, each for a reason:

* Both loss terms come from the same batch (stacked rows [u_i; u_0]); the authors' code duplicates every training
  pair with user 0 instead, which doubles the epoch. The expectation is the same. With ``balance_users`` both terms
  weight each pair by 1/|D_u|.
* The user tokens go first in every row, before a BOS token if the tokenizer adds one (P-RLHF puts them right after
  BOS), as P-DPO's do in plrm: one placement for both methods; Qwen2 tokenizers add no BOS.
* Frozen features: o_u starts at 0 (``init: auto``), so every user starts as the generic user and alpha = 0 gives
  the generic model exactly; P-RLHF initializes o_u like e_0 (vocabulary rows), which features have none of.
* New users. P-RLHF maps an unknown user to the generic user (Dong et al. §5: PRM "does not inherently support"
  cold start), and so does ``adapt: generic`` (the default): their o_u is set to 0, e_u = e_0.
  ``adapt: fit_offset`` is plrm's extension: each new user's o_u (cluster logits w_u) is fitted on their support
  pairs with everything else frozen, all users at once (plrm.methods.peruser), from o_u = 0; the model then
  declares ``adapts_new_users: yes`` and its numbers are a personal fit, not the paper's fallback.
* On a transformer, P-RLHF adds LoRA to the LM (Dong et al.'s PRM scripts: r 32, alpha 64, lr 1e-5 or 3e-5, 1 / 2 / 5
  epochs); those are the backbone's and the recipe's settings here. The defaults of ``lr``, ``batch_size`` and
  ``max_epochs`` below are the frozen variant's.

Shared: the backbone (LoRA), the head, e_0 (and the cluster tokens). Per user: the offsets o (U, T, dim) (the
cluster logits (U, C)).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plrm.backbones.causal_lm import select_rows
from plrm.backbones.text import pad, pool
from plrm.backbones.transformer import HFEncoder
from plrm.config import opt
from plrm.errors import RecipeError
from plrm.methods.base import CONDITIONED, AdaptConfig, MethodConfig, PersonalizedRewardModel, concat_inputs
from plrm.methods.peruser import fit_per_user
from plrm.methods.user_tokens import SoftUserTokens
from plrm.registry import methods


@dataclass
class PRMConfig(MethodConfig, AdaptConfig):
    """Options of PRM, on either backbone."""

    alpha: float = opt(0.5, "alpha of the loss alpha L(u) + (1 - alpha) L(u_0): the personal term against the "
                            "generic user's (P-RLHF's code default and every script of Dong et al.: 0.5). 1: personal "
                            "only; 0: only the generic user's term (o never trains).", min=0, max=1)
    n_tokens: int = opt(1, "T, user tokens per user (Dong et al.'s reward-model code: 1; P-RLHF's DPO scripts: 10).",
                        min=1)
    user_dim: int = opt(8, "Size of each user token on frozen features (plrm's variant; a transformer's tokens have "
                           "its hidden size). 8 reaches the personal oracle on a 4-direction world.", min=1)
    head: Literal["auto", "mlp", "linear"] = opt(
        "auto", "Reward head. auto: P-RLHF's linear v_head on the last hidden state on a transformer, an MLP on "
                "[phi(x, y); e_u] on frozen features. linear on frozen features is refused (the user's term cancels "
                "in r(y+) - r(y-)); mlp on a transformer: an MLP on the hidden state.")
    hidden: int = opt(64, "Hidden width H of an MLP head (plrm's choice; 64 reaches the personal oracle on the "
                          "low-rank worlds).", min=1)
    user_model: Literal["individual", "cluster"] = opt(
        "individual", "individual: e_u = e_0 + o_u (Dong et al.'s PRM); cluster: e_u = sum_c softmax(w_u)_c V_c over "
                      "n_clusters cluster tokens (P-RLHF's second user model).")
    n_clusters: int = opt(4, "C, cluster tokens of user_model: cluster.", min=1)
    init: Literal["auto", "vocab", "uniform", "zero"] = opt(
        "auto", "Initial user tokens. vocab: e_0 and every o_u copied from the transformer's input embeddings at "
                "distinct random vocabulary ids (P-RLHF's default; transformer only); uniform: U(-0.5, 0.5) "
                "(P-RLHF's other choice); zero: e_0 ~ U(-0.5, 0.5) and o_u = 0 (every user starts as the generic "
                "one); auto: vocab on a transformer, zero on frozen features.")
    adapt: Literal["generic", "fit_offset"] = opt(
        "generic", "New users: 'generic' gives them the generic user e_0 (P-RLHF; adapts_new_users: generic); "
                   "'fit_offset' fits their o_u (cluster logits w_u) on their support pairs from 0 with everything "
                   "else frozen (plrm's extension; adapts_new_users: yes). adapt_lr / adapt_steps / adapt_l2 set "
                   "the fit (their defaults were measured on frozen features; P-DPO fits a transformer's tokens "
                   "with 1e-3 and 50 steps).")
    lr: float = opt(0.01, "AdamW learning rate of the head and the user tokens (a transformer's LoRA adapter has "
                          "backbone.lr; Dong et al.'s PRM scripts: 1e-5 or 3e-5 for both). 0.01: the frozen variant, "
                          "measured on a 16-d low-rank world.", gt=0)
    batch_size: int = opt(256, "Training pairs per step (frozen variant; set it for a transformer).", min=1)
    max_epochs: int = opt(20, "Epochs over the seen users' train pairs (frozen variant, measured: 20 beats 40 on the "
                              "quickstart world; Dong et al. search 1, 2 and 5 on a transformer).", min=1, also=(-1,))


class _PRMBase(PersonalizedRewardModel):
    """What both backbones share: the user tokens, the alpha-weighted loss and new users' adaptation."""

    Config = PRMConfig
    adapts_new_users = "generic"  # the faithful default; an instance with adapt: fit_offset says 'yes'
    user_state = ("user_tokens.offsets",)

    def __init__(self, config: PRMConfig, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        self.adapts_new_users = "yes" if config.adapt == "fit_offset" else "generic"

    @property
    def ddp_find_unused_parameters(self) -> bool:
        return super().ddp_find_unused_parameters or self.config.alpha == 0  # alpha 0: o is never used

    def _make_user_tokens(self, dim: int, embeddings: Tensor | None, zero_offsets: bool) -> None:
        c = self.config
        self.user_tokens = SoftUserTokens(self.n_users, c.n_tokens, dim, c.user_model, c.n_clusters, embeddings)
        if zero_offsets and c.user_model == "individual":
            with torch.no_grad():
                self.user_tokens.offsets.zero_()
        self.user_state = tuple(f"user_tokens.{name}" for name in self.user_tokens.user_state)

    def user_state_of(self, user_idx: Tensor) -> Tensor:
        return getattr(self.user_tokens, self.user_tokens.user_state[0])[user_idx]

    def alpha_loss(self, personal: Tensor | None, generic: Tensor | None, batch: dict) -> Tensor:
        """alpha * BT NLL of the personal logits (B,) + (1 - alpha) * that of the generic user's (B,); a term of
        weight 0 is not computed (None), so it gives no gradient at all."""
        alpha = self.config.alpha
        terms = ([(alpha, personal)] if alpha > 0 else []) + ([(1.0 - alpha, generic)] if alpha < 1 else [])
        return sum(w * self.nll(logit, batch) for w, logit in terms)

    def generic_preference_logit(self, batch: dict) -> Tensor:
        """r(y+, u_0) - r(y-, u_0) of a batch of pairs (B,): the generic user's preference (the loss's second
        term; what an unseen user gets with ``adapt: generic``)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        """Every parameter without gradients inside the block (adaptation moves only the new users' state)."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in trainable:
                p.requires_grad_(True)

    @torch.no_grad()
    def adapt(self, support: dict, users: Tensor) -> None:
        """New users (sorted ``users``): o_u = 0 (cluster: the generic user's logits), i.e. the generic user; with
        ``adapt: fit_offset`` then fitted to each user's mean BT NLL on their support pairs, all users at once."""
        c, name = self.config, self.user_tokens.user_state[0]
        state = self.user_tokens.adaptation_start(len(users))                    # (U_new, T, dim) or (U_new, C)
        if c.adapt == "fit_offset" and c.adapt_steps > 0 and len(support["user_idx"]):
            with self._frozen():
                state = self._fit_user_state(support, users, state)
        getattr(self.user_tokens, name)[users] = state.to(getattr(self.user_tokens, name).dtype)

    def _fit_user_state(self, support: dict, users: Tensor, start: Tensor) -> Tensor:
        raise NotImplementedError


@methods.register("prm")
class PRM(_PRMBase):
    """PRM (P-RLHF's personalized RM): generic + offset user embeddings, personal + generic BT loss. On frozen
    features an MLP on [phi; e_u]; on a transformer backbone, soft user tokens in the input (:class:`SoftTokenPRM`)."""

    def __new__(cls, config: PRMConfig | None = None, n_users: int | None = None, feature_dim: int | None = None,
                encoder: nn.Module | None = None):
        # a transformer backbone gets the soft-token model (its own class, not a PRM subclass, so Python does not
        # run PRM.__init__ on it); recipes name both `prm`
        if cls is PRM and isinstance(encoder, HFEncoder):
            return SoftTokenPRM(config, n_users, feature_dim, encoder)
        return super().__new__(cls)

    def __init__(self, config: PRMConfig, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        if hasattr(self.encoder, "response_logprobs"):
            raise RecipeError("prm reads features or a transformer's hidden states; backbone causal_lm serves "
                              "log-probabilities: use backbone transformer (soft user tokens) or a feature backbone")
        if config.head == "linear":
            raise RecipeError(
                "prm head: linear on frozen features cannot personalize: r = v^T [phi(x, y); e_u] = v_phi^T phi(x, y) "
                "+ v_e^T e_u, and the user's term v_e^T e_u is the same for y+ and y-, so it cancels in r(y+) - "
                "r(y-) and every user gets the generic model's preferences. Use head: mlp (or auto), or a "
                "transformer backbone, where the user tokens enter the encoder")
        if config.init == "vocab":
            raise RecipeError("prm init: vocab copies rows of a transformer's input embeddings; frozen features have "
                              "no vocabulary: use init auto, zero or uniform")
        self._make_user_tokens(config.user_dim, None, zero_offsets=config.init in ("auto", "zero"))
        tokens = config.n_tokens * config.user_dim
        self.item_layer = nn.Linear(feature_dim, config.hidden)              # W_phi, b_1: (H, D)
        self.user_layer = nn.Linear(tokens, config.hidden, bias=False)       # W_e: (H, T * dim)
        self.out = nn.Linear(config.hidden, 1, bias=False)                   # w_2: (1, H); a bias would cancel

    def item_embedding(self, h: Tensor) -> Tensor:
        return self.item_layer(h)  # W_phi phi + b_1: (N, H)

    def _reward(self, z: Tensor, tokens: Tensor) -> Tensor:
        """w_2^T relu(z + W_e vec(e)): (N,) from z (N, H) and user tokens e (N or 1, T, dim)."""
        return self.out(torch.relu(z + self.user_layer(tokens.flatten(1))))[:, 0]

    def reward_with(self, z: Tensor, state: Tensor) -> Tensor:
        return self._reward(z, self.user_tokens.with_state(state))

    def generic_reward(self, z: Tensor) -> Tensor:
        """The generic user's reward (N,) of item embeddings z (N, H)."""
        return self._reward(z, self.user_tokens.generic(1))

    def generic_preference_logit(self, batch: dict) -> Tensor:
        z_chosen, z_rejected = self.embed_pairs(batch)
        return self.generic_reward(z_chosen) - self.generic_reward(z_rejected)

    def loss(self, batch: dict) -> Tensor:
        z_chosen, z_rejected = self.embed_pairs(batch)                          # (B, H) each
        alpha = self.config.alpha
        personal = self.pair_logit(z_chosen, z_rejected, batch["user_idx"]) if alpha > 0 else None
        generic = self.generic_reward(z_chosen) - self.generic_reward(z_rejected) if alpha < 1 else None
        return self.alpha_loss(personal, generic, batch)

    def _fit_user_state(self, support: dict, users: Tensor, start: Tensor) -> Tensor:
        c = self.config
        return self.fit_user_state(support, users, start, c.adapt_steps, c.adapt_lr, c.adapt_l2)


class SoftTokenPRM(_PRMBase):
    """PRM on a transformer backbone: [e_u; tokens(prompt + response)] through the (LoRA) transformer, reward =
    v_head(h_last). Built by ``PRM`` when the backbone is a transformer."""

    reward_shape = CONDITIONED

    def __init__(self, config: PRMConfig, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        if not isinstance(self.encoder, HFEncoder):
            raise RecipeError(f"SoftTokenPRM needs backbone transformer; got {type(self.encoder).__name__}")
        embeddings = self.encoder.model.get_input_embeddings().weight
        self._make_user_tokens(int(embeddings.shape[1]), embeddings if config.init in ("auto", "vocab") else None,
                               zero_offsets=config.init == "zero")
        if config.head == "mlp":
            self.v_head = nn.Sequential(nn.Linear(feature_dim, config.hidden), nn.ReLU(),
                                        nn.Linear(config.hidden, 1, bias=False))
        else:
            self.v_head = nn.Linear(feature_dim, 1, bias=False)                # v: (1, d); a bias would cancel

    # ---- the reward -----------------------------------------------------------------------------------------
    def _forward(self, items: dict, tokens: Tensor) -> Tensor:
        """v_head(pooled hidden state) (N,) of ragged token batches ``items`` after each row's user tokens
        ``tokens`` (N, T, d): right-padded, so a row reads [e_u, tokens, pads] and its real tokens keep their
        positions after the T user tokens."""
        enc = self.encoder
        input_ids, mask = pad(items, enc.pad_id)                                 # (N, L)
        vectors = enc.model.get_input_embeddings()(input_ids)                    # (N, L, d)
        t = tokens.shape[1]
        embeds = torch.cat([tokens.to(vectors.dtype), vectors], dim=1)          # (N, T + L, d)
        attention = torch.cat([mask.new_ones(len(mask), t), mask], dim=1)
        hidden = enc.model(inputs_embeds=embeds, attention_mask=attention).last_hidden_state[:, t:]
        return self.v_head(pool(hidden, mask, enc.pooling).float())[:, 0]

    def rewards_with_tokens(self, items: dict, tokens: Tensor) -> Tensor:
        """Rewards (N,) of ``items`` under user tokens (N, T, d); chunks of the backbone's inference batch size when
        gradients are off."""
        n, chunk = len(items["lengths"]), self.encoder.inference_batch_size
        if torch.is_grad_enabled() or n <= chunk:
            return self._forward(items, tokens)
        rows = torch.arange(n, device=items["lengths"].device)
        return torch.cat([self._forward(select_rows(items, r), tokens[r]) for r in rows.split(chunk)])

    def conditioned_reward(self, items: Any, user_idx: Tensor, item_stats: Tensor | None) -> Tensor:
        return self.rewards_with_tokens(items, self.user_tokens(user_idx))

    def generic_preference_logit(self, batch: dict) -> Tensor:
        n = len(batch["user_idx"])
        r = self.rewards_with_tokens(concat_inputs(batch["chosen"], batch["rejected"]), self.user_tokens.generic(2 * n))
        return r[:n] - r[n:]

    # ---- training and adaptation ------------------------------------------------------------------------------
    def loss(self, batch: dict) -> Tensor:
        """Both terms in one forward of up to 4B sequences: (personal, generic) x (chosen, rejected)."""
        users, n, alpha = batch["user_idx"], len(batch["user_idx"]), self.config.alpha
        items = concat_inputs(batch["chosen"], batch["rejected"])                # (2B): chosen, then rejected
        prefixes = ([self.user_tokens(users).repeat(2, 1, 1)] if alpha > 0 else []) + \
                   ([self.user_tokens.generic(2 * n)] if alpha < 1 else [])
        k = len(prefixes)
        r = self.rewards_with_tokens(concat_inputs(*[items] * k), torch.cat(prefixes)).view(k, 2, n)
        logits = r[:, 0] - r[:, 1]                                               # (k, B)
        return self.alpha_loss(logits[0] if alpha > 0 else None, logits[-1] if alpha < 1 else None, batch)

    def _fit_user_state(self, support: dict, users: Tensor, start: Tensor) -> Tensor:
        c = self.config
        items = concat_inputs(support["chosen"], support["rejected"])              # (2P)
        p = len(support["user_idx"])

        def pair_nll(state: Tensor, _positions: Tensor) -> Tensor:               # state: each pair's user's (P, ...)
            r = self.rewards_with_tokens(items, self.user_tokens.with_state(state).repeat(2, 1, 1))
            return -F.logsigmoid(r[:p] - r[p:])

        owner = torch.searchsorted(users, support["user_idx"])
        return fit_per_user(start, owner, pair_nll, steps=c.adapt_steps, lr=c.adapt_lr, l2=c.adapt_l2)
