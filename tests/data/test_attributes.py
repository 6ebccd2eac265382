"""The attribute text world (plrm/data/attributes.py) against its own ground truth and its text."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from plrm import capabilities as cap
from plrm import registry
from plrm.data.attributes import ATTRIBUTES, TOPICS, AttributeWorld, prompt_capacity
from plrm.data.schema import REQUIRED

SMALL = AttributeWorld.Config(n_users=60, pairs_per_user=8, n_train_prompts=40, n_test_prompts=12,
                              test_pairs_per_user=4)
ALL_ATTRIBUTES = list(ATTRIBUTES)


def world(**changes):
    return AttributeWorld(dataclasses.replace(SMALL, **changes)).load()


@pytest.fixture(scope="module")
def small():
    return world()


@pytest.fixture(scope="module")
def default():
    return registry.datasets.get("attribute_world")(AttributeWorld.Config()).load()


@pytest.fixture(scope="module")
def every_attribute():
    """All five attributes: 32 combinations, 8 per prompt."""
    return world(attributes=ALL_ATTRIBUTES)


def item_index(data) -> dict[tuple[str, str], tuple[int, int]]:
    """(prompt text, response text) -> (prompt number, response number), from the world's truth."""
    prompts, responses = data.truth["prompts"], data.truth["responses"]
    return {(prompts[p], responses[p, r]): (p, r) for p in range(responses.shape[0]) for r in range(responses.shape[1])}


def user_numbers(data) -> np.ndarray:
    return np.asarray([int(u.removeprefix("user")) for u in data.pairs["user_id"]])


def true_rewards(data, column: str) -> np.ndarray:
    """w_u . a(y) of each row's ``column`` response for the row's user, recomputed from the truth."""
    index = item_index(data)
    items = np.asarray([index[prompt, response] for prompt, response in zip(data.pairs["prompt"], data.pairs[column])])
    attributes = data.truth["item_attributes"][items[:, 0], items[:, 1]]  # (rows, A)
    return np.einsum("na,na->n", attributes, data.truth["user_weights"][user_numbers(data)])


def items_with(data, attribute: str, pole: int) -> list[str]:
    """Every response text whose ``attribute`` is at ``pole``."""
    column = data.truth["attributes"].index(attribute)
    return list(data.truth["responses"][data.truth["item_attributes"][..., column] == pole])


# ---- loading and the canonical schema ------------------------------------------------------------------------
def test_loads_through_the_registry_with_the_canonical_columns(default):
    """Default: 200 users x (20 train + 10 test) pairs."""
    assert registry.datasets.get("attribute_world") is AttributeWorld
    assert default.n_rows == 200 * (20 + 10)
    assert set(default.pairs.column_names) == {*REQUIRED, "pair_id", "reference", "split"}
    assert default.provides == {cap.TEXT, cap.ORACLE, cap.SHARED_PAIRS, cap.REFERENCE, cap.USERS}
    assert default.features is None
    assert set(default.oracle_logits) == {"oracle/personal", "oracle/non-personalized"}
    assert set(default.pairs["split"]) == {"train", "test"}
    assert default.truth["attributes"] == ["length", "formality", "expertise", "style"]


def test_same_seed_same_world_and_another_seed_differs(small):
    again = world()
    assert again.pairs.data.table.equals(small.pairs.data.table)
    for key, logits in small.oracle_logits.items():
        np.testing.assert_array_equal(again.oracle_logits[key], logits)
    other = world(seed=1)
    assert other.truth["prompts"] != small.truth["prompts"]
    assert not np.array_equal(other.truth["user_weights"], small.truth["user_weights"])
    assert other.pairs["chosen"] != small.pairs["chosen"]


