"""PAL: pluralistic alignment with a mixture of K prototypical preferences (Chen et al., "PAL: Sample-Efficient
Personalized Reward Modeling for Pluralistic Alignment", ICLR 2025, arXiv 2406.08469, models PAL-A and PAL-B, as
restated in LoRe, Bose et al., arXiv 2504.14439, eq. 12-13 and Table 4; the authors' code,
RamyaLab/pluralistic-alignment, ``src/pal_rm_a``, ``src/pal_rm_b``, ``config/*``), on frozen features (the
paper's PAL-"Tiny": the foundation model is fixed and only the projectors and user weights are learned).

Every user u has mixture logits W_u in R^K (one row of a (U, K) table); w_u = softmax(W_u / tau) (tau = 1).

PAL-A (``pal_a``; LoRe eq. 12):
    P in R^{K x D}                               K prototypes in the input feature space
    a_u = f(w_u^T P)                             user u's ideal point (the code's ``f(Pw)`` learner)
    r_u(x, y) = -||f(e(x, y)) - a_u||_2          (``squared: true``: -||.||^2, as LoRe eq. 12 writes it)
with f(x) = p(x) + MLP(p(x)), MLP = Linear-ReLU-Linear-ReLU-Linear of width d_pref (the code's
``mlp2-relu-dropout0-residual``), one f for items and ideal points.

PAL-B (``pal_b``; prompt-dependent ideal points, LoRe eq. 13, with the authors' cosine ``angle`` learner):
    z_u(x) = sum_k w_uk g_k(e(x))                K prompt projectors g_k
    r_u(x, y) = cos(z_u(x), f(e(y))) * min(exp(s), 100)      s learnable, initialized to log(1 / 0.07)
with f and every g_k = Linear-GELU-Linear-GELU-Linear of width d_pref (``mlp2-gelu-dropout0``).

Loss: Bradley-Terry -log sigmoid(r_u(y+) - r_u(y-)) (PAL-B's 2-way cross-entropy is exactly this), or with
``loss: hinge`` the authors' PAL-A loss max(0, 1 - (r_u(y+) - r_u(y-))).

New users (the authors' ``main_pal_b_unseen.py``): W_u alone is fitted on the support pairs, every shared tensor
frozen, all new users at once by plrm.methods.peruser (full-batch Adam, each user's mean loss).

Shared: the projectors (f, g_k, p), the prototypes P (PAL-A), the logit scale s (PAL-B). Per user: ``user_logits``.

Deviations from the paper and its code, and why:
- p is the identity when d_pref equals the feature dimension D (every authors' config: d_pref = D) and a linear
  map D -> d_pref otherwise, so that the residual x + MLP(x) is defined for any d_pref.
- PAL-B's g_k read the *item* feature e(x, y) (``prompt_input: item``, the only value): plrm's datasets give one
  feature per (prompt, response) item and no feature of the prompt alone. When every response of a prompt has
  the same e(x) the two agree; otherwise z_u depends on the response too.
- New users by default start from zero logits (the uniform mixture) and take ``adapt_steps`` = 300 full-batch
  Adam steps at ``adapt_lr`` = 5e-2. The authors' schedule (``adapt_schedule: authors``): N(0, I) logits, lr 5e-3,
  20 epochs of batches of 4 pairs, i.e. 20 * ceil(k / 4) steps for k support pairs (here full-batch steps),
  without their selection of the best epoch by the new users' validation loss (plrm's few-shot protocol has no
  such data). Measured on plrm's low-rank world (D 16, 4 true functions, Dirichlet 0.05, k = 10 support pairs;
  non-personalized oracle 0.860): the authors' schedule left unseen accuracy *below* that oracle (PAL-A 0.855,
  PAL-B 0.814), the default reached PAL-A 1.000, PAL-B 0.973, from the same trained models.
- Training is plrm's loop: AdamW (decoupled weight decay) over random pair batches, with the authors' parameter
  groups; the prototype-norm bound of their code is left out, as their code leaves it out of the loss.

Measured on the low-rank world (D 16, 4 true functions, 150 seen users x 30 pairs; tests/methods/test_pal.py):
the defaults (the authors' batch 4, one epoch) underfit it (PAL-B seen 0.86, no better than the non-personalized
oracle); batch 256, 30-60 epochs fit it (seen 0.99-1.0). PAL-A recovers planted user groups in its prototypes
when the projectors learn slowly beside P and W (the authors' 1e-4 vs faster prototypes and W). PAL-B's weights
are identified only up to mixtures of its prompt projectors, as the cosine ignores ||z_u||: how well they match
the true weights depends on the training seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plrm.config import Forbid, Not, opt
from plrm.errors import RecipeError
from plrm.methods.base import AdaptConfig, MethodConfig, PersonalizedRewardModel
from plrm.methods.peruser import fit_per_user_sets
from plrm.registry import methods

MAX_LOGIT_SCALE = 100.0            # PAL-B: min(exp(s), 100), the authors' clamp (CLIP's)
AUTHORS_ADAPT_LR = 5e-3            # the authors' new-user schedule (optim_config/vanilla-e20.yaml)
AUTHORS_ADAPT_EPOCHS, AUTHORS_ADAPT_BATCH = 20, 4
AUTHORS_INIT_SEED = 0              # seeds their N(0, I) init of new users' logits, so a rerun gives the same state


def mlp2(d_in: int, width: int, activation: type[nn.Module]) -> nn.Sequential:
    """The authors' ``mlp2`` projector: Linear(d_in, width)-act-Linear-act-Linear(width, width) (dropout 0)."""
    return nn.Sequential(nn.Linear(d_in, width), activation(), nn.Linear(width, width), activation(),
                         nn.Linear(width, width))


