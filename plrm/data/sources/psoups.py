"""Personalized Soups (P-SOUPS, Jang et al. 2023) reward-model preference files as six synthetic users.

Files. P-SOUPS is not on the Hugging Face Hub: its data zip (``wget https://storage.googleapis.com/
personalized-soups/data.zip``, joeljang/RLPHF README) holds ``rm_training/{P1A,P1B,P2A,P2B,P3A,P3B}.json``, one
file per preference profile, each row ``{"user_input", "completion_a", "completion_b"}`` with the GPT-4-preferred
response in ``completion_a`` (RLPHF ``training_reward_model.py``: "text_j is the preferred"; shared/datasets.md
§4.2). ``data.path`` is the unzipped ``data/`` folder; a file is read as a JSON array or as JSON Lines.

Mapping (shared/datasets.md §4.3 and §9, P-RLHF ``data/psoups_dataset.ipynb``, reused by When Personalization Meets
Reality (Dong et al., arXiv 2502.19158) §4.1, whose Table 2 counts 53k comparisons from 6 users):

- ``user_id`` = the profile name (``P1A`` ... ``P3B``: the 3 dimensions x 2 opposite poles);
- ``prompt`` = ``user_input`` with the profile's preference prompt (``PREFERENCE_PROMPTS``, verbatim from
  P-RLHF) removed wherever it occurs, then stripped; rows whose ``user_input`` lacks it are kept unchanged, as
  P-RLHF does, and counted in a note;
- ``chosen`` = ``completion_a``, ``rejected`` = ``completion_b``;
- ``pair_id``: one id per (prompt, {completion, completion}) whatever the order, so opposite profiles that
  judged the same two responses to the same question share it (with opposite labels: Dong et al. §4.2's
  ~100 % divergence).

Rows dropped, counted per rule and profile, in P-RLHF's order: ``completion_a == completion_b``, then repeats
of an earlier (user_input, completion_a, completion_b) row of the same profile (53,471 comparisons are left
of the 291,415 rows). ``split_mode: prlhf`` writes P-RLHF's train/test split into the canonical ``split``
column: the comparisons of all profiles in file order (P1A ... P3B) shuffled with seed 123, then 10 % held out
by ``datasets``' ``train_test_split(test_size=0.1, seed=123)`` (``prlhf/utils.py:load_psoups_comparisons``),
row for row when all six profiles are read; ``split_mode: none`` leaves the per-user split to plrm. Last, rows
whose question or a completion is blank are dropped (P-RLHF keeps them; plrm's schema refuses empty text).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from plrm import capabilities as cap
from plrm.config import opt
from plrm.data.published import (
    DataUnavailableError,
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

WHAT = "psoups"
PREFERENCE_PROMPTS = {
    "P1A": "Generate a response that can be easily understood by an elementary school student.",
    "P1B": "Generate a response that only a PhD Student in that specific field could understand.",
    "P2A": "Generate a response that is concise and to the point without being verbose.",
    "P2B": "Generate a response that is very informative without missing any background information.",
    "P3A": "Generate a response that is friendly, witty, funny, and humorous, like a close friend.",
    "P3B": "Generate a response in an unfriendly manner.",
}
PROFILES = tuple(PREFERENCE_PROMPTS)
COLUMNS = ("user_input", "completion_a", "completion_b")
NO_PATH = (f"{WHAT}: P-SOUPS is not on the Hugging Face Hub, so data.repo_id is empty by default. Download "
           "https://storage.googleapis.com/personalized-soups/data.zip (joeljang/RLPHF), unzip it and set data.path "
           "to the unzipped data/ folder (it holds rm_training/P1A.json ... P3B.json), or list the profile files "
           "in data.files")


def read_profile(path: Path) -> pd.DataFrame:
    """One profile file (a JSON array, or JSON Lines) with its three text columns checked."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        frame = read_table(path, WHAT)
    else:
        try:
            frame = pd.read_json(path, lines=True, dtype=False)
        except ValueError as exc:
            raise DataValidationError(f"{WHAT}: cannot read {path} as a JSON array or JSON Lines: {exc}") from exc
    frame = frame.reset_index(drop=True)
    require_columns(frame, COLUMNS, path, WHAT)
    for column in COLUMNS:
        not_text = ~is_text(frame[column])
        malformed(path, np.flatnonzero(not_text), column, "is missing or not a string", WHAT)
    return frame[list(COLUMNS)]


def strip_preference_prompt(frame: pd.DataFrame, profile: str) -> pd.DataFrame:
    """Adds ``question`` (user_input without the profile's preference prompt, stripped) and ``has_prompt``."""
    preference_prompt = PREFERENCE_PROMPTS[profile]
    text = frame["user_input"]
    return frame.assign(profile=profile, has_prompt=text.str.contains(preference_prompt, regex=False),
                        question=text.str.replace(preference_prompt, "", regex=False).str.strip())


def prlhf_test_rows(n_rows: int, test_size: float, seed: int) -> np.ndarray:
    """Rows that P-RLHF's ``shuffle(seed)`` then ``train_test_split(test_size, seed)`` put in its eval split.

    Done with ``datasets`` itself on a row-number column, so the permutation is the library's own."""
    import datasets  # imported when used: it takes ~1 s, and `plrm list` needs none
    index = datasets.Dataset.from_dict({"row": np.arange(n_rows)})
    held_out = index.shuffle(seed=seed).train_test_split(test_size=test_size, seed=seed)["test"]
    return np.asarray(held_out["row"], dtype=np.int64)


