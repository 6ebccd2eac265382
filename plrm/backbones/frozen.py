"""FrozenEncoder: features of (prompt, response) from a frozen Hugging Face model, cached on disk.

Every unique item is encoded once per cache, whatever the number of users, methods, split seeds and runs: the
cache (:mod:`plrm.backbones.cache`) is keyed by the model, its revision (for a local directory: a fingerprint of
its config and weight files), the pooling, the maximum length, the prompt rendering and normalization, and by a
hash of each item's text. A run whose items are all cached does not load the model at all. ``plrm embed
--recipe ...`` fills the cache ahead of a sweep.

The default CPU encoder for text datasets is ``offline:minilm`` (all-MiniLM-L6-v2, mean pooling, 384-d).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from plrm.backbones import models
from plrm.backbones.cache import FeatureCache
from plrm.backbones.text import item_texts, pad, pool, tokenize_items
from plrm.backbones.transformer import HFBackbone, HFModelConfig, resolve_dtype
from plrm.config import opt
from plrm.items import ITEM_SEP, ItemIndex
from plrm.registry import backbones

CACHE_FORMAT = 1  # bump when what a cached vector means changes (rendering, pooling code)


def model_fingerprint(path: str, revision: str | None) -> str:
    """What identifies the weights: the Hub revision, or for a local directory a hash of its config and of
    its weight files' names, sizes and modification times (re-saved weights get new features)."""
    p = Path(path)
    if not p.is_dir():
        return revision or "default"
    h = hashlib.blake2b(digest_size=8)
    h.update((p / "config.json").read_bytes())
    for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


