"""The low-rank synthetic world, PersonalLLM-like as in LoRe (Bose et al., arXiv 2504.14439) §5.

Prompts have ``n_responses`` responses each; every (prompt, response) item has a feature vector
e ~ N(0, I_D). There are K true reward functions, linear in the features: f_k(e) = e . v_k with
v_k ~ N(0, I_D). A user has weights w_u ~ Dirichlet(alpha) over them, so their true reward is
r_u(e) = e . (V w_u). Each pair is the user's highest- vs lowest-scored response of a prompt
(LoRe §5: "we store the highest/lowest scored responses"), or, with ``labels: bradley_terry``,
that pair labelled by a Bradley-Terry draw.

Seen and unseen users are generated alike: ``pairs_per_user`` pairs on distinct train prompts (the split's
few-shot support of an unseen user is the first k of them) and pairs on the test prompts (a 'split' column
marks which).

Overlap. By default each user judges their own best-vs-worst pair of each of their prompts (or, with
``pair_choice: random``, a random pair of their own), so an item pair is labeled by few users (sparse,
PRISM-like). With ``users_per_pair`` set, the world is PReF's dense setting (PReF, Shenfeld et al.,
arXiv 2503.06358, app. B.2: "we sample 50 users for each response pair"): a shared pool of item pairs -- one random
response pair on each of M train prompts, M = n_users * pairs_per_user / users_per_pair -- from which every
user labels ``pairs_per_user`` distinct pairs, and one random pair per test prompt that every user labels.
The label is the user's truly preferred response of the pair (or a Bradley-Terry draw).

Two oracles are scored on every row: the personal oracle (the user's own true reward) and the
non-personalized oracle (the population-mean weights); the gap between them is the room for
personalization (When Personalization Meets Reality, Dong et al., arXiv 2502.19158, §4.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from plrm import capabilities as cap
from plrm.config import opt
from plrm.data.source import DatasetSource, FeatureTable, PreferenceData, item_keys
from plrm.lazy import lazy_module
from plrm.registry import datasets as dataset_registry

pd = lazy_module("pandas")  # imported at first use: `plrm list` imports this module, reads no data


def dirichlet(rng: np.random.Generator, alpha: float | np.ndarray, n: int, k: int) -> np.ndarray:
    """Dirichlet(alpha) samples that stay finite for tiny alpha (a scalar, or one concentration per component).

    numpy's sampler draws Gamma(alpha), which underflows to 0 for alpha ~ 1e-3 and gives 0/0 rows.
    Work in log space instead: log G(alpha) = log G(alpha + 1) + log(U) / alpha, then a softmax.
    """
    log_g = np.log(rng.gamma(alpha + 1.0, size=(n, k))) + np.log(rng.uniform(size=(n, k))) / alpha
    log_g -= log_g.max(axis=1, keepdims=True)
    g = np.exp(log_g)
    return g / g.sum(axis=1, keepdims=True)


def label_pairs(rng: np.random.Generator, chosen: np.ndarray, rejected: np.ndarray, diff: np.ndarray,
                user_weights: np.ndarray, mean_weights: np.ndarray, labels: str, bt_temperature: float):
    """Labels and oracle logits of (U, n) pairs whose true-feature difference chosen - rejected is ``diff``
    (U, n, F), linear true rewards w_u . f: with ``labels: bradley_terry`` each pair's order is redrawn with
    P = sigmoid(delta / bt_temperature). Returns chosen, rejected, the personal and the population logits."""
    if labels == "bradley_terry":
        delta = np.einsum("unf,uf->un", diff, user_weights)
        flip = rng.random(delta.shape) >= 1.0 / (1.0 + np.exp(-delta / bt_temperature))
        chosen, rejected = np.where(flip, rejected, chosen), np.where(flip, chosen, rejected)
        diff = np.where(flip[..., None], -diff, diff)
    return chosen, rejected, np.einsum("unf,uf->un", diff, user_weights), diff @ mean_weights


def _texts(prefix: str, ids: np.ndarray) -> pd.Series:
    return prefix + pd.Series(ids, dtype=np.int64).astype(str)


@dataset_registry.register("lowrank_world")
class LowRankWorld(DatasetSource):
    """Synthetic PersonalLLM-like world: linear true rewards, Dirichlet users, known oracles."""

    provides = frozenset({cap.FEATURES, cap.ORACLE, cap.SHARED_PAIRS})

    @dataclass
    class Config:
        n_users: int = opt(2000, "Users generated (split.unseen_fraction of them become unseen users).", min=1)
        pairs_per_user: int = opt(45, "Train pairs per user, on distinct train prompts (LoRe: 45).", min=1)
        n_train_prompts: int = opt(9000, "Prompts that train pairs are drawn from.", min=1)
        n_test_prompts: int = opt(1000, "Test prompts.", min=1)
        test_prompts_per_user: int | None = opt(
            None, "Test pairs per user, on distinct test prompts (null: every test prompt, as LoRe).", min=1)
        n_responses: int = opt(8, "Responses per prompt (PersonalLLM: 8).", min=2)
        feature_dim: int = opt(4096, "D, the feature dimension (LoRe's embeddings: 4096).", min=1)
        n_functions: int = opt(10, "K, the number of true reward functions (PersonalLLM: 10 reward models).", min=1)
        alpha: float = opt(0.01, "Dirichlet concentration of user weights: 0.001 very diverse, 0.1 near uniform.", gt=0)
        function_prevalence: list[float] | None = opt(
            None, "Planted majority / minority preferences: how common each true function is among users (K "
            "positive numbers, normalized to sum 1). Users' weights are Dirichlet(alpha * K * p_k): each still has "
            "total concentration alpha * K, and with a small alpha a user leans on function k with probability "
            "about p_k, so [0.7, 0.2, 0.07, 0.03] plants two minority groups. null: all equally common.",
            nonempty=True, gt=0)
        minority_fraction: float = opt(
            0.0, "A planted minority that inverts the shared preference: this share of the users (a seeded random "
            "set, truth['minority']) has its true weights negated, r_u = -e . (V w_u), so it prefers what the "
            "majority dislikes (the minority users of When Personalization Meets Reality, Dong et al., arXiv "
            "2502.19158, Fig. 5). 0: none.", min=0, lt=0.5)
        users_per_pair: int | None = opt(
            None, "Dense overlap (PReF's setting, app. B.2: 50): users label a shared pool of random "
            "response pairs, each pair by about this many users; null: every user labels their own best-vs-worst "
            "pair of each of their prompts (sparse overlap).", min=1)
        pair_choice: str = opt("extremes", "Without users_per_pair: which pair of a prompt a user labels. "
                               "'extremes': their best vs worst response (LoRe §5); 'random': a random "
                               "pair of their own (PRISM-like: hardly any pair is labeled twice).",
                               choices=("extremes", "random"))
        labels: str = opt("extremes", "'extremes': the user's truly preferred response of the pair (the "
                          "highest vs lowest scored response unless users_per_pair is set); 'bradley_terry': "
                          "that pair's order drawn with P = sigmoid(delta / bt_temperature).",
                          choices=("extremes", "bradley_terry"))
        bt_temperature: float = opt(1.0, "Temperature of Bradley-Terry labels (true reward units).", gt=0)
        seed: int = opt(0, "Seed of the world (features, true functions, users, pairs).", min=0)

        def __post_init__(self) -> None:
            if self.pair_choice not in ("extremes", "random"):
                raise ValueError(f"pair_choice must be 'extremes' or 'random', got {self.pair_choice!r}")
            if self.labels not in ("extremes", "bradley_terry"):
                raise ValueError(f"labels must be 'extremes' or 'bradley_terry', got {self.labels!r}")
            if self.pairs_per_user > self.n_train_prompts:
                raise ValueError(f"pairs_per_user={self.pairs_per_user} exceeds n_train_prompts={self.n_train_prompts}")
            if self.test_prompts_per_user is not None and self.test_prompts_per_user > self.n_test_prompts:
                raise ValueError(f"test_prompts_per_user={self.test_prompts_per_user} exceeds "
                                 f"n_test_prompts={self.n_test_prompts}")
            if self.n_responses < 2:
                raise ValueError("n_responses must be >= 2")
            if self.function_prevalence is not None:
                if len(self.function_prevalence) != self.n_functions:
                    raise ValueError(f"function_prevalence has {len(self.function_prevalence)} entries; it needs one "
                                     f"per true function (n_functions={self.n_functions})")
                if min(self.function_prevalence) <= 0:
                    raise ValueError(f"function_prevalence entries must be > 0, got {self.function_prevalence}")
            if self.users_per_pair is not None:
                if self.pair_choice != "extremes":
                    raise ValueError(f"pair_choice={self.pair_choice!r} applies without users_per_pair only: with "
                                     f"users_per_pair={self.users_per_pair} every pair is a random pool pair")
                if self.users_per_pair < 1:
                    raise ValueError(f"users_per_pair must be >= 1, got {self.users_per_pair}")
                if self.pool_size > self.n_train_prompts:
                    raise ValueError(
                        f"users_per_pair={self.users_per_pair} needs a pool of n_users * pairs_per_user / "
                        f"users_per_pair = {self.pool_size} item pairs, one per train prompt, but n_train_prompts="
                        f"{self.n_train_prompts}; raise n_train_prompts or users_per_pair")

        @property
        def pool_size(self) -> int:
            """M, the number of shared train item pairs in the dense setting."""
            return max(self.pairs_per_user, round(self.n_users * self.pairs_per_user / self.users_per_pair))

    def _test_prompts(self, rng: np.random.Generator) -> np.ndarray:
        c = self.config
        if c.test_prompts_per_user is None:
            test_prompts = np.broadcast_to(np.arange(c.n_test_prompts), (c.n_users, c.n_test_prompts))
        else:
            test_prompts = rng.random((c.n_users, c.n_test_prompts)).argpartition(
                c.test_prompts_per_user - 1, axis=1)[:, :c.test_prompts_per_user]
        return test_prompts + c.n_train_prompts

    def _sparse_prompts(self, rng: np.random.Generator) -> np.ndarray:
        """(U, n) prompts of each user: distinct train prompts, then test prompts."""
        c = self.config
        train_prompts = rng.random((c.n_users, c.n_train_prompts)).argpartition(
            c.pairs_per_user - 1, axis=1)[:, :c.pairs_per_user]
        return np.concatenate([train_prompts, self._test_prompts(rng)], axis=1)

    def _random_pairs(self, rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray]:
        """Two distinct random responses (first < second) for each entry of ``shape``."""
        r = self.config.n_responses
        first = rng.integers(0, r, size=shape)
        second = (first + rng.integers(1, r, size=shape)) % r
        return np.minimum(first, second), np.maximum(first, second)

    def _dense_pairs(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prompt, first response, second response), each (U, n): pool pairs, then the test prompts' pairs."""
        c = self.config
        m = c.pool_size
        pool_prompt = rng.choice(c.n_train_prompts, size=m, replace=False)
        n_prompts = c.n_train_prompts + c.n_test_prompts
        # one random response pair (first < second) per prompt; only the pool's and the test prompts' are used
        first, second = self._random_pairs(rng, n_prompts)
        picks = np.empty((c.n_users, c.pairs_per_user), dtype=np.int64)
        for start in range(0, c.n_users, 1024):  # users' distinct picks from the pool, in bounded memory
            stop = min(c.n_users, start + 1024)
            picks[start:stop] = rng.random((stop - start, m)).argpartition(
                c.pairs_per_user - 1, axis=1)[:, :c.pairs_per_user]
        prompt = np.concatenate([pool_prompt[picks], self._test_prompts(rng)], axis=1)
        return prompt, first[prompt], second[prompt]

    def load(self) -> PreferenceData:
        import datasets  # imported when used: it takes ~1 s, and `plrm list` needs none
        c = self.config
        rng = np.random.default_rng(c.seed)
        n_prompts = c.n_train_prompts + c.n_test_prompts
        features = rng.standard_normal((n_prompts * c.n_responses, c.feature_dim), dtype=np.float32)  # (I, D)
        directions = rng.standard_normal((c.feature_dim, c.n_functions)).astype(np.float32)       # (D, K)
        true_rewards = (features @ directions).reshape(n_prompts, c.n_responses, c.n_functions)    # (P, R, K)
        concentration = c.alpha
        if c.function_prevalence is not None:
            prevalence = np.asarray(c.function_prevalence, dtype=np.float64)
            concentration = c.alpha * c.n_functions * prevalence / prevalence.sum()                  # (K,)
        user_weights = dirichlet(rng, concentration, c.n_users, c.n_functions)                     # (U, K)
        minority = np.zeros(c.n_users, dtype=bool)
        if c.minority_fraction:
            minority[rng.permutation(c.n_users)[:round(c.minority_fraction * c.n_users)]] = True
            user_weights = np.where(minority[:, None], -user_weights, user_weights)                # signed
        mean_weights = user_weights.mean(axis=0)                                                   # (K,)

        if c.users_per_pair is None and c.pair_choice == "extremes":
            prompt = self._sparse_prompts(rng)
            # Each user's scores of the responses of each of their prompts: (U, n, R); their best vs worst.
            scores = np.einsum("unrk,uk->unr", true_rewards[prompt], user_weights, optimize=True)
            chosen, rejected = scores.argmax(axis=2), scores.argmin(axis=2)
        else:
            if c.users_per_pair is None:  # a random pair of each of the user's own prompts
                prompt = self._sparse_prompts(rng)
                first, second = self._random_pairs(rng, prompt.shape)
            else:
                prompt, first, second = self._dense_pairs(rng)
            pair_rewards = true_rewards[prompt[..., None], np.stack([first, second], -1)]            # (U, n, 2, K)
            scores = np.einsum("unrk,uk->unr", pair_rewards, user_weights, optimize=True)
            prefers_first = scores[..., 0] >= scores[..., 1]
            chosen, rejected = np.where(prefers_first, first, second), np.where(prefers_first, second, first)
        is_test = prompt >= c.n_train_prompts
        user = np.broadcast_to(np.arange(c.n_users)[:, None], prompt.shape)
        diff_k = true_rewards[prompt, chosen] - true_rewards[prompt, rejected]                    # (U, n, K)
        chosen, rejected, personal, population = label_pairs(rng, chosen, rejected, diff_k, user_weights,
                                                             mean_weights, c.labels, c.bt_temperature)

        prompt, user, chosen, rejected = prompt.ravel(), user.ravel(), chosen.ravel(), rejected.ravel()
        width = len(str(c.n_users - 1))
        prompt_text = _texts("prompt ", prompt)
        response_prefix = "response to prompt " + prompt_text.str.slice(7) + " #"
        low, high = np.minimum(chosen, rejected), np.maximum(chosen, rejected)
        table = pa.table({
            "user_id": pa.array(("user" + pd.Series(user).astype(str).str.zfill(width)).to_numpy()),
            "prompt": pa.array(prompt_text.to_numpy()),
            "chosen": pa.array((response_prefix + pd.Series(chosen).astype(str)).to_numpy()),
            "rejected": pa.array((response_prefix + pd.Series(rejected).astype(str)).to_numpy()),
            "pair_id": pa.array((prompt_text.str.slice(7) + ":" + pd.Series(low).astype(str) + "-"
                                 + pd.Series(high).astype(str)).to_numpy()),
            "split": pa.array(np.where(is_test.ravel(), "test", "train")),
        })
        item_prompt = np.repeat(np.arange(n_prompts), c.n_responses)
        item_response = np.tile(np.arange(c.n_responses), n_prompts)
        item_prompt_text = _texts("prompt ", item_prompt)
        keys = item_keys(item_prompt_text,
                         "response to prompt " + item_prompt_text.str.slice(7) + " #"
                         + pd.Series(item_response).astype(str))
        return PreferenceData(
            name="lowrank_world",
            pairs=datasets.Dataset(datasets.table.InMemoryTable(table)),
            provides=self.provides,
            features=FeatureTable(keys, features),
            oracle_logits={"oracle/personal": personal.ravel().astype(np.float32),
                           "oracle/non-personalized": population.ravel().astype(np.float32)},
            truth={"directions": directions, "user_weights": user_weights, "feature_dim": c.feature_dim,
                   "minority": minority},
        )
