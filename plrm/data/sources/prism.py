"""PRISM (``HannahRoseKirk/prism-alignment``): real users' multi-turn conversations with rated replies.

Read as published: ``conversations.jsonl`` (one conversation per line, its ``conversation_history`` a list of
user messages and rated model replies, turns 0-indexed) and, as per-user side information, ``survey.jsonl``
(one line per user: demographics, ``system_string``, ``stated_prefs`` ...), which becomes
``PreferenceData.user_info`` indexed by ``user_id``. Pairs follow the pipeline every author code shares
(shared/datasets.md §1.3 and §9; LoRe ``PRISM/prepare.py``, MRM ``preprocess_prism.py``, P-RLHF):

- one rated turn gives one pair per reply other than the chosen one: ``chosen`` = the reply marked
  ``if_chosen`` (the first in list order if several are), ``rejected`` = each other reply of the same turn
  (up to 3 at turn 0, 1 at later turns);
- ``prompt`` = JSON chat messages: every earlier turn as its user message plus that turn's chosen reply as
  the assistant message (the conversation continued from it), then the current user message;
- ``group_id`` = ``conversation_id``: per-user train/test splits keep a conversation whole, as the LoRe and MRM
  code split PRISM by conversation (shared/datasets.md §1.4), so no shared history leaks into test;
- ``pair_id`` = ``"{conversation_id}/t{turn}/{chosen within_turn_id}>{rejected within_turn_id}"``: it names
  the comparison, and is never shared across users (every user wrote their own prompts).

The load report counts model replies (PRISM's rated utterances). Every reply ends up in a kept pair (as its
chosen or rejected side) or is dropped by exactly one rule, applied in this order:

1. ``turn without a user message`` (missing or empty), ``turn without a chosen reply`` (none marked
   ``if_chosen`` with non-empty text), ``turn with a single reply``: every reply of such a turn;
2. ``empty reply text``; ``same text as the chosen reply`` (PRISM marks both A/B replies chosen when their
   texts are identical); ``another reply marked chosen`` (a different text also marked ``if_chosen``: neither
   side of such a pair is known to be preferred); ``longer than max_chars`` (option, off by default: user
   message + reply over ``max_chars`` characters, for the chosen or the rejected reply, as P-RLHF's 2,300 /
   2,400-character filter);
3. ``chosen reply with no reply left to compare``: a chosen reply whose other replies all fell to rule 2;
4. ``user with fewer than min_conversations conversations``: a user's remaining replies when fewer of their
   conversations yield a pair than ``min_conversations`` (MRM, Cai et al., arXiv 2601.18731, §5.1.1 and LoRe,
   Bose et al., arXiv 2504.14439, §5: users with at least 6 dialogues; counted after rules 1-3, as the LoRe and
   MRM code do).

Malformed input (a missing column, a history that is not a list of messages, a message without its keys or
with a wrong type, two user messages in one turn, a user repeated in the survey) raises naming file, row and
column. Licence: human-written text CC-BY-4.0, model replies CC-BY-NC-4.0 (non-commercial).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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
from plrm.data.source import DatasetSource, PreferenceData
from plrm.lazy import lazy_module
from plrm.registry import datasets as dataset_registry

pd = lazy_module("pandas")  # imported at first use: `plrm list` imports this module, reads no data

WHAT = "prism"
CONVERSATIONS = "conversations.jsonl"
SURVEY = "survey.jsonl"
MESSAGE_KEYS = ("turn", "role", "content")                  # every history item
REPLY_KEYS = ("if_chosen", "within_turn_id")                # model replies too


@dataset_registry.register("prism")
class Prism(DatasetSource):
    """PRISM: each rated turn's chosen reply vs each other reply, multi-turn history as chat messages."""

    provides = frozenset({cap.TEXT})
    licence = "CC-BY-4.0 (human text), CC-BY-NC-4.0 (model replies)"
    homepage = "https://huggingface.co/datasets/HannahRoseKirk/prism-alignment"

    @dataclass
    class Config(PublishedConfig):
        repo_id: str = opt("HannahRoseKirk/prism-alignment", "Hugging Face Hub dataset id of PRISM.")
        min_conversations: int = opt(6, "Keep users with at least this many conversations that yield a pair "
                                        "(MRM §5.1.1, LoRe §5: 6; 1 keeps every user).", min=1)
        max_chars: int | None = opt(None, "Drop a pair when its user message + chosen or rejected reply exceed this "
                                          "many characters (P-RLHF: 2300; null: no length filter).", min=1)
        survey: bool = opt(True, "Read survey.jsonl as per-user side information (PreferenceData.user_info).")

        def __post_init__(self) -> None:
            if self.min_conversations < 1:
                raise ValueError(f"min_conversations must be >= 1, got {self.min_conversations}")
            if self.max_chars is not None and self.max_chars < 1:
                raise ValueError(f"max_chars must be >= 1 or null, got {self.max_chars}")

    def load(self) -> PreferenceData:
        c = self.config
        wanted = [CONVERSATIONS, SURVEY] if c.survey else [CONVERSATIONS]
        found = resolve_files(c, wanted, WHAT)
        conv_path = _one(found, CONVERSATIONS, c)
        frame = read_table(conv_path, WHAT)
        require_columns(frame, ["conversation_id", "user_id", "conversation_history"], conv_path, WHAT)
        for col in ("conversation_id", "user_id"):
            bad = ~frame[col].map(lambda v: isinstance(v, str) and v.strip() != "")
            malformed(conv_path, np.flatnonzero(bad), col, "is not a non-empty string", WHAT)
        items = _history_items(frame, conv_path)
        report = LoadReport(WHAT, unit="replies")
        pairs = _pairs(frame, items, c, report)
        if pairs.empty:
            raise DataValidationError(f"{WHAT}: no pair is left after the drop rules:\n{report.render()}")
        pairs_table = pa.Table.from_pandas(pairs, preserve_index=False)
        user_info = _survey(_one(found, SURVEY, c), pairs["user_id"].unique(), report) if c.survey else None
        report.note(f"kept {pairs['user_id'].nunique():,} users, {pairs['group_id'].nunique():,} conversations "
                    f"(of {len(frame):,} conversations read from {conv_path.name})")
        return PreferenceData(name=WHAT, pairs=canonical_dataset(pairs_table, c, found),
                              provides=self.provides, user_info=user_info, load_report=report)


