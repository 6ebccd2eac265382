"""Items: the unique (prompt, response) pairs of a dataset, how they are keyed, and where each row's sit.

A low module shared by data sources (which key their feature tables by item) and backbones (which prepare one
input per unique item), so that neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from plrm.lazy import lazy_module

pd = lazy_module("pandas")  # imported at first use: `plrm list` imports this module, reads no data

ITEM_SEP = "\x1f"  # joins prompt and response into an item key; a control char that never occurs in text


def item_keys(prompts, responses) -> np.ndarray:
    """uint64 key of each (prompt, response) item: a hash of the two texts."""
    joined = pd.Series(prompts, dtype=object) + ITEM_SEP + pd.Series(responses, dtype=object)
    return pd.util.hash_array(joined.to_numpy(dtype=object), categorize=False).astype(np.uint64)


@dataclass
class ItemIndex:
    """The unique (prompt, response) items of a dataset and where each row's chosen/rejected item sits."""

    keys: np.ndarray          # (I,) uint64 item keys (item_keys)
    chosen_item: np.ndarray   # (rows,) int64 index into keys
    rejected_item: np.ndarray  # (rows,) int64
    first_row: np.ndarray     # (I,) a row where each item occurs, for error messages

    @property
    def n_items(self) -> int:
        return len(self.keys)