@dataset_registry.register("psoups")
class PersonalizedSoups(DatasetSource):
    """P-SOUPS preference profiles P1A..P3B (GPT-4-labelled, opposite poles of 3 dimensions) as 6 users."""

    licence = "unstated (joeljang/RLPHF has no LICENSE file)"
    homepage = "https://github.com/joeljang/RLPHF"
    provides = frozenset({cap.TEXT})

    @dataclass
    class Config(PublishedConfig):
        repo_id: str = opt("", "Empty: P-SOUPS is not on the Hub (set data.path to the unzipped data zip); "
                               "a Hub copy laid out as the zip (rm_training/P*.json) may be named here.")
        profiles: list[str] = opt(list(PROFILES), "Preference profiles read, each one user "
                                                  f"(of {', '.join(PROFILES)}).", nonempty=True, choices=PROFILES)
        split_mode: Literal["prlhf", "none"] = opt(
            "prlhf", "'prlhf': P-RLHF's held-out 10% of all comparisons (shuffle + train_test_split, seed 123) "
            "as the canonical 'split' column (Dong et al. reuse P-RLHF's data); 'none': plrm's random per-user "
            "split (split.test_fraction).")
        prlhf_test_size: float = opt(0.1, "Held-out fraction of split_mode: prlhf (P-RLHF: 0.1).", gt=0, lt=1)
        prlhf_seed: int = opt(123, "Seed of split_mode: prlhf's shuffle and split (P-RLHF: 123).", min=0)

        def __post_init__(self) -> None:
            unknown = [p for p in self.profiles if p not in PREFERENCE_PROMPTS]
            if unknown or not self.profiles or len(set(self.profiles)) != len(self.profiles):
                raise ValueError(f"profiles must be distinct names of {list(PROFILES)}, got {self.profiles}")
            if not 0.0 < self.prlhf_test_size < 1.0:
                raise ValueError(f"prlhf_test_size must be in (0, 1), got {self.prlhf_test_size}")

    def load(self) -> PreferenceData:
        c = self.config
        if not (c.files or c.path or c.repo_id):
            raise DataUnavailableError(NO_PATH)  # nothing wrong with the data: plrm bench lists it as skipped
        files = self._profile_files()
        frames = [strip_preference_prompt(read_profile(files[p]), p) for p in PROFILES if p in c.profiles]
        frame = pd.concat(frames, ignore_index=True)
        report = LoadReport(WHAT, unit="rows", read=len(frame))
        report.note(f"files: {', '.join(str(files[p]) for p in PROFILES if p in c.profiles)}")

        keep = report.drop("with completion_a == completion_b",
                           (frame["completion_a"] == frame["completion_b"]).to_numpy(), frame["profile"])
        repeat = frame.duplicated(["profile", *COLUMNS]).to_numpy()
        keep &= report.drop("repeating an earlier row of the same profile", keep & repeat, frame["profile"])
        frame = frame[keep].reset_index(drop=True)
        if c.split_mode == "prlhf":  # over P-RLHF's own rows, before the blank rule below (P-RLHF has none)
            frame["split"] = "train"
            frame.loc[prlhf_test_rows(len(frame), c.prlhf_test_size, c.prlhf_seed), "split"] = "test"
        blank = (frame[["question", "completion_a", "completion_b"]].apply(lambda col: col.str.strip()) == "")
        keep = report.drop("with a blank question or completion (question: after the preference prompt is removed)",
                           blank.any(axis=1).to_numpy(), frame["profile"])
        frame = frame[keep].reset_index(drop=True)

        without = frame.loc[~frame["has_prompt"], "profile"].value_counts().sort_index()
        if len(without):
            report.note(f"{int(without.sum())} kept row(s) without their profile's preference prompt in user_input "
                        "(kept as written, as P-RLHF): " + ", ".join(f"{p} {n}" for p, n in without.items()))

        columns = {
            "user_id": frame["profile"].to_numpy(dtype=object), "prompt": frame["question"].to_numpy(dtype=object),
            "chosen": frame["completion_a"].to_numpy(dtype=object),
            "rejected": frame["completion_b"].to_numpy(dtype=object),
            "pair_id": order_free_pair_ids(frame["question"], frame["completion_a"], frame["completion_b"]),
        }
        if c.split_mode == "prlhf":
            columns["split"] = frame["split"].to_numpy(dtype=object)
            report.note(f"split: P-RLHF's {c.prlhf_test_size:g} held out (seed {c.prlhf_seed}) "
                        f"-> {int((frame['split'] == 'test').sum())} test pairs")
        pairs = canonical_dataset(pd.DataFrame(columns).astype(str), c, list(files.values()))
        report.kept = len(pairs)
        return PreferenceData(name=WHAT, pairs=pairs, provides=self.provides, load_report=report)

    def _profile_files(self) -> dict[str, Path]:
        """profile -> its file; a file's profile is its name (P1A.json), and every requested profile needs one."""
        c = self.config
        files = resolve_files(c, [f"rm_training/{p}.json" for p in c.profiles], WHAT)
        by_profile: dict[str, Path] = {}
        for f in files:
            if f.stem not in c.profiles:
                raise DataValidationError(f"{WHAT}: {f}: the file name must be a requested profile "
                                          f"({', '.join(c.profiles)}).json (data.profiles)")
            if f.stem in by_profile:
                raise DataValidationError(f"{WHAT}: two files for profile {f.stem}: {by_profile[f.stem]} and {f}")
            by_profile[f.stem] = f
        missing = [p for p in c.profiles if p not in by_profile]
        if missing:
            raise DataValidationError(f"{WHAT}: no file for profile(s) {missing} (expected rm_training/<profile>.json;"
                                      f" found {sorted(str(f) for f in files)}); set data.profiles to read fewer")
        return by_profile
