"""PersonalLLM (``namkoong-lab/PersonalLLM``): simulated users over ten reward models' scores of eight responses.

Files. ``data/train-00000-of-00001.parquet`` (9,402 prompts) and ``data/test-00000-of-00001.parquet`` (1,000), one
row per prompt with 99 columns (shared/datasets.md §3.2): ``prompt``, ``subset``, ``prompt_id``, the responses
``response_1`` .. ``response_8`` of eight LLMs (with ``response_{i}_model``) and 80 scores ``response_{i}_{rm}``,
one per response and reward model. There are no human labels: users are simulated from the scores, so the ground
truth of every pair is known. A local copy (``data.path``) has the same layout; with ``data.files`` a file's
published split is the start of its name (``train-*`` / ``test-*``).

R. The scores of ``reward_models`` (default: all ten, in LoRe's order) form R [prompts, 8, K], the reward vector
R(x, y) of LoRe (Bose et al., arXiv 2504.14439) §5, used as published (raw, as LoRe's
``PersonalLLM/train_basis.py``). A missing score column is an error naming it.

``mode: dirichlet`` (LoRe §5 "Semi-synthetic Preference Dataset"; LoRe ``utils.py:simulate_user``):
``n_users`` users with weights w ~ Dirichlet(alpha 1_K) (seeded), each scoring a response w . R(x, y). On each of
their prompts a user's ``chosen`` is their highest-scored response and ``rejected`` the lowest ("we store the
highest/lowest scored responses"). Each user judges ``pairs_per_user`` distinct train prompts (paper: 45) and
``test_prompts_per_user`` test prompts (null: all 1,000, as the paper). Seen and unseen users are generated alike:
the split (``split.unseen_fraction``) decides who is unseen, and an unseen user's few-shot support is the first
``split.k`` of their train pairs (paper: 9). The paper's 1,000 seen + 1,000 unseen users are ``n_users: 2000``
with ``unseen_fraction: 0.5``. ``user_id`` = ``dir{alpha}-u{index}``.

``mode: archetypes`` (When Personalization Meets Reality, Dong et al., arXiv 2502.19158, §4.1, Table 2): each
reward model of ``archetypes`` (null: all of ``reward_models``) is one user, named after it, who prefers the
response its own model scores higher. Each prompt's 8 responses are split into 4 disjoint pairs by a seeded random
matching, and the first ``pairs_per_prompt`` of them are labelled by every archetype (dense: every pair by every
user). Dong et al. say only "8 different pre-trained reward models ... as archetypal users" and "333k
samples"; 10,402 prompts x 4 pairs x 8 users = 332,864 is how shared/datasets.md §3.3 reads that count. Which 8
models and which pairs the paper used are not published; the matching is plrm's choice.

Both modes: ``split`` and ``source_split`` are the published split of the row's prompt (every user's train pairs
come from train prompts and their test pairs from test prompts); ``group_id`` = ``prompt_id``; ``pair_id`` =
``{prompt_id}:{i}-{j}`` with response numbers i < j (1..8, as in the column names), shared by every user who
labels the same two responses of a prompt (datasets.md §9). ``n_train_prompts`` / ``n_test_prompts`` use a seeded
subset of the published prompts (null: all of them).

Oracles, as in the synthetic worlds (plrm/data/lowrank.py): 'oracle/personal' is the user's true reward difference
w_u . (R(x, chosen) - R(x, rejected)), 'oracle/non-personalized' the same with the population's mean weights; the
gap between them is the room for personalization (Dong et al. §4.2). ``truth`` holds ``user_weights`` (U, K; one-hot
rows for archetypes, in the order of ``user_ids``) and ``reward_models``.

Dropped, counted per rule and user (unit: a judgement, one user labelling one prompt (dirichlet) or one response
pair (archetypes)): judgements on a prompt with a missing or non-finite score of a used reward model; ties (the user
scores every response equally, so argmax == argmin; with archetypes, both responses of the pair equally); an
empty prompt or response; chosen and rejected with identical text (two LLMs gave the same answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from plrm import capabilities as cap
from plrm.config import opt
from plrm.data.lowrank import dirichlet
from plrm.data.published import (
    LoadReport,
    PublishedConfig,
    canonical_dataset,
    is_text,
    malformed,
    read_table,
    require_columns,
    resolve_files,
)
from plrm.data.schema import DataValidationError
from plrm.data.source import DatasetSource, PreferenceData
from plrm.lazy import lazy_module
from plrm.registry import datasets as dataset_registry

pd = lazy_module("pandas")  # imported at first use: `plrm list` imports this module, reads no data

WHAT = "personal_llm"
# LoRe's order (PersonalLLM/train_basis.py); Hub ids and score mean/sd in PersonalLLM's eval/constants.py
REWARD_MODELS = ["gemma_2b", "gemma_7b", "mistral_raft", "llama3_sfairx", "oasst_deberta_v3", "beaver_7b",
                 "oasst_pythia_7b", "oasst_pythia_1b", "mistral_ray", "mistral_weqweasdas"]
N_RESPONSES = 8
PUBLISHED_SPLITS = ("train", "test")
PATTERNS = [f"data/{split}-*.parquet" for split in PUBLISHED_SPLITS]
# drop rules, in the order they apply
NONFINITE = "judgements on a prompt with a missing or non-finite score"
TIE = "ties: the user scores the two responses equally (dirichlet: argmax == argmin)"
EMPTY = "empty prompt or response text"
IDENTICAL = "identical chosen and rejected texts"
USER_BLOCK = 256  # users scored at once: (256, 1,045 prompts, 8, 10) float64 is 170 MB


@dataclass
class Prompts:
    """The published prompts of both splits (train first), with their responses and reward vectors."""

    ids: np.ndarray        # (P,) str prompt_id
    text: np.ndarray       # (P,) object: str or None
    responses: np.ndarray  # (P, 8) object: str or None
    scores: np.ndarray     # (P, 8, K) float64: R
    is_test: np.ndarray    # (P,) bool


def _split_of(path: Path) -> str:
    for split in PUBLISHED_SPLITS:
        if path.name.startswith(f"{split}-") or path.stem == split:
            return split
    raise DataValidationError(f"{WHAT}: {path}: cannot tell which published split the file holds; its name must "
                              f"start with one of {[s + '-' for s in PUBLISHED_SPLITS]} (as data/train-00000-of-"
                              "00001.parquet on the Hub)")


def _is_text_or_null(series: pd.Series) -> np.ndarray:
    return series.isna().to_numpy() | is_text(series)


def read_prompts(path: Path, reward_models: list[str]) -> pd.DataFrame:
    """One file's prompts: prompt_id, prompt, response_1..8, the scores of ``reward_models`` (float64), file, row.

    Raises naming file, row and column for anything that is not the published schema."""
    frame = read_table(path, WHAT).reset_index(drop=True)
    response_columns = [f"response_{i}" for i in range(1, N_RESPONSES + 1)]
    score_columns = [f"response_{i}_{rm}" for i in range(1, N_RESPONSES + 1) for rm in reward_models]
    require_columns(frame, ["prompt", "prompt_id", *response_columns, *score_columns], path, WHAT)
    malformed(path, np.flatnonzero(frame["prompt_id"].isna().to_numpy()), "prompt_id", "is missing", WHAT)
    for column in ("prompt", *response_columns):
        malformed(path, np.flatnonzero(~_is_text_or_null(frame[column])), column, "is not a string", WHAT)
    out = {"prompt_id": frame["prompt_id"].astype(str).to_numpy(dtype=object),
           "prompt": frame["prompt"].to_numpy(dtype=object),
           **{c: frame[c].to_numpy(dtype=object) for c in response_columns}}
    for column in score_columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        malformed(path, np.flatnonzero(values.isna().to_numpy() & frame[column].notna().to_numpy()), column,
                  "is not a number", WHAT)
        out[column] = values.to_numpy(dtype=np.float64)
    return pd.DataFrame({**out, "split": _split_of(path), "file": str(path), "row": np.arange(len(frame))})


def assemble(frame: pd.DataFrame, reward_models: list[str]) -> Prompts:
    """R [P, 8, K] and the texts from the prompts of every file (train prompts first)."""
    repeated = frame["prompt_id"].duplicated(keep="first").to_numpy()
    if repeated.any():
        first = int(np.flatnonzero(repeated)[0])
        path = frame["file"].iloc[first]
        in_file = repeated & (frame["file"] == path).to_numpy()
        malformed(path, frame["row"].to_numpy()[in_file], "prompt_id", "repeats a prompt_id of an earlier row", WHAT)
    frame = frame.sort_values("split", kind="stable", key=lambda s: s.map(PUBLISHED_SPLITS.index))
    score_columns = [f"response_{i}_{rm}" for i in range(1, N_RESPONSES + 1) for rm in reward_models]
    scores = frame[score_columns].to_numpy(dtype=np.float64).reshape(len(frame), N_RESPONSES, len(reward_models))
    responses = frame[[f"response_{i}" for i in range(1, N_RESPONSES + 1)]].to_numpy(dtype=object)
    return Prompts(ids=frame["prompt_id"].to_numpy(dtype=object), text=frame["prompt"].to_numpy(dtype=object),
                   responses=responses, scores=scores, is_test=(frame["split"] == "test").to_numpy())


def _subset(rng: np.random.Generator, positions: np.ndarray, n: int | None, key: str) -> np.ndarray:
    """A seeded subset of ``n`` of the prompts at ``positions`` (all of them for None), in file order."""
    if n is None:
        return positions
    if n > len(positions):
        raise DataValidationError(f"{WHAT}: data.{key}={n}, but the files hold only {len(positions)} such prompts")
    return np.sort(rng.choice(positions, size=n, replace=False))


def _distinct_per_user(rng: np.random.Generator, positions: np.ndarray, n: int, n_users: int) -> np.ndarray:
    """(U, n): each user's own ``n`` distinct prompts among ``positions`` (random keys, the n smallest)."""
    out = np.empty((n_users, n), dtype=np.int64)
    for start in range(0, n_users, USER_BLOCK):  # bounded memory: (block, len(positions)) keys at a time
        stop = min(n_users, start + USER_BLOCK)
        keys = rng.random((stop - start, len(positions)))
        out[start:stop] = positions[keys.argpartition(n - 1, axis=1)[:, :n]]
    return out


