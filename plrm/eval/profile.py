"""Dataset profile: the characterization of Dong et al. §4.2 and Table 2, written as JSON, Markdown and plots.

The paper is When Personalization Meets Reality (Dong et al., arXiv 2502.19158). Definitions followed (§4.2,
Table 2 caption, §3.1):

- An *item* is a ``pair_id``: one (x, y1, y2) triple. Its two responses are compared order-free: a user's vote
  is which of the two texts they chose, read on the canonical order (the lexicographically smaller text first),
  never on the row's chosen/rejected order. Rows without a ``pair_id`` are items of their own.
- A *shared item* is labelled by two or more users. The statistics below need shared items. Where there are
  none, they are undefined (``None`` plus the reason in ``stats["undefined"]``), never 0.
- *Preference divergence rate* (Table 2 "%Cont."): the fraction of shared items where any user's preference
  differs from the others'.
- *Highly controversial rate* (Table 2 "%Highly Cont."): the fraction of shared items where at least 30 % of
  the item's users disagree with its majority (inclusive: 3 of 10 users is highly controversial).
- *MV-ACC* (Table 2, "Minority Users"): the data are aggregated by majority vote over all users of each
  item, as the non-personalized pipeline of §3.1 aggregates D_p into D, so a user's own vote counts in the
  majority. MV-ACC of a user is their accuracy against that aggregate on the shared items they labelled,
  per row. The paper does not say how a tied vote is broken. We score a tied item 0.5 for each of its users.
  That is the expected accuracy of a fair coin toss, and it keeps the statistic deterministic. Tied items
  count as highly controversial (half the users disagree with either side).
- *Minority users*: MV-ACC < 0.5 ("below 50% (random performance)").
- *Room for personalization* (§4.2): the gap between the consistency of users' own preferences and the
  accuracy of a non-personalized aggregate. The data's aggregate is the majority vote: no single label per
  item scores better on the shared items, so its accuracy (mean MV-ACC over users) bounds every
  non-personalized model there. Consistency comes from the personal oracle where the data has one (how often
  a label agrees with the user's own true reward), else from repeated annotations of the same item by the
  same user, else it is unknown ("?" in Table 2). Where the data has the oracles 'oracle/personal' and
  'oracle/non-personalized', their accuracies and the gap between them are reported too.

A user who labels the same item more than once casts one vote on it: the share of their rows choosing the
canonical first response. Every accuracy is computed per user first, then averaged over users, as in
plrm.eval.metrics, so a user with many pairs weighs as much as one with few. Oracle pairs count as right when
their logit is > 0.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from plrm.data.source import PreferenceData  # noqa: E402
from plrm.errors import DataValidationError  # noqa: E402
from plrm.items import ITEM_SEP  # noqa: E402
from plrm.recipe import build_dataset, load_source  # noqa: E402

HIGHLY_CONTROVERSIAL_SHARE = 0.3  # Dong et al. Table 2: "at least 30% of users ... differ from the majority"
MINORITY_MV_ACC = 0.5             # Dong et al. §4.2: "below 50% (random performance)"
NO_SHARED_ITEMS = "no item is labelled by two or more users"
PERSONAL_ORACLE = "oracle/personal"
POPULATION_ORACLE = "oracle/non-personalized"
HISTOGRAM_MAX_BINS = 40
MAX_LISTED_USERS = 100  # minority users listed in profile.md; profile.json lists them all
_EPS = 1e-9             # shares such as 3/10 are compared with 0.3 in floating point


# ---- statistics ------------------------------------------------------------------------------------------------
def _summary(values: np.ndarray) -> dict:
    return {"min": int(values.min()), "median": float(np.median(values)), "mean": float(values.mean()),
            "max": int(values.max())}


def _histogram(counts: np.ndarray) -> dict:
    """One bin per pair count when the range is small, else HISTOGRAM_MAX_BINS equal bins."""
    lo, hi = int(counts.min()), int(counts.max())
    edges = np.arange(lo, hi + 2) if hi - lo < HISTOGRAM_MAX_BINS else np.linspace(lo, hi + 1, HISTOGRAM_MAX_BINS + 1)
    hist, edges = np.histogram(counts, bins=edges)
    return {"bin_edges": [float(e) for e in edges], "counts": [int(c) for c in hist]}


def _votes(table: pa.Table) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per pair: user code, item code (-1: no pair_id) and whether the canonical first text was chosen;
    and the user ids, indexed by user code."""
    chosen_first = pc.less(table["chosen"], table["rejected"]).to_numpy(zero_copy_only=False)
    user, user_ids = pd.factorize(table["user_id"].to_numpy(zero_copy_only=False))
    if "pair_id" in table.column_names:
        pair_id = pd.Series(table["pair_id"].to_numpy(zero_copy_only=False), dtype=object)
        item, item_names = pd.factorize(pair_id)  # null pair_id -> -1
        _check_items(table, item, np.asarray(item_names, dtype=object), chosen_first)
    else:
        item = np.full(table.num_rows, -1, dtype=np.int64)
    votes = pd.DataFrame({"user": user, "item": item, "first": chosen_first.astype(np.float64)})
    return votes, np.asarray(user_ids, dtype=object)


