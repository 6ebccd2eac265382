"""VPL: Variational Preference Learning (Poddar et al., "Personalizing Reinforcement Learning from Human Feedback
with Variational Preference Learning", NeurIPS 2024, arXiv 2408.10075, §4; the authors' code, WEIRDLabUW/vpl_llm,
``hidden_context/vae_utils.py``: PairEncoder, SequenceEncoder, Decoder, VAEModel, Annealer).

A user is a latent z inferred from a few of their annotated pairs (the context C_u) by an amortized encoder, and
the reward is a decoder conditioned on it (LoRe, Bose et al., arXiv 2504.14439, eq. 14, writes it the same way):

    a_i          = MLP_pair([e(x_i, y_i+); e(x_i, y_i-)])               2D -> H -> H -> L, LeakyReLU(0.2)
    s            = mean_i softmax((W_q a)(W_k a)^T / sqrt(L))_i (W_v a)  one-head self-attention over C_u, pooled
    mu, log s^2  = clamp(W_mu s, -1, 1), clamp(W_s s, -1, 1)              q(z | C_u) = N(mu, diag(s^2))
    r(x, y, z)   = MLP_dec([e(x, y); z])                                  (D + L) -> H -> H -> 1, LeakyReLU(0.2)

Training maximizes the ELBO (§4) over user-grouped episodes: for each user of a batch, a context C_u of C pairs
(C uniform in [c_min, c_max]) and the disjoint targets T_u (the user's other train pairs of that batch),

    ELBO_u = mean_{i in T_u} log sigmoid(r(y_i+, z) - r(y_i-, z)) - beta_t KL(N(mu, s^2) || N(0, I)),
    z = normalize(mu + s * eps) * sqrt(L)        (the authors' reparameterization: z on the sphere of radius sqrt(L))
    KL = -1/2 sum_l (1 + log s^2 - mu^2 - s^2)    (closed form, on the clamped mu and log s^2)

averaged over the batch's users; beta_t = beta times the authors' cyclical cosine annealing (0.1 -> 1 over
``anneal_steps`` optimizer steps, then again; ``anneal: false`` turns it off). The KL is logged (``train/kl``).
Evaluation uses the posterior mean, un-normalized, as the authors' ``forward`` does outside training
(``eval_latent: normalized_mean`` puts it on the training sphere instead).

Shared: every learned parameter (pair encoder, attention, posterior heads, decoder). Per user: ``user_latent``
(U, L), a buffer computed from data, the posterior mean mu. New users (``adapt``): one encoder pass over their
support pairs, padded to (U, k_max) with a mask on the attention keys and on the mean, no gradient. Seen users
(``fit_seen_users``): the same on a seeded sample of at most c_max of their train pairs (``seen_context``), so that
``plrm test`` reloads the same z.

Deviations from the authors' setup, and why:
- Contexts are the user's own train pairs, drawn per batch (the authors draw them from a pool of 100 survey items
  every user answered, one context per target). One context per user per batch is C times cheaper and has the
  same expectation. The episode scaffold (plrm.methods.episodic) first splits a user's pairs into a support pool
  (``support_fraction``) and a query set; the context is a random C of the pool, and the pool's other pairs join
  the targets, so every train pair of the batch is context or target, never both.
- Plain AdamW at a constant learning rate (the authors: cosine schedule with 3% warmup, bf16).
- With a trained backbone (LoRA), context pairs go through the same encoder as targets (the authors' LLM path
  embeds contexts with the frozen LLM).
- A user with no context pairs gets the prior mean z = 0.

Notes. The decoder's first layer is one (D + L) x H matrix, as in the authors' Decoder, applied as W_e e + W_z z:
W_e e is the user-independent ``item_embedding`` (computed once per item at evaluation), W_z z is added per user.
The clamp of mu to [-1, 1] (kept from the authors' code) stops its gradient once a coordinate saturates; on a small
low-rank world ~90% of the coordinates end at +-1, and two true user types can end on the same corner, so the
result depends on the initialization (tests/methods/test_vpl.py gives the spread). Posterior collapse (the KL
pulling every mu to 0 and the decoder ignoring z) shows as a small ``posterior_mean_norm`` in the diagnostics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plrm.config import opt
from plrm.methods import meta
from plrm.methods.base import MethodConfig, SeenUsersData, concat_inputs
from plrm.methods.episodic import EpisodeConfig, EpisodicRewardModel
from plrm.registry import methods


def gaussian_kl(mu: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(log_var))) || N(0, I)) of each row (..., L) -> (...): -1/2 sum (1 + log s^2 - mu^2 - s^2)."""
    return -0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(-1)


