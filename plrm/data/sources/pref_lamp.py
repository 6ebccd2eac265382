"""Pref-LaMP: preferences between paper titles, built from the LaMP-5 files by a seeded builder.

Pref-LaMP is the benchmark of The Reward Model Selection Crisis in Personalized Alignment (Rezk et al., arXiv
2512.23067) §5-6.

Files. LaMP-5 (shared/datasets.md §5.1) is served from ciir.cs.umass.edu, not the Hub: ``LaMP_5/dev/dev_questions.json``
and ``LaMP_5/dev/dev_outputs.json`` (and ``train_*``; ``lamp_splits`` picks them). ``<split>_questions.json`` is a
JSON array of ``{"id", "input", "profile": [{"id", "title", "abstract"}, ...]}`` (the time-based files also carry
``user_id``): one question per user, ``input`` = "Generate a title for the following abstract of a paper: " + the
abstract of one of the author's papers, ``profile`` = the author's other papers. ``<split>_outputs.json`` is
``{"task": "LaMP_5", "golds": [{"id", "output"}]}``, ``output`` = that paper's real title. ``data.path`` is a
directory holding these files anywhere below it; a Hub mirror with the same file names works through
``data.repo_id``.

Construction (Rezk et al. §5 "Dataset Construction": "(1) encode abstracts with Qwen3-Embedding-0.6B, (2) retrieve
top-k similar abstracts, (3) sample one retrieved abstract ... and use its title as y_l, (4) use original title as
y_w"). A user is a LaMP-5 question (``user_id`` where the file has it); the user's papers are the profile papers
plus, with ``include_question``, the question's own paper (abstract from ``input``, title = the gold ``output``).
Each paper gives one pair: ``prompt`` = its abstract (``prompt_format: lamp`` prefixes the LaMP-5 instruction),
``chosen`` = ``reference`` = its title, written by the user, ``rejected`` = the title of a paper sampled uniformly
from the ``top_k`` abstracts most similar to it (cosine of ``encoder`` features) in the candidate ``pool``: a
human-written title on the same topic (the paper's footnote 1: LLM-written negatives let probes cheat). A
candidate with the same (case- and space-normalized) title or abstract as the paper is never its negative: that is
the paper itself, or a co-author's copy of it. ``pair_id`` = ``{user}:{paper id}>{negative's paper id}``
(datasets.md §9; never shared across users); ``source_split`` = the LaMP split.

What the paper states and what plrm chose (datasets.md §11: no Pref-LaMP artifact is public):

- paper: hard negatives by embedding nearest neighbours, one sampled negative per pair, chosen = the author's
  title; 485 training + 126 adaptation users, 48.8 / 49.2 preferences each (§6); Qwen3-Embedding-0.6B.
- plrm: ``encoder`` defaults to the offline MiniLM (``offline:minilm``; any plrm frozen-encoder model works,
  ``Qwen/Qwen3-Embedding-0.6B`` included), used through plrm's frozen-encoder backbone and its disk cache (the
  dataset asks for that backbone with ``encoder_request()`` and gets it built: ``load(encoder=...)``);
  ``top_k: 5``; ``pool: all`` (every usable paper of the selected users, whoever wrote it); a pair per paper up
  to ``max_pairs_per_user: 50`` (the question's paper first, then a seeded sample; ~49 pairs per user in the paper
  suggests such a cap); ``min_papers: 10``; ``max_users`` (null: all) samples users after ``min_papers``;
  ``include_question: true``; ``prompt_format: abstract``. The result re-creates, not reproduces, the paper's data.

Dropped, counted per rule and user (unit: papers, a profile entry or a question): a question without a gold
output; an empty title or abstract; a profile entry repeating a paper id already in the user's profile; the papers
of users with fewer than ``min_papers`` usable papers; of users not sampled by ``max_users``; papers over
``max_pairs_per_user``; papers with no valid retrieval candidate. Notes give the user counts at each step.
``user_info`` (one row per user): LaMP split, question id, question input, gold output, profile size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa

from plrm import capabilities as cap
from plrm.config import opt
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
from plrm.data.source import DatasetSource, EncoderRequest, PreferenceData
from plrm.items import ItemIndex
from plrm.lazy import lazy_module
from plrm.registry import datasets as dataset_registry

pd = lazy_module("pandas")  # imported at first use: `plrm list` imports this module, reads no data

if TYPE_CHECKING:
    import datasets

    from plrm.backbones.base import Backbone

WHAT = "pref_lamp"
LAMP5_INSTRUCTION = "Generate a title for the following abstract of a paper: "
PROFILE_KEYS = ("id", "title", "abstract")
CHUNK_ELEMENTS = 2**24  # similarities computed at once (queries x pool), 64 MB of float32
# drop rules, in the order they apply
NO_GOLD = "questions without a gold output (no <split>_outputs.json entry)"
EMPTY = "papers with an empty title or abstract"
REPEATED = "profile entries repeating a paper id of the same user"
FEW_PAPERS = "papers of users with fewer than min_papers usable papers"
NOT_SAMPLED = "papers of users not sampled (max_users)"
OVER_CAP = "papers over max_pairs_per_user (not sampled)"
NO_CANDIDATE = "papers with no valid retrieval candidate in the pool"


def _blank(series: pd.Series) -> np.ndarray:
    return (series.isna() | (series.astype(str).str.strip() == "")).to_numpy()


def _normalized_codes(texts: pd.Series) -> np.ndarray:
    """An int per text, equal for texts that differ only in case and whitespace."""
    return pd.factorize(texts.astype(str).str.casefold().str.split().str.join(" "))[0]


def read_questions(path: Path, lamp_split: str, include_question: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(papers, questions) of one ``<split>_questions.json``.

    papers: user_id, paper_id, title, abstract, is_question (question papers get their title from the outputs);
    questions: user_id, question_id, question, profile_size. Raises naming file, row and key for anything that is
    not the published schema (a row is a question: its index in the JSON array)."""
    frame = read_table(path, WHAT).reset_index(drop=True)
    require_columns(frame, ["id", "input", "profile"], path, WHAT)
    users = frame["user_id"] if "user_id" in frame.columns else frame["id"]
    for column, values in (("id", frame["id"]), ("user_id", users)):
        malformed(path, np.flatnonzero(values.isna().to_numpy()), column, "is missing", WHAT)
    malformed(path, np.flatnonzero(~frame["profile"].map(lambda v: isinstance(v, list)).to_numpy(dtype=bool)),
              "profile", "is not a list of papers", WHAT)
    sizes = frame["profile"].map(len).to_numpy()
    question_row = np.repeat(np.arange(len(frame)), sizes)
    entries = [entry for profile in frame["profile"] for entry in profile]  # one linear pass over nested records
    is_object = np.fromiter((isinstance(e, dict) for e in entries), dtype=bool, count=len(entries))
    malformed(path, np.unique(question_row[~is_object]), "profile", "holds an entry that is not an object "
              "{id, title, abstract}", WHAT)
    for key in PROFILE_KEYS:
        has_key = np.fromiter((key in e for e in entries), dtype=bool, count=len(entries))
        malformed(path, np.unique(question_row[~has_key]), f"profile[].{key}", "is missing", WHAT)
    profile = pd.DataFrame.from_records(entries).reindex(columns=list(PROFILE_KEYS))
    malformed(path, np.unique(question_row[profile["id"].isna().to_numpy()]), "profile[].id", "is null", WHAT)
    for key in ("title", "abstract"):
        bad = profile[key].notna().to_numpy() & ~is_text(profile[key])
        malformed(path, np.unique(question_row[bad]), f"profile[].{key}", "is not a string", WHAT)

    user_ids = users.astype(str).to_numpy(dtype=object)
    papers = pd.DataFrame({"user_id": user_ids[question_row], "paper_id": profile["id"].astype(str).to_numpy(),
                           "title": profile["title"].to_numpy(dtype=object),
                           "abstract": profile["abstract"].to_numpy(dtype=object), "is_question": False,
                           "question_row": question_row})
    questions = pd.DataFrame({"user_id": user_ids, "question_id": frame["id"].astype(str).to_numpy(dtype=object),
                              "question": frame["input"].to_numpy(dtype=object), "profile_size": sizes})
    if include_question:
        malformed(path, np.flatnonzero(~is_text(frame["input"])), "input", "is not a string", WHAT)
        lamp5 = frame["input"].str.startswith(LAMP5_INSTRUCTION).to_numpy(dtype=bool)
        malformed(path, np.flatnonzero(~lamp5), "input", f"does not start with the LaMP-5 instruction "
                  f"{LAMP5_INSTRUCTION!r}", WHAT)
        own = pd.DataFrame({"user_id": user_ids, "paper_id": questions["question_id"], "title": None,
                            "abstract": frame["input"].str.slice(len(LAMP5_INSTRUCTION)).to_numpy(dtype=object),
                            "is_question": True, "question_row": np.arange(len(frame))})
        # each question's own paper, then its profile, question by question
        papers = pd.concat([own, papers], ignore_index=True).sort_values("question_row", kind="stable")
    papers = papers.drop(columns="question_row").reset_index(drop=True)
    papers["lamp_split"] = lamp_split
    questions["lamp_split"] = lamp_split
    return papers, questions


