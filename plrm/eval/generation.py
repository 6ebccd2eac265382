"""Behavioural metrics of generated text, one value per example so that they can be averaged per user.

The Reward Model Selection Crisis in Personalized Alignment (Rezk et al., arXiv 2512.23067) scores what a
reward-guided policy writes, not only how its reward model ranks pairs: ROUGE-1 / ROUGE-L F1 and BERTScore-F1
against the user's reference (eq. 8, Tables 9-12), and the circular win rate of Table 5, where each reward model
judges its own guided output against the base policy's zero-shot output.

Every function returns per-example values in input order; per-user means (the headline, macro over users) and
pooled means are the caller's, as for the preference metrics of ``plrm.eval.metrics``. Generations go through
:func:`clean_generation` first, the same for every method, so that a method is not scored on its formatting.
"""

from __future__ import annotations

import re

import numpy as np
import torch

ROUGE_KEYS = ("rouge1", "rougeL")
# bert-score's and torchmetrics' max_length: longer texts are truncated (titles and short answers never are)
BERTSCORE_MAX_TOKENS = 512

_TITLE_PREFIX = re.compile(r"^title\s*:", re.IGNORECASE)
_MATCHED_QUOTES = {'"': '"', "'": "'", "“": "”"}
# a lone double quote at one end is an unclosed quote (the closing one was on a line cut away); a lone "'" is
# more often an apostrophe ('Tis, the authors') and stays
_LONE_QUOTES = ('"', "“", "”")


def clean_generation(text: str) -> str:
    """The first line of a generation without surrounding quotes and a leading "Title:" prefix.

    Policies prompted for a title answer in many dresses (``Title: "X"``, ``"X"\\nExplanation: ...``); the
    reference is the bare title, so ROUGE would otherwise score formatting. Quotes and the prefix are removed
    repeatedly, so their order does not matter; quotes inside the text stay.
    """
    lines = text.strip().splitlines()
    text = lines[0] if lines else ""
    while True:
        cleaned = _strip_quotes(text.strip())
        cleaned = _TITLE_PREFIX.sub("", cleaned, count=1).strip()
        if cleaned == text:
            return cleaned
        text = cleaned


def _strip_quotes(text: str) -> str:
    if len(text) >= 2 and text[0] in _MATCHED_QUOTES and text[-1] == _MATCHED_QUOTES[text[0]]:
        return text[1:-1]
    if text[:1] in _LONE_QUOTES and not any(q in text[1:] for q in _LONE_QUOTES):
        return text[1:]
    if text[-1:] in _LONE_QUOTES and not any(q in text[:-1] for q in _LONE_QUOTES):
        return text[:-1]
    return text


def rouge(predictions: list[str], references: list[str]) -> dict[str, np.ndarray]:
    """Per-example ROUGE-1 and ROUGE-L F1 in [0, 1] ({"rouge1": (N,), "rougeL": (N,)}); reports show them x100.

    torchmetrics' ``rouge_score`` tokenizes as Google's rouge-score, which LaMP's evaluation uses through HF
    ``evaluate`` (lower case, non-alphanumerics as spaces, no stemmer). It averages over the examples it is
    given, so it is called once per pair (about 0.1 ms each). ``rougeLsum`` is not asked for: it needs nltk's
    sentence splitter, which is not installed offline. An empty prediction or reference scores 0.
    """
    from torchmetrics.functional.text.rouge import rouge_score

    _check_same_length(predictions, references)
    scores = {key: np.zeros(len(predictions)) for key in ROUGE_KEYS}
    for i, (prediction, reference) in enumerate(zip(predictions, references)):
        if not prediction.strip() or not reference.strip():
            continue
        pair = rouge_score(prediction, reference, rouge_keys=ROUGE_KEYS, use_stemmer=False)
        for key in ROUGE_KEYS:
            scores[key][i] = float(pair[f"{key}_fmeasure"])
    return scores


