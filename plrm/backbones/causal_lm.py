"""causal_lm: a Hugging Face causal language model whose output is the log-probability of responses.

The backbone of LM-level methods: P-DPO (soft user tokens in front of the prompt; the implicit DPO reward) and
GenARM (an autoregressive reward model, r = beta_r sum_t log pi_r(y_t | x, y_<t)). The model is loaded, quantized
and fitted with LoRA exactly as the ``transformer`` backbone does (same options), but as
``AutoModelForCausalLM``: what it serves is

    log pi(y_t | [prefix,] x, y_<t)   for every response token   -> :meth:`CausalLM.response_logprobs` (N, R)
    sum_t log pi(y_t | [prefix,] x, y_<t)                           -> :meth:`CausalLM.forward` (N, 1)

Tokenization (spec conventions of plrm's LM methods): prompt and response are tokenized separately and their ids
concatenated, the prompt through the tokenizer's chat template (``chat_template``), and the response ends with
the tokenizer's EOS (``append_eos``: a likelihood model must learn to stop; a sequence reward model, the
``transformer`` backbone, appends nothing). A batch is left-padded, with position ids counted over the real
tokens, so the responses end at the same column and the LM head runs only on the last R + 1 positions
(``logits_to_keep``): on a long prompt with a short response most of the vocabulary projection is skipped.

A prefix of soft tokens (``inputs_embeds``; P-DPO's user embeddings, (N, T_u, d)) goes in front of each row,
before its padding: with the mask on the pads and positions counted over real tokens, that is the same
computation as ``[pads][prefix][prompt][response]``. :meth:`CausalLM.reference` disables the LoRA adapter (the
frozen base model, DPO's reference). :meth:`CausalLM.prefill` and :meth:`CausalLM.advance` serve the next-token
log-probabilities over the whole vocabulary, one KV-cached step at a time (token-level rewards for decoding).

``packing: true`` (the ``transformer`` backbone's option) applies here to the training forwards (gradients on; GenARM,
P-DPO and every method that trains through :meth:`CausalLM.response_logprobs`): each sequence, its soft-token
prefix included, is packed first-fit decreasing into rows as long as the batch's longest one, with position ids
restarting per sequence and no attention mask (transformers' packed format: a block-diagonal causal mask), and
only the hidden states of the positions that predict a response token go through the LM head. The log-probabilities
and LoRA gradients equal the padded batch's to float rounding; scoring without gradients (reference
log-probabilities, evaluation) stays padded. When the encoder is built, a probe on the loaded model checks that its
attention keeps packed sequences apart and that its LM head is the plain output projection the packed path applies
(no logit scaling or soft-capping); a model that fails either is refused.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plrm import capabilities as cap
from plrm.backbones.text import ItemTextTable, TokenizedItems, item_texts, ragged_select, tokenize_items
from plrm.backbones.transformer import TransformerBackbone, pack_rows
from plrm.config import Forbid, opt
from plrm.errors import BackboneError
from plrm.items import ItemIndex
from plrm.registry import backbones


def left_pad(items: dict, pad_id: int) -> tuple[Tensor, Tensor]:
    """Ragged {'ids', 'lengths'} -> left-padded (N, L) input_ids and attention_mask (every row ends at column
    L - 1), L = the longest in the batch."""
    ids, lengths = items["ids"], items["lengths"]
    n, width = len(lengths), int(lengths.max()) if len(lengths) else 0
    mask = torch.arange(width, device=ids.device)[None, :] >= (width - lengths)[:, None]
    input_ids = torch.full((n, width), pad_id, dtype=ids.dtype, device=ids.device)
    input_ids[mask] = ids  # row-major fill matches the ragged order
    return input_ids, mask.long()


def select_rows(items: dict, rows: Tensor) -> dict:
    """Rows ``rows`` of a causal_lm batch: the ragged ids of those items and every per-item tensor."""
    starts = torch.cumsum(items["lengths"], 0) - items["lengths"]
    out = ragged_select(items["ids"], starts, items["lengths"], rows)
    return {**{k: v[rows] for k, v in items.items() if k not in ("ids", "lengths")}, **out}


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] at every position: (N, T, V) logits, (N, T) targets -> (N, T) float32. Rows
    are upcast one at a time in low precision (a (N, T, V) float32 copy of a 150k vocabulary does not fit)."""
    if logits.dtype == torch.float32:
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.stack([token_logprobs(row.float(), t) for row, t in zip(logits, targets)])


