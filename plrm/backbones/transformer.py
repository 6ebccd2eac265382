"""TransformerBackbone: a Hugging Face model (Qwen2, LLaMA, BERT, ...) as a trainable reward encoder.

The method's head sits on the pooled hidden state: the last response token for decoders, the mean over tokens
for encoders (:mod:`plrm.backbones.text`). Fine-tuning is LoRA through peft by default (rank, alpha, dropout,
target modules, rsLoRA), or full, or none; 4-bit / 8-bit loading goes through bitsandbytes with peft's k-bit
preparation (QLoRA). Every method runs on it unchanged: the encoder's trainable parameters get their own
optimizer group (``lr`` / ``weight_decay`` here), and checkpoints hold only what was trained.

Each call of ``encoder()`` loads the base model afresh (from disk or the local Hub cache), so every method and
every split seed of a run trains its own adapter from the same starting point.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from plrm import capabilities as cap
from plrm.backbones import models
from plrm.backbones.base import Backbone
from plrm.backbones.text import TokenizedItems, item_texts, pad, pool, ragged_select, tokenize_items
from plrm.config import Forbid, Not, opt
from plrm.errors import BackboneError, DataValidationError
from plrm.items import ItemIndex
from plrm.registry import backbones


@dataclass
class HFModelConfig:
    """Options of every backbone that loads a Hugging Face model."""

    model: str = opt("", "Hub id (Qwen/Qwen2.5-0.5B-Instruct), local save_pretrained directory, or an offline alias: "
                         "offline:minilm, offline:smollm2, tiny-random:qwen2, tiny-random:llama, tiny-random:bert.")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = opt(False, "Run modeling code shipped with the model (off unless you trust it).")
    architecture: Literal["auto", "decoder", "encoder"] = opt(
        "auto", "auto: decoder if the config names a causal LM (Qwen2, LLaMA, ...), else encoder (BERT family).")
    pooling: Literal["auto", "last", "mean", "cls"] = opt(
        "auto", "Feature of an item: auto = the last response token for decoders, the token mean for encoders.")
    max_length: int = opt(512, "Tokens per item; longer items lose prompt tokens from the left first (warned).", min=2)
    chat_template: Literal["auto", "always", "never"] = opt(
        "auto", "Render the prompt as a user turn with the tokenizer's chat template (auto: when a decoder "
        "tokenizer has one); the response follows it as is, with nothing appended.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Weights dtype: auto = bfloat16 on a CUDA GPU that supports it, float32 on CPU.")
    inference_batch_size: int = opt(64, "Items per forward pass when scoring without gradients (eval, adapt).", min=1)

    forbid = (Forbid({"model": ""}, "model: is required: a Hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct), a local "
                                    f"directory, or an offline alias ({', '.join(models.ALIASES)})"),)


# reduce(hidden (N, L, H) float32, attention mask (N, L), the ragged batch) -> per-item output (N, ...)
Reduce = Callable[[Tensor, Tensor, dict], Tensor]


class HFEncoder(nn.Module):
    """Ragged token batches -> pooled features (N, H) in float32. Chunks itself when gradients are off."""

    def __init__(self, model: nn.Module, pooling: str, pad_id: int, inference_batch_size: int,
                 lr: float | None = None, weight_decay: float = 0.0, tokenizer=None, packing: bool = False):
        super().__init__()
        self.model = model
        self.packing = packing  # training forwards pack the batch's sequences into rows (decoders only)
        self.tokenizer = tokenizer  # the backbone's (what tokenized the items): methods that edit token ids use it
        self.pooling, self.pad_id, self.inference_batch_size = pooling, pad_id, inference_batch_size
        self.lr, self.weight_decay = lr, weight_decay  # the optimizer group of the trainable encoder weights

    def _forward(self, items: dict, reduce: Reduce | None) -> Tensor:
        input_ids, mask = pad(items, self.pad_id)
        if self.packing and torch.is_grad_enabled():
            hidden = self._packed_hidden(items, mask)
        else:
            hidden = self.model(input_ids=input_ids, attention_mask=mask, **self.no_cache()).last_hidden_state
        if reduce is None:
            return pool(hidden, mask, self.pooling).float()
        return reduce(hidden.float(), mask, items)

    def no_cache(self) -> dict:
        """No KV cache: nothing here decodes, and a decoder would otherwise build a DynamicCache of every layer's
        keys and values that nothing reads (as TRL's RewardTrainer; bench_trl measured no memory or speed change)."""
        return {"use_cache": False} if getattr(self.model.config, "use_cache", None) is not None else {}

    def _packed_hidden(self, items: dict, mask: Tensor) -> Tensor:
        """The hidden states (N, L, H) of the padded batch, computed from the sequences packed into rows of L tokens
        (``packing``): the model runs ``rows`` x L tokens instead of N x L. Position ids restart at 0 with every
        sequence and no attention mask is passed, so transformers builds a block-diagonal causal mask from them
        (its packed-sequence format): no token attends across a sequence boundary, and each sequence's hidden
        states equal its padded ones up to float rounding. A row's unused tail is one more block of pad tokens,
        read by nothing."""
        ids, lengths = items["ids"], items["lengths"]
        n, width = mask.shape
        row, offset, used = pack_rows(lengths.tolist(), width)
        row, offset = torch.tensor(row, device=ids.device), torch.tensor(offset, device=ids.device)
        used = torch.tensor(used, device=ids.device)
        # slot of every token of the ragged batch in the (rows, L) layout; tail slots count from 0 after `used`
        inner = torch.arange(len(ids), device=ids.device) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths,
                                                                                   lengths)
        seq = torch.repeat_interleave(torch.arange(n, device=ids.device), lengths)
        slot = row[seq] * width + offset[seq] + inner
        packed = torch.full((len(used) * width,), self.pad_id, dtype=ids.dtype, device=ids.device)
        packed[slot] = ids
        positions = (torch.arange(width, device=ids.device) - used[:, None]).reshape(-1)
        positions[slot] = inner
        hidden = self.model(input_ids=packed.view(len(used), width), position_ids=positions.view(len(used), width),
                            **self.no_cache()).last_hidden_state.flatten(0, 1)          # (rows * L, H)
        # back to the padded layout the pooling and reductions read; pad positions are zeros
        where = (row[:, None] * width + offset[:, None] + torch.arange(width, device=ids.device)).clamp_max(
            len(hidden) - 1)
        return hidden[where] * mask.unsqueeze(-1).to(hidden.dtype)

    def forward(self, items: dict, reduce: Reduce | None = None) -> Tensor:
        """Pooled features (N, H); with ``reduce``, whatever it makes of every token's hidden state (N, L, H), the
        attention mask (N, L) and the batch (Global RM-v2's mean of per-token rewards)."""
        n, chunk = len(items["lengths"]), self.inference_batch_size
        if torch.is_grad_enabled() or n <= chunk:
            return self._forward(items, reduce)
        # no gradients: length-sorted chunks (little padding), results put back in input order
        lengths = items["lengths"]
        order = torch.argsort(lengths, stable=True)
        starts = torch.cumsum(lengths, 0) - lengths
        per_item = {k: v for k, v in items.items() if k not in ("ids", "lengths")}  # prompt_lengths, ...
        feats = torch.cat([self._forward({**ragged_select(items["ids"], starts, lengths, rows),
                                          **{k: v[rows] for k, v in per_item.items()}}, reduce)
                           for rows in (order[s:s + chunk] for s in range(0, n, chunk))])
        out = torch.empty_like(feats)
        out[order] = feats
        return out