def annealed_weight(step: int, total_steps: int, baseline: float = 0.1, cyclical: bool = True) -> float:
    """The authors' Annealer (shape 'cosine'): (cos(pi (t / T - 1)) + 1) / 2 rescaled to [baseline, 1], with t the
    optimizer step modulo T (cyclical) or capped at T."""
    t = step % total_steps if cyclical else min(step, total_steps)
    return baseline + (1 - baseline) * (math.cos(math.pi * (t / total_steps - 1)) + 1) / 2


def leaky_mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of ``sizes`` with LeakyReLU(0.2) between them (the authors' PairEncoder and Decoder)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.LeakyReLU(0.2))
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


@methods.register("vpl")
class VPL(EpisodicRewardModel):
    """Variational Preference Learning: an amortized posterior over a user latent z from their context pairs, and a
    reward decoder conditioned on z."""

    user_state = ("user_latent",)

    @dataclass
    class Config(MethodConfig, EpisodeConfig):
        latent_dim: int = opt(512, "L, the latent dimension (VPL code and LoRe, Bose et al., arXiv 2504.14439, "
                                   "Table 5: 512). On small features (D = 16) 8 suffices.", min=1)
        hidden_dim: int = opt(512, "H, the hidden width of the pair encoder and of the decoder (VPL code and LoRe "
                                   "Table 5: 512). On small features (D = 16) 64 suffices.", min=1)
        lr: float = opt(1e-4, "AdamW learning rate (VPL code on UltraFeedback-P; LoRe Table 5: 1e-4).", gt=0)
        weight_decay: float = opt(0.001, "AdamW weight decay (VPL code; LoRe Table 5: 0.001).", min=0)
        beta: float = opt(3e-6, "KL weight (VPL code: 3e-6 on UltraFeedback-P-4, 1e-4 on Pets, 0 on "
                                "UltraFeedback-P-2). With small L and few users, 1e-3 works (H 64, L 8 on D = 16).",
                          min=0)
        anneal: bool = opt(True, "Cyclical cosine annealing of the KL weight, 0.1 beta -> beta over anneal_steps "
                                 "optimizer steps, then again (VPL code: on).")
        anneal_steps: int = opt(10000, "Length of one annealing cycle in optimizer steps (VPL code: 1e4).", min=1)
        c_min: int = opt(1, "Fewest context pairs of a training episode (VPL code: 2; 1 on its 2-user "
                                "data set).", min=1)
        c_max: int = opt(8, "Most context pairs of a training episode, and of a seen user's stored context "
                            "(VPL code: context_length 8).", min=1)
        support_fraction: float = opt(0.2, "Share of a user's train pairs in an episode's context pool (at least "
                                           "one pair); the context is C of them, C uniform in [c_min, c_max], and "
                                           "every other pair is a target. 0.2 gives users with >= 40 train pairs a "
                                           "pool of >= c_max = 8.", gt=0, lt=1)
        meta_batch_size: int = opt(8, "Users per training batch, one context each (plrm's choice; the VPL code's "
                                      "batch holds 32 contexts, one per target, while here each user brings all "
                                      "their train pairs as context and targets).", min=1)
        eval_latent: Literal["mean", "normalized_mean"] = opt(
            "mean", "Latent of evaluation and of new users: the posterior mean mu ('mean', the VPL code outside "
            "training) or mu scaled onto the training latents' sphere, normalize(mu) sqrt(L).")
        seen_context: Literal["sample", "all"] = opt(
            "sample", "A seen user's stored latent: the posterior of a seeded sample of at most c_max of their train "
            "pairs ('sample', as training contexts), or of all of them ('all').")
        context_seed: int = opt(0, "Seed of the seen users' context sample.", min=0)
        max_epochs: int = opt(10, "Epochs over the seen users; an epoch gives each seen user one context (plrm's "
                                  "choice; the VPL code trains 2 epochs over 4-8 re-drawn contexts per target).",
                              min=1, also=(-1,))

        def check(self) -> list[str]:
            if self.c_min > self.c_max:
                return [f"c_min: {self.c_min} exceeds c_max={self.c_max}"]
            return []

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        d, h, latent = feature_dim, config.hidden_dim, config.latent_dim
        self.pair_encoder = leaky_mlp([2 * d, h, h, latent])                   # a_i: (.., 2D) -> (.., L)
        self.w_q, self.w_k, self.w_v = nn.Linear(latent, latent), nn.Linear(latent, latent), nn.Linear(latent, latent)
        self.mean_layer, self.log_var_layer = nn.Linear(latent, latent), nn.Linear(latent, latent)
        self.decoder = leaky_mlp([d + latent, h, h, 1])                        # [e; z] -> r
        self.register_buffer("user_latent", torch.zeros(n_users, latent))     # (U, L): mu of each user
        self.last_episode: dict[str, Tensor] = {}                             # KL and target NLL, for the logs

    # ---- the encoder: q(z | context) -------------------------------------------------------------------------
    def posterior(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """mu and log s^2 (U, L), both clamped to [-1, 1], of each user's context pairs x (U, C, 2, D) (chosen,
        rejected features), padded slots masked out of the attention keys and of the mean; a user with no
        context gets the prior, mu = log s^2 = 0."""
        latent = self.config.latent_dim
        a = self.pair_encoder(x.flatten(-2))                                   # (U, C, L)
        has = mask.any(1)                                                      # (U,)
        keys = mask | ~has[:, None]  # a user without context attends everywhere; their result is replaced below
        scores = self.w_q(a) @ self.w_k(a).transpose(1, 2) / math.sqrt(latent)  # (U, C, C)
        attention = torch.softmax(scores.masked_fill(~keys[:, None, :], float("-inf")), dim=-1)
        values = (attention @ self.w_v(a)).masked_fill(~mask[..., None], 0.0)  # (U, C, L)
        pooled = values.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)        # (U, L)
        mu = self.mean_layer(pooled).clamp(-1, 1)
        log_var = self.log_var_layer(pooled).clamp(-1, 1)
        zero = torch.zeros_like(mu)
        return torch.where(has[:, None], mu, zero), torch.where(has[:, None], log_var, zero)

    def sample_latent(self, mu: Tensor, log_var: Tensor) -> Tensor:
        """The training latent normalize(mu + s * eps) sqrt(L) (U, L) (the authors' reparameterization)."""
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        return F.normalize(z, dim=-1) * math.sqrt(z.shape[-1])

    def eval_latent(self, mu: Tensor) -> Tensor:
        """The latent the reward reads for a stored posterior mean (``eval_latent``)."""
        if self.config.eval_latent == "normalized_mean":
            return F.normalize(mu, dim=-1) * math.sqrt(mu.shape[-1])
        return mu

    # ---- the decoder: r(x, y, z) -----------------------------------------------------------------------------
    def item_embedding(self, h: Tensor) -> Tensor:
        """W_e e + b, the item's part of the decoder's first layer: (..., D) -> (..., H)."""
        first = self.decoder[0]
        return F.linear(h, first.weight[:, :self.feature_dim], first.bias)

    def latent_embedding(self, z: Tensor) -> Tensor:
        """W_z z, the latent's part of the decoder's first layer: (..., L) -> (..., H)."""
        return F.linear(z, self.decoder[0].weight[:, self.feature_dim:])

    def decode(self, item: Tensor, latent: Tensor) -> Tensor:
        """r from an item embedding (..., H) and a latent embedding broadcastable to it: (...)."""
        return self.decoder[1:](item + latent)[..., 0]

    def reward_with(self, z: Tensor, mu: Tensor) -> Tensor:
        """r(x, y, z_u) (N,) of item embeddings z (N, H) under users' stored posterior means mu (N, L)."""
        return self.decode(z, self.latent_embedding(self.eval_latent(mu)))

    # ---- training episodes (the scaffold: plrm.methods.episodic) ------------------------------------------------
    def pair_inputs(self, batch: dict) -> Tensor:
        """Each pair's backbone features, chosen and rejected: (R, 2, D)."""
        n = len(batch["user_idx"])
        h = self.encode(concat_inputs(batch["chosen"], batch["rejected"]))    # (2R, D)
        return torch.stack([h[:n], h[n:]], dim=1)

    def context_mask(self, pool_mask: Tensor) -> Tensor:
        """A random context of each user's pool (U, S): C uniform in [c_min, min(c_max, n)] of their n pool pairs
        (all n when n < c_min)."""
        c = self.config
        n = pool_mask.sum(1)                                                   # (U,)
        high = n.clamp(max=c.c_max)
        low = high.clamp(max=c.c_min)
        size = low + (torch.rand(len(n), device=n.device) * (high - low + 1)).long().clamp(max=high - low)
        keys = torch.rand(pool_mask.shape, device=n.device).masked_fill(~pool_mask, 2.0)  # padded slots last
        rank = keys.argsort(1).argsort(1)
        return rank < size[:, None]

    def episode_sets(self, support: Tensor, support_mask: Tensor, query: Tensor,
                     query_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """An episode's context mask over the support pool (U, S) and its targets (U, S + Q, 2, D) with their mask:
        the pool's pairs outside the context, then the query pairs."""
        context = self.context_mask(support_mask)
        targets = torch.cat([support, query], dim=1)
        return context, targets, torch.cat([support_mask & ~context, query_mask], dim=1)

    def kl_weight(self) -> float:
        """beta_t: beta, annealed by the optimizer step when ``anneal``."""
        c = self.config
        return c.beta * annealed_weight(self.global_step, c.anneal_steps) if c.anneal else c.beta

    def episode_query_losses(self, support: Tensor, support_mask: Tensor, query: Tensor,
                             query_mask: Tensor) -> Tensor:
        """-ELBO_u (U,) of each user: a context drawn from their support pool, the pool's other pairs and the query
        pairs as targets."""
        context, targets, target_mask = self.episode_sets(support, support_mask, query, query_mask)
        mu, log_var = self.posterior(support, context)                        # (U, L)
        z = self.sample_latent(mu, log_var)
        rewards = self.decode(self.item_embedding(targets), self.latent_embedding(z)[:, None, None, :])  # (U, T, 2)
        pair_nll = -F.logsigmoid(rewards[..., 0] - rewards[..., 1]).masked_fill(~target_mask, 0.0)  # (U, T)
        nll = pair_nll.sum(1) / target_mask.sum(1).clamp_min(1)               # mean over each user's targets
        kl = gaussian_kl(mu, log_var)                                          # (U,)
        self.last_episode = {"kl": kl.detach(), "target_nll": nll.detach()}
        return nll + self.kl_weight() * kl

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        loss = super().training_step(batch, batch_idx)
        if self.last_episode:
            n = len(self.last_episode["kl"])
            self.log("train/kl", self.last_episode["kl"].mean(), batch_size=n)
            self.log("train/target_nll", self.last_episode["target_nll"].mean(), batch_size=n)
            self.log("train/beta", self.kl_weight(), batch_size=n)
        return loss

    # ---- per-user state --------------------------------------------------------------------------------------
    @torch.no_grad()
    def write_posterior(self, x: Tensor, user_idx: Tensor, users: Tensor, limit: int | None = None,
                        generator: torch.Generator | None = None) -> None:
        """user_latent[users] <- mu of each user's pairs among x (P, 2, D) (``user_idx`` (P,)), all users at once;
        ``limit``: at most that many of each user's pairs, a random sample drawn with ``generator``."""
        users = torch.sort(users).values
        owner = torch.searchsorted(users, user_idx)                            # position of each pair's user
        order = torch.arange(len(owner), device=owner.device)
        if limit is not None:
            order = torch.randperm(len(owner), generator=generator).to(owner.device)
        idx, mask = meta.pad_groups(owner[order], len(users))                  # (U, k_max)
        if limit is not None:
            idx, mask = idx[:, :limit], mask[:, :limit]
        mu, _ = self.posterior(x[order[idx]], mask)
        self.user_latent[users] = mu.to(self.user_latent.dtype)

    @torch.no_grad()
    def adapt(self, support: dict, users: Tensor) -> None:
        """z_u = mu(support_u) for every user of ``users`` at once: one encoder pass, no gradient."""
        self.write_posterior(self.pair_inputs(support), support["user_idx"], users)

    def fit_seen_users(self, seen: SeenUsersData) -> None:
        """Seen users' latents from a seeded sample of at most c_max of their train pairs (``seen_context:
        sample``) or from all of them."""
        c = self.config
        pairs = seen.pairs()
        sample = c.seen_context == "sample"
        self.write_posterior(self.pair_inputs(pairs), pairs["user_idx"], seen.users,
                             limit=c.c_max if sample else None,
                             generator=torch.Generator().manual_seed(c.context_seed) if sample else None)

    def diagnostics(self) -> dict:
        """The mean norm of the stored posterior means (near 0: the posterior collapsed onto the prior)."""
        return {"posterior_mean_norm": float(self.user_latent.norm(dim=1).mean())}
