"""Seeded user splits (plrm/data/splits.py) and the datamodule's training view (plrm/data/datamodule.py)."""

from __future__ import annotations

import json
import re

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from plrm import capabilities as cap
from plrm.backbones.precomputed import PrecomputedFeatures
from plrm.data.datamodule import PreferenceDataModule, PreparedData
from plrm.data.schema import DataValidationError
from plrm.data.source import PreferenceData
from plrm.data.splits import (
    SUPPORT,
    TEST,
    TRAIN,
    VAL,
    SplitError,
    load_split,
    make_split,
)

SPLIT_ARGS = {"unseen_fraction": 0.5, "test_fraction": 0.5, "val_fraction": 0.0}


def pairs_table(pairs_per_user: list[int] | dict[str, int], split: list[str] | None = None) -> pa.Table:
    """User u<i> with the given number of pairs; every row's texts are distinct."""
    if not isinstance(pairs_per_user, dict):
        pairs_per_user = {f"u{i:02d}": n for i, n in enumerate(pairs_per_user)}
    users = [u for u, n in pairs_per_user.items() for _ in range(n)]
    rows = range(len(users))
    columns = {"user_id": users, "prompt": [f"prompt {r}" for r in rows],
               "chosen": [f"good {r}" for r in rows], "rejected": [f"bad {r}" for r in rows]}
    if split is not None:
        columns["split"] = split
    return pa.table(columns)


def split_of(table: pa.Table, seed: int = 0, need_support: int = 5, **args):
    return make_split(table, seed, need_support=need_support, source="toy", **{**SPLIT_ARGS, **args})


TWENTY_USERS = pairs_table([20] * 20)


# ---- make_split ---------------------------------------------------------------------------------------------
def test_same_seed_same_split_and_another_seed_another():
    a, b, c = split_of(TWENTY_USERS, seed=3), split_of(TWENTY_USERS, seed=3), split_of(TWENTY_USERS, seed=4)
    np.testing.assert_array_equal(a.role, b.role)
    np.testing.assert_array_equal(a.support_rank, b.support_rank)
    np.testing.assert_array_equal(a.unseen, b.unseen)
    assert not np.array_equal(a.role, c.role)


def test_unseen_fraction_is_honoured():
    """20 users: round(20 * 0.25) = 5 unseen; round(20 * 0.5) = 10."""
    assert split_of(TWENTY_USERS, unseen_fraction=0.25).unseen.sum() == 5
    assert split_of(TWENTY_USERS, unseen_fraction=0.5).unseen.sum() == 10


def test_test_fraction_per_user():
    """20 pairs per user, test_fraction 0.3: round(6.0) = 6 test pairs each, the other 14 train or support."""
    split = split_of(TWENTY_USERS, test_fraction=0.3)
    assert (np.bincount(split.row_user[split.role == TEST]) == 6).all()
    assert (np.bincount(split.row_user[split.role != TEST]) == 14).all()


def test_no_leakage():
    split = split_of(TWENTY_USERS, seed=1, val_fraction=0.2)
    row_unseen = split.unseen[split.row_user]
    assert set(np.unique(split.role)) == {TRAIN, VAL, SUPPORT, TEST}  # one int8 role per row, all four used
    assert not row_unseen[split.rows(TRAIN)].any()
    assert not row_unseen[split.rows(VAL)].any()
    assert row_unseen[split.rows(SUPPORT)].all()
    for role in (TRAIN, VAL, SUPPORT, TEST):  # every row has exactly one role
        others = [r for r in (TRAIN, VAL, SUPPORT, TEST) if r != role]
        assert not np.isin(split.rows(role), np.concatenate([split.rows(o) for o in others])).any()
    assert sum(len(split.rows(r)) for r in (TRAIN, VAL, SUPPORT, TEST)) == TWENTY_USERS.num_rows
    for u in split.unseen_users:
        mine = split.row_user == u
        assert not np.intersect1d(np.flatnonzero(mine & (split.role == SUPPORT)),
                                  np.flatnonzero(mine & (split.role == TEST))).size
    for u in split.seen_users:
        mine = split.row_user == u
        assert not np.intersect1d(np.flatnonzero(mine & (split.role == TRAIN)),
                                  np.flatnonzero(mine & (split.role == TEST))).size
    np.testing.assert_array_equal(np.sort(np.concatenate([split.test_rows(True), split.test_rows(False)])),
                                  split.rows(TEST))
    assert row_unseen[split.test_rows(True)].all() and not row_unseen[split.test_rows(False)].any()


def test_support_rows_are_k_per_unseen_user_and_nested():
    """10 pairs per unseen user, half test: a pool of 5 support pairs each."""
    split = split_of(TWENTY_USERS)
    for k in (1, 3, 5):
        rows = split.support_rows(k)
        counts = np.bincount(split.row_user[rows], minlength=len(split.user_ids))
        assert (counts[split.unseen_users] == k).all() and (counts[split.seen_users] == 0).all()
    assert np.isin(split.support_rows(3), split.support_rows(5)).all()
    assert np.isin(split.support_rows(1), split.support_rows(3)).all()
    # ranks within an unseen user's pool are 0..pool-1; every other row has rank -1
    for u in split.unseen_users:
        ranks = split.support_rank[(split.row_user == u) & (split.role == SUPPORT)]
        np.testing.assert_array_equal(np.sort(ranks), np.arange(10))
    assert (split.support_rank[split.role != SUPPORT] == -1).all()


