"""The canonical schema's validation (plrm/data/schema.py), PreferenceData and local preference files."""

from __future__ import annotations

import json
import re

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from plrm import capabilities as cap
from plrm.data.attributes import AttributeWorld
from plrm.data.files import PreferenceFiles
from plrm.data.lowrank import LowRankWorld
from plrm.data.published import LoadReport
from plrm.data.schema import REQUIRED, DataValidationError, duplicate_rows, validate_pairs
from plrm.data.source import DUPLICATES, PreferenceData
from plrm.data.splits import TEST, make_split


def clean_columns() -> dict[str, list]:
    """Three users, one pair each, every required column filled."""
    return {
        "user_id": ["u0", "u1", "u2"],
        "prompt": ["p0", "p1", "p2"],
        "chosen": ["good 0", "good 1", "good 2"],
        "rejected": ["bad 0", "bad 1", "bad 2"],
    }


def embeddings(chosen: list, rejected: list | None = None) -> dict[str, list]:
    return {"chosen_emb": chosen, "rejected_emb": rejected or [[0.0, 1.0]] * len(chosen)}


def check(columns: dict) -> None:
    validate_pairs(datasets.Dataset.from_dict(columns), source="toy")


# ---- validate_pairs ------------------------------------------------------------------------------------------
def test_clean_table_passes():
    check(clean_columns())
    check({**clean_columns(), "pair_id": ["a", "b", "c"], "split": ["train", "test", "train"],
           **embeddings([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])})


def test_missing_required_column_names_it_and_lists_found_columns():
    columns = clean_columns()
    del columns["rejected"]
    with pytest.raises(DataValidationError,
                       match=r"toy: missing required column\(s\) \['rejected'\]; "
                             r"found columns \['user_id', 'prompt', 'chosen'\]"):
        check(columns)


def test_no_rows():
    with pytest.raises(DataValidationError, match="toy: the dataset has no rows"):
        check({k: [] for k in clean_columns()})


@pytest.mark.parametrize("column", ["prompt", "chosen", "rejected"])
def test_empty_text_names_row_user_and_column(column):
    columns = clean_columns()
    columns[column][1] = ""
    with pytest.raises(DataValidationError,
                       match=rf"toy: 1 problem\(s\) in the preference data:\n  "
                             rf"row 1 \(user 'u1'\): column '{column}' is empty"):
        check(columns)


@pytest.mark.parametrize("column, row, value, user", [
    ("user_id", 2, "", ""),          # an empty user id is itself the problem
    ("chosen", 0, None, "u0"),       # a missing value counts as empty
    ("chosen", 2, " \t\n ", "u2"),   # so does whitespace only
])
def test_empty_like_values(column, row, value, user):
    columns = clean_columns()
    columns[column][row] = value
    with pytest.raises(DataValidationError, match=rf"row {row} \(user '{user}'\): column '{column}' is empty"):
        check(columns)


def test_chosen_equal_to_rejected():
    columns = clean_columns()
    columns["rejected"][1] = columns["chosen"][1]
    with pytest.raises(DataValidationError,
                       match=r"row 1 \(user 'u1'\): columns 'chosen' and 'rejected' are identical"):
        check(columns)


def test_every_problem_is_listed_together():
    """Row 0 has an empty prompt, row 2 identical responses: one error with both, counted."""
    columns = clean_columns()
    columns["prompt"][0] = ""
    columns["rejected"][2] = columns["chosen"][2]
    with pytest.raises(DataValidationError, match=r"toy: 2 problem\(s\)") as err:
        check(columns)
    assert "row 0 (user 'u0'): column 'prompt' is empty" in str(err.value)
    assert "row 2 (user 'u2'): columns 'chosen' and 'rejected' are identical" in str(err.value)


@pytest.mark.parametrize("value", ["dev", None])
def test_bad_split_value(value):
    columns = {**clean_columns(), "split": ["train", value, "test"]}
    with pytest.raises(DataValidationError,
                       match=r"row 1 \(user 'u1'\): column 'split' must be one of \['train', 'test'\]"):
        check(columns)


