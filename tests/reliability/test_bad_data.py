"""Bad preference files: each is refused by ``plrm fit`` before any work with one error (exit 2, no traceback)
that names the file, the line (or record) and what is wrong, and nothing is written (no run directory).

Every case writes one small file into the working directory, next to a tiny recipe that reads it with the
``preference_files`` dataset and the ``precomputed`` backbone (the file's chosen_emb / rejected_emb columns).
The first test checks that the same recipe runs on a clean file, so a refusal below is about the file alone.
"""

from __future__ import annotations

import json

import datasets
import pytest
from harness import assert_bad_input, tree_digest  # tests/reliability/harness.py (conftest puts it on the path)

RECIPE = """description: a tiny fit on one local preference file
run: {{name: files}}
data: {{name: preference_files, path: {path}}}
backbone: {{name: precomputed}}
split: {{seeds: [0], k: 2}}
eval: {{k_list: [1, 2]}}
methods:
  bt: {{max_epochs: 1, batch_size: 64}}
logger: {{kind: none}}
trainer: {{progress_bar: false, num_threads: 1}}
"""


def record(user: int, i: int, **changes) -> dict:
    """One clean canonical row with 4-d embeddings that differ per item."""
    return {"user_id": f"u{user}", "prompt": f"prompt {user}-{i}", "chosen": f"good answer {i}",
            "rejected": f"bad answer {i}", "chosen_emb": [1.0, float(i), 0.5, user / 10],
            "rejected_emb": [0.0, float(-i), 0.25, user / 10], **changes}


def clean_rows() -> list[dict]:
    return [record(u, i) for u in range(12) for i in range(8)]


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def csv_text(lines: list[str]) -> bytes:
    return ("user_id,prompt,chosen,rejected\n" + "".join(line + "\n" for line in lines)).encode()


def lines(*parts: bytes | str) -> bytes:
    return b"".join((p if isinstance(p, bytes) else p.encode()) + b"\n" for p in parts)


ROWS = [json.dumps(r) for r in clean_rows()]