class PAL(PersonalizedRewardModel):
    """What PAL-A and PAL-B share: the (U, K) mixture logits, the loss, the parameter groups and new users."""

    user_state = ("user_logits",)
    joint_pair_scoring = True  # one unique() over the users of both sides

    @dataclass
    class Config(MethodConfig, AdaptConfig):
        n_prototypes: int = opt(2, "K, the number of prototypical preferences (the authors' configs: 1 or 2; LoRe, "
                                   "arXiv 2504.14439, Table 4, cross-validates it in {2, 5, 10, ..., 50}).", min=1)
        d_pref: int = opt(512, "Width of the projectors, the preference embedding's dimension (authors' configs, "
                               "LoRe Table 4: 512).", min=1)
        temperature: float = opt(1.0, "tau of w_u = softmax(W_u / tau) (authors' configs: 1).", gt=0)
        loss: Literal["bt", "hinge"] = opt(
            "bt", "'bt': -log sigmoid(r+ - r-) (PAL-B's cross-entropy); 'hinge': max(0, 1 - (r+ - r-)), the "
            "authors' PAL-A configs (loss_config/a-*.yaml).")
        lr: float = opt(1e-4, "Learning rate of the projectors (authors' optim_config/vanilla*.yaml: 1e-4).", gt=0)
        weight_decay: float = opt(0.01, "Weight decay of the projectors (authors' optim configs: 0.01); the "
                                        "prototypes, user logits and logit scale get none.", min=0)
        user_lr: float = opt(5e-3, "Learning rate of the seen users' logits W (authors' optim configs: 5e-3).", gt=0)
        user_init_std: float = opt(1.0, "Seen users' logits start N(0, std^2) (authors' code: N(0, I)).", min=0)
        batch_size: int = opt(4, "Training pairs per step (authors' configs: 4).", min=1)
        max_epochs: int = opt(1, "Epochs over the seen users' pairs (authors' PAL-Tiny runs: 1).", min=1, also=(-1,))
        adapt_schedule: Literal["plrm", "authors"] = opt(
            "plrm", "New users: 'plrm': zero logits (uniform mixture), adapt_steps full-batch Adam steps at "
            "adapt_lr; 'authors': N(0, I) logits, lr 5e-3, 20 epochs of batches of 4 (20 * ceil(k / 4) steps), "
            "which measured below the non-personalized oracle on a low-rank world (module docstring).")
        adapt_lr: float = opt(5e-2, "Adam learning rate of new users' logits with adapt_schedule: plrm (calibrated "
                                    "on a low-rank world: 300 steps at 5e-2 reached 0.97-1.0 unseen accuracy).",
                              gt=0)
        adapt_steps: int = opt(300, "Full-batch Adam steps of new users' logits with adapt_schedule: plrm.", min=0)

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        self.user_logits = nn.Parameter(torch.randn(n_users, config.n_prototypes) * config.user_init_std)  # W: (U, K)

    def user_weights(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits / self.config.temperature, dim=-1)  # w_u: (M, K), rows on the simplex

    def reward_of(self, z: Tensor, logits: Tensor, row: Tensor) -> Tensor:
        """Reward (N,) of item embeddings z (N, Z) for the users whose logits are the rows ``row`` (N,) of
        ``logits`` (M, K): each user's part of the reward is computed once per row of ``logits``."""
        raise NotImplementedError

    def user_reward(self, z: Tensor, user_idx: Tensor) -> Tensor:
        users, row = torch.unique(user_idx, return_inverse=True)
        return self.reward_of(z, self.user_logits[users], row)

    def pair_loss(self, logit: Tensor) -> Tensor:
        """Per-pair loss (P,) of preference logits r+ - r-."""
        return F.relu(1.0 - logit) if self.config.loss == "hinge" else -F.logsigmoid(logit)

    def loss(self, batch: dict) -> Tensor:
        per_pair = self.pair_loss(self.preference_logit(batch))
        if self.config.balance_users:
            per_pair = per_pair * batch["pair_weight"]
        return per_pair.mean()

    def shared_groups(self) -> list[dict]:
        """Optimizer groups of the method's own shared tensors besides the projectors (own lr, no decay)."""
        return []

    def parameter_groups(self) -> list[dict]:
        special = self.shared_groups() + [{"params": [self.user_logits], "lr": self.config.user_lr,
                                           "weight_decay": 0.0}]
        taken = {id(p) for g in special for p in g["params"]}
        projectors = [p for p in self.parameters() if p.requires_grad and id(p) not in taken]
        return [{"params": projectors, "lr": self.config.lr, "weight_decay": self.config.weight_decay}, *special]

    def adapt_init(self, users: Tensor) -> Tensor:
        """Initial logits (U_new, K) of new users ``users`` under ``adapt_schedule``."""
        c = self.config
        if c.adapt_schedule == "plrm":
            return torch.zeros(len(users), c.n_prototypes, device=self.user_logits.device)  # the uniform mixture
        # the authors' N(0, I), drawn per user index (the same for a user adapted alone or with others)
        table = torch.randn(self.n_users, c.n_prototypes, generator=torch.Generator().manual_seed(AUTHORS_INIT_SEED))
        return table[users.cpu()].to(self.user_logits.device)

    @torch.no_grad()
    def adapt(self, support: dict, users: Tensor) -> None:
        """Fit the logits W_u of ``users`` (sorted) on their support pairs, everything shared frozen."""
        c = self.config
        z_chosen, z_rejected = self.embed_pairs(support)                       # (P, Z) each, fixed
        z = torch.cat([z_chosen, z_rejected])                                  # (2P, Z)
        owner = torch.searchsorted(users, support["user_idx"])                 # (P,) position in `users`
        counts = torch.bincount(owner, minlength=len(users)).clamp_min(1)      # (U_new,)
        steps, lr = c.adapt_steps, c.adapt_lr
        if c.adapt_schedule == "authors":
            steps, lr = AUTHORS_ADAPT_EPOCHS * math.ceil(int(counts.max()) / AUTHORS_ADAPT_BATCH), AUTHORS_ADAPT_LR

        def user_losses(params: dict[str, Tensor]) -> Tensor:
            # each user's mean loss over their support pairs (U_new,); ideal points / mixtures once per user
            r = self.reward_of(z, params["logits"], torch.cat([owner, owner]))  # (2P,)
            per_pair = self.pair_loss(r[:len(owner)] - r[len(owner):]) / counts[owner]
            return torch.zeros(len(users), dtype=r.dtype, device=r.device).index_add(0, owner, per_pair)

        shared = [p for p in self.parameters() if p.requires_grad]
        for p in shared:  # only the new users' logits get gradients
            p.requires_grad_(False)
        try:
            fitted = fit_per_user_sets({"logits": self.adapt_init(users)}, user_losses, steps, lr, c.adapt_l2)
        finally:
            for p in shared:
                p.requires_grad_(True)
        self.user_logits[users] = fitted["logits"].to(self.user_logits.dtype)