def test_nan_in_embedding_names_row_and_user():
    columns = {**clean_columns(), **embeddings([[1.0, 2.0], [float("nan"), 1.0], [1.0, 1.0]])}
    with pytest.raises(DataValidationError,
                       match=r"toy: 1 problem\(s\).*\n  row 1 \(user 'u1'\): column 'chosen_emb' contains NaN or inf"):
        check(columns)


def test_inf_after_a_longer_row_is_attributed_to_its_own_row():
    """Row 0 has 3 values (the others 2), so flat positions are shifted; the inf is still row 2's."""
    columns = {**clean_columns(), **embeddings([[1.0, 2.0, 3.0], [1.0, 2.0], [1.0, float("inf")]])}
    with pytest.raises(DataValidationError, match=r"toy: 2 problem\(s\)") as err:
        check(columns)
    assert "row 0 (user 'u0'): column 'chosen_emb' has a length other than 2" in str(err.value)
    assert "row 2 (user 'u2'): column 'chosen_emb' contains NaN or inf" in str(err.value)


def test_embedding_length_mismatch():
    """Lengths 2, 3, 2: the most common length (2) is the expected one, row 1 is wrong."""
    columns = {**clean_columns(), **embeddings([[1.0, 2.0], [1.0, 2.0, 3.0], [1.0, 1.0]])}
    with pytest.raises(DataValidationError,
                       match=r"row 1 \(user 'u1'\): column 'chosen_emb' has a length other than 2"):
        check(columns)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_missing_embedding_names_row_and_user():
    columns = {**clean_columns(), **embeddings([[1.0, 2.0], None, [1.0, 1.0]])}
    with pytest.raises(DataValidationError, match=r"row 1 \(user 'u1'\): column 'chosen_emb' is missing"):
        check(columns)


def test_chosen_emb_without_rejected_emb():
    columns = {**clean_columns(), "chosen_emb": [[1.0], [2.0], [3.0]]}
    with pytest.raises(DataValidationError, match="column 'chosen_emb' is present but 'rejected_emb' is not"):
        check(columns)


def test_non_string_column_type():
    columns = {**clean_columns(), "user_id": [1, 2, 3]}
    with pytest.raises(DataValidationError, match="column 'user_id': expected strings, got int64"):
        check(columns)


def test_many_bad_rows_list_ten_then_count_the_rest():
    """13 rows with an empty 'chosen': rows 0-9 are listed one by one, rows 10-12 are counted, not named,
    and the total says 13."""
    n = 13
    columns = {"user_id": [f"u{i}" for i in range(n)], "prompt": ["p"] * n, "chosen": [""] * n,
               "rejected": ["r"] * n}
    with pytest.raises(DataValidationError) as err:
        check(columns)
    message = str(err.value)
    assert "row 9 (user 'u9'): column 'chosen' is empty" in message
    assert "row 10 " not in message
    assert "13 problem(s)" in message
    assert "... and 3 more rows where column 'chosen' is empty" in message


# ---- PreferenceData -----------------------------------------------------------------------------------------
def test_preference_data_derives_what_it_provides():
    """chosen_emb/rejected_emb give a feature table (3 rows x 2 responses = 6 unique items); three users give
    'users'; pair ids that never repeat across users give no shared pairs (PRISM), one that does gives them."""
    columns = {**clean_columns(), "pair_id": ["a", "b", "c"],
               **embeddings([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])}
    data = PreferenceData("toy", datasets.Dataset.from_dict(columns), provides=frozenset({cap.TEXT}))
    assert data.provides == {cap.TEXT, cap.FEATURES, cap.USERS}
    shared = {**columns, "pair_id": ["a", "a", "c"]}
    assert PreferenceData("toy", datasets.Dataset.from_dict(shared), provides=frozenset()).provides == {
        cap.FEATURES, cap.USERS, cap.SHARED_PAIRS}
    one_user = {**columns, "user_id": ["u0", "u0", "u0"]}  # an evaluation set such as RewardBench: no 'users'
    assert PreferenceData("toy", datasets.Dataset.from_dict(one_user), provides=frozenset()).provides == {
        cap.FEATURES}
    assert data.features.matrix.shape == (6, 2)
    assert data.n_rows == 3


