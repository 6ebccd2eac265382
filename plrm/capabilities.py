"""The capability vocabulary: what datasets and backbones provide, what methods need.

A runner decides what can run where by comparing sets of these strings; it never checks names.
Plugins use the same strings (they are plain ``str``, so a plugin may also introduce its own).
"""

from __future__ import annotations

FEATURES = "features"          # a feature vector per (prompt, response): precomputed or from an encoder backbone
LM = "lm"                      # log-probabilities of a causal LM (P-DPO, GenARM, policies)
TEXT = "text"                  # real prompt/response text that a tokenizer can read
SHARED_PAIRS = "shared_pairs"  # the same (prompt, response, response) item is labelled by several users (pair_id)
REFERENCE = "reference"        # each user's own ground-truth completion (Pref-LaMP-style evaluation)
ORACLE = "oracle"              # ground-truth per-user rewards (synthetic worlds): oracle rows in the results
USERS = "users"                # pairs labelled by two or more users: something to personalize and to split by user
TOKEN_STATES = "token_states"  # every token's hidden state of a transformer run inside the method (not pooled features)

DESCRIPTIONS = {
    FEATURES: "a feature vector per (prompt, response)",
    LM: "a causal language model backbone (log-probabilities)",
    TEXT: "prompt and response text",
    SHARED_PAIRS: "item pairs shared across users (pair_id)",
    REFERENCE: "reference completions per user",
    ORACLE: "ground-truth user rewards",
    USERS: "pairs labelled by two or more users",
    TOKEN_STATES: "per-token hidden states of a transformer backbone (backbone 'transformer')",
}


def unmet(needs: frozenset[str] | set[str], provided: frozenset[str] | set[str]) -> list[str]:
    """Human-readable reasons why ``needs`` is not covered by ``provided`` (empty list: all met)."""
    return [f"needs {DESCRIPTIONS.get(n, n)} ('{n}')" for n in sorted(set(needs) - set(provided))]


def cell_problems(method: str, method_needs, dataset: str, data_provides, backbone: str, backbone_needs,
                  backbone_provides) -> list[str]:
    """Why ``method`` cannot run on ``dataset`` read through ``backbone`` (empty list: it can).

    The backbone first needs its inputs from the dataset (text for an encoder, features for 'precomputed'); only
    then does it add what it provides. The method needs the union.
    """
    missing_input = unmet(backbone_needs, data_provides)
    if missing_input:
        return [f"backbone '{backbone}' {', '.join(missing_input)}, which dataset '{dataset}' does not provide"]
    reasons = unmet(method_needs, set(data_provides) | set(backbone_provides))
    if reasons:
        return [f"method '{method}' {', '.join(reasons)}, which dataset '{dataset}' with backbone '{backbone}' "
                "does not provide"]
    return []