def bertscore_f1(predictions: list[str], references: list[str], model: str, num_layers: int | None,
                 batch_size: int = 64, device: str | torch.device | None = None) -> tuple[np.ndarray, dict]:
    """Per-pair BERTScore F1 (Zhang et al., arXiv 1904.09675), no idf weighting and no baseline rescaling.

    Returns (F1 (N,), info); info names the model and layer and goes into every result row, because scores of
    different models or layers are not comparable. ``model`` is a Hub id, a local directory or an offline alias
    of ``plrm.backbones.models.resolve`` (``offline:minilm`` with ``num_layers=6`` runs without network);
    ``num_layers`` is the hidden state used (0 = embeddings, None = the last layer).

    This is torchmetrics' BERTScore computation, batched, with its conventions kept so that one pair gives
    the same number as ``torchmetrics.functional.text.bert.bert_score`` (checked in the tests): [CLS] and
    [SEP] are left out, token states are L2-normalised, precision (recall) is the mean over the prediction's
    (reference's) tokens of the greatest cosine with the other text's tokens, floored at 0, and F1 of an empty
    text is 0. We do not call torchmetrics for batches: version 1.9 sorts each side by length and restores
    the order with the sorting permutation instead of its inverse (Lightning-AI/torchmetrics#2347), so for
    three pairs or more its scores can belong to other pairs (a prediction is compared with another
    example's reference); one pair at a time is correct there but ~N model calls.

    Call it once for all examples and split by user afterwards: every call loads the model.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from plrm.backbones.models import resolve
    from plrm.errors import BackboneError

    _check_same_length(predictions, references)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = resolve(model)
    n_hidden_layers = AutoConfig.from_pretrained(path).num_hidden_layers
    layer = n_hidden_layers if num_layers is None else num_layers
    if not 0 <= layer <= n_hidden_layers:
        raise BackboneError(f"BERTScore num_layers={num_layers} for {model!r}: the model has {n_hidden_layers} "
                            f"layers; choose 0..{n_hidden_layers} (or null for the last)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"  # the [SEP] position below is the last attended token
    encoder = AutoModel.from_pretrained(path).eval().to(device or "cpu")
    info = {"model": model, "num_layers": layer, "idf": False, "rescale_with_baseline": False}

    f1 = np.zeros(len(predictions))
    for start in range(0, len(predictions), batch_size):
        stop = start + batch_size
        pred_states, pred_weights = _token_states(predictions[start:stop], tokenizer, encoder, layer)
        ref_states, ref_weights = _token_states(references[start:stop], tokenizer, encoder, layer)
        cosine = torch.einsum("bpd,brd->bpr", pred_states, ref_states)  # (B, P, R)
        # padding and special tokens have zero states, so a max over them floors each cosine at 0 (torchmetrics)
        precision = (cosine.max(dim=2).values * pred_weights).sum(dim=1)  # (B,)
        recall = (cosine.max(dim=1).values * ref_weights).sum(dim=1)  # (B,)
        batch_f1 = (2 * precision * recall / (precision + recall)).nan_to_num(0.0)
        f1[start:stop] = batch_f1.double().cpu().numpy()
    return f1, info


@torch.inference_mode()
def _token_states(texts: list[str], tokenizer, encoder, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised states of the content tokens, zero elsewhere (B, T, D); mean weights (B, T))."""
    device = next(encoder.parameters()).device
    batch = tokenizer(texts, padding=True, truncation=True, max_length=BERTSCORE_MAX_TOKENS, return_tensors="pt")
    batch = {key: value.to(device) for key, value in batch.items()}
    hidden = encoder(**batch, output_hidden_states=True).hidden_states[layer].float()  # (B, T, D)
    hidden = hidden / hidden.norm(dim=-1, keepdim=True)
    content = batch["attention_mask"].clone().float()  # (B, T)
    content[:, 0] = 0  # [CLS]
    content[torch.arange(len(texts), device=device), batch["attention_mask"].sum(dim=1) - 1] = 0  # [SEP]
    weights = content / content.sum(dim=1, keepdim=True).clamp_min(1)
    return hidden * content.unsqueeze(-1), weights


def win_outcomes(r_guided: np.ndarray, r_zero_shot: np.ndarray, same_text: np.ndarray | None = None,
                 tol: float = 1e-6) -> np.ndarray:
    """Per example: +1 win, 0 tie, -1 loss of the guided output against the zero-shot one, judged by the same RM.

    A tie is an identical text or rewards within ``tol``: guided decoding often reproduces the greedy output,
    and counting those as losses (strict ``>``) would understate the ties the Table 5 caption's wording hides.
    """
    r_guided = np.asarray(r_guided, dtype=float)
    r_zero_shot = np.asarray(r_zero_shot, dtype=float)
    if r_guided.shape != r_zero_shot.shape or r_guided.ndim != 1:
        raise ValueError(f"r_guided {r_guided.shape} and r_zero_shot {r_zero_shot.shape} must be 1-d of one length")
    missing = np.flatnonzero(np.isnan(r_guided) | np.isnan(r_zero_shot))
    if len(missing):
        raise ValueError(f"{len(missing)} example(s) have a NaN reward, e.g. index {missing[:5].tolist()}; "
                         "a NaN comparison would count as a loss")
    tie = np.abs(r_guided - r_zero_shot) <= tol
    if same_text is not None:
        same_text = np.asarray(same_text, dtype=bool)
        if same_text.shape != r_guided.shape:
            raise ValueError(f"same_text {same_text.shape} must match the rewards {r_guided.shape}")
        tie |= same_text
    return np.where(tie, 0, np.where(r_guided > r_zero_shot, 1, -1))


def win_rate(r_guided: np.ndarray, r_zero_shot: np.ndarray, same_text: np.ndarray | None = None,
             tol: float = 1e-6) -> dict:
    """The circular win rate of Rezk et al. (arXiv 2512.23067) Table 5, with its ties and losses.

    ``win_rate`` is the headline: the fraction of examples where the RM rewards its own guided output strictly
    more than the zero-shot output (ties are not wins). ``win_rate_non_ties`` is wins / (wins + losses), NaN
    when every example ties; all rates are NaN for no examples. See :func:`win_outcomes` for ties.
    """
    outcomes = win_outcomes(r_guided, r_zero_shot, same_text, tol)
    n = len(outcomes)
    wins, ties, losses = (int((outcomes == value).sum()) for value in (1, 0, -1))
    win, tie, loss = (count / n if n else float("nan") for count in (wins, ties, losses))
    return {"win_rate": win, "tie_rate": tie, "loss_rate": loss,
            "win_rate_non_ties": wins / (wins + losses) if wins + losses else float("nan"), "n": n}


def _check_same_length(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: "
                         "each prediction is scored against the reference at the same index")