def test_preference_data_without_optional_columns_provides_only_what_it_was_given():
    data = PreferenceData("toy", datasets.Dataset.from_dict(clean_columns()), provides=frozenset({cap.TEXT}))
    assert data.provides == {cap.TEXT, cap.USERS}
    assert data.features is None


def test_preference_data_validates_its_pairs():
    columns = clean_columns()
    columns["chosen"][0] = ""
    with pytest.raises(DataValidationError, match=r"mine: 1 problem\(s\) in the preference data:\n  row 0 \(user 'u0'\): column 'chosen'"):
        PreferenceData("mine", datasets.Dataset.from_dict(columns), provides=frozenset())


def test_oracle_of_the_wrong_length():
    with pytest.raises(DataValidationError, match="toy: oracle 'oracle/personal' has 2 logits for 3 rows"):
        PreferenceData("toy", datasets.Dataset.from_dict(clean_columns()), provides=frozenset(),
                       oracle_logits={"oracle/personal": [0.5, 1.0]})


# ---- PreferenceFiles --------------------------------------------------------------------------------------------
@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep datasets' builder cache inside the test's temp dir."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def records() -> list[dict]:
    c = clean_columns()
    return [dict(zip(c, values)) | {"pair_id": f"item{i}"} for i, values in enumerate(zip(*c.values()))]


def test_preference_files_reads_jsonl(tmp_path, hf_cache):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records()))
    data = PreferenceFiles(PreferenceFiles.Config(path=str(path))).load()
    assert data.n_rows == 3
    assert data.pairs["chosen"] == ["good 0", "good 1", "good 2"]
    assert data.provides == {cap.TEXT, cap.USERS}  # item0..item2: each pair id labelled by one user


def test_preference_files_reads_parquet(tmp_path, hf_cache):
    path = tmp_path / "pairs.parquet"
    pd.DataFrame(records()).to_parquet(path)
    data = PreferenceFiles(PreferenceFiles.Config(path=str(path))).load()
    assert data.pairs["user_id"] == ["u0", "u1", "u2"]
    assert data.name == str(path)


def test_preference_files_validates_what_it_reads(tmp_path, hf_cache):
    rows = records()
    rows[1]["rejected"] = rows[1]["chosen"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataValidationError,
                       match=r"pairs\.jsonl line 2 \(user 'u1'\): columns 'chosen' and 'rejected' are identical"):
        PreferenceFiles(PreferenceFiles.Config(path=str(path))).load()


def test_preference_files_missing_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataValidationError, match=f"data.path: no preference files at {re.escape(str(missing))} "
                                                  r"\(expected \['.csv', '.json', '.jsonl', '.parquet'\]\)"):
        PreferenceFiles(PreferenceFiles.Config(path=str(missing))).load()


def test_preference_files_mixed_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.parquet").write_text("")
    with pytest.raises(DataValidationError, match=r"files must all be one of .*got \['a.jsonl', 'b.parquet'\]"):
        PreferenceFiles(PreferenceFiles.Config(path=str(tmp_path))).load()


def test_preference_files_empty_file_is_named(tmp_path, hf_cache):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataValidationError, match=r"empty\.jsonl: empty file\(s\) \['empty.jsonl'\]"):
        PreferenceFiles(PreferenceFiles.Config(path=str(path))).load()


def test_preference_files_unreadable_file_is_named(tmp_path, hf_cache):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"user_id": "u0", "prompt": \n')
    with pytest.raises(DataValidationError,
                       match=r"^data\.path: broken\.jsonl line 1: not valid JSON \(it ends early: truncated\? "
                             r"a line must hold one whole object\)$"):
        PreferenceFiles(PreferenceFiles.Config(path=str(path))).load()