def _check_items(table: pa.Table, item: np.ndarray, item_names: np.ndarray, chosen_first: np.ndarray) -> None:
    """Every pair_id must name one (prompt, response, response) triple, or its votes compare different things."""
    first = pc.if_else(pa.array(chosen_first), table["chosen"], table["rejected"])
    second = pc.if_else(pa.array(chosen_first), table["rejected"], table["chosen"])
    triple = pc.binary_join_element_wise(table["prompt"], first, second, ITEM_SEP).to_numpy(zero_copy_only=False)
    key = pd.util.hash_array(np.asarray(triple, dtype=object), categorize=False)
    frame = pd.DataFrame({"item": item, "key": key})
    frame = frame[frame["item"] >= 0]
    n_triples = frame.groupby("item")["key"].nunique()
    bad = n_triples[n_triples > 1]
    if len(bad):
        name = item_names[bad.index[0]]
        rows = np.flatnonzero(item == bad.index[0])[:5].tolist()
        raise DataValidationError(
            f"pair_id {name!r} names {int(bad.iloc[0])} different (prompt, response, response) triples "
            f"(rows {rows}); {len(bad)} pair_id(s) do. A pair_id must be one item across users: fix the "
            "source's pair ids, or drop the column to profile without shared items")


def _mv_stats(votes: pd.DataFrame, shared: np.ndarray, user_ids: np.ndarray) -> dict:
    """Divergence, highly controversial and tied items, MV-ACC per user (see the module docstring)."""
    on_shared = votes[shared[votes["item"].to_numpy()]]
    # one vote per (item, user): the share of that user's rows choosing the canonical first text
    user_vote = on_shared.groupby(["item", "user"], sort=False)["first"].mean().rename("vote").reset_index()
    per_item = user_vote.groupby("item")["vote"].agg(["sum", "count", "min", "max"])
    for_first, n_users = per_item["sum"].to_numpy(), per_item["count"].to_numpy()
    tied = np.abs(for_first - n_users / 2) < _EPS
    minority_share = np.minimum(for_first, n_users - for_first) / n_users
    controversial = (per_item["max"] - per_item["min"]).to_numpy() > _EPS
    majority_first = pd.Series(np.where(tied, 0.5, (for_first > n_users / 2).astype(np.float64)),
                               index=per_item.index)

    # a row agrees with the majority when it chose the majority's text; a tied item scores 0.5
    majority = majority_first.reindex(on_shared["item"]).to_numpy()
    chose_first = on_shared["first"].to_numpy()
    agreement = np.where(majority == 0.5, 0.5, np.where(majority == 1.0, chose_first, 1.0 - chose_first))
    users = on_shared["user"].to_numpy()
    rows = np.bincount(users, minlength=len(user_ids))
    agreed = np.bincount(users, weights=agreement, minlength=len(user_ids))
    has_shared = rows > 0
    mv_acc = agreed[has_shared] / rows[has_shared]
    order = np.argsort(user_ids[has_shared], kind="stable")
    ids = user_ids[has_shared][order].tolist()
    minority = np.flatnonzero(mv_acc < MINORITY_MV_ACC)
    minority = minority[np.argsort(mv_acc[minority], kind="stable")]
    return {
        "preference_divergence_rate": float(controversial.mean()),
        "highly_controversial_rate": float((minority_share >= HIGHLY_CONTROVERSIAL_SHARE - _EPS).mean()),
        "tied_items": int(tied.sum()),
        "mv_acc": {
            "per_user": dict(zip(ids, mv_acc[order].tolist())),
            "n_shared_pairs": dict(zip(ids, rows[has_shared][order].tolist())),
            "range": [float(mv_acc.min()), float(mv_acc.max())],
            "mean_over_users": float(mv_acc.mean()),
            "users_without_shared_items": sorted(user_ids[~has_shared].tolist()),
        },
        "minority_users": user_ids[has_shared][minority].tolist(),
    }


