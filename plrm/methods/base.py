"""The method base class: every personalized reward model is a ``PersonalizedRewardModel``.

A method's reward comes in one of two shapes, declared by ``reward_shape``:

* ``factored`` (default; LoRe, PReF, MRM, BT, and every method whose user acts after the encoder): with item
  features ``h = encode(items)`` from the backbone,

      z = item_embedding(h)        # user-independent part of the head, (N, Z); identity by default
      r = user_reward(z, u)        # the personalized scalar, (N,)

  so evaluation computes each unique item's ``z`` once and scores millions of (user, pair) rows with the cheap
  ``user_reward``, and ``head(h, u) = user_reward(item_embedding(h), u)`` is what reward-guided decoding reads
  at each prefix of a causal backbone's hidden states.
* ``conditioned`` (P-DPO's soft user tokens, a Conditional RM's user id in the prompt): the user changes the
  encoder's forward pass, so no user-independent item embedding exists. The method implements
  ``conditioned_reward(items, users, item_stats)`` on backbone inputs; evaluation scores (user, pair) rows in
  chunks, chosen and rejected in one forward, and still computes once per unique item whatever part of the
  reward does not depend on the user (``item_statistics``: P-DPO's reference log-probabilities).

Pairwise-only judges (the RAG judge) set ``pairwise_only``, are ``conditioned`` and override
``conditioned_pair_logit``; their ``reward`` raises, and reward-guided decoding and the policy stage skip them.

Per-user state lives in the module (``nn.Embedding``-style tables indexed by ``user_idx``), so Lightning
checkpoints, DDP and loggers work unchanged. ``adapt(support, users)`` fits new users' rows from their support
pairs, vectorized over users, and must leave every shared tensor unchanged. Training, validation, the loss
and the optimizer are plumbing that lives here; a method file holds parameters, its reward, its regularizer and
``adapt``. What a method may know of the data reaches it through the hooks ``before_fit``, ``fit_seen_users``
and ``reference_checkpoints`` (called by the runner, plrm.data.hooks), never through the datamodule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plrm import capabilities as cap
from plrm.config import Forbid, Not, opt
from plrm.errors import PlrmError
from plrm.methods.losses import bradley_terry_nll
from plrm.methods.optim import adam
from plrm.methods.peruser import fit_per_user

FACTORED, CONDITIONED = "factored", "conditioned"


@dataclass
class MethodConfig:
    """Options every method has (training loop and optimizer)."""

    lr: float = opt(1e-3, "Learning rate of the shared parameters.", gt=0)
    weight_decay: float = opt(0.0, "Decoupled weight decay (AdamW) of the shared parameters.", min=0)
    batch_size: int = opt(1024, "Training pairs per step.", min=1)
    max_epochs: int = opt(10, "Training epochs over the seen users' train pairs.", min=1, also=(-1,))
    max_steps: int = opt(-1, "Stop after this many optimizer steps (-1: no limit).", min=1, also=(-1,))
    balance_users: bool = opt(True, "Weight each pair by 1/|D_u| so every user counts equally "
                                    "(LoRe, Bose et al., arXiv 2504.14439, eq. 10); with equal pairs per user "
                                    "it changes nothing.")
    difference_cache: Literal["auto", "always", "never"] = opt(
        "auto", "Methods linear in frozen features (bt, lore, pref, individual, further_ft): train on a table of "
        "every train pair's e+ - e- built once per run (train pairs x D numbers) instead of gathering both "
        "sides and subtracting every batch. 'auto': when batch_size covers every train pair (the table is then "
        "the batch, with no copy) or the table is no larger than the feature table; other methods ignore it.")

    forbid = (Forbid({"max_epochs": -1, "max_steps": -1},
                     "max_epochs: -1 together with max_steps: -1 never stops training; give one of them a limit"),)


@dataclass
class AdaptConfig:
    """Options of methods that fit new users' state with the shared per-user routine (plrm.methods.peruser)."""

    adapt_lr: float = opt(0.1, "Adam learning rate of few-shot adaptation (LoRe, Bose et al., arXiv 2504.14439, "
                               "App. B.1: 0.1).", gt=0)
    adapt_steps: int = opt(300, "Full-batch Adam steps of few-shot adaptation.", min=0)
    adapt_l2: float = opt(0.0, "L2 penalty on the adapted per-user parameters.", min=0)


