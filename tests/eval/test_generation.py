"""Behavioural metrics of generated text (plrm/eval/generation.py): ROUGE on hand-made pairs, the cleaning of
generations, the circular win rate on planted rewards, and BERTScore with the packaged MiniLM (offline)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from plrm.errors import BackboneError
from plrm.eval.generation import bertscore_f1, clean_generation, rouge, win_outcomes, win_rate

# ---- ROUGE -----------------------------------------------------------------------------------------------------


def test_rouge_identical_is_one_and_disjoint_is_zero():
    scores = rouge(["the cat sat on the mat", "The Cat, sat!", "a b c"], ["the cat sat on the mat", "the cat sat", "x y z"])
    # rouge-score's tokenizer lower-cases and turns punctuation into spaces: "The Cat, sat!" = "the cat sat"
    assert scores["rouge1"].tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert scores["rougeL"].tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_rouge_partial_overlap_by_hand():
    """prediction "the cat sat on the mat" (6 tokens), reference "on the mat the cat sat down" (7 tokens).

    ROUGE-1: clipped unigram overlap: the min(2, 2) = 2, cat 1, sat 1, on 1, mat 1 -> 6. P = 6/6, R = 6/7,
    F1 = 2 * 1 * 6/7 / (1 + 6/7) = 12/13.
    ROUGE-L: the longest common subsequence is "the cat sat" (reference positions 4-6) or "on the mat"
    (reference 1-3): after "the cat sat" the prediction has "on the mat", which comes before it in the
    reference, and after "on the mat" it has nothing. LCS = 3: P = 3/6, R = 3/7, F1 = 2 * 1/2 * 3/7 / (1/2 + 3/7)
    = (3/7) / (13/14) = 6/13.
    """
    scores = rouge(["the cat sat on the mat"], ["on the mat the cat sat down"])
    assert scores["rouge1"][0] == pytest.approx(12 / 13)
    assert scores["rougeL"][0] == pytest.approx(6 / 13)


def test_rouge_empty_prediction_scores_zero_and_lengths_must_match():
    scores = rouge(["", "   "], ["a title", "another title"])
    assert scores["rouge1"].tolist() == [0.0, 0.0] and scores["rougeL"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        rouge(["a", "b", "c"], ["a", "b"])


# ---- cleaning ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, clean", [
    ("  Deep Learning for Graphs  ", "Deep Learning for Graphs"),
    ("Deep Learning for Graphs\nThis title reflects ...", "Deep Learning for Graphs"),
    ("\n\nTitle: Deep Learning\n", "Deep Learning"),
    ('TITLE:  "Deep Learning"', "Deep Learning"),
    ('"Title: Deep Learning"', "Deep Learning"),
    ("“Deep Learning”", "Deep Learning"),
    ("'Deep Learning'", "Deep Learning"),
    ('"Deep Learning\nis the answer"', "Deep Learning"),  # the closing quote was on the line cut away
    ('The "best" model', 'The "best" model'),  # quotes inside the title stay
    ("'Tis the season", "'Tis the season"),  # a lone apostrophe is not a quote
    ("Subtitle: X", "Subtitle: X"),  # only a leading "Title:" is a prefix
    ("", ""),
    ("  \n  ", ""),
])
def test_clean_generation(raw, clean):
    assert clean_generation(raw) == clean


# ---- circular win rate -------------------------------------------------------------------------------------------


def test_win_rate_on_planted_rewards_counts_ties_as_ties():
    """Six examples, judged by the same RM (tol = 1e-6):

    0: 2.0 vs 1.0          win
    1: 1.0 vs 1.0000005    |diff| = 5e-7 <= tol: tie (a strict > would call it a loss)
    2: 0.5 vs 0.7          loss
    3: 3.0 vs 3.0          tie
    4: 1.0 vs 0.0, same text: tie (the texts are identical, whatever the rewards say)
    5: 0.2 vs 0.1          win
    wins 2, ties 3, losses 1 of 6: 1/3, 1/2, 1/6; among non-ties 2 of 3.
    """
    r_guided = np.array([2.0, 1.0, 0.5, 3.0, 1.0, 0.2])
    r_zero_shot = np.array([1.0, 1.0 + 5e-7, 0.7, 3.0, 0.0, 0.1])
    same_text = np.array([False, False, False, False, True, False])
    assert win_outcomes(r_guided, r_zero_shot, same_text).tolist() == [1, 0, -1, 0, 0, 1]
    result = win_rate(r_guided, r_zero_shot, same_text)
    assert result["n"] == 6
    assert result["win_rate"] == pytest.approx(1 / 3)
    assert result["tie_rate"] == pytest.approx(1 / 2)
    assert result["loss_rate"] == pytest.approx(1 / 6)
    assert result["win_rate_non_ties"] == pytest.approx(2 / 3)
    # without same_text, example 4 is a win: 3 wins, 2 ties, 1 loss
    assert win_rate(r_guided, r_zero_shot)["win_rate"] == pytest.approx(1 / 2)


def test_win_rate_edge_cases():
    all_ties = win_rate(np.ones(3), np.ones(3))
    assert all_ties["tie_rate"] == 1.0 and all_ties["win_rate"] == 0.0 and math.isnan(all_ties["win_rate_non_ties"])
    empty = win_rate(np.array([]), np.array([]))
    assert empty["n"] == 0 and math.isnan(empty["win_rate"])
    with pytest.raises(ValueError, match=r"1 example\(s\) have a NaN reward, e.g. index \[1\]"):
        win_rate(np.array([1.0, np.nan]), np.array([0.0, 0.0]))
    with pytest.raises(ValueError, match="must be 1-d of one length"):
        win_rate(np.ones(3), np.ones(2))


# ---- BERTScore (packaged all-MiniLM-L6-v2, offline; about 3 s on 2 cores) ---------------------------------------

# Token lengths 8, 2, 4 on the prediction side: sorting them by length is a 3-cycle, the permutation that
# torchmetrics 1.9's batched bert_score restores wrongly, so this order would expose a scrambled batch.
PREDICTIONS = ["a b c d e f g h", "the cat", "one two three four", ""]
REFERENCES = ["a b c d e f g h x", "the cat sat on the mat", "five", "an empty prediction"]


@pytest.fixture(scope="module")
def minilm_scores():
    return bertscore_f1(PREDICTIONS, REFERENCES, "offline:minilm", num_layers=6)


def test_bertscore_identical_strings_score_one():
    f1, info = bertscore_f1(["Deep learning for graphs", "a title"], ["Deep learning for graphs", "a title"],
                            "offline:minilm", num_layers=6)
    assert (f1 > 0.99).all()
    assert info == {"model": "offline:minilm", "num_layers": 6, "idf": False, "rescale_with_baseline": False}


def test_bertscore_keeps_pair_order_and_equals_torchmetrics_one_pair_at_a_time(minilm_scores):
    """Each pair scored alone by torchmetrics (one pair: no reordering) is the reference for the batched scores;
    a batch size of 2 splits the pairs across batches and must not change them."""
    from torchmetrics.functional.text.bert import bert_score

    from plrm.backbones.models import resolve

    f1, info = minilm_scores
    alone = [float(bert_score([p], [r], model_name_or_path=resolve("offline:minilm"), num_layers=6)["f1"])
             for p, r in zip(PREDICTIONS[:3], REFERENCES[:3])]
    assert f1[:3].tolist() == pytest.approx(alone, abs=1e-5)
    assert len(set(np.round(f1[:3], 3))) == 3  # three different pairs, three different scores
    assert f1[3] == 0.0  # an empty prediction has no token to match
    assert info["model"] == "offline:minilm" and info["num_layers"] == 6
    split, _ = bertscore_f1(PREDICTIONS, REFERENCES, "offline:minilm", num_layers=6, batch_size=2)
    assert split.tolist() == pytest.approx(f1.tolist(), abs=1e-5)


def test_bertscore_refuses_a_layer_the_model_does_not_have():
    with pytest.raises(BackboneError, match=r"num_layers=7 for 'offline:minilm': the model has 6 layers"):
        bertscore_f1(["a"], ["b"], "offline:minilm", num_layers=7)
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        bertscore_f1(["a"], ["b", "c"], "offline:minilm", num_layers=6)