def check_packing(encoder: HFEncoder, name: str) -> None:
    """Refuse packing for a model whose attention does not keep packed sequences apart (modeling code that
    ignores restarting position ids: some ``trust_remote_code`` models): the two short sequences packed into one
    row beside a long one must give their padded hidden states."""
    vocab = encoder.model.config.get_text_config().vocab_size
    items = {"ids": torch.tensor([3, 5, 7, 11, 13, 17, 19, 23]) % vocab, "lengths": torch.tensor([4, 2, 2])}
    device = next(encoder.model.parameters()).device
    items = {k: v.to(device) for k, v in items.items()}
    input_ids, mask = pad(items, encoder.pad_id)
    mode = encoder.model.training
    encoder.model.eval()
    try:
        with torch.no_grad():
            padded = encoder.model(input_ids=input_ids, attention_mask=mask, **encoder.no_cache()).last_hidden_state
            packed = encoder._packed_hidden(items, mask)
    finally:
        encoder.model.train(mode)
    padded, packed = padded[mask.bool()].float(), packed[mask.bool()].float()
    if not torch.allclose(packed, padded, rtol=2e-2, atol=2e-2 * float(padded.abs().max())):
        raise BackboneError(f"backbone.packing: {name!r} does not keep packed sequences apart (its attention "
                            "ignores position ids that restart per sequence): set packing: false")


