"""Conditional RM: one reward model for every user, the user written into the prompt ("When Personalization Meets
Reality", Dong et al., arXiv 2502.19158, §3.2 "Conditional RM"):

    r(x, y, u) = v^T h("User ID: {u}\\n" + x, y)        h: the (LoRA) transformer's pooled state; no bias (it cancels)
    trained with -log sigmoid(r(x, y+, u) - r(x, y-, u)) on every seen user's pairs, like the Global RM.

Everything is shared; the user exists only as text. The user changes the encoder's input, so the reward is
``conditioned``: the tokens of the user's prefix (``prefix_template``, tokenized once per user with the backbone's
tokenizer) are spliced into each item's token ids where the prompt's text starts, and the transformer runs on the
spliced rows, pooled as the backbone pools. Where the prompt starts:

* a plain rendering (no chat template, or ``backbone.chat_template: never``; encoders): position 0, after the
  special tokens the tokenizer puts before text (a BOS, BERT's [CLS]);
* a chat rendering: the start of the user message's content, as the authors' code writes it
  (``f"User ID: {uid}\\n" + instruction`` as the user turn): right after the template's tokens before a single user
  turn's content. Those tokens are found once from the tokenizer (renderings of probe messages); a template whose
  last token merges with the message's first characters, or that rewrites the message, cannot be split there, and
  rows rendered with it are refused (RecipeError naming ``backbone.chat_template``).

For a tokenizer that does not merge tokens across the newline ending the prefix (byte-level BPEs such as Qwen2's,
the tiny test models), the spliced row is exactly the tokenization of the text with the prefix written in.

Deviations, each for a reason:

* ``{user_index}`` is plrm's ``user_idx``: the user's position in the split's sorted vocabulary of user ids (seen
  and unseen users together), stored with the split, so a checkpoint always reads the same ids. The authors number
  a dataset's users 1..U; the number itself carries no meaning, only that each seen user keeps one.
* New users are not served (``adapts_new_users = 'no'``; the protocol reports n/a), as in the paper, which
  evaluates this model on seen users only: an unseen id was never trained on. Fine-tuning on a new id's support
  pairs would be another baseline (the further-fine-tuned RM).
* The spliced row may be longer than ``backbone.max_length`` by the prefix's tokens (items are truncated when the
  backbone tokenizes them, before any user is known). A left-truncated prompt (its first tokens, BOS included,
  dropped) gets the prefix at position 0; a conversation (a JSON list of messages) whose rendering opens otherwise
  than a single user turn (a system message first) gets it at the very start too.
* The prefix is tokenized with the backbone's tokenizer (the one that tokenized the items; ``HFEncoder.tokenizer``).

Defaults are Dong et al.'s App. A.1 settings (lr 3e-4, weight decay 0.001, 1 epoch) and their scripts' batch
(8 x 8 accumulation); the LoRA adapters learn at ``backbone.lr`` (set it to 3e-4 for the paper's single learning rate).
Transformer backbones only (``needs``: token states): a frozen-feature encoder cannot read a text id, and its feature
cache would hold every text once per user.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from plrm import capabilities as cap
from plrm.backbones.transformer import HFEncoder
from plrm.config import opt
from plrm.errors import RecipeError
from plrm.methods.base import CONDITIONED, MethodConfig, PersonalizedRewardModel
from plrm.registry import methods

# user-message contents whose renderings differ from their first character on: the tokens they share come before it
PROBE_MESSAGES = ("a", "Z", "7", "(")
SENTINEL = "\u2063plrm user message\u2063"


def plain_opening(tokenizer) -> list[int]:
    """The ids a tokenizer puts before plain text (``add_special_tokens``: a BOS, [CLS], or nothing)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    for k in range(len(with_special) - len(bare) + 1):
        if with_special[k:k + len(bare)] == bare:
            return list(with_special[:k])
    return []


