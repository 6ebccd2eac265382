"""Text of items, their token ids, padding and pooling: shared by the transformer and frozen-encoder backbones.

Reward position convention (README "Backbones"). A decoder reads the hidden state of the *last response token*;
prompt and response are tokenized separately and their ids concatenated, and nothing is appended after the
response (no EOS, no template suffix). The reward of every response prefix r(x, y<=t) is then the hidden
state at position t of one forward pass, which reward-guided decoding needs. The prompt is rendered with the
tokenizer's chat template as a user turn followed by the generation prompt (``chat_template``), or as plain
text followed by a newline. Encoders (BERT family) read ``[CLS] prompt [SEP] response [SEP]`` and mean-pool.

Token ids are stored ragged -- one flat int32 array plus offsets over the unique items of a dataset -- and
padded per batch (dynamic padding), on the model's device, to the longest sequence of that batch.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from plrm.items import ItemIndex


def item_texts(data, items: ItemIndex) -> tuple[np.ndarray, np.ndarray]:
    """(prompts, responses) of every unique item, each an object array of length ``items.n_items``."""
    table = data.pairs.data.table
    prompts = table["prompt"].to_numpy(zero_copy_only=False)
    prompt_of, response_of = np.empty(items.n_items, object), np.empty(items.n_items, object)
    for column, item_of_row in (("rejected", items.rejected_item), ("chosen", items.chosen_item)):
        uniq, first = np.unique(item_of_row, return_index=True)
        prompt_of[uniq] = prompts[first]
        response_of[uniq] = table[column].to_numpy(zero_copy_only=False)[first]
    return prompt_of, response_of


@dataclass
class ItemTextTable:
    """The text of every item of a prepared dataset and the tokenizer of the backbone that read them: what a
    method that writes its own prompts around items (the RAG judge) reads besides item ids."""

    prompts: np.ndarray    # (I,) object
    responses: np.ndarray  # (I,) object
    tokenizer: Any

    def texts(self, item_ids: Tensor) -> tuple[list[str], list[str]]:
        """(prompts, responses) of items ``item_ids`` (the backbone's item ids)."""
        ids = item_ids.cpu().numpy()
        return [str(p) for p in self.prompts[ids]], [str(r) for r in self.responses[ids]]


def as_messages(prompt: str) -> list[dict]:
    """A prompt column value as chat messages: a JSON list of {role, content} stays a conversation (PRISM's
    multi-turn histories); any other text is one user turn."""
    if prompt.startswith("[{"):
        try:
            messages = json.loads(prompt)
            if all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
                return messages
        except json.JSONDecodeError:
            pass
    return [{"role": "user", "content": prompt}]


def plain_prompt(prompt: str) -> str:
    """A prompt for a model read without a chat template: a JSON conversation becomes one "role: content" line
    per message (an encoder should read the words, not JSON syntax); any other text is returned unchanged."""
    messages = as_messages(prompt)
    if len(messages) == 1 and messages[0]["content"] == prompt:
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


@dataclass
class TokenizedItems:
    """Ragged token ids of items: item i is ``ids[offsets[i]:offsets[i + 1]]``."""

    ids: Tensor        # (total,) int64
    offsets: Tensor    # (I + 1,) int64
    n_truncated: int = 0
    prompt_lengths: Tensor | None = None  # (I,) int64: tokens before the response (with any separator before it)

    @property
    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def gather(self, item_ids: Tensor) -> dict:
        """The ragged batch of these items: {'ids': flat ids, 'lengths': (N,)}; concatenates with torch.cat."""
        return ragged_select(self.ids, self.offsets[:-1], self.lengths, item_ids)


def ragged_select(ids: Tensor, starts: Tensor, lengths: Tensor, which: Tensor) -> dict:
    """Sequences ``which`` of a ragged array (sequence i is ids[starts[i]:starts[i] + lengths[i]]), in one gather."""
    ln = lengths[which]
    inner = torch.arange(int(ln.sum()), device=ids.device) - torch.repeat_interleave(torch.cumsum(ln, 0) - ln, ln)
    return {"ids": ids[torch.repeat_interleave(starts[which], ln) + inner], "lengths": ln}


def tokenize_items(tokenizer, prompts, responses, max_length: int, decoder: bool, chat: bool,
                   response_suffix: tuple[int, ...] = (), min_prompt: int = 0) -> TokenizedItems:
    """Token ids of each (prompt, response); prompts are truncated from the left first (the response is what is
    scored), then the response from the right. Each unique prompt is rendered once. ``response_suffix``: ids
    appended to every response (a likelihood model's EOS: it learns to stop; a reward model reads the last
    response token and gets none). ``min_prompt``: prompt tokens kept however long the response (a likelihood
    model needs one before the first response token to predict it). The result records each item's prompt
    length."""
    uniq_prompts, prompt_idx = np.unique(np.asarray(prompts, dtype=object).astype(str), return_inverse=True)
    if decoder:
        if chat:
            rendered = [tokenizer.apply_chat_template(as_messages(p), add_generation_prompt=True, tokenize=False)
                        for p in uniq_prompts]
            p_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        else:
            p_ids = tokenizer([plain_prompt(p) + "\n" for p in uniq_prompts], add_special_tokens=True)["input_ids"]
        r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        r_ids = [list(r) + list(response_suffix) for r in r_ids]
        sep_head, sep_mid, sep_tail = [], [], []
    else:  # [CLS] prompt [SEP] response [SEP]
        p_ids = tokenizer([plain_prompt(p) for p in uniq_prompts], add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        sep_head = [cls] if cls is not None else []
        sep_mid = sep_tail = [sep] if sep is not None else []
    pieces, lengths, truncated = [], np.empty(len(r_ids), np.int64), 0
    prompt_lengths = np.empty(len(r_ids), np.int64)
    fixed = len(sep_head) + len(sep_mid) + len(sep_tail)
    for i, (pi, r) in enumerate(zip(prompt_idx, r_ids)):
        p = p_ids[pi]
        room = max_length - fixed
        if len(p) + len(r) > room:
            truncated += 1
            r = r[:room - min(len(p), min_prompt)]
            keep = room - len(r)
            p = p[len(p) - keep:] if keep > 0 else []
        seq = sep_head + list(p) + sep_mid + list(r) + sep_tail
        pieces.append(seq)
        lengths[i] = len(seq)
        prompt_lengths[i] = len(sep_head) + len(p) + len(sep_mid)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.fromiter((t for s in pieces for t in s), dtype=np.int64, count=int(offsets[-1]))
    if truncated:
        warnings.warn(f"{truncated} of {len(r_ids)} items are longer than max_length={max_length} tokens and were "
                      "truncated (prompt from the left, then response from the right); raise backbone.max_length "
                      "to keep them whole", stacklevel=2)
    return TokenizedItems(torch.from_numpy(ids), torch.from_numpy(offsets), truncated, torch.from_numpy(prompt_lengths))


def pad(batch: dict, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Ragged {'ids', 'lengths'} -> right-padded (N, L) input_ids and attention_mask, L = longest in batch."""
    ids, lengths = batch["ids"], batch["lengths"]
    n, width = len(lengths), int(lengths.max()) if len(lengths) else 0
    mask = torch.arange(width, device=ids.device)[None, :] < lengths[:, None]
    input_ids = torch.full((n, width), pad_id, dtype=ids.dtype, device=ids.device)
    input_ids[mask] = ids  # row-major fill matches the ragged order
    return input_ids, mask.long()


def pool(hidden: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """(N, L, H) hidden states -> (N, H): 'last' non-pad token, 'mean' over tokens, or 'cls' (first token)."""
    if pooling == "last":
        last = mask.sum(1) - 1
        return hidden[torch.arange(len(hidden), device=hidden.device), last]
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    if pooling == "cls":
        return hidden[:, 0]
    raise ValueError(f"unknown pooling {pooling!r}; choose last, mean or cls")