@methods.register("pal_a")
class PALA(PAL):
    """PAL-A: K prototypes in the feature space; a user's ideal point f(w_u^T P); reward -distance to it."""

    @dataclass
    class Config(PAL.Config):
        prototype_lr: float = opt(5e-3, "Learning rate of the prototypes P, which get no weight decay: decay "
                                        "shrinks them to ~0 and PAL-A to one global model (authors' configs: 5e-3, "
                                        "measured on a low-rank world).", gt=0)
        squared: bool = opt(False, "Reward -||f(e) - a_u||^2 (LoRe, arXiv 2504.14439, eq. 12) instead of the "
                                   "authors' code's -||f(e) - a_u||.")

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        d = config.d_pref
        self.prototypes = nn.Parameter(F.normalize(torch.randn(config.n_prototypes, feature_dim), dim=1))  # P: (K, D)
        self.down = nn.Identity() if d == feature_dim else nn.Linear(feature_dim, d, bias=False)          # p
        self.mlp = mlp2(d, d, nn.ReLU)

    def project(self, x: Tensor) -> Tensor:
        """f(x) = p(x) + MLP(p(x)): (N, D) -> (N, d_pref)."""
        x = self.down(x)
        return x + self.mlp(x)

    def item_embedding(self, h: Tensor) -> Tensor:
        return self.project(h)  # f(e(x, y)): (N, d_pref)

    def ideal_points(self, logits: Tensor) -> Tensor:
        return self.project(self.user_weights(logits) @ self.prototypes)  # a_u = f(w_u^T P): (M, d_pref)

    def reward_of(self, z: Tensor, logits: Tensor, row: Tensor) -> Tensor:
        gap = z - self.ideal_points(logits)[row]                                 # (N, d_pref)
        return -gap.pow(2).sum(-1) if self.config.squared else -torch.linalg.vector_norm(gap, dim=-1)

    def shared_groups(self) -> list[dict]:
        return [{"params": [self.prototypes], "lr": self.config.prototype_lr, "weight_decay": 0.0}]

    def diagnostics(self) -> dict:
        return {"prototype_norms": [float(v) for v in self.prototypes.detach().norm(dim=1)]}


