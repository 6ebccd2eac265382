"""RewardBench (``allenai/reward-bench``, split ``filtered``): the general-purpose preference benchmark on which
When Personalization Meets Reality (Dong et al., arXiv 2502.19158) §5 (App. B Table 3) measures the
personalization tax, the change in Chat / Chat Hard / Safety / Reasoning accuracy when a reward model is
personalized.

Read as published (shared/datasets.md §6): ``data/{split}-*.parquet`` with columns ``id, prompt, chosen,
chosen_model, rejected, rejected_model, subset``, single-turn. Canonical rows, one per published row:

- ``user_id`` = :data:`GLOBAL_USER` (``"__global__"``). The labels are the benchmark's, not a user's: these rows
  are an evaluation set scored under the non-personalized reward and under each user's personalized reward,
  never the input of plrm's seen / unseen user splits;
- ``prompt``, ``chosen``, ``rejected`` as published; ``pair_id`` = ``str(id)``;
- ``group_id`` = ``subset`` (e.g. ``"hep-python"``), the unit RewardBench reports; its section is
  :func:`section_of` (``"Reasoning"``); ``source_split`` = the split read (``"filtered"``).

:func:`section_scores` turns per-row correctness (``reward(chosen) > reward(rejected)``; RewardBench counts a
tie as wrong) into per-subset accuracies and section scores exactly as RewardBench's
``calculate_scores_per_section`` does: a section's score is the mean of its subsets' accuracies weighted by
:data:`EXAMPLE_COUNTS`. These weights are the subsets' row counts except ``math-prm``: 447 rows weighted as 984
(= 6 x 164, the six ``hep-*`` code subsets), so that math and code weigh equally in Reasoning. Chat, Chat Hard
and Safety are thus per-row accuracies over their subsets, Reasoning is not.

The constants follow ``allenai/reward-bench`` ``rewardbench/constants.py`` (read at a32e272, its only stored
version), which lists ``xstest-should-refuse`` as 250 and ``xstest-should-respond`` as 154: the reverse of the
filtered split's row counts (154 and 250, shared/datasets.md §6, :data:`SUBSET_ROWS`). :data:`EXAMPLE_COUNTS`
keeps RewardBench's numbers so that Safety matches its leaderboard; pass ``weights=SUBSET_ROWS`` to
:func:`section_scores` for a per-row Safety score instead.

Rows are dropped, counted in the load report, when their subset is in no section, when prompt, chosen or
rejected is empty, or when chosen and rejected are the same text (none in the published ``filtered`` split).
Licence: ODC-BY (and the licences of the datasets RewardBench draws from).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
from plrm.data.source import DatasetSource, PreferenceData
from plrm.lazy import lazy_module
from plrm.registry import datasets as dataset_registry

pd = lazy_module("pandas")  # imported at first use: `plrm list` imports this module, reads no data

WHAT = "reward_bench"
GLOBAL_USER = "__global__"
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "subset")

# RewardBench's sections and their subsets (rewardbench/constants.py SUBSET_MAPPING), in its order
SECTION_SUBSETS: dict[str, tuple[str, ...]] = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": ("mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "Safety": ("refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
SECTIONS = tuple(SECTION_SUBSETS)
SUBSET_TO_SECTION: dict[str, str] = {s: section for section, subs in SECTION_SUBSETS.items() for s in subs}
# rows of each subset in the filtered split (2,985 in all)
SUBSET_ROWS: dict[str, int] = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28, "mt-bench-med": 40,
    "mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "refusals-dangerous": 100, "refusals-offensive": 100, "xstest-should-refuse": 154, "xstest-should-respond": 250,
    "donotanswer": 136,
    "math-prm": 447, "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164,
    "hep-rust": 164,
}
# RewardBench's weights of subset accuracies within a section (rewardbench/constants.py EXAMPLE_COUNTS)
EXAMPLE_COUNTS: dict[str, int] = {
    **SUBSET_ROWS,
    "math-prm": 984,               # 447 rows, weighted as the six code subsets together (6 x 164)
    "xstest-should-refuse": 250,   # as RewardBench lists them (the row counts are 154 and 250)
    "xstest-should-respond": 154,
}


def section_of(subset):
    """RewardBench section of a subset name (``"hep-go"`` -> ``"Reasoning"``), or of each name of an array."""
    if isinstance(subset, str):
        return section_of([subset])[0]
    names = pd.Series(np.asarray(subset, dtype=object))
    unknown = sorted(set(names[~names.isin(SUBSET_TO_SECTION)].astype(str)))
    if unknown:
        raise ValueError(f"not a RewardBench subset: {unknown}; subsets: {sorted(SUBSET_TO_SECTION)}")
    return names.map(SUBSET_TO_SECTION).to_numpy(dtype=object)


def section_scores(per_row_correct: np.ndarray, subsets: np.ndarray, weights: dict[str, int] = EXAMPLE_COUNTS) -> dict:
    """Per-subset accuracy and section scores of one reward model on RewardBench rows.

    ``per_row_correct`` (N,): 1 / True where the model scored chosen above rejected (fractions in [0, 1] are
    averaged as they are); ``subsets`` (N,): each row's subset (the source's ``group_id``). Returns
    ``{"subsets": {subset: accuracy}, "rows": {subset: N_s}, "sections": {section: score}}``, accuracies as
    fractions. A section's score is sum_s acc_s w_s / sum_s w_s over its subsets present in ``subsets`` (w =
    ``weights``); a section with none of its subsets present is left out (RewardBench writes 0 for it).
    """
    correct = np.asarray(per_row_correct, dtype=np.float64)
    subsets = np.asarray(subsets, dtype=object)
    if correct.ndim != 1 or correct.shape != subsets.shape:
        raise ValueError(f"per_row_correct {correct.shape} and subsets {subsets.shape} must be 1-d, of one length")
    if len(correct) == 0:
        raise ValueError("no rows to score")
    if not np.isfinite(correct).all() or (correct < 0).any() or (correct > 1).any():
        raise ValueError("per_row_correct must hold values in [0, 1] (1 = chosen scored above rejected)")
    section_of(subsets)  # every subset is RewardBench's
    codes, names = pd.factorize(subsets, sort=True)
    rows = np.bincount(codes)
    accuracy = np.bincount(codes, weights=correct) / rows  # (S,)
    by_subset = dict(zip(names.tolist(), accuracy.tolist()))
    sections = {}
    for section, members in SECTION_SUBSETS.items():
        present = [s for s in members if s in by_subset]
        if present:
            w = np.array([weights[s] for s in present], dtype=np.float64)
            sections[section] = float(np.dot([by_subset[s] for s in present], w) / w.sum())
    return {"subsets": by_subset, "rows": dict(zip(names.tolist(), rows.tolist())), "sections": sections}


def _is_whole_number(value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (float, np.floating)):
        return float(value).is_integer()
    return isinstance(value, (int, np.integer))


@dataset_registry.register("reward_bench")
class RewardBench(DatasetSource):
    """RewardBench rows for the personalization tax: one pair per row, its subset kept as group_id."""

    provides = frozenset({cap.TEXT})
    licence = "ODC-BY"
    homepage = "https://huggingface.co/datasets/allenai/reward-bench"

    @dataclass
    class Config(PublishedConfig):
        repo_id: str = opt("allenai/reward-bench", "Hugging Face Hub dataset id of RewardBench.")
        split: Literal["filtered", "raw"] = opt("filtered", "Published split: 'filtered' (2,985 rows, what "
                                                            "RewardBench scores) or 'raw' (5,123 rows, unfiltered).")

    def load(self) -> PreferenceData:
        c = self.config
        frames = []
        files = resolve_files(c, [f"data/{c.split}-*.parquet"], WHAT)
        for path in files:
            frame = read_table(path, WHAT)
            require_columns(frame, ["id", *TEXT_COLUMNS], path, WHAT)
            for col in TEXT_COLUMNS:
                malformed(path, np.flatnonzero(~is_text(frame[col])),
                          col, "is not a string", WHAT)
            is_int = frame["id"].map(_is_whole_number)  # a parquet int column with nulls reads as floats
            malformed(path, np.flatnonzero(~is_int.to_numpy(dtype=bool)), "id", "is not an integer", WHAT)
            frames.append(frame.assign(_file=str(path), _row=np.arange(len(frame))))
        rows = pd.concat(frames, ignore_index=True)
        repeated = rows[rows["id"].duplicated()]
        if len(repeated):
            first = repeated["_file"].iloc[0]
            malformed(first, repeated.loc[repeated["_file"] == first, "_row"], "id", "repeats an earlier row's id",
                      WHAT)
        report = LoadReport(WHAT, unit="rows", read=len(rows))
        keep = report.drop("subset in no RewardBench section", ~rows["subset"].isin(SUBSET_TO_SECTION))
        empty = np.zeros(len(rows), dtype=bool)
        for col in ("prompt", "chosen", "rejected"):
            empty |= (rows[col].str.strip() == "").to_numpy()
        keep &= report.drop("empty prompt, chosen or rejected", keep & empty)
        same = (rows["chosen"] == rows["rejected"]).to_numpy()
        keep &= report.drop("identical chosen and rejected text", keep & same)
        rows = rows[keep]
        report.kept = len(rows)
        per_section = pd.Series(section_of(rows["subset"])).value_counts()
        report.note(f"{c.split}: {rows['subset'].nunique()} subsets; rows per section: "
                    + ", ".join(f"{s} {int(per_section.get(s, 0)):,}" for s in SECTIONS))
        table = pa.table({
            "user_id": pa.array([GLOBAL_USER] * len(rows), pa.string()),
            "prompt": pa.array(rows["prompt"].tolist(), pa.string()),
            "chosen": pa.array(rows["chosen"].tolist(), pa.string()),
            "rejected": pa.array(rows["rejected"].tolist(), pa.string()),
            "pair_id": pa.array(rows["id"].astype(np.int64).astype(str).tolist(), pa.string()),
            "group_id": pa.array(rows["subset"].tolist(), pa.string()),
            "source_split": pa.array([c.split] * len(rows), pa.string()),
        })
        return PreferenceData(name=WHAT, pairs=canonical_dataset(table, c, files),
                              provides=self.provides, load_report=report)