# (case id, file name, its bytes, extra overrides, texts the one-line error must contain)
BAD_FILES = [
    ("jsonl-not-utf8", "pairs.jsonl", lines(ROWS[0], ROWS[1], ROWS[2].replace("prompt 0-2", "caf\udcff").encode(
        "utf-8", "surrogateescape"), *ROWS[3:]), [],
     ["pairs.jsonl line 3: not UTF-8 (byte 0xff at offset", "save the file as UTF-8"]),
    ("csv-not-utf8", "pairs.csv", csv_text(["u0,p0,a,b", "u1,p1,a,b"]) + b"u1,caf\xe9,a,b\n", [],
     ["pairs.csv line 4: not UTF-8 (byte 0xe9 at offset 6"]),
    ("jsonl-truncated", "pairs.jsonl", lines(*ROWS[:6], ROWS[6][:40]), [],
     ["pairs.jsonl line 7: not valid JSON (it ends early: truncated? a line must hold one whole object)"]),
    ("jsonl-broken-mid-file", "pairs.jsonl", lines(ROWS[0], ROWS[1].replace(", ", " ", 1), *ROWS[2:]), [],
     ["pairs.jsonl line 2: not valid JSON (Expecting ',' delimiter at column"]),
    ("jsonl-scalar-line", "pairs.jsonl", lines(ROWS[0], "42", *ROWS[1:]), [],
     ["pairs.jsonl line 2: a JSON object per line is expected, got a number"]),
    ("jsonl-list-line", "pairs.jsonl", lines(*ROWS[:4], '["u0", "p", "a", "b"]', *ROWS[4:]), [],
     ["pairs.jsonl line 5: a JSON object per line is expected, got a list"]),
    ("jsonl-only-blank-lines", "pairs.jsonl", b"\n  \n\n", [],
     ["pairs.jsonl: no preference pairs (the file holds only blank lines)"]),
    ("empty-file", "pairs.jsonl", b"", [], ["empty file(s) ['pairs.jsonl']"]),
    ("csv-header-only", "pairs.csv", csv_text([]), [], ["pairs.csv: a header line but no rows"]),
    ("csv-extra-field", "pairs.csv", csv_text(["u0,p0,a,b", "u1,p1,a,b,c"]), [],
     ["pairs.csv line 3: 5 field(s), but the header line has 4"]),
    ("jsonl-number-user-id", "pairs.jsonl", lines(*ROWS[:2], json.dumps(record(1, 0, user_id=7)), *ROWS[2:]), [],
     ["pairs.jsonl line 3: column 'user_id' is a number, expected a string"]),
    # blank lines are skipped, and still counted in line numbers
    ("jsonl-identical-responses-after-blank-lines", "pairs.jsonl",
     lines(ROWS[0], "", ROWS[1], "", json.dumps(record(0, 2, rejected="good answer 2")), *ROWS[3:]), [],
     ["pairs.jsonl line 5 (user 'u0'): columns 'chosen' and 'rejected' are identical"]),
    # a quoted text across two lines: the next record starts two lines further down
    ("csv-empty-prompt-after-multiline-text", "pairs.csv",
     csv_text(['u0,"a prompt\nover two lines",a,b', "u1,p1,a,b", "u2,,a,b"]), [],
     ["pairs.csv line 5 (user 'u2'): column 'prompt' is empty"]),
    ("json-array-scalar-record", "pairs.json", json.dumps([record(0, 0), 3, record(0, 1)]).encode(), [],
     ["pairs.json record 2: a JSON object per record is expected, got a number"]),
    ("jsonl-embedding-length", "pairs.jsonl",
     lines(*ROWS[:9], json.dumps(record(1, 1, chosen_emb=[1.0, 2.0])), *ROWS[10:]), [],
     ["pairs.jsonl line 10 (user 'u1'): column 'chosen_emb' has a length other than 4"]),
    ("jsonl-two-embeddings-of-one-item", "pairs.jsonl",
     lines(*ROWS[:20], json.dumps(record(2, 4, prompt="prompt 0-1", chosen="good answer 1")), *ROWS[21:]), [],
     ["(prompt 'prompt 0-1', response 'good answer 1')", "pairs.jsonl line 2 ('chosen_emb')",
      "pairs.jsonl line 21 ('chosen_emb') differ"]),
    ("jsonl-duplicates-refused", "pairs.jsonl", lines(*ROWS, ROWS[3], ROWS[40]), ["data.duplicates=error"],
     ["2 exact duplicate row(s)", "pairs.jsonl line 97 repeats pairs.jsonl line 4",
      "pairs.jsonl line 98 repeats pairs.jsonl line 41"]),
    ("csv-embedding-columns", "pairs.csv",
     b"user_id,prompt,chosen,rejected,chosen_emb,rejected_emb\nu0,p,a,b,\"[1, 2]\",\"[3, 4]\"\n", [],
     ["column 'chosen_emb': expected lists of numbers, got string",
      "a CSV file cannot hold embeddings; use parquet or jsonl"]),
]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path_factory, monkeypatch):
    """datasets' builder cache outside the working directory (whose every byte the cases compare)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-cache"))


def write_recipe(workdir, data_path: str) -> str:
    (workdir / "recipe.yaml").write_text(RECIPE.format(path=data_path))
    return str(workdir / "recipe.yaml")


def test_the_recipe_runs_on_a_clean_file_and_drops_duplicates_with_a_report(workdir, plrm_cmd):
    """The control of the table below; exact repeats (rows 4 and 41 again at the end) are dropped, counted in
    the load report printed to stderr and stored in results.json."""
    (workdir / "pairs.jsonl").write_bytes(lines(*ROWS, ROWS[3], ROWS[40]))
    outcome = plrm_cmd("fit", "--recipe", write_recipe(workdir, "pairs.jsonl"))
    assert outcome.code == 0, outcome.err
    assert "pairs.jsonl: read 98 rows, kept 96 pairs; dropped 2 rows:" in outcome.err
    assert "- 2 exact duplicates of an earlier row (same user_id, prompt, chosen and rejected" in outcome.err
    assert "pairs.jsonl line 97 repeats pairs.jsonl line 4; pairs.jsonl line 98 repeats pairs.jsonl line 41" \
        in outcome.err
    data = json.loads((workdir / "runs" / "files" / "results.json").read_text())["data"]
    assert (data["read"], data["kept"], sum(data["drops"].values())) == (98, 96, 2)


@pytest.mark.parametrize("name, content, overrides, needles", [c[1:] for c in BAD_FILES],
                         ids=[c[0] for c in BAD_FILES])
def test_a_bad_file_is_refused_naming_file_and_line(workdir, plrm_cmd, name, content, overrides, needles):
    (workdir / name).write_bytes(content)
    recipe = write_recipe(workdir, name)
    before = tree_digest(workdir)
    outcome = plrm_cmd("fit", "--recipe", recipe, *overrides)
    assert_bad_input(outcome, "plrm fit: error: ", *needles)
    assert outcome.err.count("error") == 1, outcome.err  # one message, no log lines of the reader before it
    assert tree_digest(workdir) == before  # no run directory, nothing else touched
