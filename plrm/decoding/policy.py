"""The policy of reward-guided decoding: a causal LM that proposes the next token.

A :class:`Policy` is a :class:`~plrm.backbones.causal_lm.CausalLM` (the KV-cached ``prefill`` / ``advance`` of the
LM methods) with its backbone, which renders prompts (chat template, truncation) and scores responses the way the
LM methods' items are tokenized: prompt and response tokenized separately, the response ending with EOS. It is
either a base model loaded for decoding (:meth:`Policy.load`, frozen) or a P-DPO model, whose user's soft tokens
go in front of every prompt (:meth:`Policy.of_method`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from plrm.backbones.causal_lm import CausalLM, CausalLMBackbone, LMState
from plrm.config import opt

# end-of-turn tokens of the chat templates plrm meets (Qwen2.5 / SmolLM2, LLaMA 3, Phi-3): a chat model ends its
# answer with one of them, which is not always its tokenizer's eos_token
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


@dataclass
class PolicyConfig:
    """The base policy of reward-guided decoding."""

    model: str = opt("offline:smollm2", "Hub id, local directory or offline alias of the policy (a causal LM that "
                                        "shares the reward model's tokenizer).")
    revision: str | None = opt(None, "Hub revision to pin.")
    dtype: str = opt("auto", "Weights dtype: auto (bfloat16 on a GPU that supports it, else float32), float32, "
                             "bfloat16, float16.")
    chat_template: str = opt("auto", "Render prompts with the tokenizer's chat template: auto, always, never.")
    max_length: int = opt(1024, "Prompt (+ response, when scoring) tokens; longer prompts lose tokens from the "
                                "left (warned).", min=2)
    inference_batch_size: int = opt(16, "Rows per forward when scoring responses.", min=1)


class Policy:
    """A causal LM proposing tokens, with its backbone's tokenization; ``prefix`` gives each user's soft tokens
    (P-DPO) or None (a base model)."""

    def __init__(self, lm: CausalLM, backbone: CausalLMBackbone,
                 prefix: Callable[[Tensor], Tensor] | None = None, name: str = "") -> None:
        self.lm, self.backbone, self.prefix = lm, backbone, prefix
        self.name = name or backbone.config.model
        tok = backbone.tokenizer()
        vocab = tok.get_vocab()
        ids = {tok.eos_token_id} | {vocab[t] for t in END_OF_TURN if t in vocab}
        eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
        ids |= set(eos if isinstance(eos, list) else [eos])
        self.stop_ids = torch.tensor(sorted(i for i in ids if i is not None), dtype=torch.long)

    @classmethod
    def load(cls, config: PolicyConfig) -> Policy:
        """A frozen base model for decoding (no adapter, eval mode)."""
        backbone = CausalLMBackbone(CausalLMBackbone.Config(
            model=config.model, revision=config.revision, dtype=config.dtype, chat_template=config.chat_template,
            max_length=config.max_length, finetune="frozen", inference_batch_size=config.inference_batch_size))
        backbone.resolve()
        tok = backbone.tokenizer()
        pad = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
        model = backbone.load_base().eval().requires_grad_(False)
        return cls(CausalLM(model, pad, config.inference_batch_size), backbone)

    @classmethod
    def of_method(cls, method, backbone: CausalLMBackbone) -> Policy:
        """A trained LM method as the policy: P-DPO generates from pi_theta(. | e_u, x) (its user's soft tokens
        in front of the prompt)."""
        prefix = method.token_prefix if hasattr(method, "token_prefix") else None
        return cls(method.encoder, backbone, prefix, name=type(method).__name__)

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def tokenize(self, prompts, responses=None) -> dict:
        """Rendered prompts (ragged {'ids', 'lengths'}), or (prompt, response + EOS) items to score."""
        return {k: v.to(self.device) for k, v in self.backbone.tokenize(prompts, responses).items()}

    def user_prefix(self, users: Tensor) -> Tensor | None:
        return None if self.prefix is None else self.prefix(users)

    def prefill(self, prompts: dict, users: Tensor) -> LMState:
        return self.lm.prefill(prompts, self.user_prefix(users))

    def advance(self, state: LMState, tokens: Tensor) -> LMState:
        return self.lm.advance(state, tokens)

    @torch.no_grad()
    def response_logprobs(self, items: dict, users: Tensor) -> tuple[Tensor, Tensor]:
        """log pi(y_t | [e_u,] x, y_<t) of every response token (N, R) and its mask: one forward per response."""
        return self.lm.response_logprobs(items, self.user_prefix(users))