@dataclass
class QuasiNewtonConfig:
    """A full-batch L-BFGS schedule, offered by methods whose training loss is a deterministic function of every
    train pair (BT and LoRe over frozen features: the batch is the difference table)."""

    optimizer: Literal["adam", "lbfgs"] = opt(
        "adam", "adam: Adam at lr over batch_size pairs per step. lbfgs: torch's L-BFGS (strong-Wolfe line search, "
        "step length 1, one parameter group) on the full batch: every step reads every train pair (batch_size, "
        "lr and weight_decay do not apply), and each training step (= epoch) runs lbfgs_iterations iterations.")
    lbfgs_iterations: int = opt(20, "L-BFGS iterations per training step (each one or more loss-and-gradient "
                                    "evaluations of the full batch).", min=1)
    lbfgs_history: int = opt(10, "L-BFGS memory: curvature pairs kept.", min=1)

    forbid = (Forbid({"optimizer": "lbfgs", "weight_decay": Not(0.0)},
                     "optimizer: lbfgs has no decoupled weight decay; set weight_decay: 0 (an L2 penalty of the "
                     "method, e.g. basis_l2, is part of the loss and applies)"),)


class SeenUsersData(Protocol):
    """What the runner hands a method about the seen users (:meth:`PersonalizedRewardModel.before_fit`,
    :meth:`~PersonalizedRewardModel.fit_seen_users`); a method never reaches into the datamodule itself."""

    users: Tensor  # (U_seen,) sorted indices of the seen users with train pairs

    def pairs(self) -> dict:
        """Every train pair of the seen users as one batch dict (the keys of a training batch, ``user_idx``
        sorted ascending is not guaranteed), on the model's device."""

    def pair_matrix(self) -> Any:
        """The users x item-pairs sign matrix of those pairs (``user_idx``, ``pair_idx``, ``sign`` (+1: the user
        preferred ``y1_item``), ``y1_item``, ``y2_item``, ``n_users``, ``n_pairs``); needs the dataset's
        ``pair_id`` column (declare ``needs`` ``shared_pairs``)."""

    def item_inputs(self, item_ids: Tensor) -> Any:
        """Backbone inputs of these items (indices into the dataset's unique items), on the model's device:
        what ``encode`` takes."""