def test_users_judge_distinct_prompts_and_test_prompts_are_not_train_prompts(small):
    table = small.pairs.to_pandas()
    per_user = table.groupby(["user_id", "split"])["prompt"].agg(["size", "nunique"]).reset_index()
    assert (per_user["size"] == per_user["nunique"]).all()
    assert (per_user.loc[per_user["split"] == "train", "size"] == 8).all()
    assert (per_user.loc[per_user["split"] == "test", "size"] == 4).all()
    prompts = small.truth["prompts"]
    assert len(set(prompts)) == len(prompts) == 40 + 12
    assert set(table.loc[table["split"] == "train", "prompt"]) <= set(prompts[:40])
    assert set(table.loc[table["split"] == "test", "prompt"]) <= set(prompts[40:])


# ---- ground truth: items, users, labels, oracles ------------------------------------------------------------
def test_each_prompt_has_distinct_combinations_and_every_attribute_varies(every_attribute):
    attributes = every_attribute.truth["item_attributes"]  # (P, R, A)
    assert attributes.shape == (52, 8, 5)
    assert set(np.unique(attributes)) == {-1, 1}
    for combos in attributes:
        assert len({tuple(a) for a in combos}) == 8
        assert any((combos == -a).all(axis=1).any() for a in combos)  # a combination and its opposite
    assert (attributes.min(axis=1) == -1).all() and (attributes.max(axis=1) == 1).all()


def test_users_weigh_a_few_attributes_with_opposing_signs():
    """attributes_per_user = 2 of 4: two nonzero weights per user, magnitudes in [0.5, 1.5], and each attribute
    has users at both poles, so the population mean is far smaller than any user's weight."""
    weights = world(n_users=400).truth["user_weights"]
    assert weights.shape == (400, 4)
    assert ((weights != 0).sum(axis=1) == 2).all()
    magnitudes = np.abs(weights[weights != 0])
    assert magnitudes.min() >= 0.5 and magnitudes.max() <= 1.5
    assert ((weights > 0).sum(axis=0) > 50).all() and ((weights < 0).sum(axis=0) > 50).all()
    assert np.abs(weights.mean(axis=0)).max() < 0.2


def test_extremes_chosen_is_strictly_better_for_the_user(small):
    """No ties: the chosen response's true reward beats the rejected one's on every row."""
    gap = true_rewards(small, "chosen") - true_rewards(small, "rejected")
    assert (gap > 0).all()
    np.testing.assert_allclose(small.oracle_logits["oracle/personal"], gap, rtol=1e-5, atol=1e-5)


def test_non_personalized_oracle_uses_the_population_mean_weights(small):
    index = item_index(small)
    rows = zip(small.pairs["prompt"], small.pairs["chosen"], small.pairs["rejected"])
    attributes = small.truth["item_attributes"]
    diff = np.asarray([attributes[index[p, c]] - attributes[index[p, r]] for p, c, r in rows])  # (rows, A)
    expected = diff @ small.truth["user_weights"].mean(axis=0)
    np.testing.assert_allclose(small.oracle_logits["oracle/non-personalized"], expected, rtol=1e-5, atol=1e-5)


def test_reference_is_the_users_best_response_to_the_prompt(small):
    index = item_index(small)
    prompt_number = np.asarray([index[p, r][0] for p, r in zip(small.pairs["prompt"], small.pairs["reference"])])
    scores = np.einsum("nra,na->nr", small.truth["item_attributes"][prompt_number],
                       small.truth["user_weights"][user_numbers(small)])  # (rows, R): every response of the prompt
    np.testing.assert_allclose(true_rewards(small, "reference"), scores.max(axis=1))
    assert (true_rewards(small, "reference") >= true_rewards(small, "chosen")).all()


def test_personal_oracle_is_perfect_and_the_population_is_near_chance(default):
    """The population-mean weights are close to 0 (opposing users), so they rank a user's pairs about at random."""
    test = np.asarray(default.pairs["split"]) == "test"
    personal = (default.oracle_logits["oracle/personal"][test] > 0).mean()
    population = (default.oracle_logits["oracle/non-personalized"][test] > 0).mean()
    assert personal == 1.0
    assert 0.3 < population < 0.8


