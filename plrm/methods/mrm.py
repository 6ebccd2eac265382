"""MRM: Meta Reward Modeling (Cai et al., "One Adapts to Any: Meta Reward Modeling for Personalized LLM
Alignment", arXiv 2601.18731, §4, Algorithm 2, eq. 5-15, §5.1.4; Table 2 ablations).

    r_i(x, y) = sum_k w_ik phi_k(x, y)                                    (eq. 5; K base reward functions)

Meta-training (Algorithm 2) over meta-batches of ``meta_batch_size`` seen users (§5.1.4: 2); each user's train
pairs are split at random, every time the user is drawn, into a support set (``support_fraction``, §5.1.4: 10%)
and a query set (the episode scaffold, plrm.methods.episodic):
    inner loop   w_i = w0 - alpha grad_w L_i(w; support_i), ``inner_steps`` times       (eq. 8)
    outer loop   w0, phi <- Adam step on A({L_i(w_i; query_i)}_i)                       (eq. 9-10)
through the inner steps (second order; ``first_order`` for FOMAML). A is the Robust Personalization Objective
(eq. 13-15; plrm.methods.losses.robust_objective): tau = the (1 - rho) quantile of the batch's query losses,
weights sigmoid((L_i - tau) / gamma) (gamma = 0: hard filtering). The inner loop runs for all users of a
meta-batch at once (torch.func grad + vmap over padded, masked support sets; plrm.methods.meta).

New users (eq. 11) and, after training, the seen users: the same inner steps from w0 on their pairs (the
seen users' on all their train pairs), vectorized over users.

Loss scale (``loss_reduction``): L_i is eq. 7's *sum* of NLL over the user's pairs, so an inner step adds up
its k support pairs' gradients (it grows with k), and RPO's gamma is in units of summed NLL. 'mean' divides by
the number of pairs (alpha then means the same for any support size); recipes tuned before the option existed
pin it.

Ablations (Table 2), as options: ``meta_learning: false`` (1: per-user weights trained jointly with the basis
on all train pairs, new users fitted from the common initialization by Adam, ``adapt_*`` options),
``rpo: false`` (2: the plain mean of query losses), ``basis: none`` (3: a single MLP on the features whose
every parameter is adapted in the inner loop; the subclass :class:`MRMNoBasis`, which ``mrm`` builds for it).
``basis: mlp`` makes phi a small MLP instead of linear.

Shared: ``w0`` and ``basis`` (or the MLP ``net``). Per user: ``user_params`` (U, P), the adapted fast
parameters flattened (P = K, or the MLP's size for ``basis: none``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from plrm.config import Forbid, opt
from plrm.methods import meta
from plrm.methods.base import AdaptConfig, MethodConfig
from plrm.methods.episodic import EpisodeConfig, EpisodicRewardModel
from plrm.methods.losses import robust_objective
from plrm.registry import methods

ROW_CHUNK_FLOATS = 2**24  # per-row gathered fast parameters scored at once (64 MB in fp32)


@methods.register("mrm")
class MRM(EpisodicRewardModel):
    """Meta Reward Modeling: MAML-learned initial user weights over K base reward functions, with RPO."""

    user_state = ("user_params",)

    @dataclass
    class Config(MethodConfig, AdaptConfig, EpisodeConfig):
        n_basis: int = opt(2, "K, the number of base reward functions (§5.1.4: 2).", min=1)
        basis: Literal["linear", "mlp", "none"] = opt(
            "linear", "Base reward functions phi on the features: 'linear' (phi = A h), 'mlp' (one hidden "
            "layer, ``hidden`` units, K outputs), or 'none' (Table 2's ablation 3: a single MLP, all of whose "
            "parameters are adapted per user in the inner loop).")
        hidden: int = opt(64, "Hidden units of the MLP basis / of the single MLP of basis: none.", min=1)
        inner_lr: float = opt(1e-3, "alpha, the inner-loop step size (§5.1.4: 1e-3 on PRISM, "
                                    "5e-3 on Reddit TL;DR); also used to adapt new users (eq. 11). The "
                                    "low-rank-world recipes tune it (recipes/mrm_*.yaml).", min=0)
        loss_reduction: Literal["sum", "mean"] = opt(
            "sum", "L_i, a user's loss in both loops: 'sum' over their pairs (eq. 7: the inner step grows with "
            "the number of support pairs, and RPO's gamma is in units of summed NLL) or 'mean' (alpha then moves "
            "w0 as far for 1 support pair as for 50).")
        inner_steps: int = opt(1, "n, gradient steps of the inner loop and of new-user adaptation (§5.1.4: 1).", min=0)
        lr: float = opt(1e-3, "beta, the Adam meta learning rate of w0 and the basis (§5.1.4: 1e-3 on PRISM, "
                              "5e-3 on Reddit TL;DR).", gt=0)
        first_order: bool = opt(False, "First-order MAML: do not differentiate through the inner gradients.")
        rpo: bool = opt(True, "Robust Personalization Objective on the query losses (false: their plain mean, "
                              "Table 2's ablation 2).")
        rho: float = opt(0.5, "RPO: fraction of hardest users of a meta-batch; tau is the (1 - rho) quantile "
                              "of the query losses (§5.1.4: 0.5).", gt=0, max=1)
        gamma: float = opt(0.5, "RPO smoothing: weights sigmoid((L - tau) / gamma) (eq. 15); 0: hard "
                                "filtering, only users above tau (eq. 13) (§5.1.4: 0.5).", min=0)
        meta_learning: bool = opt(True, "false: Table 2's ablation 1, per-user weights trained independently "
                                        "(jointly with the basis, on random pair batches of batch_size); new "
                                        "users fitted from the common initial weights with adapt_lr / "
                                        "adapt_steps / adapt_l2.")
        init_std: float = opt(1.0, "Std of the random initial weights w0 (Algorithm 2, line 1), over sqrt(K).", min=0)
        batch_size: int = opt(1024, "Training pairs per step with meta_learning: false (meta-training draws "
                                    "meta_batch_size users per step instead).", min=1)
        max_epochs: int = opt(20, "Epochs over the seen users (§5.1.4 selects them on held-out data).",
                              min=1, also=(-1,))

        forbid = (Forbid({"basis": "none", "meta_learning": False},
                         "basis: none with meta_learning: false would train a whole MLP per user from "
                         "its own few pairs; Table 2 removes one component at a time"),)

    def __new__(cls, config: Config | None = None, *args, **kwargs):
        # Table 2's ablation 3 is its own small class; recipes keep writing `basis: none` under `mrm`. (config is
        # None when copy / pickle rebuild an instance: its class is then already the right one.)
        none = cls is MRM and config is not None and config.basis == "none"
        return super().__new__(MRMNoBasis if none else cls)

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        self.build_functions(config)
        self._shapes = {k: tuple(v.shape) for k, v in self.fast0().items()}
        size = sum(torch.Size(s).numel() for s in self._shapes.values())
        init = torch.cat([v.detach().reshape(-1) for v in self.fast0().values()])
        # every user starts at the initialization; meta variants overwrite rows by adaptation, not by Adam
        self.user_params = nn.Parameter(init.repeat(n_users, 1).reshape(n_users, size),   # (U, P)
                                        requires_grad=not config.meta_learning)

    def build_functions(self, c: Config) -> None:
        """phi (linear or MLP, K outputs) and the initial user weights w0 (K,) (Algorithm 2, line 1)."""
        self.linear_in_features = c.basis == "linear"  # w^T A h is linear in h: pairs scored from h+ - h-
        self.basis = (nn.Linear(self.feature_dim, c.n_basis, bias=False) if c.basis == "linear" else
                      nn.Sequential(nn.Linear(self.feature_dim, c.hidden), nn.ReLU(), nn.Linear(c.hidden, c.n_basis)))
        self.w0 = nn.Parameter(torch.randn(c.n_basis) * c.init_std / c.n_basis ** 0.5)

    # ---- fast parameters (adapted per user) ----------------------------------------------------------------
    def fast0(self) -> dict[str, Tensor]:
        """The shared initialization of the per-user parameters: {'w': w0}."""
        return {"w": self.w0}

    def _flatten(self, fast: dict[str, Tensor]) -> Tensor:
        n = next(iter(fast.values())).shape[0]
        return torch.cat([fast[k].reshape(n, -1) for k in self._shapes], dim=1)

    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for k, shape in self._shapes.items():
            size = torch.Size(shape).numel()
            out[k] = flat[:, start:start + size].reshape(len(flat), *shape)
            start += size
        return out

    def logit_fn(self, fast: dict[str, Tensor], x: Tensor) -> Tensor:
        """Preference logits (P,) of one user's pair inputs x = phi(y+) - phi(y-) (P, K) under their fast w."""
        return x @ fast["w"]

    def pair_inputs(self, batch: dict) -> Tensor:
        """What the inner loop sees of each pair: phi(y+) - phi(y-) (R, K)."""
        if self.scores_differences():
            # two skinny (B, D) @ (D, K) GEMMs instead of materializing h+ - h- (B, D): the same numbers, no
            # B x D temporary (2x faster at B = 8,000, D = 4,096, K = 2 on one CPU thread, and fewer page faults)
            return self.basis(batch["chosen"]) - self.basis(batch["rejected"])
        return self.embedding_difference(batch)

    # ---- the reward ------------------------------------------------------------------------------------------
    def item_embedding(self, h: Tensor) -> Tensor:
        return self.basis(h)  # phi(x, y): (N, K)

    def reward_with(self, z: Tensor, w: Tensor) -> Tensor:
        return (z * w).sum(-1)  # w_u^T phi (eq. 5): (N,)

    def export_head(self) -> tuple[list[nn.Module], Tensor]:
        """``plrm export``: g = the basis phi (linear or MLP), W = the adapted user weights (U, K)."""
        return [self.basis], self.user_params.detach()

    def diagnostics(self) -> dict:
        return {"w0": [float(v) for v in self.w0.detach()]}

    # ---- meta-training (the episodes themselves: plrm.methods.episodic) ---------------------------------------
    @property
    def episodic(self) -> bool:
        return self.config.meta_learning

    @property
    def ddp_find_unused_parameters(self) -> bool:
        return super().ddp_find_unused_parameters or not self.config.meta_learning  # w0 only starts adaptation

    def episode_query_losses(self, support: Tensor, support_mask: Tensor, query: Tensor,
                             query_mask: Tensor) -> Tensor:
        """Algorithm 2's lines 5-9 for every user of the meta-batch: the inner loop from w0 on the support set
        (eq. 8), then the query loss L_i under the adapted w_i: (U,)."""
        c = self.config
        fast = meta.adapt(self.logit_fn, self.fast0(), support, support_mask, c.inner_steps, c.inner_lr,
                          c.first_order, c.loss_reduction)
        return meta.query_losses(self.logit_fn, fast, query, query_mask, c.loss_reduction)

    def outer_objective(self, losses: Tensor, population: Tensor | None = None) -> Tensor:
        """A over the meta-batch's query losses: RPO (eq. 15), or their mean (``rpo: false``)."""
        c = self.config
        if c.rpo:
            return robust_objective(losses, c.rho, c.gamma, population)
        return super().outer_objective(losses, population)

    # ---- new users -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def adapt(self, support: dict, users: Tensor) -> None:
        """Eq. 11 for every user in ``users`` (sorted) at once: the inner steps from w0 on their support pairs
        (a user with none keeps w0); with meta_learning: false, Adam from the common initial weights."""
        c = self.config
        x = self.pair_inputs(support)                                           # (P, ...)
        if c.meta_learning:
            owner = torch.searchsorted(users, support["user_idx"])
            idx, mask = meta.pad_groups(owner, len(users))                      # (U, S)
            fast0 = {k: v.detach() for k, v in self.fast0().items()}
            fitted = self._flatten(meta.adapt(self.logit_fn, fast0, x[idx], mask, c.inner_steps, c.inner_lr,
                                              reduction=c.loss_reduction))
        else:
            init = self._flatten({"w": self.w0.detach()[None]}).expand(len(users), -1)   # (U, K)
            fitted = self.fit_user_state(support, users, init, c.adapt_steps, c.adapt_lr, c.adapt_l2, pair_inputs=x)
        self.user_params[users] = fitted.to(self.user_params.dtype)