class PersonalizedRewardModel(L.LightningModule):
    """Base class of all methods. Subclasses set ``Config`` and implement ``user_reward`` (and ``adapt``)."""

    Config: ClassVar[type] = MethodConfig
    needs: ClassVar[frozenset[str]] = frozenset({cap.FEATURES, cap.USERS})
    # 'yes': adapt() fits new users; 'generic': one model for everyone, adapt() is a no-op;
    # 'no': unseen users cannot be served and the protocol reports n/a for them.
    adapts_new_users: ClassVar[Literal["yes", "generic", "no"]] = "yes"
    # True when user_reward(item_embedding(h), u) is linear in h (LoRe: w_u^T A h; BT: v^T h). Then, over a
    # frozen encoder, a pair is scored from the feature difference h+ - h-: one (B, D) GEMM instead of a
    # (2B, D) concatenation and GEMM (benchmarks/results/lore_cpu.md measures the difference).
    linear_in_features: ClassVar[bool] = False
    # Names of the per-user tensors (first dim n_users) in the state dict: what adapt() writes, what
    # `plrm adapt --pairs` builds afresh for new users while loading everything else from a checkpoint.
    user_state: ClassVar[tuple[str, ...]] = ()
    # 'factored': reward = user_reward(item_embedding(encode(items)), u); 'conditioned': the user changes the
    # encoder's forward, the method implements conditioned_reward (see the module docstring).
    reward_shape: ClassVar[Literal["factored", "conditioned"]] = FACTORED
    # True: the method only judges pairs (the log-odds that chosen beats rejected); it has no pointwise reward, so
    # reward-guided decoding and the policy stage skip it by this flag, never by name.
    pairwise_only: ClassVar[bool] = False
    # True: pair_logit scores chosen and rejected in one user_reward call on the 2B rows, for rewards that group
    # rows by user (stacked MLP heads) or read a user's context (GPO), so the grouping is done once per batch.
    joint_pair_scoring: ClassVar[bool] = False
    # True: the training step runs its own backward passes and optimizer steps (Lightning manual optimization);
    # declared on the class so a recipe's trainer settings are checked against it before anything runs.
    manual_optimization: ClassVar[bool] = False
    # A manual-optimization method that clips its own gradients (with self.gradient_clip_val, the recipe's
    # trainer.gradient_clip_val, set by the runner); any other manual-optimization method refuses that key.
    clips_gradients: ClassVar[bool] = False
    gradient_clip_val: float | None = None
    # Set by plrm.data.hooks.MethodHooks when a Trainer will call the data hooks (see on_fit_start).
    data_hooks_attached: bool = False

    @property
    def ddp_find_unused_parameters(self) -> bool:
        """True when a backward pass of a training step leaves some trainable parameter without a gradient (manual
        optimization with one backward per parameter group, parameters training never uses): DDP must then
        look for them (``find_unused_parameters``), which costs a graph traversal per step, so only then."""
        return not self.automatic_optimization

    # True: every training step reads a pair only through embedding_difference (its loss and regularization read
    # no batch["chosen"] / batch["rejected"]), so that over a frozen feature table the datamodule may serve training
    # batches as rows of a difference table (``difference_cache``). A method sets it only when that holds.
    trains_on_differences: ClassVar[bool] = False

    def uses_difference_cache(self, n_train_pairs: int, n_items: int) -> bool:
        """Whether training batches come from the difference table (``difference_cache``; ``auto``: when the
        batch is every train pair, or the table (n_train_pairs rows) is no larger than the item feature table)."""
        choice = getattr(self.config, "difference_cache", "never")
        if not (self.trains_on_differences and self.scores_differences()) or choice == "never":
            return False
        full_batch = self.training_batch_size(n_train_pairs) >= n_train_pairs
        return choice == "always" or full_batch or n_train_pairs <= n_items

    def training_batch_size(self, n_train_pairs: int) -> int:
        """Pairs per training step: ``batch_size``, or every train pair under ``optimizer: lbfgs`` (full batch)."""
        if getattr(self.config, "optimizer", "adam") == "lbfgs":
            return max(n_train_pairs, 1)
        return self.config.batch_size

    @property
    def users_per_batch(self) -> int | None:
        """None: training batches are random pairs (``batch_size`` of them). An int n: each batch is every
        train pair of n random seen users, for methods that learn per user task (MRM's meta-batches)."""
        return None

    def __init__(self, config: Any, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.n_users = n_users
        self.feature_dim = feature_dim
        self.encoder = encoder if encoder is not None else nn.Identity()
        if self.manual_optimization:
            self.automatic_optimization = False
        self.save_hyperparameters({"method": type(self).__name__, "config": dataclasses.asdict(config),
                                   "n_users": n_users, "feature_dim": feature_dim})

    # ---- what a method defines ----------------------------------------------------------------------------
    def item_embedding(self, h: Tensor) -> Tensor:
        """User-independent part of the head: (N, D) -> (N, Z)."""
        return h

    def user_reward(self, z: Tensor, user_idx: Tensor) -> Tensor:
        """Scalar reward (N,) of item embeddings z (N, Z) for users user_idx (N,). Methods with one per-user
        tensor define :meth:`reward_with` instead and get this, and ``adapt``'s fitting, from it."""
        return self.reward_with(z, self.user_state_of(user_idx))

    def reward_table(self, z: Tensor, users: Tensor) -> Tensor | None:
        """Optional: rewards (I, U_b) of every item z (I, Z) under every user of ``users`` (U_b,), as matrix
        products. Evaluation uses it when the rows to score cover a good share of all (item, user) combinations
        (every user on the same test prompts), where it replaces a per-row gather of each user's parameters.
        Define it when a user's reward is a head over z wider than a few numbers (a D-dimensional head per user);
        it must equal user_reward on every (item, user). None (the default): evaluation scores rows."""
        return None

    def reward_with(self, z: Tensor, state: Tensor) -> Tensor:
        """Scalar reward (N,) of item embeddings z (N, Z) under per-user parameters ``state`` (N, ...): the one
        place a method writes its reward formula, used for seen users (their rows of ``user_state[0]``) and by
        :meth:`fit_user_state` for candidate parameters."""
        raise NotImplementedError(f"{type(self).__name__} defines neither user_reward() nor reward_with()")

    def user_state_of(self, user_idx: Tensor) -> Tensor:
        """The rows (N, ...) of the (single) per-user tensor ``user_state[0]`` for users ``user_idx``."""
        if len(self.user_state) != 1:
            raise NotImplementedError(f"{type(self).__name__} has {len(self.user_state)} per-user tensors: "
                                      "define user_reward() itself")
        return getattr(self, self.user_state[0])[user_idx]

    def conditioned_reward(self, items: Any, user_idx: Tensor, item_stats: Tensor | None) -> Tensor:
        """``reward_shape = 'conditioned'``: scalar reward (N,) of backbone inputs ``items`` for users
        ``user_idx`` (N,), from a forward pass that depends on the user; ``item_stats``: the items'
        :meth:`item_statistics` (or None)."""
        raise NotImplementedError(f"{type(self).__name__} declares reward_shape='conditioned' but has no "
                                  "conditioned_reward()")

    def item_statistics(self, items: Any) -> Tensor | None:
        """``reward_shape = 'conditioned'``: the user-independent part of each item's reward (N, S) that
        evaluation computes once per unique item and hands to :meth:`conditioned_reward` (P-DPO: the reference
        model's log-probability). None (default): there is none."""
        return None

    def regularization(self, batch: dict) -> Tensor | float:
        """Penalty added to the training loss (logged apart from the NLL); ``batch`` for per-user penalties."""
        return 0.0

    def adapt(self, support: dict, users: Tensor) -> None:
        """Fit the per-user state of ``users`` from ``support`` pairs (a batch dict of all their pairs)."""
        if self.adapts_new_users == "yes":
            raise NotImplementedError(f"{type(self).__name__} declares adapts_new_users='yes' but has no adapt()")

    # ---- hooks the runner calls with the seen users' data (plrm.data.hooks.MethodHooks) ----------------------
    def before_fit(self, seen: SeenUsersData) -> None:
        """Data-dependent initialisation or sizing, before Lightning builds the optimizer (PReF's SVD and
        ``rank: elbow``). Default: nothing."""

    def fit_seen_users(self, seen: SeenUsersData) -> None:
        """Per-user state derived from data for the seen users, from their train pairs: called after training
        and before every validation epoch (MRM's inner steps from w0; VPL's posterior; a GPO context).
        Default: nothing (the seen users' state is what training learned)."""

    def needs_data_hooks(self) -> bool:
        """Whether training this method needs the hooks above (it defines ``before_fit`` or ``fit_seen_users``,
        or names reference checkpoints): a Trainer without plrm.data.hooks.MethodHooks would then train it
        wrongly, so :meth:`on_fit_start` refuses one."""
        base = PersonalizedRewardModel
        return (type(self).before_fit is not base.before_fit or type(self).fit_seen_users is not base.fit_seen_users
                or bool(self.reference_checkpoints()))

    def on_fit_start(self) -> None:
        if self.needs_data_hooks() and not self.data_hooks_attached:
            raise PlrmError(f"{type(self).__name__} needs the seen users' data during training (before_fit / "
                            "fit_seen_users / reference checkpoints): train it with plrm (runner.fit) or add "
                            "plrm.data.hooks.MethodHooks(datamodule) to the Trainer's callbacks")

    def on_train_start(self) -> None:
        batches = self.trainer.num_training_batches
        if getattr(self.config, "optimizer", "adam") == "lbfgs" and batches != 1:
            # plrm fit batches every train pair (training_batch_size); a datamodule built by hand may not
            raise PlrmError(f"{type(self).__name__}: optimizer: lbfgs needs the full batch at every step, but the "
                            f"datamodule makes {batches} batches per epoch; give it a batch_size of at least the "
                            "number of train pairs (training_batch_size), or use optimizer: adam")

    def reference_checkpoints(self) -> dict[str, str]:
        """Checkpoints of other runs this method needs, by name (LoRe-Alt's reference reward model): the runner
        loads each before training and hands its state dict to :meth:`load_reference`. Default: none."""
        return {}

    def load_reference(self, name: str, state_dict: dict) -> None:
        """Take the state dict of the checkpoint :meth:`reference_checkpoints` named ``name``."""
        raise NotImplementedError(f"{type(self).__name__} names reference checkpoints but has no load_reference()")

    def export_head(self) -> tuple[list[nn.Module], Tensor]:
        """``plrm export``: (the layers of ``item_embedding``, per-user weights W (n_users, Z)) when the reward
        is ``W[u] . g(h)``. Methods whose reward has another form leave it unimplemented (export says so)."""
        raise NotImplementedError(f"{type(self).__name__}'s reward is not of the form W[u] . g(h)")

    def uncertainty(self, answered: dict, users: Tensor, candidates: dict) -> Tensor:
        """Active-learning score (C,) of each candidate pair for its user (``candidates['user_idx']``): larger
        means ask it sooner. ``answered`` holds the pairs each user of ``users`` has answered so far and the
        model holds their state adapted to them. Methods without one leave this unimplemented; the interactive
        session (plrm.eval.active) then offers them random selection only."""
        raise NotImplementedError

    @property
    def has_uncertainty(self) -> bool:
        return type(self).uncertainty is not PersonalizedRewardModel.uncertainty

    def diagnostics(self) -> dict:
        """JSON-able facts about the fitted model that results.json reports next to the metrics."""
        return {}

    def _frozen_encoder_keys(self) -> set[str]:
        trained = {f"encoder.{n}" for n, p in self.encoder.named_parameters() if p.requires_grad}
        return {k for k in self.state_dict(keep_vars=True) if k.startswith("encoder.") and k not in trained}

    def checkpoint_state(self) -> dict:
        """What a checkpoint holds: the head, per-user state and the encoder's *trained* weights (LoRA adapters),
        never the frozen base model, which is reloaded from its source."""
        frozen = self._frozen_encoder_keys()
        return {k: v for k, v in self.state_dict().items() if k not in frozen}

    def load_checkpoint_state(self, state_dict: dict, skip: tuple[str, ...] = ()) -> None:
        """Load ``checkpoint_state()`` output; every tensor but the frozen encoder's (and ``skip``) must be there."""
        missing, unexpected = self.load_state_dict({k: v for k, v in state_dict.items() if k not in skip},
                                                   strict=False)
        wrong = sorted(set(missing) - self._frozen_encoder_keys() - set(skip)) + sorted(unexpected)
        if wrong:
            raise ValueError(f"checkpoint does not match {type(self).__name__}: {wrong}")

    def load_shared_state(self, state_dict: dict) -> None:
        """Load a checkpoint's shared tensors, leaving this model's per-user tensors (``user_state``) as built."""
        self.load_checkpoint_state(state_dict, skip=self.user_state)

    # ---- derived ----------------------------------------------------------------------------------------
    def encode(self, items: Any) -> Tensor:
        return self.encoder(items)

    def head(self, h: Tensor, user_idx: Tensor) -> Tensor:
        return self.user_reward(self.item_embedding(h), user_idx)

    def token_rewards(self, items: Any, user_idx: Tensor) -> Tensor:
        """r(y_t | x, y_<t) of every response token (B, T) for users (B,): the per-token reward of a token-level
        method (GenARM: beta_r log pi_r(y_t | x, y_<t); P-DPO's implicit reward per token), which a token guide
        for reward-guided decoding reads. Sequence-level methods leave it unimplemented and are guided through
        :meth:`prefix_rewards`."""
        raise NotImplementedError(f"{type(self).__name__} has no token-level reward (use prefix_rewards)")

    def prefix_rewards(self, h: Tensor, user_idx: Tensor) -> Tensor:
        """r_u(x, y_<=t) of every prefix from a causal backbone's hidden states h (B, T, D) -- the state at
        position t is the last-token feature of the prompt and the response up to t -- for users (B,): (B, T).
        One call of ``head`` on the flattened (B*T, D) states, what policy accuracy and reward-guided decoding
        read (factored methods only)."""
        if self.reward_shape != FACTORED:
            raise NotImplementedError(f"{type(self).__name__} conditions the encoder on the user: its prefix "
                                      "rewards come from its own forward pass, not from a head on hidden states")
        b, t, d = h.shape
        return self.head(h.reshape(b * t, d), user_idx.repeat_interleave(t)).view(b, t)  # (B*T,) -> (B, T)

    @torch.no_grad()
    def population_reward(self, z: Tensor, users: Tensor, max_entries: int = 2**24) -> Tensor:
        """The non-personalized reward (N,) of item embeddings ``z`` (N, Z): the mean over ``users`` of their
        rewards (for a reward linear in the per-user state, the reward of the average user; for a global model,
        its reward). Chunked so that at most ``max_entries`` (item, user, feature) values exist at once."""
        if self.reward_shape == CONDITIONED:
            raise NotImplementedError(f"{type(self).__name__} conditions the encoder on the user: it has no item "
                                      "embedding to average users' rewards over")
        n_users = len(users)
        step = max(1, max_entries // max(1, n_users * z.shape[1]))
        out = []
        for start in range(0, len(z), step):
            chunk = z[start:start + step]                                         # (n, Z)
            rewards = self.user_reward(chunk.repeat_interleave(n_users, 0), users.repeat(len(chunk)))
            out.append(rewards.view(len(chunk), n_users).mean(1))
        return torch.cat(out) if out else z.new_zeros(0)

    def reward(self, items: Any, user_idx: Tensor) -> Tensor:
        """Scalar reward of each (prompt, response) item for each user: (N,), in either shape."""
        if self.reward_shape == CONDITIONED:
            return self.conditioned_reward(items, user_idx, self.item_statistics(items))
        return self.head(self.encode(items), user_idx)

    def conditioned_pair_logit(self, chosen: Any, rejected: Any, user_idx: Tensor,
                               stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """r_u(y+) - r_u(y-) of a conditioned method, chosen and rejected in one (2B) forward; ``stats``: their
        item statistics when the caller has them (evaluation computes them once per unique item)."""
        n = len(user_idx)
        items = concat_inputs(chosen, rejected)
        item_stats = self.item_statistics(items) if stats is None else concat_optional(*stats)
        r = self.conditioned_reward(items, torch.cat([user_idx, user_idx]), item_stats)  # (2B,)
        return r[:n] - r[n:]

    def pair_logit(self, z_chosen: Tensor, z_rejected: Tensor, user_idx: Tensor) -> Tensor:
        """Log-odds that chosen beats rejected, from item embeddings."""
        if self.joint_pair_scoring:
            n = len(user_idx)
            r = self.user_reward(torch.cat([z_chosen, z_rejected]), torch.cat([user_idx, user_idx]))  # (2B,)
            return r[:n] - r[n:]
        return self.user_reward(z_chosen, user_idx) - self.user_reward(z_rejected, user_idx)

    def embed_pairs(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Item embeddings of a batch's chosen and rejected responses, encoded in one forward pass."""
        n = len(batch["user_idx"])
        items = concat_inputs(batch["chosen"], batch["rejected"])
        z = self.item_embedding(self.encode(items))  # (2B, Z)
        return z[:n], z[n:]

    def scores_differences(self) -> bool:
        """Whether a pair's reward difference reads only e+ - e- of its inputs (a reward linear in frozen
        features): then training (``difference_cache``) and active sessions hand the method that difference."""
        return self.linear_in_features and isinstance(self.encoder, nn.Identity)

    def embedding_difference(self, batch: dict) -> Tensor:
        """z+ - z- of each pair (B, Z), for methods whose reward is linear in z (a training batch of the
        difference table carries e+ - e- itself, ``difference``)."""
        if "difference" in batch:
            return self.item_embedding(batch["difference"])
        if self.scores_differences():
            return self.item_embedding(batch["chosen"] - batch["rejected"])
        z_chosen, z_rejected = self.embed_pairs(batch)
        return z_chosen - z_rejected

    def preference_logit(self, batch: dict) -> Tensor:
        if self.reward_shape == CONDITIONED:
            return self.conditioned_pair_logit(batch["chosen"], batch["rejected"], batch["user_idx"])
        if self.scores_differences():
            return self.user_reward(self.embedding_difference(batch), batch["user_idx"])
        z_chosen, z_rejected = self.embed_pairs(batch)
        return self.pair_logit(z_chosen, z_rejected, batch["user_idx"])

    def nll(self, logit: Tensor, batch: dict) -> Tensor:
        """Bradley-Terry negative log-likelihood of the batch (plrm.methods.losses.bradley_terry_nll),
        user-balanced as LoRe's eq. 10 when ``balance_users``."""
        return bradley_terry_nll(logit, batch["pair_weight"] if self.config.balance_users else None)

    def fit_user_state(self, support: dict, users: Tensor, init: Tensor, steps: int, lr: float,
                       l2: float = 0.0, pair_inputs: Tensor | tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``adapt``'s usual work: per-user parameters (U, ...) of ``users`` (sorted), from ``init``, minimizing
        each user's mean Bradley-Terry NLL on their ``support`` pairs + l2 ||theta_u||^2 with the method's own
        :meth:`reward_with`, all users at once (plrm.methods.peruser.fit_per_user). ``pair_inputs``: what
        ``reward_with`` scores per pair: a difference z+ - z- (P, Z) for a reward linear in z, or the pair
        (z+, z-); default: ``embedding_difference(support)`` when ``linear_in_features``, else
        ``embed_pairs(support)``."""
        if pair_inputs is None:
            pair_inputs = self.embedding_difference(support) if self.linear_in_features else self.embed_pairs(support)
        owner = torch.searchsorted(users, support["user_idx"])  # position of each pair's user in `users`

        def pair_nll(state: Tensor, pos: Tensor) -> Tensor:  # state: each pair's user's parameters (P, ...)
            if isinstance(pair_inputs, tuple):
                logit = self.reward_with(pair_inputs[0][pos], state) - self.reward_with(pair_inputs[1][pos], state)
            else:
                logit = self.reward_with(pair_inputs[pos], state)
            return -F.logsigmoid(logit)

        return fit_per_user(init, owner, pair_nll, steps=steps, lr=lr, l2=l2)

    def loss(self, batch: dict) -> Tensor:
        return self.nll(self.preference_logit(batch), batch)

    # ---- Lightning ----------------------------------------------------------------------------------------
    @staticmethod
    def global_loss(loss: Tensor, batch: dict) -> Tensor:
        """What this rank backpropagates of its part of a global training batch: ``loss`` (a mean over the
        rank's pairs or users, plus penalties that are the same on every rank) times the batch's ``share``
        (plrm.data.datamodule). DDP averages the ranks' gradients, which then equals the gradient of the whole
        global batch's loss. In one process ``share`` is 1 and ``loss`` is returned unchanged. A method that
        overrides ``training_step`` calls it on what it backpropagates."""
        share = batch.get("share", 1.0)
        return loss if share == 1.0 else loss * share

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        nll = self.loss(batch)
        loss = nll + self.regularization(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["user_idx"]))
        self.log("train/nll", nll, batch_size=len(batch["user_idx"]))
        return self.global_loss(loss, batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Validation loss and accuracy pooled over the validation pairs (not per user: the per-user numbers are
        the evaluation protocol's). Under DDP each rank holds a part of every validation batch; Lightning's
        ``sync_dist`` reduces the ranks' batch-size-weighted sums and counts, so the values are the same pooled
        numbers as in one process (a rank's copy of a batch smaller than the world, ``share`` 0, weighs 0)."""
        logit = self.preference_logit(batch)
        n = len(batch["user_idx"]) if batch.get("share", 1.0) > 0 else 0
        self.log("val/loss", -F.logsigmoid(logit).mean(), prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val/accuracy", (logit > 0).float().mean(), prog_bar=True, batch_size=n, sync_dist=True)

    def parameter_groups(self) -> list[dict]:
        """Optimizer groups; methods with per-user tables give them their own learning rate / decay."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def optimizer_groups(self) -> list[dict]:
        """``parameter_groups()`` with the encoder's trainable weights (LoRA adapters) moved into a group of their
        own, at the backbone's learning rate and weight decay."""
        encoder = [p for p in self.encoder.parameters() if p.requires_grad]
        if not encoder:
            return self.parameter_groups()
        ids = {id(p) for p in encoder}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in self.parameter_groups()]
        lr = getattr(self.encoder, "lr", None)
        return [g for g in groups if g["params"]] + [
            {"params": encoder, "lr": self.config.lr if lr is None else lr,
             "weight_decay": getattr(self.encoder, "weight_decay", self.config.weight_decay)}]

    def mixed_precision(self) -> bool:
        """Whether the attached trainer runs a mixed-precision plugin (plrm.methods.optim: no fused kernel then)."""
        trainer = self._trainer
        return trainer is not None and str(trainer.precision).endswith("-mixed")

    def configure_optimizers(self):
        c = self.config
        if getattr(c, "optimizer", "adam") == "lbfgs":
            # torch's L-BFGS takes one parameter group; Lightning calls step() with the closure it needs
            params = [p for group in self.optimizer_groups() for p in group["params"]]
            return torch.optim.LBFGS(params, lr=1.0, max_iter=c.lbfgs_iterations, history_size=c.lbfgs_history,
                                     line_search_fn="strong_wolfe")
        return adam(self.optimizer_groups(), lr=self.config.lr, weight_decay=self.config.weight_decay,
                    mixed_precision=self.mixed_precision())


def concat_optional(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None else torch.cat([a, b])


def concat_inputs(*parts: Any) -> Any:
    """Backbone inputs of several batches as one: tensors concatenated, token batches key by key (ragged ids
    and per-item tensors alike)."""
    a = parts[0]
    if isinstance(a, Tensor):
        return torch.cat(parts)
    if isinstance(a, dict):  # token batches of LM backbones
        return {k: torch.cat([p[k] for p in parts]) for k in a}
    raise TypeError(f"cannot batch backbone inputs of type {type(a).__name__}")