def test_pair_id_names_the_same_item_pair_across_users(small):
    df = small.pairs.to_pandas()
    df["items"] = [frozenset(pair) for pair in zip(df["chosen"], df["rejected"])]
    per_pair = df.groupby("pair_id").agg(prompts=("prompt", "nunique"), items=("items", "nunique"),
                                         users=("user_id", "nunique"), orders=("chosen", "nunique"))
    assert (per_pair["prompts"] == 1).all() and (per_pair["items"] == 1).all()
    assert (df.groupby(["prompt", "items"])["pair_id"].nunique() == 1).all()
    assert (per_pair["users"] > 1).any()
    assert (per_pair["orders"] == 2).any()  # users disagree about a shared pair


def test_bradley_terry_flips_some_pairs_reproducibly(small):
    """Same pairs as 'extremes' (the flips are drawn last); the personal oracle is right exactly where no flip."""
    bt = world(labels="bradley_terry", bt_temperature=2.0)
    assert bt.pairs["pair_id"] == small.pairs["pair_id"]
    personal = bt.oracle_logits["oracle/personal"]
    assert 0.5 < (personal > 0).mean() < 1.0
    flipped = np.asarray(bt.pairs["chosen"]) != np.asarray(small.pairs["chosen"])
    np.testing.assert_array_equal(personal <= 0, flipped)
    np.testing.assert_allclose(np.abs(personal), small.oracle_logits["oracle/personal"], rtol=1e-6)
    assert world(labels="bradley_terry", bt_temperature=2.0).pairs.data.table.equals(bt.pairs.data.table)


# ---- the attributes are visible in the text -----------------------------------------------------------------
def sentences(text: str) -> int:
    return len(re.findall(r"[.!?](?:\s|$)", text))


def test_every_response_of_a_prompt_differs_and_mentions_its_topic(every_attribute):
    responses, topics = every_attribute.truth["responses"], every_attribute.truth["topics"]
    for topic, texts in zip(topics, responses):
        assert len(set(texts)) == len(texts)
        assert all(topic in text.lower() for text in texts)
    assert len(set(topics)) > 10  # prompts draw on many topics


def test_length_short_is_one_sentence_and_long_three_to_five(every_attribute):
    assert {sentences(t) for t in items_with(every_attribute, "length", -1)} == {1}
    assert {sentences(t) for t in items_with(every_attribute, "length", 1)} == {3, 4, 5}
    # Words: within a prompt, every long response is longer than every short one of the same expertise and tone
    # (those fix the lead sentence and the opener; formality only swaps an opener and contracts a few words).
    truth = every_attribute.truth
    words = np.vectorize(lambda text: len(text.split()))(truth["responses"])  # (P, R)
    length, expertise, tone = (truth["item_attributes"][..., truth["attributes"].index(a)]
                               for a in ("length", "expertise", "tone"))
    compared = 0
    for p, e, t in np.ndindex(words.shape[0], 2, 2):
        same = (expertise[p] == 2 * e - 1) & (tone[p] == 2 * t - 1)
        long, short = words[p][same & (length[p] == 1)], words[p][same & (length[p] == -1)]
        if len(long) and len(short):
            assert long.min() > short.max()
            compared += 1
    assert compared > 50


def test_formal_has_no_contractions_and_casual_does(every_attribute):
    formal, casual = items_with(every_attribute, "formality", 1), items_with(every_attribute, "formality", -1)
    casual_words = re.compile(r"\b(hey|basically)\b", re.IGNORECASE)
    assert not any("'" in text or casual_words.search(text) for text in formal)
    assert all(re.search(r"\w'(s|ll|t|re)\b", text) and casual_words.search(text) for text in casual)


def test_technical_uses_the_topics_jargon_and_plain_uses_analogies(every_attribute):
    truth = every_attribute.truth
    column = truth["attributes"].index("expertise")
    for texts, poles, topic in zip(truth["responses"], truth["item_attributes"], truth["topics"]):
        for text, technical in zip(texts, poles[:, column] == 1):
            assert any(term in text for term in TOPICS[topic]) == technical, text
            assert (" like " in text) != technical, text  # plain responses explain by analogy