@backbones.register("frozen_encoder")
class FrozenEncoder(HFBackbone):
    """A frozen Hugging Face encoder or decoder; features computed once per unique text and cached on disk."""

    registry_name = "frozen_encoder"
    caches_features = True  # `plrm embed` fills its cache

    @dataclass
    class Config(HFModelConfig):
        model: str = opt("offline:minilm", HFModelConfig.__dataclass_fields__["model"].metadata["help"])
        max_length: int = opt(256, "Tokens per item; longer items lose prompt tokens from the left first (warned).",
                              min=2)
        normalize: bool = opt(False, "L2-normalize each feature vector (sentence-transformers' cosine convention).")
        standardize: bool = opt(False, "Scale features to zero mean and unit variance per dimension "
                                       "(statistics over all items of the dataset; applied after the cache).")
        cache: bool = opt(True, "Keep features on disk and reuse them across runs.")
        cache_dir: str | None = opt(None, "Feature cache root (null: $PLRM_CACHE/features, ~/.cache/plrm/features).")
        cache_dtype: Literal["float32", "float16"] = opt("float32", "Stored precision (float16 halves the disk).")
        device: Literal["auto", "cpu", "cuda"] = opt("auto", "Where features are computed (auto: a GPU if any).")
        progress: bool | Literal["auto"] = opt("auto", "Progress bar with texts/s while encoding "
                                                       "(auto: on a terminal).")

    def __init__(self, config) -> None:
        super().__init__(config)
        self._stats: dict = {}
        self.shift: Tensor | None = None  # standardize: the features' mean and std over the dataset's items
        self.scale: Tensor | None = None

    def namespace(self, chat: bool) -> dict:
        c = self.config
        return {"model": c.model, "fingerprint": model_fingerprint(self.path, c.revision), "pooling": self.pooling,
                "max_length": c.max_length, "decoder": self.decoder, "chat_template": chat,
                "normalize": c.normalize, "dtype": c.cache_dtype, "format": CACHE_FORMAT}

    def prepare(self, data, items: ItemIndex) -> None:
        self._check_text(data)
        self.resolve()
        c = self.config
        tok = self.tokenizer()
        chat = self.use_chat(tok)
        prompts, responses = item_texts(data, items)
        texts = [f"{p}{ITEM_SEP}{r}" for p, r in zip(prompts, responses)]
        root = Path(c.cache_dir).expanduser() if c.cache_dir else models.cache_root() / "features"
        encoder = _LazyEncoder(self, tok, chat)
        start = time.perf_counter()
        if c.cache:
            cache = FeatureCache(root, self.namespace(chat))
            feats = cache.get_or_compute(texts, encoder, batch_size=c.inference_batch_size, progress=c.progress)
            encoded = cache.last_computed
        else:
            uniq, inverse = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
            feats = np.concatenate([encoder(list(uniq[i:i + c.inference_batch_size]))
                                    for i in range(0, len(uniq), c.inference_batch_size)])[inverse]
            encoded = len(uniq)
        seconds = time.perf_counter() - start
        features = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
        self.shift, self.scale = None, None
        if c.standardize:
            self.shift, self.scale = features.mean(0), features.std(0).clamp_min(1e-6)
            features = (features - self.shift) / self.scale
        self._features = features
        self._stats = {"items": len(texts), "encoded": int(encoded), "from_cache": len(texts) - int(encoded),
                       "encode_seconds": round(seconds, 3),
                       "texts_per_second": round(encoded / seconds, 1) if encoded and seconds > 0 else None,
                       "cache": str(cache.path) if c.cache else None}

    @property
    def feature_dim(self) -> int:
        return int(self._features.shape[1]) if hasattr(self, "_features") else self.hidden_size

    def inputs(self, item_ids: Tensor) -> Tensor:
        return self._features[item_ids]

    def encoder(self) -> nn.Module:
        return nn.Identity()

    @property
    def pad_id(self) -> int:
        return self.tokenizer().pad_token_id or 0

    def load_model(self) -> nn.Module:
        """The frozen model itself (eval mode, no gradients), as the features were computed: what reward-guided
        decoding runs, a KV-cached step at a time, to read the feature of every prefix."""
        return _LazyEncoder(self, self.tokenizer(), self.use_chat(self.tokenizer())).load()

    def encode_texts(self, prompts: list[str], responses: list[str]) -> Tensor:
        """Features (N, D) of new (prompt, response) texts exactly as methods read the dataset's items (pooled,
        normalised, standardized with the dataset's statistics), computed now and not cached: what decoding
        reads of the responses it is writing."""
        if getattr(self, "_text_encoder", None) is None:
            self._text_encoder = _LazyEncoder(self, self.tokenizer(), self.use_chat(self.tokenizer()))
        step = self.config.inference_batch_size
        texts = [f"{p}{ITEM_SEP}{r}" for p, r in zip(prompts, responses)]
        if not texts:
            return torch.zeros(0, self.feature_dim)
        raw = np.concatenate([self._text_encoder(texts[i:i + step]) for i in range(0, len(texts), step)])
        feats = torch.from_numpy(raw)
        return (feats - self.shift) / self.scale if self.shift is not None else feats

    def feature_transform(self, hidden: Tensor) -> Tensor:
        """Pooled hidden states (N, H) -> the features methods read: L2-normalised (``normalize``) and
        standardized with the dataset's statistics (``standardize``), as ``prepare`` made them."""
        feats = hidden.float()
        if self.config.normalize:
            feats = torch.nn.functional.normalize(feats, dim=-1)
        if self.shift is not None:
            feats = (feats - self.shift.to(feats.device)) / self.scale.to(feats.device)
        return feats

    def stats(self) -> dict:
        return dict(self._stats)


class _LazyEncoder:
    """compute() for the cache: loads the model on the first batch that is not cached."""

    def __init__(self, backbone: FrozenEncoder, tokenizer, chat: bool):
        self.b, self.tok, self.chat = backbone, tokenizer, chat
        self.model = None

    def load(self) -> nn.Module:
        self._load()
        return self.model

    def _load(self) -> None:
        from transformers import AutoModel

        c = self.b.config
        device = ("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device
        dtype = resolve_dtype(c.dtype) if device == "cuda" else torch.float32
        self.device = torch.device(device)
        self.model = AutoModel.from_pretrained(self.b.path, revision=c.revision, dtype=dtype,
                                               trust_remote_code=c.trust_remote_code).to(self.device).eval()
        self.model.requires_grad_(False)

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.model is None:
            self._load()
        c = self.b.config
        prompts, responses = zip(*(t.split(ITEM_SEP, 1) for t in texts))
        tokens = tokenize_items(self.tok, prompts, responses, c.max_length, self.b.decoder, self.chat)
        ragged = {"ids": tokens.ids.to(self.device), "lengths": tokens.lengths.to(self.device)}
        input_ids, mask = pad(ragged, self.tok.pad_token_id or 0)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        feats = pool(hidden, mask, self.b.pooling).float()
        if c.normalize:
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats.cpu().numpy()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' fork warning under DataLoader workers
