"""Seeded user splits, written once into the run directory and reused by ``test`` and ``adapt``.

Users are partitioned into seen and unseen; each user's pairs into train and test (or by the dataset's own
``split`` column). Seen users' train pairs train the model (minus ``val_fraction`` held out for
validation); an unseen user's train pairs are their few-shot *support pool*, in a seeded order, so the
k-shot support set is the first k of them and a larger k always contains a smaller one. Every role is a
per-row code, so a split is a pure function of (dataset, seed, fractions) and is stored as one parquet file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from plrm.errors import DataValidationError, SplitError, refit_command

TRAIN, VAL, SUPPORT, TEST = 0, 1, 2, 3
ROLE_NAMES = ("train", "val", "support", "test")




@dataclass
class Split:
    seed: int
    user_ids: np.ndarray       # (U,) object: the user vocabulary; user_idx indexes it
    row_user: np.ndarray       # (rows,) int64 user_idx of each row
    unseen: np.ndarray         # (U,) bool
    role: np.ndarray           # (rows,) int8: TRAIN, VAL, SUPPORT or TEST
    support_rank: np.ndarray   # (rows,) int32: order in the unseen user's support pool, -1 elsewhere

    @property
    def seen_users(self) -> np.ndarray:
        return np.flatnonzero(~self.unseen)

    @property
    def unseen_users(self) -> np.ndarray:
        return np.flatnonzero(self.unseen)

    def rows(self, role: int) -> np.ndarray:
        return np.flatnonzero(self.role == role)

    def test_rows(self, unseen: bool) -> np.ndarray:
        return np.flatnonzero((self.role == TEST) & (self.unseen[self.row_user] == unseen))

    def support_rows(self, k: int) -> np.ndarray:
        return np.flatnonzero((self.role == SUPPORT) & (self.support_rank < k))

    # ---- persistence ---------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write ``split.parquet`` (one row per data row) atomically."""
        table = pa.table({
            "row": pa.array(np.arange(len(self.role), dtype=np.int64)),
            "user_id": pa.array(self.user_ids[self.row_user].astype(str)),
            "unseen_user": pa.array(self.unseen[self.row_user]),
            "role": pa.array(np.asarray(ROLE_NAMES, dtype=object)[self.role].astype(str)),
            "support_rank": pa.array(self.support_rank),
        }, metadata={"plrm.split_seed": str(self.seed)})
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)


SPLIT_COLUMNS = ("user_id", "unseen_user", "role", "support_rank")


def read_split_table(path: Path, columns: list[str] | tuple[str, ...] = SPLIT_COLUMNS) -> pa.Table:
    """The ``columns`` of a stored ``split.parquet``; a file that is damaged (truncated, overwritten, not
    parquet) or lacks one of them raises :class:`SplitError` naming it, never pyarrow's own error."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"split file {path} does not exist")
    try:
        table = pq.read_table(path)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001  (ArrowInvalid, OSError, ...: one message for every unreadable file)
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SplitError(f"split file {path} is damaged (it cannot be read as parquet: {reason}); "
                         f"{_split_advice(path)}") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise SplitError(f"split file {path} is not a split plrm wrote: it has no column "
                         f"{', '.join(map(repr, missing))} (its columns: {', '.join(table.column_names)}); "
                         f"{_split_advice(path)}")
    return table.select(list(columns))


def _split_advice(path: Path) -> str:
    """What to do about a run's unreadable split: it is the record of which users and pairs were held out, so it
    cannot be rebuilt from a damaged copy."""
    run_dir = path.parent.parent
    if path.name == "split.parquet" and path.parent.name.startswith("seed-") and (run_dir / "recipe.yaml").is_file():
        return (f"the run's split cannot be rebuilt from it. Restore the file from a backup, or re-run the fit: "
                f"`{refit_command(run_dir)}` (it replaces {run_dir})")
    return "pass a split.parquet that plrm wrote, or a JSON file of user lists"


def stored_users(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(user vocabulary, whether each user is unseen) of a saved ``split.parquet``, without the dataset: the same
    user order as the split's (the rows of a method's per-user state)."""
    table = read_split_table(path, ["user_id", "unseen_user"]).to_pandas()
    _, user_ids = _user_codes(table["user_id"].to_numpy())
    return user_ids, np.isin(user_ids, table.loc[table["unseen_user"], "user_id"].unique())