def test_list_style_is_bullets_and_prose_one_paragraph(every_attribute):
    for text in items_with(every_attribute, "style", 1):
        assert all(line.startswith("- ") for line in text.split("\n"))
    for text in items_with(every_attribute, "style", -1):
        assert "\n" not in text and not text.startswith("- ")


def test_enthusiastic_tone_exclaims_and_neutral_never_does(every_attribute):
    assert all(text.count("!") == sentences(text) for text in items_with(every_attribute, "tone", 1))
    assert not any("!" in text for text in items_with(every_attribute, "tone", -1))


def test_attributes_outside_the_world_keep_their_fixed_pole():
    """attributes = [style]: every response is long, formal, plain and neutral, as a list or as prose."""
    data = world(attributes=["style"], n_responses=2, attributes_per_user=1)
    texts = list(data.truth["responses"].ravel())
    assert all(sentences(t) >= 3 and "'" not in t and "!" not in t for t in texts)
    assert (data.oracle_logits["oracle/personal"] > 0).all()



def test_fixed_poles_replace_the_default_pole_of_attributes_left_out():
    """fixed_poles = [short, casual]: every response is one casual sentence; the varying attribute still varies."""
    data = world(attributes=["tone"], n_responses=2, attributes_per_user=1, fixed_poles=["short", "casual"])
    texts = list(data.truth["responses"].ravel())
    assert {sentences(t) for t in texts} == {1} and all("'" in t for t in texts)
    assert sum("!" in t for t in texts) == len(texts) // 2
    assert (data.oracle_logits["oracle/personal"] > 0).all()


# ---- configuration errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("changes", "message"), [
    ({"attributes": ["length", "humor"]}, r"attributes: unknown attribute\(s\) \['humor'\]; valid attributes: "
                                          r"length, formality, expertise, style, tone"),
    ({"attributes": []}, "attributes must name at least one attribute"),
    ({"attributes": ["length", "length"]}, "attributes must not repeat a name"),
    ({"labels": "foo"}, "labels must be 'extremes' or 'bradley_terry', got 'foo'"),
    ({"bt_temperature": 0.0}, "bt_temperature must be > 0, got 0.0"),
    ({"n_users": 0}, "n_users must be >= 1, got 0"),
    ({"pairs_per_user": 0}, "pairs_per_user must be >= 1, got 0"),
    ({"test_pairs_per_user": -1}, "test_pairs_per_user must be >= 0, got -1"),
    ({"pairs_per_user": 41}, "pairs_per_user=41 exceeds n_train_prompts=40"),
    ({"test_pairs_per_user": 13}, "test_pairs_per_user=13 exceeds n_test_prompts=12"),
    ({"n_train_prompts": prompt_capacity()}, rf"n_train_prompts \+ n_test_prompts = {prompt_capacity() + 12} exceeds "
                                             rf"the {prompt_capacity()} distinct prompts"),
    ({"n_responses": 17}, r"n_responses must be between 2 and 2 \*\* len\(attributes\) = 16 .*got 17"),
    ({"n_responses": 1}, r"n_responses must be between 2 and .*got 1"),
    ({"fixed_poles": ["tiny"]}, r"fixed_poles: unknown pole 'tiny'; poles: short, long, casual"),
    ({"fixed_poles": ["short"]}, r"fixed_poles: 'short' is a pole of 'length', which is one of `attributes`"),
    ({"attributes": ["style"], "attributes_per_user": 1, "n_responses": 2, "fixed_poles": ["short", "long"]},
     r"fixed_poles: one pole per attribute, got \['short', 'long'\]"),
    ({"attributes_per_user": 5}, r"attributes_per_user must be between 1 and len\(attributes\) = 4, got 5"),
])
def test_config_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SMALL, **changes)
