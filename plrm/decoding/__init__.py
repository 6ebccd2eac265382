"""Reward-guided decoding: a policy LM generates, a reward model guides it, both on shared token ids.

* :mod:`plrm.decoding.policy` -- the policy (a causal LM, KV-cached, optionally behind a user's soft tokens).
* :mod:`plrm.decoding.guides` -- what decoding asks of a reward model: a *sequence* guide (any factored method on
  a causal ``transformer`` backbone: the reward of each candidate prefix from its KV cache), a *token* guide
  (GenARM, P-DPO's implicit reward: a reward for every vocabulary item at once), and the scoring of whole
  responses that policy accuracy reads.
* :mod:`plrm.decoding.args` -- ARGS (Khanov et al., ICLR 2024, arXiv 2402.01694): top-k of the policy, score
  ``log pi + w r``, greedy or sampled, with a naive no-cache implementation as the exactness oracle and the
  benchmark's baseline.
* :mod:`plrm.decoding.genarm` -- GenARM's own decoding (Xu et al., ICLR 2025, arXiv 2410.08193):
  ``log pi_base + alpha log pi_r`` over the whole vocabulary.
"""
