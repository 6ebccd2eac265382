"""In-context baselines of the policy stage: ICL and ICL-RAG (The Reward Model Selection Crisis in Personalized
Alignment, Rezk et al., arXiv 2512.23067, §4 and eq. 7): the base policy reads some of the user's own preference
pairs as demonstrations before the query -- no reward model at all.

* Demonstrations come from the user's support pairs -- the same first ``split.k`` pairs the reward models adapt
  on, so every row of the table sees the same information -- never a pair with the query's prompt (leakage).
* ``icl``: a seeded random sample of them, in the order drawn; ``icl_rag``: the ones whose prompts are most
  similar to the query's (cosine of L2-normalised mean-pooled all-MiniLM-L6-v2 embeddings, as the RAG judge of
  When Personalization Meets Reality, Dong et al., arXiv 2502.19158, §3), the most similar last (closest to the
  query); ties broken by row order.
* The paper publishes no prompt; plrm's (one user message, the policy's chat template) shows each demonstration's
  prompt, the response the user preferred and the one they rejected, then asks for the query in that style.
"""

from __future__ import annotations

import numpy as np

ICL_HEADER = ("Here are earlier requests from the same user. For each one you see the response the user preferred "
              "and a response they rejected.")
ICL_QUERY = "Answer the following request in the style of the preferred responses: {prompt}"
ICL_BLOCK = "Prompt: {prompt}\nPreferred response: {chosen}\nDispreferred response: {rejected}"


def render_icl_prompt(prompt: str, demos: list[tuple[str, str, str]]) -> str:
    """The ICL prompt of one query: the header, one block per (prompt, chosen, rejected) demonstration, the query."""
    blocks = [ICL_BLOCK.format(prompt=p, chosen=c, rejected=r) for p, c, r in demos]
    return "\n\n".join([ICL_HEADER, *blocks, ICL_QUERY.format(prompt=prompt)])


def select_demos(query_prompts: np.ndarray, query_users: np.ndarray, pool_prompts: np.ndarray,
                 pool_users: np.ndarray, n: int, mode: str, seed: int = 0,
                 embeddings: tuple[np.ndarray, np.ndarray] | None = None) -> list[np.ndarray]:
    """For each query (prompt, user), the positions in the pool of its demonstrations: the same user's pool
    pairs whose prompt differs from the query's, at most ``n`` of them, chosen at random (``icl``, seeded per
    query) or by prompt similarity (``icl_rag``, the most similar last; ``embeddings`` = (query, pool) L2-normalised
    vectors)."""
    if mode not in ("icl", "icl_rag"):
        raise ValueError(f"demonstration selection {mode!r}: choose icl or icl_rag")
    out = []
    for q, (prompt, user) in enumerate(zip(query_prompts, query_users)):
        candidates = np.flatnonzero((pool_users == user) & (pool_prompts != prompt))
        if mode == "icl":
            rng = np.random.default_rng([seed, q])
            out.append(rng.permutation(candidates)[:n])
        else:
            sims = embeddings[1][candidates] @ embeddings[0][q]
            order = np.lexsort((candidates, -sims))[:n]                   # most similar first, ties by row
            out.append(candidates[order][::-1])                            # ... then put the most similar last
    return out