def _per_user_mean(correct: np.ndarray, users: np.ndarray, n_users: int) -> float:
    rows = np.bincount(users, minlength=n_users)
    hits = np.bincount(users, weights=correct.astype(np.float64), minlength=n_users)
    return float((hits[rows > 0] / rows[rows > 0]).mean())


def _repeat_consistency(votes: pd.DataFrame, n_users: int) -> float | None:
    """Mean over users of how often a repeated label of an item agrees with the user's own majority on it."""
    labelled = votes[votes["item"] >= 0]
    group = labelled.groupby(["item", "user"], sort=False)["first"]
    size = group.transform("size").to_numpy()
    if not (size > 1).any():
        return None
    own = group.transform("mean").to_numpy()[size > 1]
    chose_first = labelled["first"].to_numpy()[size > 1]
    agreement = np.where(np.abs(own - 0.5) < _EPS, 0.5, np.where(own > 0.5, chose_first, 1.0 - chose_first))
    return _per_user_mean(agreement, labelled["user"].to_numpy()[size > 1], n_users)


def _room(data: PreferenceData, votes: pd.DataFrame, n_users: int, mv: dict | None, undefined: dict) -> dict:
    """Room for personalization (Dong et al. §4.2) and, where known, the oracles' accuracies and gap."""
    users = votes["user"].to_numpy()
    oracle = {name: _per_user_mean(np.asarray(data.oracle_logits[name]) > 0, users, n_users)
              for name in (PERSONAL_ORACLE, POPULATION_ORACLE) if name in data.oracle_logits}
    room = {"consistency": None, "consistency_source": None, "majority_vote_accuracy": None, "room": None,
            "room_if_fully_consistent": None, "oracle_personal_accuracy": oracle.get(PERSONAL_ORACLE),
            "oracle_non_personalized_accuracy": oracle.get(POPULATION_ORACLE), "oracle_gap": None}
    repeats = _repeat_consistency(votes, n_users)
    if PERSONAL_ORACLE in oracle:
        room["consistency"], room["consistency_source"] = oracle[PERSONAL_ORACLE], PERSONAL_ORACLE
    elif repeats is not None:
        room["consistency"], room["consistency_source"] = repeats, "repeated annotations"
    else:
        undefined["room_for_personalization.consistency"] = (
            "no personal oracle and no item labelled twice by the same user")
    if mv is not None:
        room["majority_vote_accuracy"] = mv["mv_acc"]["mean_over_users"]
        room["room_if_fully_consistent"] = 1.0 - room["majority_vote_accuracy"]
        if room["consistency"] is not None:
            room["room"] = room["consistency"] - room["majority_vote_accuracy"]
        else:
            undefined["room_for_personalization.room"] = "consistency is unknown"
    else:
        for key in ("majority_vote_accuracy", "room", "room_if_fully_consistent"):
            undefined[f"room_for_personalization.{key}"] = undefined["mv_acc"]
    if len(oracle) == 2:
        room["oracle_gap"] = oracle[PERSONAL_ORACLE] - oracle[POPULATION_ORACLE]
    else:
        for key, needs in (("oracle_personal_accuracy", PERSONAL_ORACLE),
                           ("oracle_non_personalized_accuracy", POPULATION_ORACLE),
                           ("oracle_gap", f"{PERSONAL_ORACLE} and {POPULATION_ORACLE}")):
            if room[key] is None:
                undefined[f"room_for_personalization.{key}"] = f"needs {needs} logits, which the data lacks"
    return room