@dataset_registry.register("personal_llm")
class PersonalLLM(DatasetSource):
    """PersonalLLM prompts with simulated users: Dirichlet mixtures of 10 reward models, or the models themselves."""

    licence = "CC-BY-4.0"
    homepage = "https://huggingface.co/datasets/namkoong-lab/PersonalLLM"
    provides = frozenset({cap.TEXT, cap.ORACLE, cap.SHARED_PAIRS})

    @dataclass
    class Config(PublishedConfig):
        repo_id: str = opt("namkoong-lab/PersonalLLM", "Hugging Face Hub dataset id.")
        mode: Literal["dirichlet", "archetypes"] = opt(
            "dirichlet", "'dirichlet': users with Dirichlet(alpha) weights over the reward models, best vs worst "
            "response of each of their prompts (LoRe §5); 'archetypes': each reward model is one user "
            "labelling random response pairs (Dong et al. §4.1).")
        reward_models: list[str] = opt(REWARD_MODELS, "Reward models whose scores form R (columns "
                                                      "response_{i}_{rm}); default: all ten, in LoRe's order.",
                                                      nonempty=True)
        n_users: int = opt(2000, "dirichlet: users simulated (LoRe Table 1: 1,000 seen + 1,000 unseen).", min=1)
        alpha: float = opt(0.01, "dirichlet: concentration of the user weights (LoRe: 0.001 very diverse, "
                                 "0.01 moderately diverse, 0.1 near uniform).", gt=0)
        pairs_per_user: int = opt(45, "dirichlet: train prompts judged per user, distinct (LoRe: 45; an "
                                      "unseen user's few-shot support is the first split.k of them, paper: 9).", min=1)
        test_prompts_per_user: int | None = opt(
            None, "dirichlet: test prompts judged per user, distinct (null: every test prompt, as LoRe; "
                  "2,000 users x 1,000 prompts of full text need about 10 GB of memory).", min=1)
        archetypes: list[str] | None = opt(
            None, "archetypes: the reward models that are users (null: all of reward_models; Dong et al. used 8, "
                  "unnamed).", nonempty=True)
        pairs_per_prompt: int = opt(4, "archetypes: disjoint response pairs per prompt, 1 to 4 (Dong et al.: 4).",
                                    min=1, max=N_RESPONSES // 2)
        n_train_prompts: int | None = opt(None, "Use a seeded subset of this many train prompts (null: all 9,402).",
                                          min=1)
        n_test_prompts: int | None = opt(None, "Use a seeded subset of this many test prompts (null: all 1,000).",
                                         min=1)
        seed: int = opt(0, "Seed of the prompt subsets, user weights, users' prompts and response pairs.", min=0)

        def __post_init__(self) -> None:
            if not self.reward_models or len(set(self.reward_models)) != len(self.reward_models):
                raise ValueError(f"reward_models must be a non-empty list without repeats, got {self.reward_models}")
            if self.archetypes is not None:
                unknown = [m for m in self.archetypes if m not in self.reward_models]
                if not self.archetypes or unknown or len(set(self.archetypes)) != len(self.archetypes):
                    raise ValueError(f"archetypes must be distinct members of reward_models {self.reward_models}, "
                                     f"got {self.archetypes}")
            for key in ("n_users", "pairs_per_user", "test_prompts_per_user", "n_train_prompts", "n_test_prompts"):
                value = getattr(self, key)
                if value is not None and value < 1:
                    raise ValueError(f"{key} must be >= 1, got {value}")
            if not self.alpha > 0:
                raise ValueError(f"alpha must be > 0, got {self.alpha}")
            if not 1 <= self.pairs_per_prompt <= N_RESPONSES // 2:
                raise ValueError(f"pairs_per_prompt must be in 1..{N_RESPONSES // 2} (disjoint pairs of "
                                 f"{N_RESPONSES} responses), got {self.pairs_per_prompt}")

    def load(self) -> PreferenceData:
        c = self.config
        files = resolve_files(c, PATTERNS, WHAT)
        frame = pd.concat([read_prompts(f, c.reward_models) for f in files], ignore_index=True)
        missing = [s for s in PUBLISHED_SPLITS if not (frame["split"] == s).any()]
        if missing:
            raise DataValidationError(f"{WHAT}: no {missing} prompts among {[str(f) for f in files]}; both the "
                                      "train and the test file are needed (data/train-*.parquet, data/test-*.parquet)")
        prompts = assemble(frame, c.reward_models)
        rng = np.random.default_rng(c.seed)
        train = _subset(rng, np.flatnonzero(~prompts.is_test), c.n_train_prompts, "n_train_prompts")
        test = _subset(rng, np.flatnonzero(prompts.is_test), c.n_test_prompts, "n_test_prompts")
        if c.mode == "dirichlet":
            user_ids, weights, judged = self._dirichlet_judgements(prompts, train, test, rng)
        else:
            user_ids, weights, judged = self._archetype_judgements(prompts, np.concatenate([train, test]), rng)
        user, prompt, chosen, rejected, tie = (a.ravel() for a in judged)

        report = LoadReport(WHAT, unit=f"judgements (user x {'prompt' if c.mode == 'dirichlet' else 'pair'})",
                            read=len(user))
        report.note(f"files: {', '.join(str(f) for f in files)}")
        report.note(f"prompts: {len(train):,} train / {len(test):,} test used of {int((~prompts.is_test).sum()):,} "
                    f"/ {int(prompts.is_test.sum()):,} read; {len(user_ids):,} users ({c.mode}"
                    + (f", alpha={c.alpha:g}" if c.mode == "dirichlet" else "") + ")")
        users = user_ids[user]
        keep = self._drop_unusable(prompts, user, prompt, chosen, rejected, tie, users, report)
        if not keep.any():
            raise DataValidationError(f"{WHAT}: no judgement is left after the rules above:\n{report.render()}")
        user, prompt, chosen, rejected = user[keep], prompt[keep], chosen[keep], rejected[keep]

        diff = prompts.scores[prompt, chosen] - prompts.scores[prompt, rejected]       # (N, K)
        personal = np.einsum("nk,nk->n", diff, weights[user])
        population = diff @ weights.mean(axis=0)
        pairs = canonical_dataset(self._table(prompts, user_ids[user], prompt, chosen, rejected), c, files)
        report.kept = len(pairs)
        return PreferenceData(
            name=WHAT, pairs=pairs, provides=frozenset({cap.TEXT}),  # oracle, shared_pairs: from what was built
            oracle_logits={"oracle/personal": personal.astype(np.float32),
                           "oracle/non-personalized": population.astype(np.float32)},
            truth={"user_weights": weights, "user_ids": user_ids, "reward_models": list(c.reward_models),
                   "mode": c.mode},
            load_report=report)

    # ---- users and what they judge ----------------------------------------------------------------------------
    def _dirichlet_judgements(self, prompts: Prompts, train: np.ndarray, test: np.ndarray, rng: np.random.Generator):
        """Dirichlet users, each judging their own prompts: (user, prompt, chosen, rejected, tie), each (U, n)."""
        c = self.config
        if c.pairs_per_user > len(train):
            raise DataValidationError(f"{WHAT}: data.pairs_per_user={c.pairs_per_user}, but only {len(train)} train "
                                      "prompts are used (data.n_train_prompts, or the train file)")
        if c.test_prompts_per_user is not None and c.test_prompts_per_user > len(test):
            raise DataValidationError(f"{WHAT}: data.test_prompts_per_user={c.test_prompts_per_user}, but only "
                                      f"{len(test)} test prompts are used (data.n_test_prompts, or the test file)")
        n_users, n_models = c.n_users, len(c.reward_models)
        weights = dirichlet(rng, c.alpha, n_users, n_models)                                     # (U, K)
        test_prompts = (np.broadcast_to(test, (n_users, len(test))) if c.test_prompts_per_user is None
                        else _distinct_per_user(rng, test, c.test_prompts_per_user, n_users))
        prompt = np.concatenate([_distinct_per_user(rng, train, c.pairs_per_user, n_users), test_prompts], axis=1)
        chosen, rejected = np.empty_like(prompt), np.empty_like(prompt)                         # (U, n)
        for start in range(0, n_users, USER_BLOCK):  # bounded memory; every user of a block at once
            block = slice(start, min(n_users, start + USER_BLOCK))
            scores = np.einsum("unrk,uk->unr", prompts.scores[prompt[block]], weights[block])  # (B, n, 8)
            chosen[block], rejected[block] = scores.argmax(axis=2), scores.argmin(axis=2)
        user = np.broadcast_to(np.arange(n_users)[:, None], prompt.shape)
        width = len(str(n_users - 1))
        user_ids = (f"dir{c.alpha:g}-u" + pd.Series(np.arange(n_users)).astype(str).str.zfill(width)).to_numpy(object)
        return user_ids, weights, (user, prompt, chosen, rejected, chosen == rejected)

    def _archetype_judgements(self, prompts: Prompts, used: np.ndarray, rng: np.random.Generator):
        """Every archetype labels the same random disjoint response pairs of every used prompt: each (A, P, m)."""
        c = self.config
        archetypes = c.archetypes if c.archetypes is not None else c.reward_models
        model = np.array([c.reward_models.index(m) for m in archetypes])                        # (A,)
        weights = np.eye(len(c.reward_models))[model]                                            # (A, K) one-hot
        matching = rng.random((len(used), N_RESPONSES)).argsort(axis=1)                         # (P, 8) a shuffle
        first = matching[:, 0::2][:, :c.pairs_per_prompt]                                        # (P, m)
        second = matching[:, 1::2][:, :c.pairs_per_prompt]
        prompt = np.broadcast_to(used[:, None], first.shape)
        score_first = prompts.scores[prompt, first][..., model].transpose(2, 0, 1)               # (A, P, m)
        score_second = prompts.scores[prompt, second][..., model].transpose(2, 0, 1)
        prefers_first = score_first > score_second
        chosen = np.where(prefers_first, first, second)                                          # (A, P, m)
        rejected = np.where(prefers_first, second, first)
        user = np.broadcast_to(np.arange(len(model))[:, None, None], chosen.shape)
        prompt = np.broadcast_to(prompt, chosen.shape)
        return np.asarray(archetypes, dtype=object), weights, (user, prompt, chosen, rejected,
                                                               score_first == score_second)

    # ---- rows ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _drop_unusable(prompts: Prompts, user, prompt, chosen, rejected, tie, users, report: LoadReport) -> np.ndarray:
        """The judgements to keep; every other one dropped by its rule, in this order."""
        nonfinite = ~np.isfinite(prompts.scores).all(axis=(1, 2))                                # (P,)
        if nonfinite.any():
            report.note(f"{int(nonfinite.sum()):,} prompt(s) have a missing or non-finite score, e.g. prompt_id "
                        f"{prompts.ids[np.flatnonzero(nonfinite)[:5]].tolist()}")
        text = pd.DataFrame(np.column_stack([prompts.text, prompts.responses]))
        blank = (text.isna() | (text.astype(str).apply(lambda col: col.str.strip()) == "")).to_numpy()  # (P, 9)
        codes = pd.factorize(prompts.responses.ravel())[0].reshape(prompts.responses.shape)     # (P, 8)
        keep = np.ones(len(user), dtype=bool)
        rules = [
            (NONFINITE, nonfinite[prompt]),
            (TIE, tie),
            (EMPTY, blank[prompt, 0] | blank[prompt, chosen + 1] | blank[prompt, rejected + 1]),
            (IDENTICAL, codes[prompt, chosen] == codes[prompt, rejected]),
        ]
        for reason, mask in rules:
            keep &= report.drop(reason, mask & keep, users)
        return keep

    @staticmethod
    def _table(prompts: Prompts, user_ids, prompt, chosen, rejected) -> pa.Table:
        prompt_id = pd.Series(prompts.ids[prompt], dtype=object)
        low, high = np.minimum(chosen, rejected) + 1, np.maximum(chosen, rejected) + 1   # response numbers, 1..8
        split = np.where(prompts.is_test[prompt], "test", "train")
        table = pa.table({
            "user_id": pa.array(np.asarray(user_ids, dtype=object).astype(str)),
            "prompt": pa.array(prompts.text[prompt]),
            "chosen": pa.array(prompts.responses[prompt, chosen]),
            "rejected": pa.array(prompts.responses[prompt, rejected]),
            "pair_id": pa.array((prompt_id + ":" + pd.Series(low).astype(str) + "-"
                                 + pd.Series(high).astype(str)).to_numpy(dtype=object)),
            "group_id": pa.array(prompt_id.to_numpy(dtype=object)),
            "split": pa.array(split),
            "source_split": pa.array(split),
        })
        return table
