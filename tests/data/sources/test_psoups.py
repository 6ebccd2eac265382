"""P-SOUPS source on a fixture laid out as the RLPHF data zip (fixtures/psoups/rm_training/P*.json; P1B.json is
JSON Lines, the others JSON arrays): the preference prompt stripped, completion_a preferred, drops per rule and
profile, order-free pair ids shared by opposite profiles, P-RLHF's split, the no-path message, the Hub code path,
malformed files, and `plrm fit` through the psoups/lore recipe.

Fixture (28 rows): P1A has 6 rows -- row 1 repeats row 0, row 2 has completion_a == completion_b, row 4
("What is rain?") lacks the preference prompt; P2B has 5 -- row 4 repeats row 3; P3A has 5 -- row 4 has a blank
completion_a; P1B, P2A and P3B have 4. Every kept question of P1A / P2A / P3A appears in P1B / P2B / P3B with the
two completions swapped.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from plrm import runner
from plrm.data.published import DataUnavailableError, order_free_pair_ids
from plrm.data.schema import DataValidationError
from plrm.data.sources.psoups import PREFERENCE_PROMPTS, PROFILES, PersonalizedSoups, prlhf_test_rows

FIXTURE = Path(__file__).parent / "fixtures" / "psoups"

PHOTO = ("Explain photosynthesis.", "Plants cook food from sunlight.", "Photons drive the Calvin cycle to fix CO2.")
MAGNET = ("How do magnets work?", "Magnets pull iron like glue you cannot see.",
          "Aligned electron spins produce a macroscopic field.")
RAIN = ("What is rain?", "Water falling from clouds.", "Precipitation from condensed vapour.")
SKY = ("Why is the sky blue?", "Air bounces blue light around.",
       "Rayleigh scattering scales as the inverse fourth power of wavelength.")
PASTA = ("Give me a pasta tip.", "Salt the water.",
         "Salt the water generously, since pasta absorbs it while cooking and the sauce alone cannot season it.")
FOCUS = ("How do I stay focused?", "Silence your phone.",
         "Silence your phone, plan short blocks of work and take breaks, because attention fades after an hour.")
HAIKU = ("What is a haiku?", "A 5-7-5 poem.",
         "A Japanese poem of three lines with five, seven and five syllables, often about nature.")
PURR = ("Why do cats purr?", "Mostly contentment.",
        "Cats purr when content but also when stressed or healing, as the vibration may aid recovery.")
BOOK = ("Recommend a book.", "Grab a cosy mystery, you'll love the twists, trust me!", "Read something. Whatever.")
TYRE = ("How do I fix a flat tyre?", "Oh no, flat tyre drama! Patch kit to the rescue, buddy.",
        "Patch it yourself. Obviously.")
COFFEE = ("Is coffee healthy?", "In moderation, coffee is your cheerful morning sidekick!", "Look it up.")
COOK = ("What should I cook?", "Pancakes! Breakfast for dinner is a party.", "Cook whatever you have.")


def swapped(item):
    question, a, b = item
    return question, b, a


# (user_id, prompt, chosen, rejected) of every kept row, in file order: the "A" pole prefers the first text above
EXPECTED = ([("P1A", *t) for t in (PHOTO, MAGNET, RAIN, SKY)]
            + [("P1B", *swapped(t)) for t in (PHOTO, MAGNET, SKY, RAIN)]
            + [("P2A", *t) for t in (PASTA, FOCUS, HAIKU, PURR)]
            + [("P2B", *swapped(t)) for t in (PASTA, FOCUS, HAIKU, PURR)]
            + [("P3A", *t) for t in (BOOK, TYRE, COFFEE, COOK)]
            + [("P3B", *swapped(t)) for t in (BOOK, TYRE, COFFEE, COOK)])
DROPS = {"with completion_a == completion_b": {"P1A": 1},
         "repeating an earlier row of the same profile": {"P1A": 1, "P2B": 1},
         "with a blank question or completion (question: after the preference prompt is removed)": {"P3A": 1}}


def load(path=FIXTURE, **options):
    return PersonalizedSoups(PersonalizedSoups.Config(path=str(path), **options)).load()


def test_canonical_rows_opposite_profiles_share_pair_ids_and_drops_are_counted(tmp_path):
    local = shutil.copytree(FIXTURE, tmp_path / "data")  # data.path: the unzipped data/ folder
    data = load(local)
    df = data.pairs.to_pandas()
    assert list(df.columns) == ["user_id", "prompt", "chosen", "rejected", "pair_id", "split"]
    assert list(zip(df.user_id, df.prompt, df.chosen, df.rejected)) == EXPECTED
    # 12 items, each judged by the two poles of one dimension with opposite labels
    groups = sorted(sorted(g) for g in df.groupby("pair_id").groups.values())
    assert groups == sorted([[0, 4], [1, 5], [2, 7], [3, 6]] + [[i, i + 4] for i in (8, 9, 10, 11, 16, 17, 18, 19)])
    for first, second in groups:
        assert (df.chosen[first], df.rejected[first]) == (df.rejected[second], df.chosen[second])
    assert df.pair_id.tolist() == order_free_pair_ids(df.prompt, df.chosen, df.rejected).tolist()

    rep = data.load_report
    assert (rep.source, rep.unit, rep.read, rep.kept) == ("psoups", "rows", 28, 24)
    assert rep.drops_by_user == DROPS
    assert rep.drops == {reason: sum(users.values()) for reason, users in DROPS.items()}
    assert "1 kept row(s) without their profile's preference prompt in user_input (kept as written, as P-RLHF): " \
           "P1A 1" in rep.notes
    assert data.provides >= {"text", "shared_pairs"}


def test_prlhf_split_is_the_held_out_tenth_of_shuffle_then_train_test_split():
    """P-RLHF splits its own 25 rows (after a == b and repeats; the blank row, its 21st, is dropped only after).
    datasets' shuffle(seed=123) permutes them by perm = default_rng(123).permutation(25);
    train_test_split(test_size=0.1, seed=123) then holds out ceil(0.1 x 25) = 3 rows of the shuffled set at the
    positions perm[:3] (the same generator again): original rows perm[perm[:3]] = 4, 5 and 10, which keep their
    positions once row 20 is dropped."""
    perm = np.random.default_rng(123).permutation(25)
    assert sorted(perm[perm[:math.ceil(0.1 * 25)]]) == [4, 5, 10]
    assert sorted(prlhf_test_rows(25, 0.1, 123)) == [4, 5, 10]
    df = load().pairs.to_pandas()
    assert np.flatnonzero(df.split == "test").tolist() == [4, 5, 10]


def test_split_mode_none_and_a_subset_of_profiles():
    data = load(split_mode="none", profiles=["P2B", "P2A"])
    df = data.pairs.to_pandas()
    assert "split" not in df.columns
    assert df.user_id.tolist() == ["P2A"] * 4 + ["P2B"] * 4  # always in profile order
    assert data.load_report.read == 9 and data.load_report.drops_by_user == {
        "repeating an earlier row of the same profile": {"P2B": 1}}
    with pytest.raises(ValueError, match=r"profiles must be distinct names of \['P1A', .*got \['P4A'\]"):
        PersonalizedSoups.Config(profiles=["P4A"])


def test_without_a_path_the_error_says_psoups_is_not_on_the_hub():
    with pytest.raises(DataUnavailableError, match=r"psoups: P-SOUPS is not on the Hugging Face Hub, so "
                                                  r"data.repo_id is empty by default\. Download https://storage"
                                                  r"\.googleapis\.com/personalized-soups/data\.zip .*set data\.path"):
        PersonalizedSoups(PersonalizedSoups.Config()).load()


def test_hub_code_path_for_a_mirror_laid_out_as_the_zip(fake_hub):
    calls = fake_hub(FIXTURE)
    data = PersonalizedSoups(PersonalizedSoups.Config(repo_id="someone/psoups-copy", revision="v1")).load()
    assert calls == [("someone/psoups-copy", {"repo_type": "dataset", "revision": "v1", "allow_patterns":
                                              [f"rm_training/{p}.json" for p in PROFILES]})]
    assert data.load_report.kept == 24


def test_explicit_files_are_named_by_profile(tmp_path):
    files = [str(FIXTURE / "rm_training" / f"{p}.json") for p in ("P3A", "P3B")]
    data = PersonalizedSoups(PersonalizedSoups.Config(files=files, profiles=["P3A", "P3B"])).load()
    assert data.load_report.kept == 8
    with pytest.raises(DataValidationError, match=r"psoups: no file for profile\(s\) \['P1A', 'P1B', 'P2A', "
                                                  r"'P2B'\] .*set data.profiles to read fewer"):
        PersonalizedSoups(PersonalizedSoups.Config(files=files)).load()
    odd = tmp_path / "extra.json"
    shutil.copy(files[0], odd)
    with pytest.raises(DataValidationError, match=r"extra.json: the file name must be a requested profile"):
        PersonalizedSoups(PersonalizedSoups.Config(files=[str(odd)], profiles=["P3A"])).load()


# ---- malformed files: file, row and column named -----------------------------------------------------------------
def broken_copy(tmp_path, profile, write) -> Path:
    root = Path(shutil.copytree(FIXTURE, tmp_path / "broken"))
    path = root / "rm_training" / f"{profile}.json"
    write(path, json.loads(path.read_text()))
    return root


def test_malformed_files_name_file_row_and_column(tmp_path):
    def null_completion(path, rows):
        rows[2]["completion_a"] = None
        path.write_text(json.dumps(rows))

    root = broken_copy(tmp_path / "a", "P2A", null_completion)
    with pytest.raises(DataValidationError, match=r"psoups: .*rm_training/P2A.json: column 'completion_a' is "
                                                  r"missing or not a string in 1 row\(s\): row 2"):
        load(root)

    root = broken_copy(tmp_path / "b", "P3A", lambda path, rows: path.write_text(
        json.dumps([{k: v for k, v in r.items() if k != "completion_b"} for r in rows])))
    with pytest.raises(DataValidationError, match=r"P3A.json: missing column\(s\) \['completion_b'\]; found "
                                                  r"\['user_input', 'completion_a'\]"):
        load(root)

    root = broken_copy(tmp_path / "c", "P3B", lambda path, rows: path.write_text("{not json\n"))
    with pytest.raises(DataValidationError, match=r"psoups: cannot read .*P3B.json as a JSON array or JSON Lines"):
        load(root)

    root = broken_copy(tmp_path / "d", "P3B", lambda path, rows: path.unlink())
    with pytest.raises(DataValidationError, match=r"psoups: no file for profile\(s\) \['P3B'\]"):
        load(root)


def test_preference_prompts_are_p_rlhf_s_exact_strings():
    assert PREFERENCE_PROMPTS["P1B"] == \
        "Generate a response that only a PhD Student in that specific field could understand."
    assert PREFERENCE_PROMPTS["P3B"] == "Generate a response in an unfriendly manner."
    assert PROFILES == ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B")


# ---- the recipe, end to end on the fixture -----------------------------------------------------------------------
def test_psoups_lore_recipe_runs_on_the_fixture_and_records_the_load_report(tmp_path):
    """P-RLHF's split with a 0.3 hold-out and seed 5 gives each of the six profiles 1-2 test pairs and 2-3 train
    pairs on this fixture (with 0.1, only 3 rows and so three profiles would have test pairs)."""
    overrides = [f"data.path={FIXTURE}", "data.prlhf_test_size=0.3", "data.prlhf_seed=5", "logger.kind=none",
                 f"run.output_dir={tmp_path}", "trainer.progress_bar=false", "methods.bt.max_epochs=2",
                 "methods.lore.max_epochs=2"]
    result = runner.fit("psoups/lore", overrides, show=False)
    saved = json.loads((result.run_dir / "results.json").read_text())
    assert saved["data"]["source"] == "psoups" and saved["data"]["kept"] == 24
    assert saved["data"]["drops_by_user"] == DROPS
    for method in ("bt", "lore"):
        assert result.per_seed[0][method]["seen"]["n_users"] == 6
        assert result.per_seed[0][method]["unseen"] is None  # Dong et al. (arXiv 2502.19158) evaluate P-SOUPS users as seen users


@pytest.mark.slow
def test_psoups_lm_recipe_runs_the_lm_methods_on_the_fixture(tmp_path):
    """psoups/lm (P-DPO, GenARM, personalized GenARM) on the fixture, a tiny random LM in SmolLM2's place."""
    overrides = [f"data.path={FIXTURE}", "data.prlhf_test_size=0.3", "data.prlhf_seed=5", "logger.kind=none",
                 f"run.output_dir={tmp_path}", "trainer.progress_bar=false", "backbone.model=tiny-random:qwen2"]
    result = runner.fit("psoups/lm", overrides, show=False)
    for method in ("pdpo", "genarm", "genarm_user"):
        seen = result.per_seed[0][method]["seen"]
        assert seen["n_users"] == 6 and 0 <= seen["accuracy"] <= 1
