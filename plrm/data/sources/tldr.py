"""Reddit TL;DR human comparisons (``openai/summarize_from_feedback``, config ``comparisons``) as personalized pairs.

Files. The Hub repository's main branch is a loading script, which ``datasets`` >= 4 no longer runs; plrm reads
the parquet files the Hub converted it to, on the branch ``refs/convert/parquet``: ``comparisons/train/*.parquet``
and ``comparisons/validation/*.parquet`` (one ``0000.parquet`` each, 92,858 and 86,086 rows). Each row is one
comparison with the builder's features: ``info`` {id, post, title, subreddit, site, article}, ``summaries``
(2 x {text, policy, note}), ``choice``, ``worker``, ``batch``, ``split``, ``extra`` {confidence}
(shared/datasets.md §2). A local copy (``data.path``) has the same layout; with ``data.files`` the Hub split of
a file is the name of its folder (``train`` or ``validation``).

Mapping (shared/datasets.md §2.3 and §9; the authors' loaders: LoRe ``RedditTLDR/prepare.py``, MRM
``scripts/preprocess_reddit.py``, P-RLHF ``prlhf/utils.py``):

- ``user_id`` = ``worker`` (LoRe, Bose et al., arXiv 2504.14439, §5; MRM, Cai et al., arXiv 2601.18731,
  §5.1.1: "annotator IDs serving as user identifiers");
- ``chosen`` = ``summaries[choice].text``, ``rejected`` = ``summaries[1 - choice].text``;
- ``prompt``: ``prompt_format: post`` is ``info.post`` (LoRe, MRM); ``template`` is P-RLHF's
  ``"SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR: "`` (a line whose field is null is left out);
- ``pair_id``: one id per (prompt, {summary, summary}), the same whichever summary the row shows first, so every
  worker who judged the same two summaries of the same post shares it (When Personalization Meets Reality,
  Dong et al., arXiv 2502.19158, Table 2 measures the disagreement on these items);
- ``group_id`` = ``info.id`` (the post; per-user splits keep a post's comparisons together); a null id gets
  ``post-<hash of the prompt>``;
- ``source_split`` = the Hub split (``train`` / ``validation``); with ``split_mode: hf_split`` the canonical
  ``split`` column maps train -> train and validation -> test, as LoRe's ``train_basis.py`` and MRM's
  ``build_reddit_dataset`` do; ``split_mode: none`` leaves the per-user train/test split to plrm (``split.*``:
  random by post, LoRe §5 "evenly divided into a training set and a test set").

Rows dropped, counted per rule and worker: comparisons without a Reddit post (the CNN/DailyMail rows of the
validation split: ``info.post`` null; ``cnndm: article`` keeps them with the article as the post), summaries
that are blank, and two identical summaries (P-RLHF skips them; no preference to learn). Then worker selection
over the remaining comparisons (``workers``): all; the ``top_n`` workers by count (Dong et al. §4.1: top 5,
following Park et al. 2024; ties broken by worker id); or the workers present in both Hub splits (LoRe's and
MRM's code; both papers describe it as "workers with fewer than 50 annotations removed, 40 left", which is
``min_pairs``). LoRe's code also drops the two workers with the fewest train rows; plrm does not.
``max_train_pairs_per_user`` keeps a seeded random sample of each worker's train comparisons (LoRe §5 and
MRM §5.1.1: 100 or 150 per seen user; unseen users few-shot on 50 of them: ``split.k`` <= 50 takes the
first k of the same pool).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from plrm import capabilities as cap
from plrm.config import opt
from plrm.data.published import (
    LoadReport,
    PublishedConfig,
    canonical_dataset,
    is_text,
    malformed,
    order_free_pair_ids,
    read_table,
    require_columns,
    resolve_files,
)
from plrm.data.schema import DataValidationError
from plrm.data.source import DatasetSource, PreferenceData
from plrm.lazy import lazy_module
from plrm.registry import datasets as dataset_registry

pd = lazy_module("pandas")  # imported at first use: `plrm list` imports this module, reads no data

WHAT = "tldr"
HUB_SPLITS = ("train", "validation")
PATTERNS = [f"comparisons/{split}/*.parquet" for split in HUB_SPLITS]
INFO_KEYS = ("id", "post", "title", "subreddit", "site", "article")
CANONICAL_SPLIT = {"train": "train", "validation": "test"}  # split_mode: hf_split


def _hub_split_of(path: Path) -> str:
    split = path.parent.name
    if split not in HUB_SPLITS:
        raise DataValidationError(f"{WHAT}: {path}: cannot tell which Hub split the file holds; expected it under "
                                  f"comparisons/<split>/ with <split> one of {list(HUB_SPLITS)}")
    return split


def read_comparisons(path: Path, split: str) -> pd.DataFrame:
    """One file's comparisons, flattened: worker, info fields, text0/text1, choice, source_split, row.

    Raises naming file, row and column for anything that is not the published schema."""
    frame = read_table(path, WHAT).reset_index(drop=True)
    require_columns(frame, ["info", "summaries", "choice", "worker"], path, WHAT)
    malformed(path, np.flatnonzero(~frame["info"].map(lambda v: isinstance(v, dict)).to_numpy(dtype=bool)),
              "info", "is not an object {" + ", ".join(INFO_KEYS) + "}", WHAT)
    info = pd.DataFrame.from_records(frame["info"].tolist()).reindex(columns=list(INFO_KEYS))
    for key in ("id", "post", "title", "subreddit", "article"):
        bad = info[key].notna().to_numpy() & ~is_text(info[key])
        malformed(path, np.flatnonzero(bad), f"info.{key}", "is not a string", WHAT)

    n_summaries = frame["summaries"].map(lambda v: len(v) if isinstance(v, (list, np.ndarray)) else -1)
    malformed(path, np.flatnonzero(n_summaries.to_numpy() != 2), "summaries", "does not hold exactly 2 summaries",
              WHAT)
    summaries = frame["summaries"].explode()  # 2 entries per row, in order
    is_entry = summaries.map(lambda v: isinstance(v, dict)).to_numpy(dtype=bool)
    malformed(path, np.unique(summaries.index[~is_entry]), "summaries", "holds an entry that is not an object "
              "{text, policy, note}", WHAT)
    texts = pd.Series([s.get("text") for s in summaries], index=summaries.index, dtype=object)
    malformed(path, np.unique(texts.index[~is_text(texts)]), "summaries.text", "is missing or not a string", WHAT)
    texts = texts.to_numpy(dtype=object).reshape(-1, 2)  # (rows, 2)

    choice = pd.to_numeric(frame["choice"], errors="coerce")
    malformed(path, np.flatnonzero(~choice.isin([0, 1]).to_numpy()), "choice", "is not 0 or 1", WHAT)
    worker_ok = is_text(frame["worker"]) & (frame["worker"].astype(str).str.strip() != "").to_numpy()
    malformed(path, np.flatnonzero(~worker_ok), "worker", "is not a non-empty string", WHAT)

    return pd.DataFrame({
        "worker": frame["worker"].to_numpy(dtype=object),
        **{key: info[key].to_numpy(dtype=object) for key in ("id", "post", "title", "subreddit", "article")},
        "text0": texts[:, 0], "text1": texts[:, 1], "choice": choice.to_numpy(dtype=np.int64),
        "source_split": split, "file": str(path), "row": np.arange(len(frame)),
    })


@dataset_registry.register("tldr")
class RedditTLDR(DatasetSource):
    """Reddit TL;DR summary comparisons (openai/summarize_from_feedback), one user per worker."""

    licence = "Modified MIT (openai/summarize-from-feedback LICENSE); the Hub card declares none"
    homepage = "https://huggingface.co/datasets/openai/summarize_from_feedback"
    provides = frozenset({cap.TEXT})

    @dataclass
    class Config(PublishedConfig):
        repo_id: str = opt("openai/summarize_from_feedback", "Hugging Face Hub dataset id (config 'comparisons').")
        revision: str = opt("refs/convert/parquet", "Hub revision: the auto-converted parquet branch (the main "
                                                    "branch is a loading script datasets >= 4 cannot run).")
        workers: Literal["all", "top_n", "intersection_of_splits"] = opt(
            "intersection_of_splits", "Which workers become users: 'all'; 'top_n' (the top_n workers by number "
            "of comparisons, Dong et al. §4.1: 5); 'intersection_of_splits' (workers with comparisons in both Hub "
            "splits: LoRe's and MRM's code; the papers report 40).")
        top_n: int = opt(5, "Workers kept by workers: top_n (Dong et al.: 5; P-RLHF: 10 or 40).", min=1)
        min_pairs: int = opt(0, "Drop workers with fewer comparisons than this, after the preset (LoRe §5, "
                                "MRM §5.1.1: 50).", min=0)
        split_mode: Literal["hf_split", "none"] = opt(
            "hf_split", "'hf_split': the Hub's train comparisons are each user's train pairs and validation "
            "the test pairs (the canonical 'split' column; LoRe and MRM code); 'none': plrm's random per-user "
            "split by post (split.test_fraction).")
        max_train_pairs_per_user: int | None = opt(
            None, "Keep a seeded random sample of this many train comparisons per worker (LoRe §5, "
            "MRM §5.1.1: 100 or 150); test comparisons are never capped. Needs split_mode: hf_split.", min=1)
        prompt_format: Literal["post", "template"] = opt(
            "post", "'post': the post text (LoRe, MRM); 'template': P-RLHF's 'SUBREDDIT: r/...\\nTITLE: ...\\n"
            "POST: ...\\nTL;DR: '.")
        cnndm: Literal["drop", "article"] = opt(
            "drop", "Comparisons without a Reddit post (CNN/DailyMail rows of the validation split, info.post "
                    "null): 'drop' them (counted) or use info.article as the post.")
        seed: int = opt(0, "Seed of the max_train_pairs_per_user sample.", min=0)

        def __post_init__(self) -> None:
            if self.top_n < 1:
                raise ValueError(f"top_n must be >= 1, got {self.top_n}")
            if self.min_pairs < 0:
                raise ValueError(f"min_pairs must be >= 0, got {self.min_pairs}")
            if self.max_train_pairs_per_user is not None:
                if self.max_train_pairs_per_user < 1:
                    raise ValueError(f"max_train_pairs_per_user must be >= 1 or null, got "
                                     f"{self.max_train_pairs_per_user}")
                if self.split_mode != "hf_split":
                    raise ValueError("max_train_pairs_per_user caps the Hub's train comparisons, which are the "
                                     "train pairs only with split_mode: hf_split (got split_mode: "
                                     f"{self.split_mode})")

    def load(self) -> PreferenceData:
        c = self.config
        files = resolve_files(c, PATTERNS, WHAT)
        frame = pd.concat([read_comparisons(f, _hub_split_of(f)) for f in files], ignore_index=True)
        report = LoadReport(WHAT, unit="comparisons", read=len(frame))
        report.note(f"files: {', '.join(str(f) for f in files)}")

        frame = self._drop_unusable(frame, report)
        frame = self._select_workers(frame, report)
        if c.max_train_pairs_per_user is not None:
            frame = self._cap_train_pairs(frame, report)
        if frame.empty:
            raise DataValidationError(f"{WHAT}: no comparison is left after the rules above:\n{report.render()}")

        prompts = self._prompts(frame)
        chosen = np.where(frame["choice"] == 0, frame["text0"], frame["text1"])
        rejected = np.where(frame["choice"] == 0, frame["text1"], frame["text0"])
        pair_ids = order_free_pair_ids(prompts, frame["text0"], frame["text1"])
        no_id = frame["id"].isna().to_numpy()
        prompt_hash = np.char.mod("%016x", pd.util.hash_array(prompts, categorize=False))
        columns = {
            "user_id": frame["worker"].to_numpy(dtype=object), "prompt": prompts, "chosen": chosen,
            "rejected": rejected, "pair_id": pair_ids,
            "group_id": np.where(no_id, np.char.add("post-", prompt_hash), frame["id"].to_numpy(dtype=object)),
            "source_split": frame["source_split"].to_numpy(dtype=object),
        }
        if c.split_mode == "hf_split":
            columns["split"] = frame["source_split"].map(CANONICAL_SPLIT).to_numpy(dtype=object)
        pairs = canonical_dataset(pd.DataFrame(columns).astype(str), c, files)
        report.kept = len(pairs)
        return PreferenceData(name=WHAT, pairs=pairs, provides=self.provides, load_report=report)

    # ---- the rules, in order --------------------------------------------------------------------------------
    def _drop_unusable(self, frame: pd.DataFrame, report: LoadReport) -> pd.DataFrame:
        no_post = frame["post"].isna().to_numpy()
        if self.config.cnndm == "drop":
            keep = report.drop("without a Reddit post (CNN/DailyMail: info.post null; data.cnndm=drop)", no_post,
                               frame["worker"])
        else:
            neither = no_post & frame["article"].isna().to_numpy()
            for path, rows in frame[neither].groupby("file", sort=True)["row"]:
                malformed(path, rows.to_numpy(), "info.post", "is null and so is info.article (data.cnndm=article "
                          "needs one of them)", WHAT)
            keep = np.ones(len(frame), dtype=bool)
        blank = (frame["text0"].str.strip() == "") | (frame["text1"].str.strip() == "")
        keep &= report.drop("with a blank summary", keep & blank.to_numpy(), frame["worker"])
        same = (frame["text0"] == frame["text1"]).to_numpy()
        keep &= report.drop("with two identical summaries", keep & same, frame["worker"])
        return frame[keep].reset_index(drop=True)

    def _select_workers(self, frame: pd.DataFrame, report: LoadReport) -> pd.DataFrame:
        c = self.config
        workers = frame["worker"]
        n_before = workers.nunique()
        if c.workers == "top_n":
            counts = workers.value_counts().rename_axis("worker").reset_index(name="n")
            top = counts.sort_values(["n", "worker"], ascending=[False, True]).head(c.top_n)["worker"]
            keep = report.drop(f"from a worker outside the top {c.top_n} by count (data.workers=top_n)",
                               ~workers.isin(top).to_numpy(), workers)
        elif c.workers == "intersection_of_splits":
            splits_per_worker = frame.groupby("worker")["source_split"].nunique()
            in_both = splits_per_worker.index[splits_per_worker == len(HUB_SPLITS)]
            keep = report.drop("from a worker not in both Hub splits (data.workers=intersection_of_splits)",
                               ~workers.isin(in_both).to_numpy(), workers)
        else:
            keep = np.ones(len(frame), dtype=bool)
        if c.min_pairs:
            n_pairs = workers[keep].value_counts()
            few = n_pairs.index[n_pairs < c.min_pairs]
            keep &= report.drop(f"from a worker with fewer than {c.min_pairs} comparisons (data.min_pairs)",
                                keep & workers.isin(few).to_numpy(), workers)
        frame = frame[keep].reset_index(drop=True)
        report.note(f"workers: {frame['worker'].nunique()} of {n_before} kept (data.workers={c.workers}"
                    + (f", data.min_pairs={c.min_pairs}" if c.min_pairs else "") + ")")
        return frame

    def _cap_train_pairs(self, frame: pd.DataFrame, report: LoadReport) -> pd.DataFrame:
        cap_n = self.config.max_train_pairs_per_user
        rng = np.random.default_rng(self.config.seed)
        is_train = (frame["source_split"] == "train").to_numpy()
        order = pd.Series(rng.random(len(frame))).where(is_train)  # test rows: NaN, never ranked
        rank = order.groupby(frame["worker"]).rank(method="first").to_numpy()  # 1-based among the worker's train
        over = is_train & (rank > cap_n)
        keep = report.drop(f"over max_train_pairs_per_user={cap_n} (a seeded sample of the train comparisons kept)",
                           over, frame["worker"])
        return frame[keep].reset_index(drop=True)

    def _prompts(self, frame: pd.DataFrame) -> np.ndarray:
        post = frame["post"].fillna(frame["article"]).to_numpy(dtype=object)  # article: only with cnndm=article
        if self.config.prompt_format == "post":
            return post
        # P-RLHF's template; a line whose field is null (CNN/DailyMail rows have no subreddit) is left out
        subreddit = ("SUBREDDIT: r/" + frame["subreddit"] + "\n").fillna("")
        title = ("TITLE: " + frame["title"] + "\n").fillna("")
        return (subreddit + title + "POST: " + pd.Series(post, dtype=object) + "\nTL;DR: ").to_numpy(dtype=object)