# ---- exact duplicate rows ------------------------------------------------------------------------------------
def rows_table(rows: list[tuple]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({c: [r[i] for r in rows] for i, c in enumerate(REQUIRED)})


def test_exact_duplicates_are_dropped_counted_and_reported():
    """Rows 2 and 4 repeat rows 0 and 1: both are dropped under one counted rule (per user too), the oracle's
    logits follow the kept rows, and the report names where the first copies are."""
    rows = [("u0", "p", "a", "b"), ("u1", "p", "a", "b"), ("u0", "p", "a", "b"), ("u0", "q", "a", "b"),
            ("u1", "p", "a", "b")]
    data = PreferenceData("toy", rows_table(rows), provides=frozenset(),
                          oracle_logits={"oracle/personal": np.arange(5, dtype=np.float32)})
    assert data.n_rows == 3
    assert data.pairs["user_id"] == ["u0", "u1", "u0"] and data.pairs["prompt"] == ["p", "p", "q"]
    assert data.oracle_logits["oracle/personal"].tolist() == [0.0, 1.0, 3.0]
    assert data.copies.tolist() == [2, 2, 1]  # repeated annotations stay countable (dataset statistics)
    report = data.load_report
    assert (report.read, report.kept, report.drops) == (5, 3, {DUPLICATES: 2})
    assert report.drops_by_user == {DUPLICATES: {"u0": 1, "u1": 1}}
    text = report.render()
    assert text.startswith("toy: read 5 rows, kept 3 pairs; dropped 2 rows:")
    assert "row 2 repeats row 0; row 4 repeats row 1" in text


def test_the_same_pair_with_chosen_and_rejected_swapped_is_not_a_duplicate():
    """(u, p, a, b) and (u, p, b, a): a contradiction, which is data; another user's identical row is data too."""
    data = PreferenceData("toy", rows_table([("u0", "p", "a", "b"), ("u0", "p", "b", "a"), ("u1", "p", "a", "b")]),
                          provides=frozenset())
    assert data.n_rows == 3
    assert data.load_report is None and data.copies is None
    assert len(duplicate_rows(data.pairs)[0]) == 0


def test_duplicates_error_names_each_repeat_and_its_first_copy():
    rows = [("u0", "p", "a", "b"), ("u0", "q", "a", "b"), ("u0", "q", "a", "b"), ("u0", "p", "a", "b")]
    with pytest.raises(DataValidationError, match=r"toy: 2 exact duplicate row\(s\) \(same user_id, prompt, chosen "
                                                  r"and rejected\): row 2 repeats row 1; row 3 repeats row 0\."):
        PreferenceData("toy", rows_table(rows), provides=frozenset(), duplicates="error")


def test_duplicates_join_a_published_sources_load_report():
    """A source's own report gains the rule; its 'read' (in its own unit) stays, 'kept' counts pairs kept."""
    report = LoadReport("toy", unit="comparisons", read=10, kept=3)
    report.drop("with a blank summary", np.array([True] * 7 + [False] * 3))
    data = PreferenceData("toy", rows_table([("u0", "p", "a", "b")] * 3), provides=frozenset(), load_report=report)
    assert data.load_report is report
    assert (report.read, report.kept, report.drops) == (10, 1, {"with a blank summary": 7, DUPLICATES: 2})


def test_after_dropping_duplicates_no_pair_is_in_both_train_and_test():
    """Every pair three times over: without the rule a per-user split would put copies on both sides."""
    rows = [(f"u{u}", f"p{i}", f"good {i}", f"bad {i}") for u in range(6) for i in range(10)]
    data = PreferenceData("toy", rows_table(rows * 3), provides=frozenset())
    assert data.n_rows == 60
    table = data.pairs.data.table
    split = make_split(table, seed=0, unseen_fraction=0.5, test_fraction=0.5, val_fraction=0.0, need_support=1)
    keys = list(zip(*(table[c].to_pylist() for c in REQUIRED)))
    assert len(set(keys)) == len(keys)
    train = {keys[r] for r in np.flatnonzero(split.role != TEST)}
    test = {keys[r] for r in split.rows(TEST)}
    assert train and test and not train & test


def test_rows_keep_their_names_after_duplicates_are_dropped():
    """Row 1 (a repeat of row 0) is dropped; a later problem on the row read as row 2 still says row 2."""
    columns = {**{c: [r[i] for r in [("u0", "p", "a", "b"), ("u0", "p", "a", "b"), ("u1", "p", "a", "c")]]
                  for i, c in enumerate(REQUIRED)},
               **embeddings([[1.0, 2.0], [1.0, 2.0], [1.0, 9.0]], [[0.0, 1.0], [0.0, 1.0], [5.0, 5.0]])}
    with pytest.raises(DataValidationError, match=r"row 0 \('chosen_emb'\) and row 2 \('chosen_emb'\) differ"):
        PreferenceData("toy", datasets.Dataset.from_dict(columns), provides=frozenset())


@pytest.mark.parametrize("load", [
    lambda: LowRankWorld(LowRankWorld.Config(n_users=40, pairs_per_user=10, n_train_prompts=100, n_test_prompts=20,
                                             test_prompts_per_user=5, feature_dim=16, n_functions=3)).load(),
    lambda: LowRankWorld(LowRankWorld.Config(n_users=40, pairs_per_user=10, n_train_prompts=100, n_test_prompts=20,
                                             feature_dim=16, n_functions=3, users_per_pair=8)).load(),
    lambda: LowRankWorld(LowRankWorld.Config(n_users=40, pairs_per_user=10, n_train_prompts=100, n_test_prompts=20,
                                             feature_dim=16, n_functions=3, pair_choice="random")).load(),
    lambda: AttributeWorld(AttributeWorld.Config(n_users=60, pairs_per_user=8, n_train_prompts=40,
                                                 n_test_prompts=12, test_pairs_per_user=4)).load(),
], ids=["lowrank-sparse", "lowrank-dense", "lowrank-random-pairs", "attribute"])
def test_synthetic_worlds_hold_no_duplicates(load):
    data = load()
    assert data.load_report is None
    assert len(duplicate_rows(data.pairs)[0]) == 0


# ---- one embedding per item ----------------------------------------------------------------------------------
def test_an_item_with_two_embeddings_is_refused_naming_it_and_both_rows():
    """Rows 0 and 2 both hold the item (p0, 'good 0'), with different chosen vectors."""
    columns = {**clean_columns(), **embeddings([[1.0, 2.0], [3.0, 4.0], [1.0, 2.5]])}
    columns["prompt"][2], columns["chosen"][2] = "p0", "good 0"
    with pytest.raises(DataValidationError) as err:
        PreferenceData("toy", datasets.Dataset.from_dict(columns), provides=frozenset())
    assert str(err.value) == (
        "toy: 1 (prompt, response) item(s) carry two different embeddings; an item must have one vector wherever "
        "it occurs:\n  item (prompt 'p0', response 'good 0'): row 0 ('chosen_emb') and row 2 ('chosen_emb') differ")


def test_an_item_as_chosen_in_one_row_and_rejected_in_another_is_checked_across_columns():
    columns = {**clean_columns(), **embeddings([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])}  # rejected: [0, 1] each
    columns["prompt"][1], columns["rejected"][1] = "p0", "good 0"  # row 1 rejects row 0's chosen item
    with pytest.raises(DataValidationError, match=r"row 0 \('chosen_emb'\) and row 1 \('rejected_emb'\) differ"):
        PreferenceData("toy", datasets.Dataset.from_dict(columns), provides=frozenset())


def test_the_same_vector_up_to_float_rounding_is_one_embedding():
    columns = {**clean_columns(), **embeddings([[0.1, 2.0], [3.0, 4.0], [0.1 + 1e-9, 2.0]])}
    columns["prompt"][2], columns["chosen"][2] = "p0", "good 0"
    data = PreferenceData("toy", datasets.Dataset.from_dict(columns), provides=frozenset())
    assert data.features.matrix.shape == (5, 2)  # 6 (row, response) slots, 5 items


def test_chosen_and_rejected_embeddings_of_different_lengths():
    columns = {**clean_columns(), **embeddings([[1.0, 2.0]] * 3, [[1.0, 2.0, 3.0], [1.0, 2.0], [1.0, 2.0]])}
    with pytest.raises(DataValidationError, match=r"row 0 \(user 'u0'\): column 'rejected_emb' has a length other "
                                                  r"than 2"):
        check(columns)


def test_embeddings_that_are_not_lists_of_numbers():
    with pytest.raises(DataValidationError, match=r"column 'chosen_emb': expected lists of numbers, got string"):
        check({**clean_columns(), **embeddings(["[1, 2]"] * 3, ["[1, 2]"] * 3)})


# ---- PreferenceFiles: what is read, and how rows are named ---------------------------------------------------
def test_preference_files_key_names_the_option_the_path_came_from(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataValidationError, match=r"^--pairs: no preference files at "):
        PreferenceFiles(PreferenceFiles.Config(path=str(missing)), key="--pairs").load()
    assert PreferenceFiles(PreferenceFiles.Config(path=str(missing))).key == "data.path"


def test_preference_files_skip_blank_lines_and_count_them_in_line_numbers(tmp_path, hf_cache):
    path = tmp_path / "pairs.jsonl"
    r = [json.dumps(x) for x in records()]
    path.write_text(f"\n{r[0]}\n\n   \n{r[1]}\n{r[0]}\n{r[2]}\n\n")
    data = PreferenceFiles(PreferenceFiles.Config(path=str(path))).load()
    assert data.n_rows == 3
    assert data.load_report.notes == ["duplicates dropped: pairs.jsonl line 6 repeats pairs.jsonl line 2"]
    assert [data.row_label(i) for i in range(3)] == ["pairs.jsonl line 2", "pairs.jsonl line 5",
                                                     "pairs.jsonl line 7"]


def test_preference_files_duplicates_option(tmp_path, hf_cache):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records() + records()[:1]))
    with pytest.raises(DataValidationError, match=r"pairs\.jsonl line 4 repeats pairs\.jsonl line 1"):
        PreferenceFiles(PreferenceFiles.Config(path=str(path), duplicates="error")).load()
    assert PreferenceFiles(PreferenceFiles.Config(path=str(path))).load().n_rows == 3