def pack_rows(lengths: list[int], width: int) -> tuple[list[int], list[int], list[int]]:
    """First-fit decreasing packing of sequences of ``lengths`` (each <= ``width``) into rows of ``width`` tokens:
    each sequence's row and offset in it, and the tokens used in each row. A batch's sequences, tens to hundreds:
    a Python loop (no library packs a handful of integers faster than it is called)."""
    row, offset, used = [0] * len(lengths), [0] * len(lengths), []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, u in enumerate(used) if u + lengths[i] <= width), len(used))
        if r == len(used):
            used.append(0)
        row[i], offset[i] = r, used[r]
        used[r] += lengths[i]
    return row, offset, used


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def quiet_transformers() -> None:
    """transformers 5 prints load reports for expected mismatches (a causal LM's lm_head under AutoModel)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    logging.getLogger("peft").setLevel(logging.ERROR)


class HFBackbone(Backbone):
    """Shared by the transformer and frozen-encoder backbones: resolve the model, tokenize every unique item."""

    needs = frozenset({cap.TEXT})
    provides = frozenset({cap.FEATURES})

    def resolve(self) -> None:
        """Find the model (building an offline alias on first use) and read its config: what every other call
        needs. ``prepare`` calls it; code that only tokenizes or loads the model (a policy for decoding) calls it
        alone."""
        c = self.config
        self.path = models.resolve(c.model)
        quiet_transformers()
        info = models.model_info(self.path, c.revision, c.trust_remote_code)
        self.decoder = info["decoder"] if c.architecture == "auto" else c.architecture == "decoder"
        self.hidden_size = info["hidden_size"]
        self.pooling = ("last" if self.decoder else "mean") if c.pooling == "auto" else c.pooling

    def tokenizer(self):
        """The model's tokenizer, loaded once."""
        if getattr(self, "_tokenizer", None) is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path, revision=self.config.revision,
                                                            trust_remote_code=self.config.trust_remote_code)
        return self._tokenizer

    def use_chat(self, tok) -> bool:
        mode = self.config.chat_template
        has = bool(getattr(tok, "chat_template", None))
        if mode == "always" and not has:
            raise BackboneError(f"backbone.chat_template=always, but the tokenizer of {self.config.model!r} has none")
        return self.decoder and has if mode == "auto" else mode == "always"

    def tokenize_texts(self, prompts, responses) -> TokenizedItems:
        """Token ids of (prompt, response) texts as this backbone reads items (chat rendering, truncation,
        nothing appended to the response): the items of ``prepare``, or new text (reward-guided decoding's
        prompts, generated responses to judge)."""
        tok = self.tokenizer()
        return tokenize_items(tok, prompts, responses, self.config.max_length, self.decoder, self.use_chat(tok))

    def tokenize(self, prompts, responses=None) -> dict:
        """:meth:`tokenize_texts` as a ragged batch {'ids', 'lengths', 'prompt_lengths'}; without ``responses``,
        the rendered prompts alone {'ids', 'lengths'} (what decoding continues; nothing appended)."""
        tokens = self.tokenize_texts(prompts, [""] * len(prompts) if responses is None else responses)
        if responses is None:
            return ragged_select(tokens.ids, tokens.offsets[:-1], tokens.prompt_lengths, torch.arange(len(prompts)))
        return {**tokens.gather(torch.arange(len(prompts))), "prompt_lengths": tokens.prompt_lengths}

    def _check_text(self, data) -> None:
        if cap.TEXT not in data.provides:
            raise DataValidationError(
                f"{data.name}: backbone '{type(self).registry_name}' reads prompt and response text, but the dataset "
                "provides none (it is a feature-only world); use backbone 'precomputed' or a text dataset")

    @property
    def feature_dim(self) -> int:
        return self.hidden_size