def _one(found: list[Path], name: str, config: PublishedConfig) -> Path:
    """The resolved file called ``name`` (with ``data.files``: the one whose file name is ``name``)."""
    match = [p for p in found if p.name == name]
    if len(match) != 1:
        where = "data.files" if config.files else "the repository"
        raise DataValidationError(f"{WHAT}: expected one {name} in {where}, found {[str(p) for p in match] or 'none'}")
    return match[0]


# ---- parsing ---------------------------------------------------------------------------------------------------
def _history_items(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """One row per conversation_history message (columns: row = the conversation's file row, pos = order in the
    file, turn, role, content, if_chosen, within_turn_id), every message checked."""
    history = frame["conversation_history"]
    is_list = history.map(lambda h: isinstance(h, list))
    malformed(path, np.flatnonzero(~is_list), "conversation_history", "is not a list of messages", WHAT)
    exploded = history.explode()
    exploded = exploded[history.map(len).to_numpy()[exploded.index] > 0]  # an empty history explodes to NaN
    _bad(path, exploded.index[~exploded.map(lambda m: isinstance(m, dict)).to_numpy(dtype=bool)],
         "has a message that is not an object")
    messages = exploded.tolist()
    items = pd.DataFrame({key: pd.Series([m.get(key) for m in messages], dtype=object)  # values kept as parsed
                          for key in (*MESSAGE_KEYS, *REPLY_KEYS)})
    items.insert(0, "row", exploded.index.to_numpy(dtype=np.int64))
    items.insert(1, "pos", np.arange(len(items)))
    for key in MESSAGE_KEYS:
        _bad(path, items.row[items[key].isna()], f"has a message without '{key}'")
    _bad(path, items.row[~items.role.isin(["user", "model"])], "has a message whose role is not 'user' or 'model'")
    _bad(path, items.row[~items.turn.map(_is_int).astype(bool)], "has a message whose 'turn' is not an integer")
    _bad(path, items.row[~is_text(items.content)],
         "has a message whose 'content' is not a string")
    model = items.role == "model"
    for key in REPLY_KEYS:
        _bad(path, items.row[model & items[key].isna()], f"has a model reply without '{key}'")
    _bad(path, items.row[model & ~items.if_chosen.map(lambda v: isinstance(v, (bool, np.bool_))).astype(bool)],
         "has a model reply whose 'if_chosen' is not true or false")
    users = items[~model]
    _bad(path, users.row[users.duplicated(["row", "turn"])], "has two user messages in one turn")
    items["turn"] = items.turn.astype(np.int64)
    return items


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _bad(path: Path, rows, problem: str) -> None:
    malformed(path, np.unique(np.asarray(rows, dtype=np.int64)), "conversation_history", problem, WHAT)


def _pairs(frame: pd.DataFrame, items: pd.DataFrame, c: Prism.Config, rep: LoadReport) -> pd.DataFrame:
    """Canonical pairs of every rated turn; every reply that ends up in none is dropped through ``rep``."""
    is_user = (items.role == "user").to_numpy()
    user_msg = items.loc[is_user & (items.content.str.strip() != ""), ["row", "turn", "content"]]
    replies = items[~is_user].drop(columns="role").reset_index(drop=True)
    replies["user_id"] = frame["user_id"].to_numpy()[replies.row]
    nonempty = (replies.content.str.strip() != "").to_numpy()
    # each turn's chosen reply: the first marked if_chosen that has some text
    chosen = replies[replies.if_chosen.astype(bool).to_numpy() & nonempty].groupby(["row", "turn"]).head(1)
    turns = replies.groupby(["row", "turn"]).size().rename("n_replies").reset_index()
    turns = turns.merge(user_msg.rename(columns={"content": "user_text"}), on=["row", "turn"], how="left")
    chosen_cols = {"pos": "chosen_pos", "content": "chosen_text", "within_turn_id": "chosen_wtid"}
    turns = turns.merge(chosen[["row", "turn", *chosen_cols]].rename(columns=chosen_cols), on=["row", "turn"],
                        how="left")
    replies = replies.merge(turns, on=["row", "turn"], how="left")  # keeps the replies' (file) order
    rep.read = len(replies)
    users = replies.user_id.to_numpy()
    alive = np.ones(len(replies), dtype=bool)

    def drop(reason: str, mask) -> None:
        nonlocal alive
        alive &= rep.drop(reason, alive & np.asarray(mask, dtype=bool), users)

    # 1. turns that cannot give a pair: every reply of the turn
    drop("turn without a user message", replies.user_text.isna())
    drop("turn without a chosen reply", replies.chosen_text.isna())
    drop("turn with a single reply", replies.n_replies == 1)
    # 2. replies that cannot be the rejected side of their turn's pair
    is_chosen = (replies.pos == replies.chosen_pos).to_numpy()
    drop("empty reply text", ~is_chosen & ~nonempty)
    drop("same text as the chosen reply", ~is_chosen & (replies.content == replies.chosen_text).to_numpy())
    drop("another reply marked chosen", ~is_chosen & replies.if_chosen.astype(bool).to_numpy())
    if c.max_chars is not None:
        n_user = replies.user_text.str.len()
        drop(f"longer than max_chars={c.max_chars}", (n_user + replies.content.str.len() > c.max_chars)
             | (n_user + replies.chosen_text.str.len() > c.max_chars))
    # 3. chosen replies whose other replies all fell to rule 2
    turn_code = replies.groupby(["row", "turn"], sort=False).ngroup().to_numpy()
    n_rejected = np.bincount(turn_code, weights=alive & ~is_chosen)
    drop("chosen reply with no reply left to compare", is_chosen & (n_rejected[turn_code] == 0))
    # 4. users with too few conversations that still give a pair
    per_user = replies[alive & ~is_chosen].groupby("user_id").row.nunique()
    few = per_user.index[per_user < c.min_conversations]
    drop(f"user with fewer than {c.min_conversations} conversations", replies.user_id.isin(few))
    pairs = replies[alive & ~is_chosen]
    rep.kept = len(pairs)
    conv_ids = pd.Series(frame["conversation_id"].to_numpy()[pairs.row], dtype=object)
    pair_ids = (conv_ids + "/t" + pairs.turn.astype(str).to_numpy() + "/" + pairs.chosen_wtid.astype(str).to_numpy()
                + ">" + pairs.within_turn_id.astype(str).to_numpy())
    return pd.DataFrame({
        "user_id": pairs.user_id.to_numpy(dtype=object),
        "prompt": _prompts(items, pairs, chosen),
        "chosen": pairs.chosen_text.to_numpy(dtype=object),
        "rejected": pairs.content.to_numpy(dtype=object),
        "pair_id": pair_ids.to_numpy(dtype=object),
        "group_id": conv_ids.to_numpy(dtype=object),
    })


def _prompts(items: pd.DataFrame, pairs: pd.DataFrame, chosen: pd.DataFrame) -> list[str]:
    """Each pair's prompt as JSON chat messages: every earlier turn of its conversation as the user message and
    the chosen reply (assistant) the conversation went on from, then the pair's own user message. An earlier
    turn without a user message or a chosen reply contributes what it has."""
    users = items[(items.role == "user").to_numpy()][["row", "turn", "content"]].rename(columns={"content": "user"})
    turns = users.merge(chosen[["row", "turn", "content"]].rename(columns={"content": "reply"}),
                        on=["row", "turn"], how="outer").sort_values(["row", "turn"], kind="stable")
    needed = set(zip(pairs.row.tolist(), pairs.turn.tolist()))
    prompt_of: dict[tuple[int, int], str] = {}
    history: list[dict] = []
    current = None
    for row, turn, user, reply in zip(turns.row.tolist(), turns.turn.tolist(), turns.user.tolist(),
                                      turns.reply.tolist()):  # linear in the number of turns
        if row != current:
            history, current = [], row
        has_user = isinstance(user, str) and user.strip() != ""
        if (row, turn) in needed:
            prompt_of[(row, turn)] = json.dumps(history + [{"role": "user", "content": user}], ensure_ascii=False)
        if has_user:
            history.append({"role": "user", "content": user})
        if isinstance(reply, str):
            history.append({"role": "assistant", "content": reply})
    return [prompt_of[key] for key in zip(pairs.row.tolist(), pairs.turn.tolist())]


def _survey(path: Path, users, rep: LoadReport) -> pd.DataFrame:
    """survey.jsonl as one row per kept user, indexed by user_id (all-missing where a user has no survey row)."""
    survey = read_table(path, WHAT)
    require_columns(survey, ["user_id"], path, WHAT)
    bad = ~survey["user_id"].map(lambda v: isinstance(v, str) and v.strip() != "").astype(bool)
    malformed(path, np.flatnonzero(bad), "user_id", "is not a non-empty string", WHAT)
    malformed(path, np.flatnonzero(survey["user_id"].duplicated()), "user_id", "repeats an earlier row's user", WHAT)
    kept = sorted(users)
    missing = len(set(kept) - set(survey["user_id"]))
    rep.note(f"user_info: {path.name} columns for the {len(kept):,} kept users"
             + (f" ({missing:,} without a survey row)" if missing else ""))
    return survey.set_index("user_id").reindex(pd.Index(kept, name="user_id"))