def profile(data: PreferenceData) -> dict:
    """The dataset's profile (Dong et al. §4.2, Table 2): a JSON-able dict; see the module docstring."""
    table = data.pairs.data.table
    votes, user_ids = _votes(table)
    if data.copies is not None:  # exact repeats were dropped from training data; a repeated label is still a vote
        votes = votes.loc[votes.index.repeat(data.copies)].reset_index(drop=True)
    pairs_per_user = np.bincount(votes["user"].to_numpy(), minlength=len(user_ids))
    labelled = votes[votes["item"] >= 0]
    users_per_item = labelled.groupby("item")["user"].nunique()
    n_items = int(len(users_per_item))
    shared = np.zeros(n_items + 1, dtype=bool)  # indexed by item code; the last slot is item -1 (no pair_id)
    shared[users_per_item.index[users_per_item.to_numpy() >= 2]] = True
    shared_rows = shared[votes["item"].to_numpy()]

    stats: dict = {
        "dataset": data.name,
        "n_samples": int(len(votes)),
        "n_users": int(len(user_ids)),
        "pairs_per_user": {**_summary(pairs_per_user), "histogram": _histogram(pairs_per_user)},
        "items": {
            "has_pair_id": "pair_id" in table.column_names,
            "n_items": n_items if "pair_id" in table.column_names else None,
            "n_shared_items": int(shared.sum()),
            "fraction_rows_on_shared_items": float(shared_rows.mean()),
            "users_per_shared_item": _summary(users_per_item[users_per_item >= 2].to_numpy())
            if shared.any() else None,
        },
        "highly_controversial_threshold": HIGHLY_CONTROVERSIAL_SHARE,
        "undefined": {},
    }
    undefined = stats["undefined"]
    if not shared.any():
        reason = NO_SHARED_ITEMS + ("" if "pair_id" in table.column_names else " (the data has no pair_id column)")
        mv = None
        for key in ("preference_divergence_rate", "highly_controversial_rate", "tied_items", "mv_acc",
                    "minority_users", "items.users_per_shared_item"):
            undefined[key] = reason
        if "pair_id" not in table.column_names:
            undefined["items.n_items"] = reason
        stats.update(preference_divergence_rate=None, highly_controversial_rate=None, tied_items=None,
                     mv_acc=None, minority_users=None)
    else:
        mv = _mv_stats(votes, shared, user_ids)
        stats.update(mv)
    stats["room_for_personalization"] = _room(data, votes, len(user_ids), mv, undefined)
    return stats