def test_dataset_split_column_is_honoured():
    """Rows marked 'test' stay test whatever the seed; test_fraction is ignored."""
    marks = ["train", "train", "train", "test"] * 10  # 4 users x 10 pairs, every fourth row marked test
    table = pairs_table([10, 10, 10, 10], split=marks)
    is_test = np.asarray(marks) == "test"
    for seed in (0, 1, 2):
        split = split_of(table, seed=seed, test_fraction=0.9, need_support=1)
        np.testing.assert_array_equal(split.role == TEST, is_test)


def test_val_fraction_per_seen_user():
    """Seen users have 20 - round(20 * 0.5) = 10 train pairs; val_fraction 0.25 holds out floor(2.5) = 2 of them."""
    split = split_of(TWENTY_USERS, val_fraction=0.25)
    val_counts = np.bincount(split.row_user[split.rows(VAL)], minlength=20)
    train_counts = np.bincount(split.row_user[split.rows(TRAIN)], minlength=20)
    assert (val_counts[split.seen_users] == 2).all() and (val_counts[split.unseen_users] == 0).all()
    assert (train_counts[split.seen_users] == 8).all()


def test_too_few_support_pairs():
    """u03 has 4 pairs, half of them test: 2 support pairs, but k=5 needs 5. unseen_user_ids fixes u03 as unseen."""
    table = pairs_table({"u00": 20, "u01": 20, "u02": 20, "u03": 4})
    with pytest.raises(DataValidationError,
                       match=re.escape("toy: the split cannot be made:\n  user 'u03' has 2 support pairs; "
                                       "few-shot k=5 needs at least 5 (split.k, eval.k_list)")):
        split_of(table, unseen_user_ids={"u03"})


def test_user_without_test_pair():
    """u01 has 1 pair: round(1 * 0.4) = 0 test pairs."""
    table = pairs_table({"u00": 10, "u01": 1})
    with pytest.raises(DataValidationError, match=re.escape(
            "user 'u01' has no test pair (split.test_fraction, or the dataset's 'split' column)")):
        split_of(table, test_fraction=0.4, unseen_user_ids=set(), need_support=1)


def test_seen_user_without_train_pair():
    table = pairs_table({"u00": 2, "u01": 2}, split=["train", "test", "test", "test"])
    with pytest.raises(DataValidationError, match="user 'u01' is a seen user with no train pair"):
        split_of(table, unseen_user_ids=set(), need_support=1)


# ---- save / load --------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    split = split_of(TWENTY_USERS, seed=7, val_fraction=0.2)
    split.save(tmp_path / "split.parquet")
    loaded = load_split(tmp_path / "split.parquet", TWENTY_USERS, seed=0, split_args=SPLIT_ARGS, need_support=5)
    assert loaded.seed == 7  # the seed stored in the file wins over the one passed
    for name in ("user_ids", "row_user", "unseen", "role", "support_rank"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(split, name))


def test_load_split_of_another_size(tmp_path):
    split_of(TWENTY_USERS).save(tmp_path / "split.parquet")
    smaller = pairs_table([20] * 19)
    with pytest.raises(SplitError, match="the split has 400 rows but the data has 380; was it written for another"):
        load_split(tmp_path / "split.parquet", smaller, seed=0, split_args=SPLIT_ARGS, need_support=5)


def test_load_split_with_another_user_on_a_row(tmp_path):
    """Renaming u00 to u99 moves its 20 rows (0-19) to the end of the sorted vocabulary but not in the table."""
    split_of(TWENTY_USERS).save(tmp_path / "split.parquet")
    renamed = TWENTY_USERS.set_column(0, "user_id", pa.array(["u99"] * 20 + TWENTY_USERS["user_id"].to_pylist()[20:]))
    with pytest.raises(SplitError, match=r"row 0 belongs to user 'u99' in the data but to 'u00' in the split "
                                         r"\(20 rows differ\)"):
        load_split(tmp_path / "split.parquet", renamed, seed=0, split_args=SPLIT_ARGS, need_support=5)


def test_load_split_with_an_unknown_role(tmp_path):
    path = tmp_path / "split.parquet"
    split_of(TWENTY_USERS).save(path)
    table = pq.read_table(path)
    pq.write_table(table.set_column(3, "role", pa.array(["holdout"] + table["role"].to_pylist()[1:])), path)
    with pytest.raises(SplitError, match=r"row 0 has role 'holdout'; expected one of \('train', 'val', 'support', 'test'\)"):
        load_split(path, TWENTY_USERS, seed=0, split_args=SPLIT_ARGS, need_support=5)