def _user_codes(user_column) -> tuple[np.ndarray, np.ndarray]:
    codes, uniques = pd.factorize(pd.Series(user_column, dtype=object), sort=True)
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


def _rank_within_user(row_user: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Rank of each row among its user's rows, ordered by ``key`` (vectorized, no loop over users)."""
    order = np.lexsort((key, row_user))
    sorted_user = row_user[order]
    starts = np.flatnonzero(np.r_[True, sorted_user[1:] != sorted_user[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - group_start
    return rank


def _group_test_rows(group_column, row_user: np.ndarray, key: np.ndarray, test_fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-user train/test by group: each user's groups in a seeded order, the first round(n_groups x
    test_fraction) of them test. Returns the test mask and an order key that keeps a group's rows together
    (so an unseen user's first k support pairs come from as few groups as possible)."""
    groups = pd.Series(group_column, dtype=object).fillna("").to_numpy(dtype=object)
    ug_codes = pd.MultiIndex.from_arrays([row_user, groups]).factorize()[0]  # (user, group) of each row
    _, first = np.unique(ug_codes, return_index=True)
    ug_user = row_user[first]
    ug_rank = _rank_within_user(ug_user, rng.random(len(first)))
    n_groups = np.bincount(ug_user, minlength=int(row_user.max()) + 1)
    is_test = (ug_rank < np.round(n_groups * test_fraction)[ug_user])[ug_codes]
    return is_test, ug_rank[ug_codes] + key


def _check_counts(split: Split, need_support: int, source: str) -> None:
    n_users = len(split.user_ids)
    counts = {r: np.bincount(split.row_user[split.role == r], minlength=n_users) for r in (TRAIN, VAL, SUPPORT, TEST)}
    problems = []

    def report(mask: np.ndarray, what: str) -> None:
        for u in np.flatnonzero(mask)[:10]:
            problems.append(f"user {split.user_ids[u]!r} {what(u)}")
        if mask.sum() > 10:
            problems.append(f"... and {int(mask.sum()) - 10} more users")

    report(counts[TEST] == 0, lambda u: "has no test pair (split.test_fraction, or the dataset's 'split' column)")
    seen, unseen = ~split.unseen, split.unseen
    report(seen & (counts[TRAIN] == 0), lambda u: "is a seen user with no train pair")
    report(unseen & (counts[SUPPORT] < need_support),
           lambda u: f"has {counts[SUPPORT][u]} support pairs; few-shot k={need_support} needs at least "
                     f"{need_support} (split.k, eval.k_list)")
    if problems:
        raise DataValidationError(f"{source}: the split cannot be made:\n  " + "\n  ".join(problems))


def make_split(pairs_table: pa.Table, seed: int, unseen_fraction: float, test_fraction: float,
               val_fraction: float, need_support: int, source: str = "dataset",
               unseen_user_ids: set | None = None) -> Split:
    """A seeded split of a canonical table; ``unseen_user_ids`` fixes the user partition (published splits)."""
    rng = np.random.default_rng(seed)
    row_user, user_ids = _user_codes(pairs_table["user_id"].to_numpy(zero_copy_only=False))
    n_users, n_rows = len(user_ids), len(row_user)
    if unseen_user_ids is None:
        perm = rng.permutation(n_users)
        unseen = np.zeros(n_users, dtype=bool)
        unseen[perm[: int(round(n_users * unseen_fraction))]] = True
    else:
        unseen = np.isin(user_ids, np.asarray(sorted(unseen_user_ids), dtype=object))
    key = rng.random(n_rows)
    rank = _rank_within_user(row_user, key)
    n_per_user = np.bincount(row_user, minlength=n_users)
    if "split" in pairs_table.column_names:
        is_test = pairs_table["split"].to_numpy(zero_copy_only=False) == "test"
        train_rank = _rank_within_user(row_user, np.where(is_test, 2.0, key))  # train rows first, in seeded order
    elif "group_id" in pairs_table.column_names:  # whole groups (conversations, posts) go to train or to test
        is_test, order_key = _group_test_rows(pairs_table["group_id"].to_numpy(zero_copy_only=False), row_user,
                                              key, test_fraction, rng)
        train_rank = _rank_within_user(row_user, np.where(is_test, np.inf, order_key))
    else:
        is_test = rank < np.round(n_per_user * test_fraction)[row_user]
        train_rank = rank - np.round(n_per_user * test_fraction)[row_user].astype(np.int64)
    n_train = np.bincount(row_user[~is_test], minlength=n_users)
    role = np.full(n_rows, TEST, dtype=np.int8)
    row_unseen = unseen[row_user]
    is_val = ~is_test & ~row_unseen & (train_rank < np.floor(n_train * val_fraction)[row_user])
    role[~is_test & ~row_unseen] = TRAIN
    role[is_val] = VAL
    role[~is_test & row_unseen] = SUPPORT
    support_rank = np.where(role == SUPPORT, train_rank, -1).astype(np.int32)
    split = Split(seed, user_ids, row_user, unseen, role, support_rank)
    _check_counts(split, need_support, source)
    return split


def support_only_split(pairs_table: pa.Table) -> Split:
    """Every row a support pair of an unseen user, in file order: new users to adapt, nothing to test."""
    row_user, user_ids = _user_codes(pairs_table["user_id"].to_numpy(zero_copy_only=False))
    rank = _rank_within_user(row_user, np.arange(len(row_user), dtype=np.float64))
    return Split(0, user_ids, row_user, np.ones(len(user_ids), dtype=bool),
                 np.full(len(row_user), SUPPORT, dtype=np.int8), rank.astype(np.int32))


def load_split(path: Path, pairs_table: pa.Table, seed: int, split_args: dict, need_support: int,
               source: str = "dataset") -> Split:
    """A split from ``split.parquet`` (exact reuse) or a JSON of user lists (seen/unseen users)."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"split file {path} does not exist")
    row_user, user_ids = _user_codes(pairs_table["user_id"].to_numpy(zero_copy_only=False))
    if path.suffix == ".json":
        try:
            spec = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SplitError(f"{path} is not valid JSON ({exc}); expected an object with 'unseen_users' (and "
                             "optionally 'seen_users')") from None
        if not isinstance(spec, dict) or "unseen_users" not in spec:
            raise SplitError(f"{path}: expected a JSON object with 'unseen_users' (and optionally 'seen_users')")
        known = set(user_ids.tolist())
        listed = set(map(str, spec["unseen_users"])) | set(map(str, spec.get("seen_users", [])))
        missing = sorted(listed - known)
        if missing:
            raise SplitError(f"{path}: {len(missing)} listed user(s) are not in the data, e.g. {missing[:5]}")
        if "seen_users" in spec:
            unlisted = sorted(known - listed)
            if unlisted:
                raise SplitError(f"{path}: {len(unlisted)} user(s) of the data are in neither list, "
                                 f"e.g. {unlisted[:5]}")
        return make_split(pairs_table, seed, need_support=need_support, source=source,
                          unseen_user_ids=set(map(str, spec["unseen_users"])), **split_args)
    table = read_split_table(path)
    if table.num_rows != pairs_table.num_rows:
        raise SplitError(f"{path}: the split has {table.num_rows} rows but the data has {pairs_table.num_rows}; "
                         "was it written for another dataset or dataset configuration?")
    stored_users = table["user_id"].to_numpy(zero_copy_only=False)
    data_users = user_ids[row_user]
    bad = np.flatnonzero(stored_users != data_users)
    if len(bad):
        r = int(bad[0])
        raise SplitError(f"{path}: row {r} belongs to user {data_users[r]!r} in the data but to "
                         f"{stored_users[r]!r} in the split ({len(bad)} rows differ)")
    roles = pd.Categorical(table["role"].to_numpy(zero_copy_only=False), categories=list(ROLE_NAMES))
    if (roles.codes < 0).any():
        r = int(np.flatnonzero(roles.codes < 0)[0])
        raise SplitError(f"{path}: row {r} has role {table['role'][r].as_py()!r}; expected one of {ROLE_NAMES}")
    unseen = np.zeros(len(user_ids), dtype=bool)
    unseen[row_user[table["unseen_user"].to_numpy(zero_copy_only=False)]] = True
    meta = table.schema.metadata or {}
    split = Split(int(meta.get(b"plrm.split_seed", seed)), user_ids, row_user, unseen,
                  roles.codes.astype(np.int8), table["support_rank"].to_numpy().astype(np.int32))
    _check_counts(split, need_support, source)
    return split