@backbones.register("transformer")
class TransformerBackbone(HFBackbone):
    """A Hugging Face transformer fine-tuned with the reward head: LoRA (default), full, or frozen; 4/8-bit."""

    registry_name = "transformer"
    auto_model = "AutoModel"  # the transformers class that loads it (a causal LM backbone: AutoModelForCausalLM)
    provides = frozenset({cap.FEATURES, cap.TOKEN_STATES})

    @dataclass
    class Config(HFModelConfig):
        finetune: Literal["lora", "full", "frozen"] = opt(
            "lora", "Which weights of the transformer train: LoRA adapters (peft), all of them, or none.")
        lr: float = opt(1e-4, "Learning rate of the transformer's trainable weights (the head keeps the method's).",
                        gt=0)
        weight_decay: float = opt(0.0, "AdamW weight decay of the transformer's trainable weights.", min=0)
        lora_r: int = opt(8, "LoRA rank.", min=1)
        lora_alpha: float = opt(16.0, "LoRA alpha (scaling alpha / r, or alpha / sqrt(r) with use_rslora).", gt=0)
        lora_dropout: float = opt(0.05, "Dropout on the LoRA path.", min=0, lt=1)
        lora_target_modules: list[str] | str | None = opt(
            None, "Modules that get adapters: a list of names, 'all-linear', or null for peft's default of the "
                  "architecture (q_proj and v_proj for Qwen2 / LLaMA; query and value for BERT).")
        use_rslora: bool = opt(False, "Rank-stabilized LoRA (scaling alpha / sqrt(r)).")
        quantization: Literal["none", "4bit", "8bit"] = opt(
            "none", "Load the base weights in 4 or 8 bits with bitsandbytes (QLoRA; needs the 'quant' extra). "
                    "4-bit runs on CPU too; 8-bit needs a CUDA GPU.")
        bnb_4bit_quant_type: Literal["nf4", "fp4"] = opt("nf4", "4-bit data type.")
        bnb_4bit_double_quant: bool = opt(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
        gradient_checkpointing: bool = opt(False, "Recompute activations in backward (less memory, ~30% slower).")
        kbit_upcast: bool = opt(True, "With quantization: peft's k-bit preparation casts every weight it did not "
                                      "quantize (embeddings, norms, a tied LM head) from bf16 / fp16 to fp32, as "
                                      "QLoRA does. false keeps them in dtype: less memory (Qwen2.5-0.5B: its 136 M-"
                                      "parameter embedding), the frozen weights' arithmetic in bf16.")
        packing: bool = opt(False, "Training forwards pack each batch's sequences into rows as long as its longest "
                                   "one (position ids restart per sequence, block-diagonal causal attention): no "
                                   "compute on padding. Decoders only; rewards equal the padded ones to float "
                                   "rounding (checked on the model when the encoder is built).")

        forbid = (Forbid({"finetune": "full", "quantization": Not("none")},
                         "finetune: full cannot train quantized (4bit or 8bit) weights; use finetune: lora (QLoRA) "
                         "or quantization: none"),)

    def prepare(self, data, items: ItemIndex) -> None:
        self._check_text(data)
        self.resolve()
        if self.config.packing and not self.decoder:
            raise BackboneError(f"backbone.packing: true packs decoder sequences behind a causal mask; "
                                f"{self.config.model!r} is an encoder (bidirectional attention): set packing: false")
        tok = self.tokenizer()
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.tokens = self.tokenize_texts(*item_texts(data, items))

    def inputs(self, item_ids: Tensor) -> dict:
        """The items' ragged token batch and each one's prompt length (where the response starts)."""
        return {**self.tokens.gather(item_ids), "prompt_lengths": self.tokens.prompt_lengths[item_ids]}

    def load_base(self, device_map=None) -> nn.Module:
        """The pretrained transformer (no head; ``auto_model`` decides), quantized if configured."""
        import transformers

        c = self.config
        kwargs = dict(revision=c.revision, trust_remote_code=c.trust_remote_code, dtype=resolve_dtype(c.dtype))
        if c.quantization != "none":
            kwargs.update(quantization_config=bnb_config(c, kwargs["dtype"]),
                          device_map=device_map or quantized_device_map(c.quantization))
        model = getattr(transformers, self.auto_model).from_pretrained(self.path, **kwargs)
        if c.quantization != "none":
            disable_cpu_repack(model)
        return model

    def trainable_model(self) -> nn.Module:
        """The loaded model made trainable as ``finetune`` says: LoRA adapters (peft), all weights, or none."""
        c = self.config
        model = self.load_base()
        if c.finetune == "frozen":
            model.requires_grad_(False)
        elif c.finetune == "lora":
            model = add_lora(model, c)
        elif c.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # from_pretrained returns eval mode, and Lightning keeps submodules' modes: train mode turns on dropout
        model.train(c.finetune != "frozen")
        return model

    def encoder(self) -> nn.Module:
        c = self.config
        encoder = HFEncoder(self.trainable_model(), self.pooling, self.pad_id, c.inference_batch_size,
                            lr=c.lr, weight_decay=c.weight_decay, tokenizer=self.tokenizer(), packing=c.packing)
        if c.packing:
            check_packing(encoder, c.model)
        return encoder


def bnb_config(c, compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise BackboneError(f"backbone.quantization={c.quantization} needs bitsandbytes: "
                            "pip install 'plrm[quant]' (with -c constraints/cpu.txt on a CPU machine)") from e
    if c.quantization == "8bit":
        if not torch.cuda.is_available():
            raise BackboneError("backbone.quantization=8bit needs a CUDA GPU (bitsandbytes' int8 matmul has no CPU "
                                "backward); use quantization=4bit on CPU")
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=c.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=c.bnb_4bit_double_quant, bnb_4bit_compute_dtype=compute_dtype)


def quantized_device_map(kind: str) -> dict:
    # bitsandbytes quantizes at load time on the device it loads to; each DDP rank takes its own GPU.
    if torch.cuda.is_available():
        return {"": f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"}
    return {"": "cpu"}


def disable_cpu_repack(model: nn.Module) -> None:
    """bitsandbytes on CPUs with AVX512-BF16 repacks 4-bit weights for inference the first time an eval /
    no-grad forward runs; training afterwards crashes (Qwen2) or silently computes wrong gradients (LLaMA).
    Lightning's sanity check and every evaluation trigger it, so 4-bit layers never repack."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def add_lora(model: nn.Module, c) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if c.quantization != "none" and c.kbit_upcast:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=c.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif c.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                      target_modules=c.lora_target_modules, use_rslora=c.use_rslora, bias="none")
    try:
        return get_peft_model(model, lora)
    except ValueError as e:  # e.g. no default target modules known for this architecture
        raise BackboneError(f"backbone LoRA on {c.model!r}: {e}; set backbone.lora_target_modules") from e
