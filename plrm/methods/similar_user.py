"""Similar-user RM: serve a new user with the Individual RM of the seen user who agrees with them most ("When
Personalization Meets Reality", Dong et al., arXiv 2502.19158, §5 "Retrieve Similar User RM"; Table 4: 0.73 /
0.74 / 0.75 at 30 / 100 / 300 pairs, against the Vanilla RM's 0.74).

    seen users:  r_u(x, y) = v_u^T h(x, y), Individual RMs (plrm.methods.individual, trained as there)
    new user n:  m(n) = argmax_{u seen} a(n, u),   r_n = r_{m(n)}
    a(n, u) = mean_{(y+, y-) in S_n} 1[r_u(y+) > r_u(y-)]          (``model agreement``)

``a`` is the share of the new user's support pairs S_n that seen user u's head orders as the new user did: for
linear heads one GEMM of the support pairs' feature differences (n_support, D) by the seen heads (D, U_seen), a
per-new-user mean by ``index_add``, then the argmax (ties go to the lowest user index).

Deviation from the paper. Its (draft, non-running) code scores *label* agreement instead: seen users who labelled
the same (prompt, {y1, y2}) items as the new user, #agree - #disagree, positive counts only. That needs to know
which items a new user's support pairs are, and plrm's training batches carry the items' features, not their
identities, so only model agreement is offered. It needs no shared items (it works on PRISM-like data, where
hardly any pair is labelled twice) and matches on all k support pairs rather than the few a seen user shares.

A new user without support pairs matches nobody: ``fallback: mean`` serves them the mean of the seen users'
heads (a warning counts them, and ``diagnostics`` reports the count), ``fallback: error`` refuses.

State: ``match`` (U,), the head row each user is scored by (a seen user their own; a new user their match; the
extra last row holds the seen users' mean head). The head table (U + 1 rows) and ``seen`` (which rows are seen
users') are shared: ``plrm adapt --pairs`` loads them from the run's checkpoint, whatever the new users' number.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from plrm.config import opt
from plrm.errors import PlrmError
from plrm.methods.base import SeenUsersData
from plrm.methods.heads import PerUserHeads
from plrm.methods.individual import HeadsConfig, IndividualRM
from plrm.registry import methods

SCORE_CHUNK = 2**24  # (support pair, seen user[, hidden unit]) values computed at once (64 MB in fp32)


@methods.register("similar_user")
class SimilarUserRM(IndividualRM):
    """Individual RMs for seen users; a new user scored by the head of the seen user who agrees with them most."""

    @dataclass
    class Config(HeadsConfig):
        fallback: Literal["mean", "error"] = opt(
            "mean", "A new user with no support pairs matches nobody: 'mean' serves them the mean of the seen "
                    "users' heads (a warning says how many), 'error' refuses.")

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        self.register_buffer("match", torch.arange(n_users))                   # (U,) head row of each user
        self.register_buffer("seen", torch.zeros(n_users, dtype=torch.bool))   # (U_lib,) rows of seen users
        self.user_state = ("match",)
        self.fallback_users = 0  # new users served by the mean head at the last adapt

    def head_rows(self, n_users: int) -> int:
        """One row per user, plus the seen users' mean head (the fallback) in the last row."""
        return n_users + 1

    @property
    def mean_row(self) -> int:
        return len(self.seen)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Take the checkpoint's library size before loading: a model built for other users (``plrm adapt
        --pairs``: the new users only) scores them with the run's seen heads."""
        seen = state_dict.get("seen")
        if seen is not None and len(seen) != len(self.seen):
            c = self.config
            self.heads = PerUserHeads(len(seen) + 1, self.feature_dim, c.hidden, c.activation,
                                      init="shared" if c.hidden else "zeros").to(self.match.device)
            self.seen = torch.zeros(len(seen), dtype=torch.bool, device=self.match.device)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def user_reward(self, z: Tensor, user_idx: Tensor) -> Tensor:
        return self.heads(z, self.match[user_idx])  # r_{m(u)}(h): (N,)

    def reward_table(self, z: Tensor, users: Tensor) -> Tensor:
        heads, column = torch.unique(self.match[users], return_inverse=True)  # each matched head scored once
        return self.heads.all_users(z, heads)[:, column]                        # (I, U_b)

    def export_head(self) -> tuple[list[nn.Module], Tensor]:
        """``plrm export``: g = the identity, W = each user's matched linear head (U, D)."""
        return [], super().export_head()[1][self.match]

    def diagnostics(self) -> dict:
        return {"fallback_users": self.fallback_users, "fallback": self.config.fallback}

    @torch.no_grad()
    def fit_seen_users(self, seen: SeenUsersData) -> None:
        """Record which rows are seen users' heads, and their mean head (the fallback), after training."""
        self.seen.zero_()
        self.seen[seen.users] = True
        if len(seen.users):
            self.heads.write(torch.tensor([self.mean_row], device=self.match.device), self.heads.mean_head(seen.users))

    # ---- new users -----------------------------------------------------------------------------------------
    def agreement(self, support: dict, owner: Tensor, n_users: int, candidates: Tensor) -> Tensor:
        """a(n, u) (n_users, C): the share of each new user's support pairs that each candidate's head orders as
        the new user did; ``owner`` (P,): each pair's new user in [0, n_users)."""
        if self.heads.is_linear:
            pairs = (self.embedding_difference(support),)                         # (P, D)
        else:
            pairs = self.embed_pairs(support)                                      # (P, D) each
        agree = torch.zeros(n_users, len(candidates), device=owner.device)
        step = max(1, SCORE_CHUNK // (max(1, len(candidates)) * max(1, self.heads.hidden)))  # MLP: (C, p, H)
        for start in range(0, len(owner), step):  # bounded memory: pair chunks, each one GEMM
            chunk = [p[start:start + step] for p in pairs]
            margins = self.heads.all_users(chunk[0], candidates)                   # (p, C)
            if len(chunk) == 2:
                margins = margins - self.heads.all_users(chunk[1], candidates)
            agree.index_add_(0, owner[start:start + step], (margins > 0).to(agree.dtype))
        counts = torch.bincount(owner, minlength=n_users).clamp_min(1)
        return agree / counts[:, None]

    @torch.no_grad()
    def adapt(self, support: dict, users: Tensor) -> None:
        """m(n) for every new user in ``users`` (sorted) at once; the heads themselves are left as they are."""
        candidates = torch.nonzero(self.seen)[:, 0]                                # (C,) seen users, ascending
        if not len(candidates):
            raise PlrmError("similar_user has no seen users' heads to match new users with: train it with plrm "
                            "(runner.fit, or the method data hooks on the Trainer: see CONTRIBUTING) first")
        owner = torch.searchsorted(users, support["user_idx"])                     # position in `users`
        best = self.agreement(support, owner, len(users), candidates).argmax(1)    # first maximum: lowest index
        match = candidates[best]
        alone = torch.bincount(owner, minlength=len(users)) == 0                   # no support pair to compare
        self.fallback_users = int(alone.sum())
        if self.fallback_users:
            ids = users[alone][:5].tolist()
            if self.config.fallback == "error":
                raise PlrmError(f"similar_user: {self.fallback_users} new user(s) have no support pairs to match "
                                f"with a seen user (user indices {ids}{' ...' if self.fallback_users > 5 else ''}); "
                                "give them pairs, or set fallback: mean to serve them the seen users' mean head")
            warnings.warn(f"similar_user: {self.fallback_users} of {len(users)} new users have no support pairs; "
                          "they are scored by the seen users' mean head (fallback: mean)", stacklevel=2)
            match = torch.where(alone, self.mean_row, match)
        self.match[users] = match