@dataclass
class LMState:
    """An incremental (KV-cached) forward over a batch of prompts, one row per prompt: the cache, the attention
    mask and each row's last position so far, and ``logprobs`` (B, V) float32, log pi(. | [prefix,] x, y_<t) of
    the next token. :meth:`CausalLM.advance` extends the cache in place: a state is used once."""

    cache: Any
    mask: Tensor
    positions: Tensor
    logprobs: Tensor


class CausalLM(nn.Module):
    """A causal LM (with LoRA adapters, when fine-tuned) serving response log-probabilities; chunks itself
    when gradients are off (evaluation, reference log-probabilities)."""

    def __init__(self, model: nn.Module, pad_id: int, inference_batch_size: int, lr: float | None = None,
                 weight_decay: float = 0.0, packing: bool = False) -> None:
        super().__init__()
        self.model = model
        self.packing = packing  # training forwards run the batch's sequences packed into rows (no padding)
        self.pad_id, self.inference_batch_size = pad_id, inference_batch_size
        self.lr, self.weight_decay = lr, weight_decay  # the optimizer group of the trainable LM weights

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The frozen base model inside the block: the LoRA adapter disabled (a frozen model is its own
        reference). A fully fine-tuned model has no reference left: refused."""
        if hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield
        elif any(p.requires_grad for p in self.model.parameters()):
            raise BackboneError("causal_lm with finetune=full keeps no copy of the base model to serve as the "
                                "reference; use finetune=lora (or frozen)")
        else:
            yield

    def _model_inputs(self, ragged: dict, prefix: Tensor | None, embeds: bool = False) -> tuple[Tensor, dict, Tensor]:
        """Left-padded ids (N, L) of ragged rows, the model's input (``input_ids``, or ``inputs_embeds`` with the
        soft-token ``prefix`` (N, T, d) in front of each row; ``embeds`` forces embeddings) and the attention
        mask (N, T + L); positions follow from the mask (counted over real tokens)."""
        input_ids, mask = left_pad(ragged, self.pad_id)
        if prefix is None and not embeds:
            return input_ids, {"input_ids": input_ids}, mask
        vectors = self.input_embeddings()(input_ids)
        if prefix is not None:
            vectors = torch.cat([prefix.to(vectors.dtype), vectors], dim=1)
            mask = torch.cat([mask.new_ones(len(mask), prefix.shape[1]), mask], dim=1)
        return input_ids, {"inputs_embeds": vectors}, mask

    def _response_logprobs(self, items: dict, prefix: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.packing and torch.is_grad_enabled():
            return self._packed_response_logprobs(items, prefix)
        input_ids, kwargs, mask = self._model_inputs(items, prefix)
        n, width = input_ids.shape
        responses = items["lengths"] - items["prompt_lengths"]                   # (N,) response tokens per row
        keep = int(responses.max()) if n else 0
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        logits = self.model(**kwargs, attention_mask=mask, position_ids=positions, logits_to_keep=keep + 1,
                            use_cache=False).logits[:, :-1]                       # (N, R, V): predicts the last R ids
        right = token_logprobs(logits, input_ids[:, width - keep:])            # (N, R), responses right-aligned
        # left-align: response token t of row i at column t (the reward of the t-th token, whatever the padding)
        column = torch.arange(keep, device=right.device)
        valid = column[None, :] < responses[:, None]                            # (N, R)
        source = (column[None, :] + keep - responses[:, None]).clamp(0, max(keep - 1, 0))
        return right.gather(1, source) * valid, valid

    def body_and_head(self) -> tuple[nn.Module, nn.Module]:
        """The decoder stack (ids or embeddings -> last hidden states) and the output projection of the causal LM.
        Under a peft wrapper they are the base model's own modules, with the LoRA layers inside them, so the
        adapter (and :meth:`reference`, which disables it) acts on them as on the wrapped model's forward."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return model.get_decoder(), model.get_output_embeddings()

    def _packed_hidden(self, items: dict, prefix: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The hidden states of the positions that predict response tokens, from one forward of the sequences
        ([prefix] + ids) packed into rows as long as the longest: (K, H) for the K response tokens of the batch,
        with each one's row, response column (t - prompt length) and target id. Positions restart at 0 with
        every sequence (the prefix counts first, as in the padded batch) and no mask is passed, so transformers
        keeps the sequences apart with a block-diagonal causal mask; a row's unused tail is one more block of
        pad tokens that nothing reads."""
        ids, lengths = items["ids"], items["lengths"]
        n, dev = len(lengths), ids.device
        soft = 0 if prefix is None else prefix.shape[1]
        total = lengths + soft
        width = int(total.max())
        row, offset, used = pack_rows(total.tolist(), width)
        row, offset, used = (torch.tensor(x, device=dev) for x in (row, offset, used))
        start = row * width + offset                                              # (N,) first slot of each sequence
        seq = torch.repeat_interleave(torch.arange(n, device=dev), lengths)
        inner = torch.arange(len(ids), device=dev) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths,
                                                                             lengths)
        slot = start[seq] + soft + inner                                          # slot of every id
        packed = torch.full((len(used) * width,), self.pad_id, dtype=ids.dtype, device=dev)
        packed[slot] = ids
        positions = (torch.arange(width, device=dev) - used[:, None]).reshape(-1)
        positions[slot] = soft + inner
        shape = (len(used), width)
        if prefix is None:
            kwargs = {"input_ids": packed.view(shape)}
        else:
            prefix_slot = (start[:, None] + torch.arange(soft, device=dev)).reshape(-1)
            positions[prefix_slot] = torch.arange(soft, device=dev).repeat(n)
            vectors = self.input_embeddings()(packed)
            vectors = vectors.index_copy(0, prefix_slot, prefix.reshape(-1, prefix.shape[-1]).to(vectors.dtype))
            kwargs = {"inputs_embeds": vectors.view(*shape, -1)}
        body, _ = self.body_and_head()
        extra = {"use_cache": False} if getattr(body.config, "use_cache", None) is not None else {}
        hidden = body(**kwargs, position_ids=positions.view(shape), **extra).last_hidden_state.flatten(0, 1)
        response = inner >= items["prompt_lengths"][seq]                          # ids that are response tokens
        # the token at slot s is predicted by the hidden state at s - 1 (the previous token of its sequence)
        return (hidden[slot[response] - 1], seq[response], (inner - items["prompt_lengths"][seq])[response],
                ids[response])

    def _packed_response_logprobs(self, items: dict, prefix: Tensor | None) -> tuple[Tensor, Tensor]:
        """What the padded :meth:`_response_logprobs` returns, computed packed (``packing``): the vocabulary
        projection runs on the K response-predicting positions only, never on the packed rows."""
        hidden, seq, column, targets = self._packed_hidden(items, prefix)
        n = len(items["lengths"])
        keep = int((items["lengths"] - items["prompt_lengths"]).max()) if n else 0
        logits = self.body_and_head()[1](hidden)                                 # (K, V)
        # in low precision, upcast about one padded row's worth of logits at a time (as token_logprobs does)
        chunk = len(logits) if logits.dtype == torch.float32 else max(keep, 1)
        logps = torch.cat([token_logprobs(c[None], t[None])[0] for c, t in zip(logits.split(chunk),
                                                                                targets.split(chunk))]
                          + [logits.new_zeros(0, dtype=torch.float32)])
        out = logps.new_zeros(n, keep).index_put((seq, column), logps)
        valid = torch.zeros(n, keep, dtype=torch.bool, device=logps.device).index_put(
            (seq, column), torch.ones_like(column, dtype=torch.bool))
        return out, valid

    def response_logprobs(self, items: dict, prefix: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """log pi(y_t | prefix, x, y_<t) of every response token, (N, R) float32 left-aligned (token t of the
        response in column t), and the (N, R) mask of real tokens; R = the longest response of the batch."""
        n, chunk = len(items["lengths"]), self.inference_batch_size
        if torch.is_grad_enabled() or n <= chunk:
            return self._response_logprobs(items, prefix)
        parts = []
        for s in range(0, n, chunk):
            rows = torch.arange(s, min(s + chunk, n), device=items["lengths"].device)
            parts.append(self._response_logprobs(select_rows(items, rows), None if prefix is None else prefix[rows]))
        width = max(p[0].shape[1] for p in parts)
        return (torch.cat([F.pad(p[0], (0, width - p[0].shape[1])) for p in parts]),
                torch.cat([F.pad(p[1], (0, width - p[1].shape[1])) for p in parts]))

    def sequence_logprob(self, items: dict, prefix: Tensor | None = None) -> Tensor:
        """sum_t log pi(y_t | prefix, x, y_<t): (N,) float32."""
        return self.response_logprobs(items, prefix)[0].sum(1)

    def forward(self, items: dict) -> Tensor:
        """The summed response log-probability as a (N, 1) feature (what a factored method's head reads)."""
        return self.sequence_logprob(items).unsqueeze(1)

    def prompts(self, items: dict) -> dict:
        """The prompt part of each item, as a ragged batch {'ids', 'lengths'} (what generation continues)."""
        starts = torch.cumsum(items["lengths"], 0) - items["lengths"]
        return ragged_select(items["ids"], starts, items["prompt_lengths"], torch.arange(len(starts),
                                                                                         device=starts.device))

    @torch.no_grad()
    def prefill(self, prompts: dict, prefix: Tensor | None = None) -> LMState:
        """Run ragged ``prompts`` ({'ids', 'lengths'}) once, each after its soft-token ``prefix`` (N, T, d) if
        given, keeping the KV cache: the next-token log-probabilities over the whole vocabulary after each prompt
        (what a token-level reward guides decoding with). Left-padded, positions counted over real tokens."""
        _, kwargs, mask = self._model_inputs(prompts, prefix)
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        out = self.model(**kwargs, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        return LMState(out.cache, mask, positions[:, -1], F.log_softmax(out.logits[:, -1].float(), -1))

    @torch.no_grad()
    def advance(self, state: LMState, tokens: Tensor) -> LMState:
        """Append one token per row (B,) to a :meth:`prefill` state: one cached forward of B tokens."""
        mask = torch.cat([state.mask, state.mask.new_ones(len(tokens), 1)], dim=1)
        positions = state.positions + 1
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                         cache=state.cache, use_cache=True)
        return LMState(out.cache, mask, positions, F.log_softmax(out.logits[:, -1].float(), -1))

    @torch.no_grad()
    def generate(self, prompts: dict, prefix: Tensor | None = None, max_new_tokens: int = 64,
                 **generate_kwargs) -> list[list[int]]:
        """Continuations of ragged ``prompts`` ({'ids', 'lengths'}), each after its soft-token ``prefix`` (N, T, d)
        if given: transformers' ``generate`` prefilled with ``inputs_embeds`` (prefix, then the left-padded
        prompt) and continued with its KV cache; greedy unless ``generate_kwargs`` say otherwise. The new token ids
        of each row, up to and including the first EOS."""
        _, inputs, mask = self._model_inputs(prompts, prefix, embeds=True)
        kwargs = {"do_sample": False, "pad_token_id": self.pad_id, **generate_kwargs}
        out = self.model.generate(**inputs, attention_mask=mask, max_new_tokens=max_new_tokens, **kwargs)
        eos = self.model.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        rows = []
        for row in out.tolist():  # cut at the first stop token (generate pads finished rows)
            cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            rows.append(row[:cut])
        return rows


# config fields of output heads that transform the projected logits (Gemma 2/3 soft-capping, Cohere and Granite
# scaling): a tiny random model's logits are too small for the probe below to see a soft-cap, so they are named
HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def check_packing(lm: CausalLM, name: str) -> None:
    """Refuse ``packing`` for a model the packed path would not compute exactly: its logits must be the output
    projection of the decoder stack's last hidden states (what the packed path applies to the gathered positions),
    and its attention must keep packed sequences apart (modeling code that ignores restarting position ids: some
    ``trust_remote_code`` models). The probe packs two short sequences into one row beside a long one."""
    config = lm.model.config.get_text_config()
    transforms = [k for k in HEAD_TRANSFORMS if getattr(config, k, None) not in (None, 1.0)]
    vocab = config.vocab_size
    items = {"ids": torch.tensor([3, 5, 7, 11, 13, 17, 19, 23]) % vocab, "lengths": torch.tensor([4, 2, 2]),
             "prompt_lengths": torch.tensor([2, 1, 1])}
    device = next(lm.model.parameters()).device
    items = {k: v.to(device) for k, v in items.items()}
    input_ids, mask = left_pad(items, lm.pad_id)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    body, head = lm.body_and_head()
    mode = lm.model.training
    lm.model.eval()
    try:
        with torch.no_grad():
            own = lm.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            hidden = body(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                          use_cache=False).last_hidden_state
            projected = head(hidden)
            packed, seq, column, _ = lm._packed_hidden(items, None)
    finally:
        lm.model.train(mode)
    own, projected = own[mask.bool()].float(), projected[mask.bool()].float()
    if transforms or own.shape != projected.shape or not torch.allclose(
            projected, own, rtol=1e-3, atol=1e-3 * float(own.abs().max())):
        detail = f" ({', '.join(f'{k}={getattr(config, k)}' for k in transforms)})" if transforms else ""
        raise BackboneError(f"backbone.packing: the LM head of {name!r} is not a plain projection of the last hidden "
                            f"state{detail}, which packing applies to the response positions only: set packing: "
                            "false")
    width = input_ids.shape[1]
    # the padded hidden state that predicts the same response token as each packed one
    padded = hidden[seq, width - items["lengths"][seq] + items["prompt_lengths"][seq] + column - 1].float()
    packed = packed.float()
    if not torch.allclose(packed, padded, rtol=2e-2, atol=2e-2 * float(padded.abs().max())):
        raise BackboneError(f"backbone.packing: {name!r} does not keep packed sequences apart (its attention "
                            "ignores position ids that restart per sequence): set packing: false")


@backbones.register("causal_lm")
class CausalLMBackbone(TransformerBackbone):
    """A Hugging Face causal LM (LoRA / full / frozen; 4/8-bit) serving response log-probabilities."""

    registry_name = "causal_lm"
    auto_model = "AutoModelForCausalLM"
    provides = frozenset({cap.LM})

    @dataclass
    class Config(TransformerBackbone.Config):
        append_eos: bool = opt(True, "End every response with the tokenizer's EOS token, so the LM learns to stop "
                                     "(TRL does the same); its log-probability counts in the response's.")

        forbid = (Forbid({"architecture": "encoder"}, "architecture: encoder has no next-token head; causal_lm "
                                                      "needs a decoder (Qwen2, LLaMA, SmolLM2, ...)"),)

    def prepare(self, data, items: ItemIndex) -> None:
        self._check_text(data)
        self.resolve()
        if not self.decoder:
            raise BackboneError(f"backbone.model={self.config.model!r} is not a causal LM (no next-token head); "
                                "causal_lm needs a decoder such as Qwen2, LLaMA or SmolLM2")
        tok = self.tokenizer()
        # pads are masked out, so any id serves: the tokenizer's pad, else its EOS, else 0
        self.pad_id = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
        if self.config.append_eos and tok.eos_token_id is None:
            raise BackboneError(f"backbone.append_eos=true, but the tokenizer of {self.config.model!r} has no EOS "
                                "token; set append_eos=false")
        prompts, responses = item_texts(data, items)
        self.texts = ItemTextTable(prompts, responses, tok)  # for methods that write prompts around items
        self.tokens = self.tokenize_texts(prompts, responses)
        empty = int((self.tokens.lengths - self.tokens.prompt_lengths <= 0).sum())
        if empty:
            raise BackboneError(f"{empty} item(s) have no response token left after truncation to "
                                f"max_length={self.config.max_length}; raise backbone.max_length")

    def tokenize_texts(self, prompts, responses) -> TokenizedItems:
        """Token ids of (prompt, response) texts as this backbone reads items: each response ends with EOS
        (``append_eos``), and at least one prompt token survives truncation (it predicts the first response
        token)."""
        tok = self.tokenizer()
        suffix = (tok.eos_token_id,) if self.config.append_eos else ()
        return tokenize_items(tok, prompts, responses, self.config.max_length, True, self.use_chat(tok),
                              response_suffix=suffix, min_prompt=1)

    def inputs(self, item_ids: Tensor) -> dict:
        """Ragged ids, lengths, prompt lengths and the item ids themselves (a method may cache per item: P-DPO's
        reference log-probabilities)."""
        return {**self.tokens.gather(item_ids), "prompt_lengths": self.tokens.prompt_lengths[item_ids],
                "item": item_ids}

    def encoder(self) -> nn.Module:
        c = self.config
        lm = CausalLM(self.trainable_model(), self.pad_id, c.inference_batch_size, lr=c.lr,
                      weight_decay=c.weight_decay, packing=c.packing)
        if c.packing:
            check_packing(lm, c.model)
        lm.item_texts = getattr(self, "texts", None)  # the prepared items' texts (the RAG judge reads them)
        return lm