def read_golds(path: Path) -> pd.Series:
    """question id -> gold title of one ``<split>_outputs.json`` (a row is an entry of ``golds``)."""
    frame = read_table(path, WHAT)
    require_columns(frame, ["golds"], path, WHAT)
    golds = frame["golds"].iloc[0]
    if not isinstance(golds, list) or not all(isinstance(g, dict) for g in golds):
        raise DataValidationError(f"{WHAT}: {path}: 'golds' must be a list of objects {{id, output}}")
    table = pd.DataFrame.from_records(golds).reindex(columns=["id", "output"])
    malformed(path, np.flatnonzero(table["id"].isna().to_numpy()), "golds[].id", "is missing", WHAT)
    malformed(path, np.flatnonzero(~is_text(table["output"])), "golds[].output", "is missing or not a string", WHAT)
    ids = table["id"].astype(str)
    malformed(path, np.flatnonzero(ids.duplicated().to_numpy()), "golds[].id", "repeats an earlier id", WHAT)
    return pd.Series(table["output"].to_numpy(dtype=object), index=ids.to_numpy())


def hard_negatives(embeddings: np.ndarray, queries: np.ndarray, users: np.ndarray, titles: np.ndarray,
                   abstracts: np.ndarray, top_k: int, pool: str, rng: np.random.Generator) -> np.ndarray:
    """For each query paper (a row of the pool), a pool paper drawn uniformly from the ``top_k`` abstracts most
    similar to its own (cosine) among the valid candidates; -1 where there is none.

    Valid: a different normalized title and abstract (not the paper itself nor a copy of it), and by ``pool`` any
    user's paper ('all'), another user's ('other_users') or the same user's ('same_user'). ``embeddings`` (N, D);
    ``queries`` (Q,) pool rows; ``users``, ``titles``, ``abstracts`` (N,) integer codes."""
    import torch  # torch.topk: 25x faster than numpy's argpartition over rows of a large pool

    unit = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float32), dim=1)      # (N, D)
    users, titles, abstracts = (torch.as_tensor(np.asarray(a, dtype=np.int64)) for a in (users, titles, abstracts))
    k = min(top_k, len(unit))
    negatives = np.full(len(queries), -1, dtype=np.int64)
    step = max(1, CHUNK_ELEMENTS // len(unit))
    for start in range(0, len(queries), step):  # bounded memory: (step, N) similarities at a time
        q = torch.as_tensor(np.asarray(queries[start:start + step], dtype=np.int64))
        sim = unit[q] @ unit.T                                                                    # (b, N)
        invalid = (titles[q, None] == titles[None, :]) | (abstracts[q, None] == abstracts[None, :])
        if pool == "other_users":
            invalid |= users[q, None] == users[None, :]
        elif pool == "same_user":
            invalid |= users[q, None] != users[None, :]
        sim.masked_fill_(invalid, -torch.inf)
        top_sim, top = torch.topk(sim, k, dim=1)                          # (b, k), most similar (valid) first
        n_valid = torch.isfinite(top_sim).sum(dim=1).numpy()
        pick = np.minimum((rng.random(len(q)) * n_valid).astype(np.int64), np.maximum(n_valid - 1, 0))
        negatives[start:start + len(q)] = np.where(n_valid > 0, top.numpy()[np.arange(len(q)), pick], -1)
    return negatives


@dataclass
class _Texts:
    """What the frozen-encoder backbone reads from a dataset: text rows (one item per row: '' + the text)."""

    pairs: datasets.Dataset
    name: str = f"{WHAT} abstracts"
    provides: frozenset = frozenset({cap.TEXT})


def embed_texts(texts: np.ndarray, encoder: Backbone) -> np.ndarray:
    """(N, D) features of ``texts`` from ``encoder``, a backbone whose ``inputs`` are features (the frozen encoder
    of PrefLaMP.encoder_request, with its disk cache). Each text is an item with an empty prompt: an encoder reads
    [CLS] [SEP] text [SEP]; a decoder reads it without a chat template."""
    import datasets  # imported when used: it takes ~1 s, and `plrm list` needs none
    import torch

    n = len(texts)
    rows = pa.table({"prompt": pa.array([""] * n), "chosen": pa.array(list(texts)), "rejected": pa.array(list(texts))})
    index = np.arange(n, dtype=np.int64)
    encoder.prepare(_Texts(datasets.Dataset(datasets.table.InMemoryTable(rows))),
                    ItemIndex(keys=index.astype(np.uint64), chosen_item=index, rejected_item=index, first_row=index))
    return encoder.inputs(torch.from_numpy(index)).numpy()


@dataset_registry.register("pref_lamp")
class PrefLaMP(DatasetSource):
    """Pref-LaMP: an author's own paper title vs the title of a similar abstract, built from LaMP-5."""

    licence = "LaMP: CC-BY-NC-SA-4.0 (code and data creation); the papers' texts follow their sources' licences"
    homepage = "https://lamp-benchmark.github.io"
    provides = frozenset({cap.TEXT, cap.REFERENCE})

    @dataclass
    class Config(PublishedConfig):
        repo_id: str = opt("", "LaMP-5 has no official Hub repository (it is served from ciir.cs.umass.edu): set "
                               "data.path to a directory holding <split>_questions.json / <split>_outputs.json, or "
                               "name a Hub mirror with the same file names here.")
        lamp_splits: list[str] = opt(["dev"], "LaMP-5 splits to read: each needs <split>_questions.json (and "
                                              "<split>_outputs.json for the questions' own titles).", nonempty=True)
        include_question: bool = opt(True, "Each LaMP question's own paper (input abstract, gold output title) is "
                                           "one of the user's papers, kept first under max_pairs_per_user.")
        prompt_format: Literal["abstract", "lamp"] = opt(
            "abstract", "'abstract': the prompt is the abstract; 'lamp': the LaMP-5 instruction 'Generate a title "
                        "for the following abstract of a paper: ' followed by it.")
        min_papers: int = opt(10, "Drop users with fewer usable papers (plrm's choice; the paper does not say).", min=1)
        max_users: int | None = opt(None, "Keep a seeded sample of this many users after min_papers (null: all; "
                                          "Rezk et al. §6: 485 training + 126 adaptation = 611).", min=1)
        max_pairs_per_user: int | None = opt(50, "Pairs per user at most: the question's paper, then a seeded "
                                                 "sample of the profile (plrm's reading of the paper's ~49 per user; "
                                                 "null: every paper).", min=1)
        top_k: int = opt(5, "Negatives are drawn from the top_k most similar abstracts (Rezk et al.: 'top-k', k "
                            "not given; plrm's choice).", min=1)
        pool: Literal["all", "other_users", "same_user"] = opt(
            "all", "Retrieval candidates: every usable paper of the selected users ('all', plrm's reading of the "
                   "paper), only other users' ('other_users') or only the user's own ('same_user').")
        encoder: str = opt("offline:minilm", "Frozen-encoder model that embeds abstracts for retrieval (Rezk et "
                                             "al.: Qwen/Qwen3-Embedding-0.6B; any backbone.model value works).")
        encoder_max_length: int = opt(256, "Tokens per abstract for retrieval (longer abstracts are cut).", min=2)
        seed: int = opt(0, "Seed of max_users, max_pairs_per_user and the negative drawn among the top_k.", min=0)

        def __post_init__(self) -> None:
            if not self.lamp_splits:
                raise ValueError("lamp_splits must name at least one LaMP-5 split (train, dev)")
            for key in ("min_papers", "top_k", "max_users", "max_pairs_per_user", "encoder_max_length"):
                value = getattr(self, key)
                if value is not None and value < 1:
                    raise ValueError(f"{key} must be >= 1, got {value}")

    def encoder_request(self) -> EncoderRequest:
        """plrm's frozen encoder of ``encoder``: abstracts are embedded L2-normalized, without a chat template."""
        c = self.config
        return EncoderRequest("frozen_encoder", {"model": c.encoder, "max_length": c.encoder_max_length,
                                                 "normalize": True, "chat_template": "never"})

    def load(self, encoder: Backbone | None = None) -> PreferenceData:
        """``encoder``: the backbone built from ``encoder_request()`` (plrm.recipe.load_source builds and passes it).
        It is first needed after the files are read, so a missing copy of LaMP-5 is reported as such."""
        c = self.config
        patterns = [f"*{s}_{kind}.json" for s in c.lamp_splits for kind in ("questions", "outputs")]
        files = resolve_files(c, patterns, WHAT)
        report = LoadReport(WHAT, unit="papers")
        papers, questions = self._read(files, report)
        report.read = len(papers)
        users = papers["user_id"].to_numpy(dtype=object)

        keep = report.drop(NO_GOLD, papers["is_question"].to_numpy() & papers["title"].isna().to_numpy(), users)
        keep &= report.drop(EMPTY, keep & (_blank(papers["title"]) | _blank(papers["abstract"])), users)
        repeated = papers.duplicated(["user_id", "paper_id", "is_question"]).to_numpy()  # among profile entries
        keep &= report.drop(REPEATED, keep & repeated, users)
        n_usable = papers[keep].groupby("user_id").size()
        few = ~papers["user_id"].map(n_usable).fillna(0).ge(c.min_papers).to_numpy()
        keep &= report.drop(FEW_PAPERS, keep & few, users)
        eligible = np.sort(papers.loc[keep, "user_id"].unique().astype(str))
        rng = np.random.default_rng(c.seed)
        selected = eligible
        if c.max_users is not None and c.max_users < len(eligible):
            selected = np.sort(rng.choice(eligible, size=c.max_users, replace=False))
        keep &= report.drop(NOT_SAMPLED, keep & ~np.isin(users.astype(str), selected), users)

        pool = papers[keep].reset_index(drop=True)
        in_cap = self._cap(pool, rng)
        pool_users = pool["user_id"].to_numpy(dtype=object)
        report.drop(OVER_CAP, ~in_cap, pool_users)
        queries = np.flatnonzero(in_cap)
        embeddings = self._embed(pool["abstract"], encoder)
        negatives = hard_negatives(embeddings, queries, pd.factorize(pool["user_id"])[0],
                                   _normalized_codes(pool["title"]), _normalized_codes(pool["abstract"]), c.top_k,
                                   c.pool, rng)
        found = report.drop(NO_CANDIDATE, negatives < 0, pool_users[queries])
        queries, negatives = queries[found], negatives[found]
        if not len(queries):
            raise DataValidationError(f"{WHAT}: no pair is left after the rules above:\n{report.render()}")

        pairs = canonical_dataset(self._table(pool, queries, negatives), c, files)
        report.kept = len(pairs)
        per_user = pd.Series(pool_users[queries]).value_counts()
        sampled = f" (max_users={c.max_users})" if c.max_users is not None else ""
        report.note(f"users: {questions['user_id'].nunique():,} read, {len(eligible):,} with >= {c.min_papers} "
                    f"usable papers, {len(selected):,} selected{sampled}, {len(per_user):,} with pairs "
                    f"({per_user.mean():.1f} pairs per user; Rezk et al. §6: 485 training + 126 adaptation users, "
                    "~49 each)")
        report.note(f"hard negatives: one of the top-{c.top_k} of {len(pool):,} abstracts (pool: {c.pool}) by cosine "
                    f"similarity of {c.encoder} features")
        user_info = questions.drop_duplicates("user_id").set_index("user_id").loc[per_user.index.sort_values()]
        return PreferenceData(name=WHAT, pairs=pairs, provides=self.provides, user_info=user_info,
                              load_report=report)

    # ---- steps -------------------------------------------------------------------------------------------------------
    def _read(self, files: list[Path], report: LoadReport) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Every paper and question of the configured LaMP splits; question papers get their gold titles."""
        c = self.config
        paper_frames, question_frames = [], []
        for split in c.lamp_splits:
            found = {kind: [f for f in files if f.name == f"{split}_{kind}.json"] for kind in ("questions", "outputs")}
            for kind, matches in found.items():
                if len(matches) > 1:
                    raise DataValidationError(f"{WHAT}: several {split}_{kind}.json files: {[str(f) for f in matches]}"
                                              "; point data.path at the directory of one LaMP-5 copy")
            if not found["questions"]:
                raise DataValidationError(f"{WHAT}: no {split}_questions.json among the files read "
                                          f"({[str(f) for f in files]}); data.lamp_splits={c.lamp_splits}")
            papers, questions = read_questions(found["questions"][0], split, c.include_question)
            golds = read_golds(found["outputs"][0]) if found["outputs"] else pd.Series(dtype=object)
            report.note(f"{split}: {found['questions'][0]}" + (f", {found['outputs'][0]}" if found["outputs"] else
                                                               " (no outputs file: questions have no gold title)"))
            is_question = papers["is_question"].to_numpy()
            papers.loc[is_question, "title"] = papers.loc[is_question, "paper_id"].map(golds).to_numpy(dtype=object)
            questions["gold_output"] = questions["question_id"].map(golds)
            paper_frames.append(papers)
            question_frames.append(questions)
        return pd.concat(paper_frames, ignore_index=True), pd.concat(question_frames, ignore_index=True)

    def _cap(self, pool: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
        """Whether each paper is within its user's max_pairs_per_user: the question's paper, then a seeded sample."""
        cap_ = self.config.max_pairs_per_user
        if cap_ is None:
            return np.ones(len(pool), dtype=bool)
        key = np.where(pool["is_question"].to_numpy(), -1.0, rng.random(len(pool)))
        rank = pool.assign(key=key).sort_values(["user_id", "key"]).groupby("user_id").cumcount()
        return (rank.sort_index() < cap_).to_numpy()

    def _embed(self, abstracts: pd.Series, encoder: Backbone | None) -> np.ndarray:
        """Features of every pool abstract, each unique text encoded once."""
        if encoder is None:
            raise TypeError(f"{WHAT}: load() needs the item encoder it asks for ({self.encoder_request()}) to mine "
                            "hard negatives; load the dataset with plrm.recipe.load_source(source), which builds it, "
                            "or pass load(encoder=...)")
        unique, inverse = np.unique(abstracts.to_numpy(dtype=object).astype(str), return_inverse=True)
        return embed_texts(unique, encoder)[inverse]

    def _table(self, pool: pd.DataFrame, queries: np.ndarray, negatives: np.ndarray) -> pa.Table:
        own, negative = pool.iloc[queries], pool.iloc[negatives]
        abstract = own["abstract"].to_numpy(dtype=object)
        prompt = (LAMP5_INSTRUCTION + own["abstract"]).to_numpy(dtype=object) if \
            self.config.prompt_format == "lamp" else abstract
        title = own["title"].to_numpy(dtype=object)
        table = pa.table({
            "user_id": pa.array(own["user_id"].astype(str).to_numpy(dtype=object)),
            "prompt": pa.array(prompt),
            "chosen": pa.array(title),
            "rejected": pa.array(negative["title"].to_numpy(dtype=object)),
            "reference": pa.array(title),
            "pair_id": pa.array((own["user_id"].astype(str) + ":" + own["paper_id"] + ">"
                                 + negative["paper_id"].to_numpy(dtype=object)).to_numpy(dtype=object)),
            "source_split": pa.array(own["lamp_split"].to_numpy(dtype=object)),
        })
        return table