def chat_opening(tokenizer) -> tuple[list[int], bool] | None:
    """The ids of a chat rendering before a single user turn's content, rendered as the backbone renders prompts
    (generation prompt added, tokenized without special tokens), and whether the content starts right after them
    (False: the template's last token merges with the content, or the template rewrites it). None: no template."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(content: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)

    probes = [tokenizer(render(c), add_special_tokens=False)["input_ids"] for c in PROBE_MESSAGES]
    common = 0
    while all(len(p) > common and p[common] == probes[0][common] for p in probes):
        common += 1
    opening = list(probes[0][:common])
    text = render(SENTINEL)
    located = SENTINEL in text and tokenizer(text.split(SENTINEL)[0], add_special_tokens=False)["input_ids"] == opening
    return opening, located


class UserPrefix(nn.Module):
    """The token ids of every user's prefix and where each row's prompt text starts: :meth:`splice` writes the
    rows' users into ragged token batches, all rows at once."""

    def __init__(self, tokenizer, template: str, n_users: int):
        super().__init__()
        ids = tokenizer([template.format(user_index=u) for u in range(n_users)], add_special_tokens=False)["input_ids"]
        table = nn.utils.rnn.pad_sequence([torch.tensor(i, dtype=torch.long) for i in ids], batch_first=True)
        # derived from the tokenizer, so not part of a checkpoint
        self.register_buffer("table", table, persistent=False)              # (U, P) prefix ids, 0-padded
        self.register_buffer("lengths", torch.tensor([len(i) for i in ids], dtype=torch.long),
                             persistent=False)                               # (U,)
        chat = chat_opening(tokenizer)
        self.chat_located = chat is None or chat[1]
        self.register_buffer("chat", torch.tensor(chat[0] if chat else [], dtype=torch.long), persistent=False)
        self.register_buffer("plain", torch.tensor(plain_opening(tokenizer), dtype=torch.long), persistent=False)
        self.name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)

    @staticmethod
    def _opens_with(ids: Tensor, starts: Tensor, lengths: Tensor, opening: Tensor) -> Tensor:
        """Whether each ragged row (N,) begins with the ids ``opening`` (K,); False for all rows when K = 0."""
        k = len(opening)
        if k == 0 or len(ids) == 0:
            return torch.zeros(len(lengths), dtype=torch.bool, device=lengths.device)
        idx = (starts[:, None] + torch.arange(k, device=ids.device)).clamp_max(len(ids) - 1)   # (N, K)
        return (lengths >= k) & (ids[idx] == opening).all(1)

    def positions(self, ids: Tensor, starts: Tensor, lengths: Tensor) -> Tensor:
        """Where the prompt text starts in each ragged row (N,): after the chat template's opening, after the
        tokenizer's special opening (BOS / [CLS]), or 0."""
        chat = self._opens_with(ids, starts, lengths, self.chat)
        if not self.chat_located and bool(chat.any()):
            raise RecipeError(
                f"conditional: cannot find where the user message starts in the chat template of {self.name!r} (its "
                "last token merges with the message text, or it rewrites the message), so the user id cannot be "
                "written there; set backbone.chat_template: never (the id then starts the plain prompt)")
        plain = self._opens_with(ids, starts, lengths, self.plain)
        return torch.where(chat, len(self.chat), torch.where(plain, len(self.plain), 0))

    def splice(self, items: dict, user_idx: Tensor) -> dict:
        """The ragged batch with each row's user prefix inserted where its prompt text starts: ids, lengths and
        prompt_lengths grow by the prefix; every other per-row entry is kept."""
        ids, lengths = items["ids"], items["lengths"]
        n, starts = len(lengths), torch.cumsum(lengths, 0) - lengths
        at = self.positions(ids, starts, lengths)                               # (N,)
        extra = self.lengths[user_idx]                                          # (N,)
        new_lengths = lengths + extra
        row = torch.repeat_interleave(torch.arange(n, device=ids.device), new_lengths)   # (T',) row of each output id
        j = torch.arange(len(row), device=ids.device) - (torch.cumsum(new_lengths, 0) - new_lengths)[row]
        a, p = at[row], extra[row]
        in_prefix = (j >= a) & (j < a + p)
        source = starts[row] + torch.where(j < a, j, j - p)
        prefix = self.table[user_idx[row], (j - a).clamp(0, self.table.shape[1] - 1)]
        body = ids[torch.where(in_prefix, 0, source)]              # a prefix position reads a dummy id
        out = {**items, "ids": torch.where(in_prefix, prefix, body), "lengths": new_lengths}
        if "prompt_lengths" in items:
            out["prompt_lengths"] = items["prompt_lengths"] + extra
        return out


@methods.register("conditional")
class ConditionalRM(PersonalizedRewardModel):
    """Conditional RM: the user id written at the start of the prompt, one (LoRA) transformer and a linear head."""

    needs = frozenset({cap.TOKEN_STATES, cap.USERS})
    adapts_new_users = "no"
    reward_shape = CONDITIONED

    @dataclass
    class Config(MethodConfig):
        prefix_template: str = opt("User ID: {user_index}\n", "Text written before each prompt; {user_index} is the "
                                                              "user's index (Dong et al., arXiv 2502.19158, §3.2 "
                                                              "and their code: 'User ID: {uid}\\n').", nonempty=True)
        lr: float = opt(3e-4, "Learning rate of the reward head (Dong et al. App. A.1: 3e-4; the LoRA adapters "
                              "learn at backbone.lr).", gt=0)
        weight_decay: float = opt(1e-3, "AdamW weight decay of the reward head (Dong et al.'s scripts: 0.001).",
                                  min=0)
        batch_size: int = opt(64, "Training pairs per step (Dong et al.'s scripts: 8 x 8 gradient accumulation).",
                              min=1)
        max_epochs: int = opt(1, "Epochs over the seen users' train pairs (Dong et al. App. A.1: 1 on 100k "
                                 "samples, more on smaller sets).", min=1, also=(-1,))

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        if not isinstance(self.encoder, HFEncoder):
            raise RecipeError("conditional writes the user id into the prompt's tokens, so the transformer must run "
                              "inside the method: use backbone 'transformer' (got an encoder of type "
                              f"{type(self.encoder).__name__})")
        template = config.prefix_template
        try:
            ok = "{user_index}" in template and bool(template.format(user_index=0))
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise RecipeError(f"methods.conditional.prefix_template must contain {{user_index}} and no other "
                              f"{{...}} field, got {template!r}")
        if not any(p.requires_grad for p in self.encoder.parameters()):
            warnings.warn("conditional on a frozen transformer (backbone.finetune: frozen): only the linear head "
                          "trains, so the user id acts only through frozen hidden states; Dong et al. train LoRA "
                          "(backbone.finetune: lora)", stacklevel=2)
        if getattr(self.encoder, "tokenizer", None) is None:
            raise RecipeError("conditional tokenizes the user prefix with the backbone's tokenizer: build the "
                              "encoder with TransformerBackbone.encoder()")
        self.prefix = UserPrefix(self.encoder.tokenizer, template, n_users)
        self.head_linear = nn.Linear(feature_dim, 1, bias=False)               # v: (1, D)

    def conditioned_reward(self, items: Any, user_idx: Tensor, item_stats: Tensor | None) -> Tensor:
        """v^T h(prefix_u + x, y) (N,): the rows' users spliced in, one (chunked) forward, pooled as the backbone."""
        return self.head_linear(self.encoder(self.prefix.splice(items, user_idx)))[:, 0]