def test_preference_files_csv_cells_are_text(tmp_path, hf_cache):
    """Numeric-looking ids stay strings, and 'NA' / 'None' are the words they are, not missing values."""
    path = tmp_path / "pairs.csv"
    path.write_text("user_id,prompt,chosen,rejected\n1,NA,None,null\n2,\"multi\nline\",0,1\n")
    data = PreferenceFiles(PreferenceFiles.Config(path=str(path))).load()
    assert data.pairs["user_id"] == ["1", "2"]
    assert (data.pairs["prompt"], data.pairs["chosen"]) == (["NA", "multi\nline"], ["None", "0"])


def test_preference_files_directory_names_the_file_of_each_row(tmp_path, hf_cache):
    rows = [json.dumps(r) for r in records()]
    (tmp_path / "a.jsonl").write_text(rows[0] + "\n" + rows[1] + "\n")
    bad = {**records()[2], "rejected": "good 2"}
    (tmp_path / "b.jsonl").write_text("\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataValidationError, match=r"b\.jsonl line 2 \(user 'u2'\): columns 'chosen' and 'rejected'"):
        PreferenceFiles(PreferenceFiles.Config(path=str(tmp_path))).load()


def test_preference_files_parquet_text_that_is_not_utf8(tmp_path, hf_cache):
    path = tmp_path / "pairs.parquet"
    prompts = pa.array([b"p0", b"caf\xe9", b"p2"], pa.binary()).view(pa.string())  # written without a check
    pq.write_table(pa.table({"user_id": ["u0", "u1", "u2"], "prompt": prompts, "chosen": ["a"] * 3,
                             "rejected": ["b"] * 3}), path)
    with pytest.raises(DataValidationError, match=r"^data\.path: pairs\.parquet row 1: column 'prompt' holds text "
                                                  r"that is not UTF-8"):
        PreferenceFiles(PreferenceFiles.Config(path=str(path))).load()