@methods.register("pal_b")
class PALB(PAL):
    """PAL-B: K prompt projectors mixed by the user's weights; reward the scaled cosine with the item's projection."""

    @dataclass
    class Config(PAL.Config):
        prompt_input: str = opt(
            "item", "What the prompt projectors g_k read. 'item' (the only value): the (prompt, response) item's "
            "feature, since plrm's datasets give no feature of the prompt alone (the paper's g_k read e(x)).")
        logit_scale_lr: float = opt(0.1, "Learning rate of the logit scale s (authors' optim configs: 0.1).", gt=0)

        forbid = (Forbid({"prompt_input": Not("item")},
                         "prompt_input: only 'item' is supported: plrm's datasets give one feature per (prompt, "
                         "response) item and no feature of the prompt alone, which g_k would need"),)

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        if config.prompt_input != "item":
            raise RecipeError(f"pal_b: prompt_input={config.prompt_input!r}: only 'item' is supported (plrm's "
                              "datasets give no feature of the prompt alone)")
        super().__init__(config, n_users, feature_dim, encoder)
        self.item_projector = mlp2(feature_dim, config.d_pref, nn.GELU)                               # f
        self.prompt_projectors = nn.ModuleList(mlp2(feature_dim, config.d_pref, nn.GELU)              # g_1..g_K
                                               for _ in range(config.n_prototypes))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))                             # s

    def item_embedding(self, h: Tensor) -> Tensor:
        """[f(e) / ||f(e)||, g_1(e), ..., g_K(e)]: (N, (K + 1) d_pref), all that the reward needs of the item."""
        return torch.cat([F.normalize(self.item_projector(h), dim=-1), *(g(h) for g in self.prompt_projectors)], 1)

    def reward_of(self, z: Tensor, logits: Tensor, row: Tensor) -> Tensor:
        d = self.config.d_pref
        item, prompts = z[:, :d], z[:, d:].unflatten(1, (self.config.n_prototypes, d))  # (N, d), (N, K, d)
        ideal = torch.einsum("nk,nkd->nd", self.user_weights(logits)[row], prompts)     # z_u(x): (N, d)
        scale = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        return (F.normalize(ideal, dim=-1) * item).sum(-1) * scale

    def shared_groups(self) -> list[dict]:
        return [{"params": [self.logit_scale], "lr": self.config.logit_scale_lr, "weight_decay": 0.0}]

    def diagnostics(self) -> dict:
        return {"logit_scale": float(self.logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE))}
