"""GPO: Group Preference Optimization (Zhao, Dang, Grover, "Group Preference Optimization: Few-Shot Alignment of
Large Language Models", ICLR 2024, arXiv 2310.11523, §3; the authors' code, jamqd/Group-Preference-Optimization,
``models/gpo.py``, ``models/tnp.py``, ``models/modules.py``, ``train_gpo.py``, ``configs/gpo.yaml``).

A transformer neural process over a user's labelled examples. Each pair (y+, y-) of the user is two points
x = e(prompt, response) with labels 1 (chosen) and 0 (rejected). A point's token is

    t = MLP_emb([x; y])           four Linear layers with ReLU, width d_model (``build_mlp``, emb_depth 4)

where context points carry their label y and target points a 0 placeholder. The tokens of
[context ; targets] go through a post-norm ``nn.TransformerEncoder`` with no positional encoding (the authors'
class defines one, ``encode`` never adds it) under an attention mask that lets every position attend to
context positions only: context attends to context, a target sees neither itself nor any other target
(it reaches its own token only through the residual stream). A head MLP(d -> ff -> 2) gives (m, log s) per
target. The objective (§3: the log-likelihood of a user's target preferences given their context
preferences; ``GPO.forward``) is, per pair of targets,

    mu = softmax(m+, m-)          -log N(y; mu, exp(log s)^2) summed over the pair's two points

summed over the user's targets and averaged over the users of the batch; ``loss: bt`` replaces it by the
Bradley-Terry -log sigmoid(m+ - m-) per target pair (same reduction), which learns faster on the low-rank world.

Reward: r(x, y | C_u) = m, the raw mean before the softmax (``GPO.predict``; the authors take its argmax), a
pointwise reward given the user's context C_u. Targets never see each other, so a target's reward does not
depend on which other items are scored with it.

Meta-training runs on user-grouped batches (plrm.methods.episodic): each seen user's train pairs are split at
random into a support share (``support_fraction``) and a query share; the context is n_ctx ~ U[min_ctx, max_ctx]
support pairs and the targets n_tar ~ U[min_tar, max_tar] query pairs (the authors' collate draws both from the
group's questions), each range capped at what the user's share holds (the scaffold fixes the share, so with 50
pairs and support_fraction 0.5 at most 25 of each).

Per-user state is the context set itself, in three buffers of the state dict: ``context_z`` (U, 2K, d_model), the
points' item embeddings; ``context_labels`` (U, 2K); ``context_mask`` (U, 2K), K = ``context_pairs``. ``adapt``
writes a user's support pairs there (no gradient); seen users get a seeded random sample of at most K of their
train pairs after training (``fit_seen_users``), stored, so a reloaded checkpoint scores with the same context.

Cost: scoring T items of a user with C context pairs runs the encoder on [C_u ; targets]: O((2C + T) 2C) useful
attention scores per layer (the attention mask drops the target columns, which ``nn.TransformerEncoder`` still
computes), plus the context rows again for every user scored. Targets are split into chunks of TARGET_CHUNK, each
a sequence of its own (targets are independent, so this changes memory and time only). Memory: the context
buffers hold U x 2K x d_model floats (1,000 users, K = 100, d_model 128: 100 MB). Future work: the context rows do
not depend on the targets, so a per-user cache of the layers' context keys and values would score targets in
O(T 2C) without re-encoding C_u.

Deviations from the authors' code, and why:

* The first Linear of MLP_emb is split into its x part (``item_embedding``, applied once per unique item, as
  the evaluation protocol does for every factored method) and its label part; their sum is the same Linear on
  [x; y]. The context buffers hold these d_model-wide embeddings rather than the raw D-wide features
  (4096 -> 128 floats per point with LLM features); ``fit_seen_users`` and ``adapt`` recompute them with the
  current weights.
* ``target_flag: true`` (an option, off by default) appends an indicator f (0 context, 1 target) to every
  token, since with the authors' tokens a target's placeholder 0 reads like a context point labelled
  "rejected". On the low-rank world it changed nothing measurable (unseen accuracy over 4 seeds, 300 steps:
  0.979-0.998 with it, 0.994-0.998 without), so the default is the authors' tokens [x; y].
* The chosen / rejected order of a pair's two points is not shuffled: without positional encoding the encoder
  is permutation-equivariant and the softmax over a pair is symmetric, so the order changes nothing.
* Episode sizes are capped by the scaffold's support / query shares (above). Defaults are the authors'
  architecture and learning rate (Adam 3e-4, cosine to 0, 32 groups a batch) with the training length of
  the GPO runs of "When Personalization Meets Reality" (Dong et al., arXiv 2502.19158; its benchmark code,
  dong-river/Personalization-Benchmark, ``exp/gpo.sh``: 20k steps; the authors ran 200k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plrm.config import opt
from plrm.methods import meta
from plrm.methods.base import MethodConfig
from plrm.methods.episodic import EpisodeConfig, EpisodicRewardModel
from plrm.registry import methods

TARGET_CHUNK = 128          # targets of one user scored per sequence (they are independent of each other)
ATTENTION_ENTRIES = 2**24   # (sequence x head x query x key) attention scores materialized per forward
HALF_LOG_2PI = 0.9189385332046727


def rank_in_group(group: Tensor, counts: Tensor, order: Tensor) -> Tensor:
    """Each position's rank (N,) within its group ``group`` (N,) (``counts`` per group), ranked as ``order`` (a
    permutation of the positions that lists them group by group) lists them."""
    rank = torch.empty_like(group)
    rank[order] = torch.arange(len(group), device=group.device) - (torch.cumsum(counts, 0) - counts)[group[order]]
    return rank


@methods.register("gpo")
class GPO(EpisodicRewardModel):
    """GPO: an in-context transformer over a user's labelled pairs; the user's state is that context set."""

    user_state = ("context_z", "context_labels", "context_mask")
    joint_pair_scoring = True  # both items of a pair in one pass over the user's context

    @dataclass
    class Config(MethodConfig, EpisodeConfig):
        d_model: int = opt(128, "Width of the tokens and the transformer (configs/gpo.yaml: 128).", min=1)
        emb_depth: int = opt(4, "Linear layers of the token MLP MLP_emb([x; y]) (configs/gpo.yaml: 4).", min=2)
        dim_feedforward: int = opt(128, "Feed-forward width of each layer and of the head MLP "
                                        "(configs/gpo.yaml: 128).", min=1)
        n_heads: int = opt(4, "Attention heads (configs/gpo.yaml: 4); must divide d_model.", min=1)
        n_layers: int = opt(6, "Transformer layers (configs/gpo.yaml: 6).", min=1)
        dropout: float = opt(0.0, "Dropout of the transformer layers (configs/gpo.yaml: 0).", min=0, lt=1)
        loss: Literal["nll", "bt"] = opt(
            "nll", "'nll': the authors' Gaussian NLL of each target's label around the softmax of m over its pair "
                   "(GPO.forward); 'bt': Bradley-Terry -log sigmoid(m+ - m-) per target pair (learns faster).")
        target_flag: bool = opt(False, "Give every token an indicator (1: target, 0: context) next to its label, "
                                       "so a target's 0 placeholder differs from a context point labelled "
                                       "rejected (not in the authors' code; no gain measured on the low-rank "
                                       "world); false: the authors' tokens [x; y].")
        min_ctx: int = opt(10, "Fewest context pairs of a training episode (train_gpo.py: 10), capped at the "
                               "user's support share.", min=1)
        max_ctx: int = opt(100, "Most context pairs of a training episode (train_gpo.py: 100), capped at the "
                                "user's support share.", min=1)
        min_tar: int = opt(10, "Fewest target pairs of a training episode (train_gpo.py: 10), capped at the "
                               "user's query share.", min=1)
        max_tar: int = opt(100, "Most target pairs of a training episode (train_gpo.py: 100), capped at the "
                                "user's query share.", min=1)
        context_pairs: int | None = opt(None, "K, the context pairs stored per user: a seen user's seeded sample of "
                                              "their train pairs, a new user's support pairs (a random K of them "
                                              "when there are more); null: max_ctx.", min=1)
        context_seed: int = opt(0, "Seed of the sample of train pairs that forms a seen user's context.", min=0)
        support_fraction: float = opt(0.5, "Share of a seen user's train pairs an episode may draw its context "
                                           "from; the targets come from the rest (the authors draw both from all "
                                           "of a group's questions; 0.5 leaves room for both ranges).", gt=0, lt=1)
        meta_batch_size: int = opt(32, "Users (groups) per training batch (train_gpo.py: 32).", min=1)
        lr: float = opt(3e-4, "Adam learning rate (train_gpo.py: 3e-4).", gt=0)
        lr_schedule: Literal["cosine", "constant"] = opt(
            "cosine", "'cosine': anneal the learning rate to 0 over training (train_gpo.py); 'constant'.")
        max_epochs: int = opt(-1, "Epochs over the seen users (-1: max_steps decides).", min=1, also=(-1,))
        max_steps: int = opt(20000, "Optimizer steps (Dong et al., arXiv 2502.19158, in their benchmark code's "
                                    "exp/gpo.sh: 20k; train_gpo.py: 200k).", min=1, also=(-1,))

        def check(self) -> list[str]:
            problems = []
            if self.d_model % self.n_heads:
                problems.append(f"n_heads: must divide d_model={self.d_model}, got {self.n_heads}")
            if self.min_ctx > self.max_ctx:
                problems.append(f"min_ctx: must be <= max_ctx={self.max_ctx}, got {self.min_ctx}")
            if self.min_tar > self.max_tar:
                problems.append(f"min_tar: must be <= max_tar={self.max_tar}, got {self.min_tar}")
            return problems

        @property
        def capacity(self) -> int:
            return self.context_pairs if self.context_pairs is not None else self.max_ctx

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        problems = config.check()
        if problems:
            raise ValueError("gpo: " + "; ".join(problems))
        super().__init__(config, n_users, feature_dim, encoder)
        c, d = config, config.d_model
        # MLP_emb([x; y]) = rest(relu(W_x x + b + W_y y)): the first Linear split into its parts ([y; f]: flag)
        self.embed_x = nn.Linear(feature_dim, d)                                   # item_embedding
        self.embed_label = nn.Linear(2 if c.target_flag else 1, d, bias=False)
        rest: list[nn.Module] = [nn.ReLU()]
        for _ in range(c.emb_depth - 2):
            rest += [nn.Linear(d, d), nn.ReLU()]
        self.embed_rest = nn.Sequential(*rest, nn.Linear(d, d))
        layer = nn.TransformerEncoderLayer(d, c.n_heads, c.dim_feedforward, c.dropout, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, c.n_layers, enable_nested_tensor=False)
        self.predictor = nn.Sequential(nn.Linear(d, c.dim_feedforward), nn.ReLU(), nn.Linear(c.dim_feedforward, 2))
        points = 2 * c.capacity
        self.register_buffer("context_z", torch.zeros(n_users, points, d))                     # (U, 2K, d)
        self.register_buffer("context_labels", torch.zeros(n_users, points))                   # (U, 2K)
        self.register_buffer("context_mask", torch.zeros(n_users, points, dtype=torch.bool))   # (U, 2K)

    # ---- the network ----------------------------------------------------------------------------------------
    def item_embedding(self, h: Tensor) -> Tensor:
        return self.embed_x(h)  # the x part of MLP_emb's first Linear: (N, d)

    def tokens(self, z: Tensor, labels: Tensor, target: bool) -> Tensor:
        """MLP_emb([x; y]) ([x; y; f] with ``target_flag``) of points z (..., d) with labels (...,)."""
        label = labels[..., None]
        if self.config.target_flag:
            label = torch.cat([label, torch.full_like(label, float(target))], dim=-1)
        return self.embed_rest(z + self.embed_label(label))

    def predict(self, ctx_z: Tensor, ctx_labels: Tensor, ctx_mask: Tensor, tar_z: Tensor) -> tuple[Tensor, Tensor]:
        """(m, log s) (G, T) of targets tar_z (G, T, d) given contexts ctx_z (G, C, d) with labels (G, C) and mask
        (G, C); every context needs one unmasked point (else its attention rows are all masked: NaN)."""
        c_len, t_len = ctx_z.shape[1], tar_z.shape[1]
        x = torch.cat([self.tokens(ctx_z, ctx_labels, False),
                       self.tokens(tar_z, tar_z.new_zeros(tar_z.shape[:2]), True)], dim=1)   # (G, C+T, d)
        blocked = torch.ones(c_len + t_len, c_len + t_len, dtype=torch.bool, device=x.device)
        blocked[:, :c_len] = False                                  # every position attends to context only
        padding = torch.cat([~ctx_mask, torch.ones_like(ctx_mask[:, :1]).expand(-1, t_len)], dim=1)  # (G, C+T)
        out = self.predictor(self.transformer(x, mask=blocked, src_key_padding_mask=padding)[:, c_len:])
        return out[..., 0], out[..., 1]

    # ---- the reward: each user's targets under their stored context ---------------------------------------------
    def user_reward(self, z: Tensor, user_idx: Tensor) -> Tensor:
        """m (N,) of item embeddings z (N, d) for users user_idx (N,): rows grouped by user (and into chunks of
        TARGET_CHUNK targets), each group one sequence [context_u ; its targets], padded and masked."""
        n = len(z)
        if n == 0:
            return z.new_zeros(0)
        users, inv = torch.unique(user_idx, return_inverse=True)
        n_ctx = self.context_mask[users].sum(1)                                       # (U_b,)
        empty = users[n_ctx == 0]
        if len(empty):
            raise ValueError(f"gpo: users {empty[:10].tolist()} have an empty context set; GPO scores a user from "
                             "their context pairs, so adapt them with at least one pair (k >= 1) first")
        counts = torch.bincount(inv, minlength=len(users))
        rank = rank_in_group(inv, counts, torch.sort(inv, stable=True).indices)       # (N,) position in user
        chunks = (counts + TARGET_CHUNK - 1) // TARGET_CHUNK                          # (U_b,)
        group = (torch.cumsum(chunks, 0) - chunks)[inv] + rank // TARGET_CHUNK        # (N,) sequence of each row
        n_groups = int(chunks.sum())
        group_user = torch.repeat_interleave(users, chunks)                           # (G,)
        idx, mask = meta.pad_groups(group, n_groups)                                  # (G, T)
        c_len = int(n_ctx.max())  # contexts are left-aligned: every user's points lie in the first c_len slots
        length = c_len + idx.shape[1]
        step = max(1, ATTENTION_ENTRIES // (self.config.n_heads * length * length))
        values, rows = [], []
        for s in range(0, n_groups, step):  # memory chunks of whole sequences (not a loop over users)
            u, i, k = group_user[s:s + step], idx[s:s + step], mask[s:s + step]
            m, _ = self.predict(self.context_z[u, :c_len], self.context_labels[u, :c_len],
                                self.context_mask[u, :c_len], z[i])                   # (g, T)
            values.append(m[k])
            rows.append(i[k])
        return torch.cat(values).new_empty(n).index_copy(0, torch.cat(rows), torch.cat(values))

    # ---- meta-training -------------------------------------------------------------------------------------------
    def pair_inputs(self, batch: dict) -> Tensor:
        """Both items' embeddings of each pair (R, 2, d): the chosen point first."""
        return torch.stack(self.embed_pairs(batch), dim=1)

    @staticmethod
    def _draw(x: Tensor, mask: Tensor, low: int, high: int) -> tuple[Tensor, Tensor]:
        """A random n ~ U[min(low, a), min(high, a)] of the a unmasked pairs of each user (U, S, ...): the drawn
        pairs packed to the left (U, n_max, ...) and their mask."""
        available = mask.sum(1)                                                       # (U,)
        lo, hi = available.clamp(max=low), available.clamp(max=high)
        count = lo + (torch.rand(len(x), device=x.device) * (hi - lo + 1)).long().clamp(max=hi - lo)
        keys = torch.rand(mask.shape, device=x.device).masked_fill(~mask, 2.0)        # padding sorts last
        width = max(1, int(count.max()))
        picked = keys.argsort(dim=1)[:, :width]                                       # (U, n_max)
        index = picked.view(*picked.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, index), torch.arange(width, device=x.device) < count[:, None]

    @staticmethod
    def _points(pairs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A pair set (U, P, 2, d) as points (U, 2P, d) with labels 1 (chosen), 0 (rejected) and mask (U, 2P)."""
        u, p = mask.shape
        labels = torch.tensor([1.0, 0.0], device=pairs.device, dtype=pairs.dtype).repeat(u, p)
        return pairs.reshape(u, 2 * p, -1), labels, mask.repeat_interleave(2, dim=1)

    def episode_query_losses(self, support: Tensor, support_mask: Tensor, query: Tensor,
                             query_mask: Tensor) -> Tensor:
        """Each user's summed target loss (U,) given a context drawn from their support pairs."""
        c = self.config
        ctx, ctx_mask = self._draw(support, support_mask, c.min_ctx, c.max_ctx)      # (U, C, 2, d)
        tar, tar_mask = self._draw(query, query_mask, c.min_tar, c.max_tar)          # (U, T, 2, d)
        ctx_z, ctx_labels, ctx_points = self._points(ctx, ctx_mask)
        tar_z, tar_labels, _ = self._points(tar, tar_mask)
        m, log_s = self.predict(ctx_z, ctx_labels, ctx_points, tar_z)                # (U, 2T)
        m, log_s, y = (t.view(*tar_mask.shape, 2) for t in (m, log_s, tar_labels))
        if c.loss == "bt":
            per_pair = -F.logsigmoid(m[..., 0] - m[..., 1])                          # (U, T)
        else:
            mu = torch.softmax(m, dim=-1)                                             # (U, T, 2)
            nll = HALF_LOG_2PI + log_s + 0.5 * ((y - mu) * torch.exp(-log_s)).pow(2)  # -log N(y; mu, s^2)
            per_pair = nll.sum(-1)
        return (per_pair * tar_mask).sum(1)

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        self._base_lrs = [group["lr"] for group in optimizer.param_groups]
        return optimizer

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """``lr_schedule: cosine``: lr_t = lr (1 + cos(pi t / T)) / 2 at optimizer step t of T, set from the
        trainer's step count before each step (the closed form of CosineAnnealingLR, eta_min 0): a function of
        the step alone, so a resumed run follows the uninterrupted one exactly."""
        if self.config.lr_schedule != "cosine":
            return
        total = max(1, int(self.trainer.estimated_stepping_batches))
        factor = 0.5 * (1.0 + math.cos(math.pi * min(self.trainer.global_step, total) / total))
        for group, base in zip(self.optimizers().optimizer.param_groups, self._base_lrs):
            group["lr"] = base * factor

    # ---- the per-user state: context sets ---------------------------------------------------------------------
    @torch.no_grad()
    def adapt(self, support: dict, users: Tensor) -> None:
        """Write the support pairs of ``users`` (sorted) as their context sets, all users at once; a user with more
        than ``context_pairs`` pairs keeps a seeded random sample of that many. Shared weights are untouched."""
        if "row" in support:  # the seeded sample must not depend on the order the pairs arrive in
            order = torch.argsort(support["row"])
            support = {k: v[order] if isinstance(v, Tensor) and len(v) == len(order) else v
                       for k, v in support.items()}
        owner = torch.searchsorted(users, support["user_idx"])                        # (P,) position in users
        counts = torch.bincount(owner, minlength=len(users))
        if (counts == 0).any():
            raise ValueError(f"gpo: users {users[counts == 0][:10].tolist()} have no support pairs (k = 0); GPO "
                             "predicts from a user's context pairs and an empty context leaves its attention "
                             "fully masked, so adapt needs k >= 1")
        capacity = self.config.capacity
        keep = torch.ones_like(owner, dtype=torch.bool)
        if int(counts.max()) > capacity:
            g = torch.Generator(device=owner.device).manual_seed(self.config.context_seed)
            keys = owner.double() + torch.rand(len(owner), generator=g, device=owner.device, dtype=torch.float64)
            keep = rank_in_group(owner, counts, keys.argsort()) < capacity             # a random rank in user
        pairs = self.pair_inputs({k: v[keep] for k, v in support.items()})            # (P', 2, d)
        idx, mask = meta.pad_groups(owner[keep], len(users))                          # (U, S)
        z, labels, points = self._points(pairs[idx], mask)                            # (U, 2S, d)
        width = z.shape[1]
        self.context_z[users] = 0.0
        self.context_labels[users] = 0.0
        self.context_mask[users] = False
        self.context_z[users, :width] = (z * points[..., None]).to(self.context_z.dtype)
        self.context_labels[users, :width] = (labels * points).to(self.context_labels.dtype)
        self.context_mask[users, :width] = points
