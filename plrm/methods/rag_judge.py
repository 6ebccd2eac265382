"""RAG preference judge: a causal LM reads the user's own most similar labelled pairs, then judges the query pair
("When Personalization Meets Reality", Dong et al., arXiv 2502.19158, §3.2 "RAG"; §4.4: all-MiniLM-L6-v2
retrieval; the authors' ``baselines/rag.py``).

For a query (x, y+, y-) of user u:

1. the retrieval key is the prompt x alone, embedded with all-MiniLM-L6-v2 (mean pooling, L2-normalised);
2. the top-k (k = 3) of u's own stored pairs by the cosine between prompts, least similar first, so that the
   most similar example sits right before the query; a stored pair identical to the query pair is never one;
3. the judge prompt (``template: original``, the authors' code):

       The examples {x_1}\\n\\nResponse A: {A_1}\\nResponse B: {B_1}\\n\\nWhich response do you prefer?\\n\\n
       Response {L_1}\\n===\\n ... Prompt: {x}\\n\\nResponse A: {A}\\n\\nResponse B: {B}\\n\\nWhich response do you
       prefer?\\nResponse

   where L_i is the letter of the response user u preferred, and y+ is shown as A or B by a coin flip;
4. preference_logit = s (log p(A) - log p(B)), the LM's log-probabilities of the answer letter after the final
   "Response" (the token " A", or "A" after a space token), s = +1 when y+ is A, -1 when it is B.

Stored pairs: a seen user's train pairs (``fit_seen_users``), a new user's support pairs (``adapt``). Per-user
state (the store, padded to the largest): ``store_items`` (U, S, 2), the item ids shown as A and B;
``store_label`` (U, S), 0 when the user preferred A; ``store_mask`` (U, S); ``store_keys`` (U, S, E), the
prompts' retrieval keys. Nothing is trained: Lightning's fit makes no optimizer step (the runner's fit then
only builds the seen users' stores). Pairwise only: there is no pointwise reward, hence no ARGS or policy stage.

Deviations from the paper's code, each for determinism or to close a leak:

* the judge is scored, not sampled: the authors sample up to 10 tokens (T 0.7, top-p 0.95) and count an answer
  right if it *contains* the letter; the log-odds are deterministic and give AUROC too;
* ``debias_order`` (plrm's option) averages the query's two A/B orders, which cancels a judge's letter bias;
* coin flips are hashes of (seed, user, items): the same query gets the same order however evaluation is
  chunked, and a stored pair keeps one letter (the authors draw Python's ``random`` anew for every prompt);
* the authors' ``paired_pref`` / ``pair_diff`` retrieval keys embed the query's chosen and rejected texts, which
  leaks the label into retrieval: only the prompt is a key;
* their dataset-specific response clean-up (``split("\\nAssistant: ")``, quotes removed) is not applied;
  a prompt that is a JSON conversation is shown as one "role: content" line per turn;
* cosine ties go to the earlier stored pair (their argsort is unstable); the judge prompt keeps its last
  ``max_length`` tokens (least similar examples go first); the LM is the backbone's (their runs: LLaMA-2-7B).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plrm import capabilities as cap
from plrm.backbones.causal_lm import left_pad
from plrm.backbones.sentence import embed_texts
from plrm.backbones.text import ItemTextTable, plain_prompt
from plrm.config import opt
from plrm.errors import BackboneError, PlrmError, RecipeError
from plrm.methods.base import CONDITIONED, MethodConfig, PersonalizedRewardModel, SeenUsersData
from plrm.methods.meta import pad_groups
from plrm.methods.user_tokens import require_causal_lm
from plrm.registry import methods

FULL_BATCH = 2**30  # more train pairs than any dataset holds: Lightning's one (empty) step sees one batch
PAIRWISE_ONLY = "rag_judge is a pairwise-only method; not usable for ARGS / policy evaluation"
ANSWER_CUE = "Response "
ORDER_SALT, LABEL_SALT = 0, 1  # the query's A/B order and a stored pair's letter are independent coins

EXAMPLE = "{prompt}\n\nResponse A: {a}\nResponse B: {b}\n\nWhich response do you prefer?\n\nResponse {label}\n===\n"
QUERIES = {
    "original": "Prompt: {prompt}\n\nResponse A: {a}\n\nResponse B: {b}\n\nWhich response do you prefer?\nResponse ",
    "instructed": "Prompt: {prompt}\nResponse A: {a}\nResponse B: {b}\nWhich response would this user prefer? "
                  "Answer A or B.\nResponse ",
}


def render_judge_prompt(examples: list[tuple[str, str, str, str]], prompt: str, a: str, b: str,
                        template: str = "original") -> str:
    """The judge prompt: "The examples ", each (prompt, response A, response B, preferred letter) example (least
    similar first), then the query; it ends with "Response ", where the answer letter goes."""
    shots = "".join(EXAMPLE.format(prompt=plain_prompt(p), a=ea, b=eb, label=lab) for p, ea, eb, lab in examples)
    return "The examples " + shots + QUERIES[template].format(prompt=plain_prompt(prompt), a=a, b=b)


def coin(seed: int, *keys: Tensor) -> Tensor:
    """A fair 0/1 coin per row of the int64 ``keys`` (each (N,)): a 32-bit multiplicative hash, no RNG state.
    Every product stays below 2**63 (a 32-bit value times a 31-bit multiplier)."""
    h = torch.full_like(keys[0], seed & 0xFFFFFFFF)
    for k in keys:
        h = ((h ^ (k & 0xFFFFFFFF)) * 0x5BD1E995) & 0xFFFFFFFF
        h = h ^ (h >> 13)
    h = (h * 0x5BD1E995) & 0xFFFFFFFF
    return ((h ^ (h >> 15)) >> 16) & 1


@methods.register("rag_judge")
class RAGJudge(PersonalizedRewardModel):
    """A causal LM judging a pair after the user's k most similar labelled pairs; pairwise only."""

    needs = frozenset({cap.LM, cap.TEXT, cap.USERS})
    reward_shape = CONDITIONED
    adapts_new_users = "yes"
    pairwise_only = True
    manual_optimization = True  # the training step makes no optimizer step (and so needs no loss)
    clips_gradients = True      # there are no gradients: a recipe's gradient_clip_val has nothing to clip
    user_state = ("store_items", "store_label", "store_mask", "store_keys")

    @dataclass
    class Config(MethodConfig):
        k: int = opt(3, "Retrieved examples per query (Dong et al. §3.2: the top three).", min=1)
        retriever: str = opt("offline:minilm", "Sentence encoder of the prompts (Dong et al. §4.4: "
                                               "all-MiniLM-L6-v2), mean-pooled and L2-normalised.")
        template: Literal["original", "instructed"] = opt(
            "original", "original: the prompt of the authors' code; instructed: the same examples, then 'Prompt: "
                        "x / Response A / Response B / Which response would this user prefer? Answer A or B.' "
                        "(plrm's variant).")
        debias_order: bool = opt(False, "Average the query's two A/B orders (plrm's option; the paper shows one "
                                        "random order).")
        seed: int = opt(0, "Seed of the coins that place the preferred response at A or B.")
        max_length: int = opt(4096, "Judge prompt tokens kept, from the right: the least similar examples go "
                                    "first (the authors' max_length: 4096).", min=8)
        batch_tokens: int = opt(16384, "Padded judge-prompt tokens per LM forward (memory vs speed; at most the "
                                       "backbone's inference_batch_size prompts).", min=1)
        batch_size: int = opt(FULL_BATCH, "Training pairs per step: nothing is trained, one batch is enough.",
                              min=1)
        max_epochs: int = opt(1, "Nothing is trained: one (empty) epoch, after which the seen users' stores are "
                                 "built.", min=1, max=1)

    def __init__(self, config: Config, n_users: int, feature_dim: int, encoder: nn.Module | None = None):
        super().__init__(config, n_users, feature_dim, encoder)
        require_causal_lm(self)
        if any(p.requires_grad for p in self.encoder.parameters()):
            raise RecipeError("rag_judge trains nothing: its LM is a frozen judge; set backbone.finetune: frozen")
        self.register_buffer("store_items", torch.zeros(n_users, 0, 2, dtype=torch.long))   # (U, S, 2)
        self.register_buffer("store_label", torch.zeros(n_users, 0, dtype=torch.long))      # (U, S)
        self.register_buffer("store_mask", torch.zeros(n_users, 0, dtype=torch.bool))      # (U, S)
        self.register_buffer("store_keys", torch.zeros(n_users, 0, 0))                      # (U, S, E)
        # retrieval key of each item's prompt (by item id), computed once per item; not checkpointed
        self.register_buffer("key_cache", torch.zeros(0, 0), persistent=False)              # (I, E)
        self.register_buffer("key_known", torch.zeros(0, dtype=torch.bool), persistent=False)
        self.embed = partial(embed_texts, model=config.retriever)  # texts -> (N, E) L2-normalised array
        self.item_texts: ItemTextTable | None = None
        self.judged = self.truncated = self.shots = 0  # diagnostics

    # ---- pairwise only --------------------------------------------------------------------------------------
    def user_reward(self, z: Tensor, user_idx: Tensor) -> Tensor:
        raise RecipeError(PAIRWISE_ONLY)

    def conditioned_reward(self, items: Any, user_idx: Tensor, item_stats: Tensor | None) -> Tensor:
        raise RecipeError(PAIRWISE_ONLY)

    def diagnostics(self) -> dict:
        return {"judged_prompts": self.judged, "truncated_prompts": self.truncated,
                "mean_examples": self.shots / self.judged if self.judged else None}

    # ---- Lightning: nothing to train ------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        return None

    def configure_optimizers(self):
        return None

    # ---- texts and retrieval keys ---------------------------------------------------------------------------
    def use_texts(self, texts: ItemTextTable) -> None:
        """Where the judge reads item texts and its tokenizer (default: the encoder's ``item_texts``)."""
        self.item_texts = texts

    def _texts(self) -> ItemTextTable:
        source = self.item_texts or getattr(self.encoder, "item_texts", None)
        if source is None:
            raise PlrmError("rag_judge reads the prompt and response text of items, and its encoder carries none "
                            "(encoder.item_texts, set by the causal_lm backbone's encoder()); call "
                            "model.use_texts(plrm.backbones.text.ItemTextTable(prompts, responses, tokenizer))")
        return source

    def prompt_keys(self, items: Tensor) -> Tensor:
        """Retrieval keys (N, E) of the prompts of ``items`` (N,), each item's prompt embedded once."""
        need = int(items.max()) + 1 if len(items) else 0
        if len(self.key_known) < need:
            known = torch.zeros(need, dtype=torch.bool, device=items.device)
            known[:len(self.key_known)] = self.key_known
            self.key_known = known
        missing = torch.unique(items[~self.key_known[items]])
        if len(missing):
            prompts, _ = self._texts().texts(missing)
            vectors = torch.as_tensor(self.embed([plain_prompt(p) for p in prompts]), device=items.device)
            size = max(need, len(self.key_cache))
            if self.key_cache.shape != (size, vectors.shape[1]):
                cache = torch.zeros(size, vectors.shape[1], device=items.device)
                if len(self.key_cache):
                    cache[:len(self.key_cache)] = self.key_cache
                self.key_cache = cache
            self.key_cache[missing] = F.normalize(vectors.float(), dim=-1)
            self.key_known[missing] = True
        return self.key_cache[items]

    # ---- the stores ------------------------------------------------------------------------------------------
    def _resize_store(self, width: int, dim: int) -> None:
        """Store buffers of ``width`` slots and key size ``dim``, keeping what fits of the old ones."""
        for name in self.user_state:
            old = getattr(self, name)
            shape = [old.shape[0], width, *old.shape[2:]]
            if name == "store_keys":
                shape[2] = dim
            new = old.new_zeros(shape)
            part = old[:, :width, :dim] if name == "store_keys" else old[:, :width]
            new[tuple(slice(0, n) for n in part.shape)] = part
            setattr(self, name, new)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Take the checkpoint's store size first (stores grow with the largest user's pairs)."""
        keys = state_dict.get("store_keys")
        if keys is not None and keys.shape[1:] != self.store_keys.shape[1:]:
            self._resize_store(keys.shape[1], keys.shape[2])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def store_pairs(self, pairs: dict, users: Tensor) -> None:
        """Make the pairs of ``pairs`` (a batch dict) the stores of ``users`` (sorted), replacing theirs."""
        chosen, rejected, owner = pairs["chosen"]["item"], pairs["rejected"]["item"], pairs["user_idx"]
        index, mask = pad_groups(torch.searchsorted(users, owner), len(users))        # (n, S_new)
        keys = self.prompt_keys(chosen) if len(chosen) else self.store_keys.new_zeros(0, self.store_keys.shape[2])
        width, dim = max(index.shape[1], self.store_mask.shape[1]), keys.shape[1]
        if (width, dim) != tuple(self.store_keys.shape[1:]):
            self._resize_store(width, dim)
        label = coin(self.config.seed, owner, chosen, rejected, torch.full_like(owner, LABEL_SALT))
        shown = torch.stack([torch.where(label == 0, chosen, rejected),
                             torch.where(label == 0, rejected, chosen)], dim=1)    # (P, 2): items shown as A, B
        s = index.shape[1]
        for name in self.user_state:
            getattr(self, name)[users] = 0
        self.store_items[users, :s] = shown[index] * mask[..., None]
        self.store_label[users, :s] = label[index] * mask
        self.store_mask[users, :s] = mask
        self.store_keys[users, :s] = keys[index] * mask[..., None]

    def fit_seen_users(self, seen: SeenUsersData) -> None:
        """The seen users' stores: all their train pairs."""
        self.store_pairs(seen.pairs(), seen.users)

    def adapt(self, support: dict, users: Tensor) -> None:
        """A new user's store: their support pairs (nothing shared changes)."""
        self.store_pairs(support, users)

    @torch.no_grad()
    def retrieve(self, keys: Tensor, user_idx: Tensor, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
        """Store slots (B, k) of each query's top-k examples by prompt cosine, most similar last, and which slots
        are real (B, k): examples from the query's user's store, never the query pair itself."""
        k = self.config.k
        if self.store_mask.shape[1] == 0:                                             # no user has a store yet
            return torch.zeros(len(user_idx), k, dtype=torch.long, device=user_idx.device), \
                torch.zeros(len(user_idx), k, dtype=torch.bool, device=user_idx.device)
        users, group = torch.unique(user_idx, return_inverse=True)                   # (U_b,), (B,)
        index, qmask = pad_groups(group, len(users))                                  # (U_b, M)
        sims = torch.bmm(keys[index], self.store_keys[users].transpose(1, 2))        # (U_b, M, S): one GEMM
        slot = torch.zeros_like(group)
        slot[index[qmask]] = torch.nonzero(qmask)[:, 1]
        sims = sims[group, slot]                                                      # (B, S)
        items = self.store_items[user_idx]                                            # (B, S, 2)
        same = ((items[..., 0] == chosen[:, None]) & (items[..., 1] == rejected[:, None])) | \
               ((items[..., 0] == rejected[:, None]) & (items[..., 1] == chosen[:, None]))
        valid = self.store_mask[user_idx] & ~same                                     # (B, S)
        sims = sims.masked_fill(~valid, float("-inf"))
        top = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]  # ties: the earlier slot
        ok = valid.gather(1, top)
        pad = k - top.shape[1]                                                         # fewer slots than k
        top, ok = F.pad(top, (0, pad)), F.pad(ok, (0, pad))
        return top.flip(1), ok.flip(1)

    # ---- judging ----------------------------------------------------------------------------------------------
    def judge_prompts(self, user_idx: Tensor, chosen: Tensor, rejected: Tensor, *orders: Tensor) -> list[str]:
        """The judge prompt of each query (B,) for each of ``orders`` (each (B,): 0 shows the chosen response as
        A, 1 as B), order by order; the examples are retrieved once."""
        slots, ok = self.retrieve(self.prompt_keys(chosen), user_idx, chosen, rejected)  # (B, k)
        shown = self.store_items[user_idx[:, None], slots]                                # (B, k, 2)
        letters = self.store_label[user_idx[:, None], slots]                             # (B, k)
        ids = torch.unique(torch.cat([chosen, rejected, shown[ok].flatten()]))
        prompts, responses = self._texts().texts(ids)
        prompt_of, response_of = dict(zip(ids.tolist(), prompts)), dict(zip(ids.tolist(), responses))
        examples = [[(prompt_of[ea], response_of[ea], response_of[eb], "AB"[lab])
                     for (ea, eb), good, lab in zip(row, row_ok, row_letters) if good]
                    for row, row_ok, row_letters in zip(shown.tolist(), ok.tolist(), letters.tolist())]
        out = []
        for order in orders:
            for shots, c, r, flip in zip(examples, chosen.tolist(), rejected.tolist(), order.tolist()):
                a, b = (r, c) if flip else (c, r)
                out.append(render_judge_prompt(shots, prompt_of[c], response_of[a], response_of[b],
                                               self.config.template))
                self.shots += len(shots)
        return out

    def _answer_ids(self, tok) -> tuple[int, int]:
        """Token ids of the letters A and B after the answer cue (" A" in most vocabularies)."""
        a, b = (tok(ANSWER_CUE + letter, add_special_tokens=False)["input_ids"] for letter in "AB")
        if len(a) != len(b) or a[:-1] != b[:-1] or a[-1] == b[-1]:
            raise BackboneError(f"rag_judge needs the answers 'A' and 'B' to be one token each after {ANSWER_CUE!r}; "
                                f"this tokenizer gives {a} and {b}")
        return a[-1], b[-1]

    @torch.no_grad()
    def answer_margins(self, prompts: list[str]) -> Tensor:
        """log p(A) - log p(B) (N,) at the answer position of each judge prompt: left-padded LM forwards of
        similar lengths, at most ``batch_tokens`` padded tokens each."""
        if not prompts:
            return torch.zeros(0)
        tok, lm = self._texts().tokenizer, self.encoder
        a_id, b_id = self._answer_ids(tok)
        special = tok("", add_special_tokens=True)["input_ids"]  # what the tokenizer puts first (a BOS, or none)
        rows = tok([p + "A" for p in prompts], add_special_tokens=False)["input_ids"]
        if any(r[-1] != a_id for r in rows):
            raise BackboneError("rag_judge: a judge prompt does not end with the answer token of 'A'")
        keep = self.config.max_length - len(special)
        cut = sum(len(r) - 1 > keep for r in rows)
        if cut:
            warnings.warn(f"rag_judge: {cut} of {len(rows)} judge prompts are longer than max_length="
                          f"{self.config.max_length} tokens and lost their first tokens (the least similar "
                          "examples first); raise methods.rag_judge.max_length to keep them whole", stacklevel=2)
        self.truncated += cut
        rows = [special + r[:-1][-keep:] for r in rows]                  # the prompt, without the answer token
        self.judged += len(rows)
        lengths = torch.tensor([len(r) for r in rows])
        device = next(lm.model.parameters()).device
        out = torch.zeros(len(rows))
        order = torch.argsort(lengths, descending=True).tolist()
        start = 0
        while start < len(order):                                        # longest first: the widest chunk first
            n = max(1, min(lm.inference_batch_size, self.config.batch_tokens // int(lengths[order[start]])))
            chunk = order[start:start + n]
            ragged = {"ids": torch.tensor([t for i in chunk for t in rows[i]], device=device),
                      "lengths": lengths[chunk].to(device)}
            input_ids, mask = left_pad(ragged, lm.pad_id)
            positions = (mask.cumsum(1) - 1).clamp_min(0)
            logits = lm.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1,
                              use_cache=False).logits[:, -1].float()     # (n, V): the next token after the cue
            logp = torch.log_softmax(logits, dim=-1)
            out[chunk] = (logp[:, a_id] - logp[:, b_id]).cpu()
            start += n
        return out

    def conditioned_pair_logit(self, chosen: Any, rejected: Any, user_idx: Tensor,
                               stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """s (log p(A) - log p(B)) of each query (B,): positive when the judge prefers the user's chosen response."""
        c, r = chosen["item"], rejected["item"]
        if not len(c):
            return torch.zeros(0, device=user_idx.device)
        if self.config.debias_order:
            both = self.answer_margins(self.judge_prompts(user_idx, c, r, torch.zeros_like(c), torch.ones_like(c)))
            return (0.5 * (both[:len(c)] - both[len(c):])).to(user_idx.device)
        order = self.query_order(user_idx, c, r)
        sign = 1.0 - 2.0 * order.float()                                  # +1: chosen shown as A
        return (sign.cpu() * self.answer_margins(self.judge_prompts(user_idx, c, r, order))).to(user_idx.device)

    def query_order(self, user_idx: Tensor, chosen: Tensor, rejected: Tensor) -> Tensor:
        """The query's coin (B,): 0 shows the chosen response as A, 1 as B."""
        return coin(self.config.seed, user_idx, chosen, rejected, torch.full_like(user_idx, ORDER_SALT))