def test_load_split_missing_file(tmp_path):
    with pytest.raises(SplitError, match="split file .*nope.parquet does not exist"):
        load_split(tmp_path / "nope.parquet", TWENTY_USERS, seed=0, split_args=SPLIT_ARGS, need_support=5)


def test_json_user_lists_fix_the_unseen_users(tmp_path):
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"unseen_users": ["u03", "u11"]}))
    split = load_split(path, TWENTY_USERS, seed=0, split_args=SPLIT_ARGS, need_support=5)
    assert split.user_ids[split.unseen].tolist() == ["u03", "u11"]
    split_with_seen = tmp_path / "both.json"
    split_with_seen.write_text(json.dumps({"unseen_users": ["u03", "u11"],
                                           "seen_users": [f"u{i:02d}" for i in range(20) if i not in (3, 11)]}))
    again = load_split(split_with_seen, TWENTY_USERS, seed=0, split_args=SPLIT_ARGS, need_support=5)
    np.testing.assert_array_equal(again.role, split.role)


def test_json_user_not_in_the_data(tmp_path):
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"unseen_users": ["u03", "ghost"]}))
    with pytest.raises(SplitError, match=r"1 listed user\(s\) are not in the data, e.g. \['ghost'\]"):
        load_split(path, TWENTY_USERS, seed=0, split_args=SPLIT_ARGS, need_support=5)


def test_json_data_user_in_neither_list(tmp_path):
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"unseen_users": ["u00"], "seen_users": [f"u{i:02d}" for i in range(1, 19)]}))
    with pytest.raises(SplitError, match=r"1 user\(s\) of the data are in neither list, e.g. \['u19'\]"):
        load_split(path, TWENTY_USERS, seed=0, split_args=SPLIT_ARGS, need_support=5)


def test_json_without_unseen_users(tmp_path):
    path = tmp_path / "users.json"
    path.write_text(json.dumps(["u00"]))
    with pytest.raises(SplitError, match="expected a JSON object with 'unseen_users'"):
        load_split(path, TWENTY_USERS, seed=0, split_args=SPLIT_ARGS, need_support=5)


# ---- the datamodule's training view ------------------------------------------------------------------------------
def prepared(table: pa.Table) -> PreparedData:
    """One-hot-ish 2-d features per item, so the precomputed backbone can serve them."""
    n = table.num_rows
    columns = table.to_pydict() | {"chosen_emb": [[float(r), 1.0] for r in range(n)],
                                   "rejected_emb": [[float(r), -1.0] for r in range(n)]}
    data = PreferenceData("toy", datasets.Dataset.from_dict(columns), provides=frozenset({cap.TEXT}))
    return PreparedData(data, PrecomputedFeatures(PrecomputedFeatures.Config()))


def test_train_loader_yields_each_train_row_once_per_epoch():
    split = split_of(TWENTY_USERS, val_fraction=0.2)
    dm = PreferenceDataModule(prepared(TWENTY_USERS), split, batch_size=16, seed=0)
    for _epoch in range(2):
        rows = torch.cat([batch["row"] for batch in dm.train_dataloader()]).numpy()
        np.testing.assert_array_equal(np.sort(rows), split.rows(TRAIN))
    batch = next(iter(dm.train_dataloader()))
    np.testing.assert_array_equal(batch["user_idx"].numpy(), split.row_user[batch["row"].numpy()])
    # chosen features were [row, 1] and rejected [row, -1]: the batch serves each row's own items
    np.testing.assert_array_equal(batch["chosen"][:, 0].numpy(), batch["row"].numpy())
    np.testing.assert_array_equal(batch["rejected"][:, 1].numpy(), -np.ones(len(batch["row"])))
    val_rows = torch.cat([b["row"] for b in dm.val_dataloader()]).numpy()
    np.testing.assert_array_equal(val_rows, split.rows(VAL))


def test_pair_weight_is_mean_pairs_over_user_pairs():
    """Seen users with 2, 4 and 6 train pairs (each also has one test pair), no unseen users, no validation.

    mean_pairs = (2 + 4 + 6) / 3 = 4, so pair_weight = 4 / n_u: 2.0 for u00, 1.0 for u01, 2/3 for u02.
    """
    marks = ["train"] * 2 + ["test"] + ["train"] * 4 + ["test"] + ["train"] * 6 + ["test"]
    table = pairs_table([3, 5, 7], split=marks)
    split = split_of(table, unseen_user_ids=set(), need_support=1)
    dm = PreferenceDataModule(prepared(table), split, batch_size=100)
    (batch,) = list(dm.train_dataloader())
    expected = {0: 2.0, 1: 1.0, 2: 2.0 / 3.0}
    assert len(batch["row"]) == 12
    for user, weight in zip(batch["user_idx"].tolist(), batch["pair_weight"].tolist()):
        assert weight == pytest.approx(expected[user])
    assert batch["pair_weight"].mean().item() == pytest.approx(1.0)  # (2*2 + 4*1 + 6*2/3) / 12 = 12/12