# ---- report ---------------------------------------------------------------------------------------------------
def _write_atomic(path: Path, write) -> Path:
    """Write through a temporary file in the same folder, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def _get(stats: dict, key: str):
    value = stats
    for part in key.split("."):
        value = value[part]
    return value


def _cell(stats: dict, key: str, fmt: str = "{:.1%}") -> str:
    value = _get(stats, key)
    if value is None:
        return f"undefined: {stats['undefined'].get(key, 'not computed')}"
    return fmt.format(value)


def _markdown(stats: dict, title: str) -> str:
    mv_range = ("undefined: " + stats["undefined"]["mv_acc"] if stats["mv_acc"] is None
                else "[{:.2f}-{:.2f}]".format(*stats["mv_acc"]["range"]))
    room = "room_for_personalization"
    ppu = stats["pairs_per_user"]
    lines = [
        f"# {title}", "",
        "Dataset statistics as in Table 2 of When Personalization Meets Reality (Dong et al., arXiv 2502.19158) "
        "(definitions: its §4.2; plrm/eval/profile.py).", "",
        "| dataset | #Samples | #Users | %Cont. | %Highly Cont. | MV-ACC Range | Consistency |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {stats['dataset']} | {stats['n_samples']:,} | {stats['n_users']:,} "
        f"| {_cell(stats, 'preference_divergence_rate')} | {_cell(stats, 'highly_controversial_rate')} "
        f"| {mv_range} | {_cell(stats, room + '.consistency', '{:.3f}')} |", "",
        "| statistic | value |", "| --- | --- |",
        f"| pairs per user (min / median / mean / max) | {ppu['min']} / {ppu['median']:g} / {ppu['mean']:.1f} "
        f"/ {ppu['max']} |",
        f"| items (pair_id) | {_cell(stats, 'items.n_items', '{:,}')} |",
        f"| items labelled by >= 2 users | {stats['items']['n_shared_items']:,} |",
        f"| rows on shared items | {stats['items']['fraction_rows_on_shared_items']:.1%} |",
        f"| preference divergence rate (%Cont.) | {_cell(stats, 'preference_divergence_rate')} |",
        f"| highly controversial rate (>= {stats['highly_controversial_threshold']:.0%} disagree with the majority)"
        f" | {_cell(stats, 'highly_controversial_rate')} |",
        f"| tied majority votes (scored 0.5) | {_cell(stats, 'tied_items', '{:,}')} |",
        f"| mean MV-ACC over users (majority-vote accuracy) "
        f"| {_cell(stats, room + '.majority_vote_accuracy', '{:.3f}')} |",
        f"| consistency ({stats[room]['consistency_source'] or 'source unknown'}) "
        f"| {_cell(stats, room + '.consistency', '{:.3f}')} |",
        f"| room for personalization (consistency - MV accuracy) | {_cell(stats, room + '.room', '{:+.3f}')} |",
        f"| room if users were fully consistent (1 - MV accuracy) "
        f"| {_cell(stats, room + '.room_if_fully_consistent', '{:+.3f}')} |",
        f"| oracle/personal accuracy | {_cell(stats, room + '.oracle_personal_accuracy', '{:.3f}')} |",
        f"| oracle/non-personalized accuracy | {_cell(stats, room + '.oracle_non_personalized_accuracy', '{:.3f}')} |",
        f"| oracle gap (personal - non-personalized) | {_cell(stats, room + '.oracle_gap', '{:+.3f}')} |",
        "", "## Minority users (MV-ACC < 0.5)", "",
    ]
    if stats["minority_users"] is None:
        lines.append(f"undefined: {stats['undefined']['minority_users']}")
    elif not stats["minority_users"]:
        lines.append("none")
    else:
        mv_acc, n_pairs = stats["mv_acc"]["per_user"], stats["mv_acc"]["n_shared_pairs"]
        listed = stats["minority_users"][:MAX_LISTED_USERS]
        lines += [f"{len(stats['minority_users'])} of {len(mv_acc)} users with shared items:", "",
                  "| user | MV-ACC | pairs on shared items |", "| --- | --- | --- |"]
        lines += [f"| {u} | {mv_acc[u]:.3f} | {n_pairs[u]} |" for u in listed]
        if len(stats["minority_users"]) > len(listed):
            lines.append(f"\n... and {len(stats['minority_users']) - len(listed)} more (all in profile.json)")
    if stats["mv_acc"] is not None and stats["mv_acc"]["users_without_shared_items"]:
        lines += ["", f"{len(stats['mv_acc']['users_without_shared_items'])} user(s) label no shared item and "
                  "have no MV-ACC (listed in profile.json)."]
    return "\n".join(lines) + "\n"


def _save_figure(fig, path: Path) -> Path:
    _write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def _plot_mv_acc(stats: dict, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    if stats["mv_acc"] is None:
        ax.text(0.5, 0.5, "MV-ACC undefined:\n" + stats["undefined"]["mv_acc"], ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
    else:
        acc = np.sort(np.fromiter(stats["mv_acc"]["per_user"].values(), dtype=np.float64))
        ax.bar(np.arange(len(acc)), acc, width=1.0,
               color=np.where(acc < MINORITY_MV_ACC, "tab:red", "tab:blue"), linewidth=0)
        ax.axhline(MINORITY_MV_ACC, color="black", linestyle="--", linewidth=1, label="0.5: minority below")
        ax.set_xlabel("users, sorted by MV-ACC")
        ax.set_ylabel("MV-ACC (agreement with the majority vote)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{title}: MV-ACC per user")
    fig.tight_layout()
    return _save_figure(fig, path)


def _plot_pairs_per_user(stats: dict, path: Path, title: str) -> Path:
    hist = stats["pairs_per_user"]["histogram"]
    edges = np.asarray(hist["bin_edges"])
    fig, ax = plt.subplots(figsize=(7, 4))
    if np.allclose(np.diff(edges), 1.0):  # one bin per pair count: a bar centred on each count
        ax.bar(edges[:-1], hist["counts"], width=0.9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", edgecolor="white", linewidth=0.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("pairs per user")
    ax.set_ylabel("users")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"{title}: pairs per user")
    fig.tight_layout()
    return _save_figure(fig, path)


def write_report(stats: dict, out_dir: Path, title: str) -> list[Path]:
    """profile.json, profile.md and the two plots in ``out_dir``, each written atomically; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(stats, indent=2) + "\n"
    markdown = _markdown(stats, title)
    return [
        _write_atomic(out_dir / "profile.json", lambda tmp: tmp.write_text(text)),
        _write_atomic(out_dir / "profile.md", lambda tmp: tmp.write_text(markdown)),
        _plot_mv_acc(stats, out_dir / "mv_acc_per_user.png", title),
        _plot_pairs_per_user(stats, out_dir / "pairs_per_user.png", title),
    ]


# ---- from a dataset name ------------------------------------------------------------------------------------
def run_profile(dataset: str, overrides: list[str], out_dir: str | None) -> dict:
    """Build, load and profile a registered dataset; write the report to ``out_dir`` (profiles/<dataset>)."""
    data = load_source(build_dataset(dataset, overrides), dataset)
    if data.load_report is not None:  # a published source: what it read, kept and dropped, by rule
        print(data.load_report.render(), file=sys.stderr)
    stats = profile(data)
    write_report(stats, Path(out_dir) if out_dir is not None else Path("profiles") / dataset, dataset)
    return stats
