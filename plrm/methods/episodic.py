"""The per-user-episode scaffold: methods that learn from users as tasks (MRM's MAML, VPL's user encoder, GPO).

Every training batch holds all train pairs of ``meta_batch_size`` random seen users (``users_per_batch``). Each
user's pairs are split at random, every time the user is drawn, into a support set (``support_fraction``) and a
query set; the method maps each user's support set to that user's state and returns the query loss under it:

    episode_query_losses(support (U, S, ...), support_mask (U, S), query (U, Q, ...), query_mask (U, Q)) -> (U,)

for all users of the batch at once (padded and masked: no loop over users). This class does the rest, once for
every such method: the split and the padded layout, users without a query set (a user with a single train pair),
the outer objective over the batch's users, the distributed step (DDP: each rank holds some users of the
meta-batch; the objective's statistics come from all of them), and the seen users' state after training
(``fit_seen_users``: ``adapt`` on all their train pairs, as for new users).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from plrm.config import opt
from plrm.distributed import gather_shards, rank_and_world
from plrm.methods import meta
from plrm.methods.base import PersonalizedRewardModel, SeenUsersData


@dataclass
class EpisodeConfig:
    """Options of episodic training."""

    meta_batch_size: int = opt(2, "Users per training batch (an episode per user).", min=1)
    support_fraction: float = opt(0.1, "Share of a seen user's train pairs drawn as the support set of an "
                                       "episode, the rest being the query set; at least one pair each.", gt=0, lt=1)


class EpisodicRewardModel(PersonalizedRewardModel):
    """Base of methods trained on per-user episodes. Subclasses define ``pair_inputs`` (what an episode sees of
    each pair), ``episode_query_losses`` and ``adapt``; they may override ``outer_objective``."""

    @property
    def episodic(self) -> bool:
        """False turns the scaffold off (random pair batches and the base class's training step), for ablations."""
        return True

    @property
    def users_per_batch(self) -> int | None:
        return self.config.meta_batch_size if self.episodic else None

    # ---- what a method defines ---------------------------------------------------------------------------
    def pair_inputs(self, batch: dict) -> Tensor:
        """What an episode sees of each pair of ``batch``: (R, ...)."""
        raise NotImplementedError

    def episode_query_losses(self, support: Tensor, support_mask: Tensor, query: Tensor,
                             query_mask: Tensor) -> Tensor:
        """Each user's query loss (U,) after fitting their state on their support pairs; padded slots masked."""
        raise NotImplementedError

    def outer_objective(self, losses: Tensor, population: Tensor | None = None) -> Tensor:
        """What a meta-batch minimizes over its users' query losses (default: their mean). ``population``: every
        user's (detached) loss when ``losses`` are one rank's part; the parts must sum to the whole's value."""
        return losses.mean() if population is None else losses.sum() / len(population)

    # ---- the scaffold ------------------------------------------------------------------------------------
    def meta_losses(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        """Query losses (n,) of the batch's users that have a query set, after fitting each on a random support
        set of theirs: a whole meta-batch, no loop over users."""
        users, group = torch.unique(batch["user_idx"], return_inverse=True)
        return self.episode_losses(self.pair_inputs(batch), group, len(users), generator)

    def episode_losses(self, x: Tensor, group: Tensor, n_users: int,
                       generator: torch.Generator | None = None) -> Tensor:
        """:meth:`meta_losses` from the pair inputs x (R, ...) and each row's user, numbered 0..n_users-1."""
        is_support = meta.episode_split(group, n_users, self.config.support_fraction, generator)
        s_pos, q_pos = is_support.nonzero()[:, 0], (~is_support).nonzero()[:, 0]
        s_idx, s_mask = meta.pad_groups(group[s_pos], n_users)                 # (U, S)
        q_idx, q_mask = meta.pad_groups(group[q_pos], n_users)                 # (U, Q)
        losses = self.episode_query_losses(x[s_pos[s_idx]], s_mask, x[q_pos[q_idx]], q_mask)
        return losses[q_mask.any(1)]  # a user with a single train pair has no query set

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if not self.episodic:
            return super().training_step(batch, batch_idx)
        losses = self.meta_losses(batch)
        world = rank_and_world()[1]
        if world > 1:
            return self._distributed_step(losses, batch, world)
        if len(losses) == 0:
            return None  # every user of this meta-batch has a single train pair: nothing to query
        loss = self.outer_objective(losses)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(losses))
        self.log("train/query_nll", losses.mean(), batch_size=len(losses))
        return loss

    def _distributed_step(self, losses: Tensor, batch: dict, world: int) -> Tensor:
        """DDP: each rank holds some users of the meta-batch. The objective's statistics (RPO's tau, the number of
        users) come from every rank's query losses, each rank backpropagates its users' part times the world size
        (DDP averages gradients over ranks), so the step is the one-process step on the same meta-batch (the
        episodes' support / query draws differ: each rank draws for its own users)."""
        mine = losses if batch["share"] > 0 else losses[:0]  # share 0: a copy of users another rank holds
        population = gather_shards(mine.detach())
        if len(population) == 0:
            # no user of this meta-batch has a query set: one process skips the step, Lightning cannot under DDP,
            # so every rank takes a step with zero gradients (Adam's momentum still moves)
            return mine.sum()
        part = self.outer_objective(mine, population)
        total = part.detach().clone()
        torch.distributed.all_reduce(total)
        self.log("train/loss", total, prog_bar=True, batch_size=len(population))
        self.log("train/query_nll", population.mean(), batch_size=len(population))
        return part * world

    def fit_seen_users(self, seen: SeenUsersData) -> None:
        """Seen users are served like new ones: their state from ``adapt`` on all their train pairs."""
        if self.episodic:
            self.adapt(seen.pairs(), seen.users)
