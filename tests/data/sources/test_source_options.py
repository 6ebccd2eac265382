"""Option values a source refuses, reported through the recipe schema with the dataset's key, and the input checks
of RewardBench's section scoring."""

import numpy as np
import pytest

from plrm.data.sources.reward_bench import section_scores
from plrm.recipe import RecipeError, build_dataset


@pytest.mark.parametrize("dataset, override, message", [
    ("personal_llm", "alpha=0", "data.alpha: must be > 0, got 0.0"),
    ("pref_lamp", "lamp_splits=[]", "data.lamp_splits: must not be empty"),
    ("psoups", "prlhf_test_size=1.5", "data.prlhf_test_size: must be in (0, 1), got 1.5"),
    ("tldr", "top_n=0", "data.top_n: must be >= 1, got 0"),
    ("tldr", "min_pairs=-1", "data.min_pairs: must be >= 0, got -1"),
])
def test_bad_option_values_are_named(dataset, override, message):
    with pytest.raises(RecipeError) as err:
        build_dataset(dataset, [override])
    assert f"dataset '{dataset}': 1 problem(s):\n  {message}" in str(err.value)


def test_section_scores_refuses_malformed_input():
    with pytest.raises(ValueError, match=r"per_row_correct \(2,\) and subsets \(1,\) must be 1-d, of one length"):
        section_scores(np.array([1, 0]), np.array(["hep-go"], dtype=object))
    with pytest.raises(ValueError, match="no rows to score"):
        section_scores(np.array([]), np.array([], dtype=object))
    with pytest.raises(ValueError, match=r"per_row_correct must hold values in \[0, 1\] \(1 = chosen scored above "
                                         r"rejected\)"):
        section_scores(np.array([2.0]), np.array(["hep-go"], dtype=object))
