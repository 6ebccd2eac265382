"""Sentence embeddings of texts (all-MiniLM-L6-v2 by default, offline): the retriever of ICL-RAG demonstrations
("The Reward Model Selection Crisis in Personalized Alignment", Rezk et al., arXiv 2512.23067, §6) and of the RAG
judge ("When Personalization Meets Reality", Dong et al., arXiv 2502.19158, §4.4). The model is loaded once per
process and kept."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=2)
def _load(model: str):
    from transformers import AutoModel, AutoTokenizer

    from plrm.backbones.models import resolve

    path = resolve(model)
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def embed_texts(texts: list[str], model: str = "offline:minilm", batch_size: int = 64) -> np.ndarray:
    """L2-normalised mean-pooled embeddings (N, D) of ``texts`` (sentence-transformers' convention), each unique
    text encoded once."""
    tok, enc = _load(model)
    uniq, inverse = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    out = []
    for start in range(0, len(uniq), batch_size):
        batch = tok(list(uniq[start:start + batch_size]), padding=True, truncation=True, max_length=256,
                    return_tensors="pt")
        hidden = enc(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1))
    return torch.cat(out).numpy()[inverse] if out else np.zeros((0, 1), np.float32)