class MRMNoBasis(MRM):
    """Table 2's ablation 3 (``mrm`` with ``basis: none``): no base reward functions; a single MLP on the
    features, every parameter of which is a fast parameter adapted per user in the inner loop."""

    def build_functions(self, c: MRM.Config) -> None:
        self.linear_in_features = False
        self.net = nn.Sequential(nn.Linear(self.feature_dim, c.hidden), nn.ReLU(), nn.Linear(c.hidden, 1))

    def fast0(self) -> dict[str, Tensor]:
        """The shared initialization of the per-user parameters: the MLP's parameters."""
        return dict(self.net.named_parameters())

    def logit_fn(self, fast: dict[str, Tensor], x: Tensor) -> Tensor:
        r = functional_call(self.net, fast, (x,))[..., 0]   # x (P, 2, D) -> rewards (P, 2)
        return r[:, 0] - r[:, 1]

    def pair_inputs(self, batch: dict) -> Tensor:
        """Both items' features (R, 2, D)."""
        return torch.stack(self.embed_pairs(batch), dim=1)

    def item_embedding(self, h: Tensor) -> Tensor:
        return h

    def user_reward(self, z: Tensor, user_idx: Tensor) -> Tensor:
        params = self.user_params[user_idx]                                     # (N, P) flattened MLPs
        one = vmap(lambda p, z1: functional_call(self.net, p, (z1[None],))[0, 0])
        step = max(1, ROW_CHUNK_FLOATS // params.shape[1])
        return torch.cat([one(self._unflatten(params[s:s + step]), z[s:s + step]) for s in range(0, len(z), step)])

    def export_head(self) -> tuple[list[nn.Module], Tensor]:
        raise NotImplementedError("mrm with basis: none adapts a whole MLP per user, so its reward is not "
                                  "W[u] . g(h) with a shared g (export a basis: linear or mlp run)")

    def diagnostics(self) -> dict:
        return {}
