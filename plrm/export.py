"""``plrm export``: a trained method as a ``save_pretrained``-style directory, and its loader.

Every method whose reward is ``r_u(x, y) = W[u] . g(h(x, y))`` -- a user-independent head ``g`` (plain linear
layers and activations) on the backbone's feature ``h``, dotted with a per-user weight row -- exports through
its ``export_head()``: ``(the layers of g, W)``. LoRe / LoRe-Alt: g = the basis, W = softmax(user logits);
PReF: g = phi, W = the user vectors; MRM (basis linear / mlp): g = the basis, W = the adapted user weights;
BT: g = its linear head, W = ones (the same reward for everyone). Export directory::

    plrm_export.json     format version, plrm version, method, base model (as given and resolved), revision,
                         how features are made (architecture, pooling, max_length, chat template, dtype,
                         quantization, pad id, normalization), the head ops with their tensor names, the user
                         ids in W's row order and which were trained (seen users; plus the unseen users for a
                         checkpoint written by `plrm adapt`), the reward mean and std
    recipe.yaml          the run's resolved recipe
    head.safetensors     g's tensors (``head.<i>.weight`` / ``.bias``), ``user_weights`` (U, Z), and the feature
                         standardization statistics when the backbone standardizes (``features.mean`` / ``.std``)
    tokenizer/           tokenizer.save_pretrained (text backbones): rendering is reproducible
    adapter/             transformer with finetune=lora: the peft adapter (adapter_config.json and
                         adapter_model.safetensors), to put on the base model named in plrm_export.json
    model/               transformer with finetune=full: the fine-tuned transformer (save_pretrained)
    merged/              with --merge (finetune=lora, unquantized): the base with the adapter merged in, and
                         the tokenizer: a plain transformers directory

A method on a ``causal_lm`` backbone (P-DPO, GenARM) exports as an LM (``"kind": "lm"`` in plrm_export.json):
its reward is a log-likelihood, not ``W[u] . g(h)``. The directory holds ``adapter/`` (or ``model/``),
``tokenizer/``, ``recipe.yaml`` and, for a method with soft user tokens, ``user_tokens.safetensors`` (the user
model's tables, with the user ids in row order); plrm_export.json records beta, whether the reward subtracts the
reference model (the base model with the adapter off) and how items are tokenized. The loader
(:class:`ExportedLMRewardModel`) gives ``reward(prompts, responses, users)`` and greedy ``generate(prompts,
users)``, with plrm.backbones.causal_lm's log-probability code and no training code.

A ``frozen_encoder`` backbone exports no weights of its own: features come from the frozen model it names (the
loader loads it), then the recorded normalization. A ``precomputed`` backbone's features ship with its dataset:
the export holds the head and the user weights only, and rewards come from the same features
(:meth:`ExportedRewardModel.reward_from_features`).

:func:`load_exported` reads the directory back with torch, transformers, peft and safetensors and the pure text
helpers of :mod:`plrm.backbones.text` (tokenization, padding, pooling), never with the training code (Lightning,
``plrm.methods``, ``plrm.runner``): the same items give the same rewards as the training-code model.

The reward mean and std are those of the training-code rewards of every response of the seen users' train
pairs, each scored for its own user (std with Bessel's correction): ``(r - mean) / std`` is a calibrated reward.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from plrm.errors import ExportError  # noqa: F401  (re-exported: plrm.errors defines every error class)

FORMAT = "plrm-export"
FORMAT_VERSION = 1
META_FILE = "plrm_export.json"
HEAD_FILE = "head.safetensors"
RECIPE_FILE = "recipe.yaml"
ADAPTER_DIR, MODEL_DIR, TOKENIZER_DIR, MERGED_DIR = "adapter", "model", "tokenizer", "merged"
USER_WEIGHTS = "user_weights"
BACKBONES = ("transformer", "frozen_encoder", "precomputed", "causal_lm")
USER_TOKENS_FILE = "user_tokens.safetensors"
STATS_ROWS = 512  # train pairs scored at once for the reward statistics




# ---- the head: layers of g as data ----------------------------------------------------------------------------
_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: "identity"}


def head_ops(modules: list[nn.Module], prefix: str = "head") -> tuple[list[dict], dict[str, Tensor]]:
    """The layers of g (nn.Sequential flattened) as JSON ops and their tensors, in order."""
    flat: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        if isinstance(m, nn.Sequential):
            for child in m:
                walk(child)
        else:
            flat.append(m)

    for m in modules:
        walk(m)
    ops, tensors = [], {}
    for i, m in enumerate(flat):
        if type(m) is nn.Linear:
            name = f"{prefix}.{i}"
            tensors[f"{name}.weight"] = m.weight.detach().float().cpu().contiguous()
            bias = None
            if m.bias is not None:
                bias = f"{name}.bias"
                tensors[bias] = m.bias.detach().float().cpu().contiguous()
            ops.append({"op": "linear", "weight": f"{name}.weight", "bias": bias})
        elif type(m) in _ACTIVATIONS:
            ops.append({"op": _ACTIVATIONS[type(m)]})
        elif type(m) is nn.GELU:
            ops.append({"op": "gelu", "approximate": m.approximate})
        else:
            raise ExportError(f"the head has a {type(m).__name__} layer; plrm export writes nn.Linear, nn.ReLU, "
                              "nn.Tanh, nn.Sigmoid, nn.GELU and nn.Identity layers (nn.Sequential flattened)")
    return ops, tensors


def apply_ops(ops: list[dict], tensors: dict[str, Tensor], x: Tensor) -> Tensor:
    """Run the ops of :func:`head_ops` (and the feature ops below) on x (N, D)."""
    for op in ops:
        kind = op["op"]
        if kind == "linear":
            bias = tensors[op["bias"]] if op.get("bias") else None
            x = nn.functional.linear(x, tensors[op["weight"]], bias)
        elif kind == "relu":
            x = torch.relu(x)
        elif kind == "tanh":
            x = torch.tanh(x)
        elif kind == "sigmoid":
            x = torch.sigmoid(x)
        elif kind == "gelu":
            x = nn.functional.gelu(x, approximate=op.get("approximate", "none"))
        elif kind == "identity":
            pass
        elif kind == "l2_normalize":
            x = nn.functional.normalize(x, dim=-1)
        elif kind == "cast":  # features stored in a lower precision by the feature cache, read back as float32
            x = x.to(getattr(torch, op["dtype"])).float()
        elif kind == "standardize":
            x = (x - tensors[op["mean"]]) / tensors[op["std"]]
        else:
            raise ExportError(f"unknown op {kind!r} in the export (written by a newer plrm?)")
    return x


# ---- writing ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A new folder beside ``out`` to write an export into: renamed to ``out`` (empty or absent, checked before)
    when the block ends normally, removed otherwise, so a failed export leaves nothing behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory; not overwriting it (choose another --out)")


def _pick_label(recipe, method: str | None) -> str:
    labels = list(recipe.methods)
    if method is None:
        if len(labels) > 1:
            raise ExportError(f"the run has several methods; choose one with --method: {', '.join(labels)}")
        return labels[0]
    if method not in recipe.methods:
        raise ExportError(f"no method labelled {method!r} in the run; its methods: {', '.join(labels)}")
    return method


def _feature_ops(backbone, prepared) -> tuple[list[dict], dict[str, Tensor]]:
    """What the backbone does to a pooled feature before the method sees it: L2 normalization, the feature
    cache's storage precision, standardization with the dataset's statistics."""
    import dataclasses

    c = backbone.config
    ops: list[dict] = []
    tensors: dict[str, Tensor] = {}
    if getattr(c, "normalize", False):
        ops.append({"op": "l2_normalize"})
    if getattr(c, "cache", False) and getattr(c, "cache_dtype", "float32") != "float32":
        ops.append({"op": "cast", "dtype": c.cache_dtype})
    if getattr(c, "standardize", False):
        raw = type(backbone)(dataclasses.replace(c, standardize=False))  # same features, read from the cache
        raw.prepare(prepared.data, prepared.items)
        feats = raw.inputs(torch.arange(prepared.items.n_items)).float()
        tensors["features.mean"] = feats.mean(0).contiguous()
        tensors["features.std"] = feats.std(0).clamp_min(1e-6).contiguous()
        ops.append({"op": "standardize", "mean": "features.mean", "std": "features.std"})
    return ops, tensors


def _backbone_meta(recipe, prepared) -> dict:
    b, c = prepared.backbone, recipe.backbone.config
    out: dict = {"name": recipe.backbone.name}
    if not hasattr(b, "path"):  # precomputed (or a plugin's feature backbone): features ship with the data
        out["standardize"] = bool(getattr(c, "standardize", False))
        return out
    from plrm.backbones.transformer import resolve_dtype

    tok_pad = getattr(b, "pad_id", None)
    if tok_pad is None:  # frozen_encoder: the tokenizer's pad id, as its encoder pads
        tok_pad = b.tokenizer().pad_token_id or 0
    if recipe.backbone.name == "frozen_encoder":
        device = ("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device
        dtype = resolve_dtype(c.dtype) if device == "cuda" else torch.float32
    else:
        dtype = resolve_dtype(c.dtype)
    quant = getattr(c, "quantization", "none")
    out.update({
        "model": c.model, "resolved_model": b.path, "revision": c.revision, "trust_remote_code": c.trust_remote_code,
        "architecture": "decoder" if b.decoder else "encoder", "pooling": b.pooling, "max_length": c.max_length,
        "chat_template": bool(b.use_chat(b.tokenizer())), "dtype": str(dtype).removeprefix("torch."),
        "pad_token_id": int(tok_pad), "finetune": getattr(c, "finetune", "frozen"),
        "quantization": {"kind": quant, "bnb_4bit_quant_type": getattr(c, "bnb_4bit_quant_type", None),
                         "bnb_4bit_double_quant": getattr(c, "bnb_4bit_double_quant", None)},
        "inference_batch_size": c.inference_batch_size,
    })
    return out


@torch.no_grad()
def _reward_stats(model, prepared, split, ops, tensors, weights: Tensor, device) -> dict:
    """Mean and std of the training-code rewards of both responses of every seen-user train pair, and the check
    that the exported head and user weights reproduce the method's head on the same features."""
    from plrm.data.datamodule import PreferenceDataModule
    from plrm.data.splits import TRAIN
    from plrm.distributed import to_device

    dm = PreferenceDataModule(prepared, split)
    rows = torch.from_numpy(split.rows(TRAIN))
    rewards, worst = [], 0.0
    w = weights.to(device)
    for s in range(0, len(rows), STATS_ROWS):
        batch = dm.batch(rows[s:s + STATS_ROWS])
        u = batch["user_idx"].to(device)
        for items in (batch["chosen"], batch["rejected"]):
            h = model.encode(to_device(items, device))
            r = model.head(h, u)
            mine = (apply_ops(ops, tensors, h.float()) * w[u]).sum(-1)
            worst = max(worst, float((r - mine).abs().max()) / max(1.0, float(r.abs().max())))
            rewards.append(r.double().cpu())
    if worst > 1e-4:
        raise ExportError(f"{type(model).__name__}.export_head() does not reproduce its reward: exported head and "
                          f"user weights differ from user_reward(item_embedding(h)) by {worst:.3g} (relative)")
    r = torch.cat(rewards) if rewards else torch.zeros(0, dtype=torch.float64)
    return {"mean": float(r.mean()) if len(r) else 0.0, "std": float(r.std()) if len(r) > 1 else 1.0,
            "n": len(r), "over": "both responses of the seen users' train pairs, each for its own user",
            "max_head_error": worst}


def export(run_dir: str | Path, out: str | Path, method: str | None = None, seed: int | None = None,
           checkpoint: str | None = None, merge: bool = False, show: bool = True) -> Path:
    """Write method ``method`` (its label; default: the recipe's only method) of split seed ``seed`` (default:
    the first) from ``checkpoint`` (a file name in ``seed-<s>/``, default ``<label>.ckpt``; an adapted
    ``<label>.adapted-k<k>.ckpt`` exports the unseen users too) to the new directory ``out``."""
    from safetensors.torch import save_file

    from plrm import __version__, registry
    from plrm.methods.base import PersonalizedRewardModel
    from plrm.runner import RECIPE_FILE as RUN_RECIPE_FILE
    from plrm.runner import Run

    run = Run.open(run_dir)
    recipe = run.recipe
    out = Path(out).expanduser()
    _check_out(out)
    label = _pick_label(recipe, method)
    comp = recipe.methods[label]
    cls = registry.methods.get(comp.name)
    lm = recipe.backbone.name == "causal_lm"
    if not lm and getattr(cls, "export_head", None) is getattr(PersonalizedRewardModel, "export_head"):
        raise ExportError(f"method '{comp.name}' ({cls.__name__}) has no export_head(): plrm export writes rewards "
                          "of the form W[u] . g(h) and this method does not say how it is one")
    if recipe.backbone.name not in BACKBONES:
        raise ExportError(f"backbone '{recipe.backbone.name}': plrm export knows how the features of "
                          f"{', '.join(BACKBONES)} are made, not of this one")
    c = recipe.backbone.config
    finetune = getattr(c, "finetune", None)
    quant = getattr(c, "quantization", "none")
    if merge and lm:
        raise ExportError("--merge refused for a causal_lm method: its reward needs the base model without the "
                          "adapter (the reference) as well as with it; export without --merge")
    if merge:
        if recipe.backbone.name != "transformer" or finetune != "lora":
            raise ExportError(f"--merge merges a LoRA adapter into its base model, but backbone "
                              f"'{recipe.backbone.name}'{f' with finetune={finetune}' if finetune else ''} has none")
        if quant != "none":
            raise ExportError(f"--merge refused: the base model is {quant} quantized and merging the adapter into "
                              "quantized weights rounds it (the merged model would not give the same rewards); "
                              "export without --merge (adapter + base model), or train with quantization=none")
    seed = run.seeds[0] if seed is None else seed
    if seed not in run.seeds:
        raise ExportError(f"split seed {seed} is not in the run; its seeds: {run.seeds}")
    ckpt_name = checkpoint or f"{label}.ckpt"
    state = run.checkpoint(label, seed, ckpt_name)
    if "user_ids" in state:
        raise ExportError(f"{ckpt_name} holds only new users' state (`plrm adapt --pairs`); export the run's "
                          f"{label}.ckpt or {label}.adapted-k<k>.ckpt")
    if state.get("label") not in (None, label):
        raise ExportError(f"{ckpt_name} is a checkpoint of method '{state['label']}', not of '{label}'")
    adapted = "k" in state

    prepared = run.prepared
    split = run.split(seed)
    model = run.build_method(label, seed)
    model.load_checkpoint_state(state["state_dict"])
    model.eval()
    if lm:
        return _export_lm(run, recipe, model, label, comp.name, seed, ckpt_name, adapted, out, show)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    try:
        modules, weights = model.export_head()
    except NotImplementedError as e:
        raise ExportError(f"method '{label}' ({comp.name}) cannot be exported: {e}") from e
    ops, tensors = head_ops(modules)
    weights = weights.detach().float().cpu().contiguous()
    if weights.shape[0] != len(split.user_ids):
        raise ExportError(f"export_head() returned {weights.shape[0]} user weight rows for {len(split.user_ids)} users")
    feature_ops, feature_tensors = _feature_ops(prepared.backbone, prepared)
    stats = _reward_stats(model, prepared, split, ops, tensors, weights, device)

    trained, generic = _trained_users(model, split, adapted)
    bb = _backbone_meta(recipe, prepared)
    files = {"head": HEAD_FILE, "recipe": RECIPE_FILE, "tokenizer": None, "adapter": None, "model": None,
             "merged": None}

    with staged_dir(out) as tmp:
        shutil.copyfile(run.dir / RUN_RECIPE_FILE, tmp / RECIPE_FILE)
        save_file({**tensors, **feature_tensors, USER_WEIGHTS: weights}, str(tmp / HEAD_FILE),
                  metadata={"format": "pt", "plrm_format": FORMAT})
        if hasattr(prepared.backbone, "tokenizer"):
            prepared.backbone.tokenizer().save_pretrained(tmp / TOKENIZER_DIR)
            files["tokenizer"] = TOKENIZER_DIR
        encoder = getattr(model.encoder, "model", None)  # HFEncoder's transformer (a PeftModel under LoRA)
        if recipe.backbone.name == "transformer" and encoder is not None:
            if finetune == "lora":
                encoder.save_pretrained(tmp / ADAPTER_DIR)
                files["adapter"] = ADAPTER_DIR
            elif finetune == "full":
                encoder.save_pretrained(tmp / MODEL_DIR)
                files["model"] = MODEL_DIR
            if merge:  # last: merging changes the model in place
                merged = encoder.merge_and_unload()
                merged.save_pretrained(tmp / MERGED_DIR)
                prepared.backbone.tokenizer().save_pretrained(tmp / MERGED_DIR)
                files["merged"] = MERGED_DIR
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "plrm_version": __version__,
            "method": {"name": comp.name, "label": label, "class": cls.__name__},
            "source": {"run": str(run.dir), "seed": seed, "checkpoint": ckpt_name, "adapted": adapted},
            "backbone": bb,
            "feature_dim": int(prepared.backbone.feature_dim),
            "feature_ops": feature_ops,
            "head": ops,
            "user_weights": USER_WEIGHTS,
            "users": {"ids": [str(u) for u in split.user_ids], "trained": trained.tolist(), "generic": generic},
            "reward": stats,
            "merged": files["merged"] is not None,
            "files": files,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if show:
        n = int(trained.sum())
        print(f"exported {label} ({comp.name}, seed {seed}, {ckpt_name}): {n} users, reward mean "
              f"{stats['mean']:.4g} std {stats['std']:.4g} -> {out}")
    return out


def _trained_users(model, split, adapted: bool) -> tuple[Tensor, bool]:
    """Which users' state was trained (the seen users; all of them for an adapted checkpoint or a generic model),
    and whether the model is generic (one reward for every user)."""
    generic = model.adapts_new_users == "generic"
    trained = torch.zeros(len(split.user_ids), dtype=torch.bool)
    trained[torch.from_numpy(split.seen_users)] = True
    if adapted or generic:
        trained[:] = True
    return trained, generic


def _export_lm(run, recipe, model, label: str, name: str, seed: int, ckpt_name: str, adapted: bool, out: Path,
               show: bool) -> Path:
    """``plrm export`` of a method on a causal_lm backbone: adapter, tokenizer, soft user tokens, recipe."""
    from safetensors.torch import save_file

    from plrm import __version__
    from plrm.runner import RECIPE_FILE as RUN_RECIPE_FILE

    split = run.split(seed)
    c = recipe.backbone.config
    trained, generic = _trained_users(model, split, adapted)
    tokens = getattr(model, "user_tokens", None)
    files = {"recipe": RECIPE_FILE, "tokenizer": TOKENIZER_DIR, "adapter": None, "model": None,
             "user_tokens": USER_TOKENS_FILE if tokens is not None else None}
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "plrm_version": __version__, "kind": "lm",
        "method": {"name": name, "label": label, "class": type(model).__name__},
        "source": {"run": str(run.dir), "seed": seed, "checkpoint": ckpt_name, "adapted": adapted},
        "backbone": {**_backbone_meta(recipe, run.prepared), "append_eos": bool(c.append_eos)},
        "reward": {"beta": float(model.config.beta), "reference": bool(getattr(model, "uses_reference", False))},
        "user_tokens": None if tokens is None else {"model": tokens.kind, "n_tokens": tokens.n_tokens,
                                                    "dim": tokens.dim},
        "users": {"ids": [str(u) for u in split.user_ids], "trained": trained.tolist(), "generic": generic},
        "files": files,
    }
    with staged_dir(out) as tmp:
        shutil.copyfile(run.dir / RUN_RECIPE_FILE, tmp / RECIPE_FILE)
        run.prepared.backbone.tokenizer().save_pretrained(tmp / TOKENIZER_DIR)
        if c.finetune == "lora":
            model.encoder.model.save_pretrained(tmp / ADAPTER_DIR)
            files["adapter"] = ADAPTER_DIR
        elif c.finetune == "full":
            model.encoder.model.save_pretrained(tmp / MODEL_DIR)
            files["model"] = MODEL_DIR
        if tokens is not None:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in tokens.state_dict().items()},
                      str(tmp / USER_TOKENS_FILE), metadata={"format": "pt", "plrm_format": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if show:
        print(f"exported {label} ({name}, seed {seed}, {ckpt_name}): {int(trained.sum())} users, causal LM reward "
              f"(beta {meta['reward']['beta']:g}{', minus the reference' if meta['reward']['reference'] else ''})"
              f" -> {out}")
    return out


# ---- loading (no training code) ---------------------------------------------------------------------------------
class _ExportedUsers:
    """The user ids of an export and the row of each (shared by both kinds of export)."""

    def _read_users(self, meta: dict) -> None:
        users = meta["users"]
        self.user_ids: list[str] = list(users["ids"])
        self.trained_user_ids: list[str] = [u for u, t in zip(users["ids"], users["trained"]) if t]
        self.generic: bool = bool(users.get("generic", False))
        self._row = {u: i for i, u in enumerate(self.user_ids)}
        self._trained = dict(zip(users["ids"], users["trained"]))

    def user_rows(self, users: list[str]) -> Tensor:
        rows = []
        for u in users:
            u = str(u)
            if self.generic:  # one reward for everyone: any user id is served
                rows.append(self._row.get(u, 0))
                continue
            if u not in self._row:
                known = ", ".join(self.trained_user_ids[:5])
                raise KeyError(f"unknown user {u!r}: the export has {len(self.trained_user_ids)} trained users "
                               f"(e.g. {known}); fit new users with `plrm adapt --pairs` on the run")
            if not self._trained[u]:
                raise KeyError(f"user {u!r} is an unseen user of the run that this checkpoint did not adapt; "
                               "export the checkpoint written by `plrm adapt` (--checkpoint <label>.adapted-k<k>.ckpt)")
            rows.append(self._row[u])
        return torch.tensor(rows, dtype=torch.long, device=self.device)


class ExportedLMRewardModel(_ExportedUsers):
    """A causal-LM reward read from a ``plrm export`` directory (P-DPO, GenARM): ``reward(prompts, responses,
    users)`` = beta (log pi(y | [user tokens,] x) [- log pi_ref(y | x)]), and ``generate(prompts, users)``."""

    def __init__(self, meta: dict, user_tensors: dict[str, Tensor], model: nn.Module, tokenizer,
                 device: torch.device):
        from plrm.backbones.causal_lm import CausalLM

        self.meta, self.tensors, self.tokenizer, self.device = meta, user_tensors, tokenizer, device
        self._read_users(meta)
        b = meta["backbone"]
        self.lm = CausalLM(model, b["pad_token_id"], int(b.get("inference_batch_size") or 64)).eval()
        self.beta: float = float(meta["reward"]["beta"])
        self.uses_reference: bool = bool(meta["reward"]["reference"])

    def user_tokens(self, users: list[str]) -> Tensor | None:
        """The soft tokens (N, T_u, d) of ``users`` (None for a method without them)."""
        spec = self.meta.get("user_tokens")
        if spec is None:
            return None
        rows, t = self.user_rows(users), self.tensors
        if spec["model"] == "individual":
            return t["generic_tokens"].unsqueeze(0) + t["offsets"][rows]
        weights = torch.softmax(t["logits"][rows], dim=-1)
        return (weights @ t["cluster_tokens"].flatten(1)).view(-1, spec["n_tokens"], spec["dim"])

    def _items(self, prompts: list[str], responses: list[str]) -> dict:
        from plrm.backbones.text import tokenize_items

        b = self.meta["backbone"]
        suffix = (self.tokenizer.eos_token_id,) if b["append_eos"] else ()
        toks = tokenize_items(self.tokenizer, list(prompts), list(responses), b["max_length"], True,
                              b["chat_template"], response_suffix=suffix, min_prompt=1)
        return {"ids": toks.ids.to(self.device), "lengths": toks.lengths.to(self.device),
                "prompt_lengths": toks.prompt_lengths.to(self.device)}

    @torch.inference_mode()
    def reward(self, prompts: list[str], responses: list[str], users: list[str]) -> Tensor:
        """Reward (N,) of each (prompt, response) for its user."""
        if not (len(prompts) == len(responses) == len(users)):
            raise ValueError(f"prompts, responses and users differ in length: {len(prompts)}, {len(responses)}, "
                             f"{len(users)}")
        prefix = self.user_tokens(users)  # unknown users fail before the LM runs
        items = self._items(prompts, responses)
        logps = self.lm.sequence_logprob(items, prefix)
        if self.uses_reference:
            with self.lm.reference():
                logps = logps - self.lm.sequence_logprob(items)
        return (self.beta * logps).cpu()

    def generate(self, prompts: list[str], users: list[str], max_new_tokens: int = 64, **generate_kwargs) -> list[str]:
        """Each user's continuation of each prompt (greedy unless ``generate_kwargs`` say otherwise), the prompt
        rendered as in training (chat template), the user's soft tokens in front."""
        prefix = self.user_tokens(users)
        items = self._items(prompts, [""] * len(prompts))
        rows = self.lm.generate(self.lm.prompts(items), prefix, max_new_tokens, **generate_kwargs)
        return [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows]


class ExportedRewardModel(_ExportedUsers):
    """A reward model read from a ``plrm export`` directory: ``reward(prompts, responses, users)``."""

    def __init__(self, meta: dict, tensors: dict[str, Tensor], encoder: nn.Module | None, tokenizer,
                 device: torch.device):
        self.meta, self.tensors, self.encoder, self.tokenizer, self.device = meta, tensors, encoder, tokenizer, device
        self._read_users(meta)
        self.user_weights = tensors[meta["user_weights"]]
        self.reward_mean: float = float(meta["reward"]["mean"])
        self.reward_std: float = float(meta["reward"]["std"])

    @torch.inference_mode()
    def reward_from_features(self, features: Tensor, users: list[str], calibrated: bool = False) -> Tensor:
        """Rewards (N,) of raw backbone features (N, D) (pooled, before normalization) for ``users``."""
        if len(features) != len(users):
            raise ValueError(f"{len(features)} feature rows but {len(users)} users")
        h = apply_ops(self.meta["feature_ops"], self.tensors, features.to(self.device).float())
        z = apply_ops(self.meta["head"], self.tensors, h)
        r = (z * self.user_weights[self.user_rows(users)]).sum(-1)
        return ((r - self.reward_mean) / self.reward_std if calibrated else r).cpu()

    @torch.inference_mode()
    def features(self, prompts: list[str], responses: list[str]) -> Tensor:
        """Pooled features (N, D) of (prompt, response) items, as the backbone computes them (float32)."""
        from plrm.backbones.text import pad, pool, ragged_select, tokenize_items

        b = self.meta["backbone"]
        if self.encoder is None:
            raise ExportError(f"backbone '{b['name']}' reads features shipped with its dataset: score them with "
                              "reward_from_features(features, users)")
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not len(prompts):
            return torch.zeros(0, self.meta["feature_dim"])
        toks = tokenize_items(self.tokenizer, list(prompts), list(responses), b["max_length"],
                              b["architecture"] == "decoder", b["chat_template"])
        ids, lengths = toks.ids.to(self.device), toks.lengths.to(self.device)
        starts = toks.offsets[:-1].to(self.device)
        chunk = int(b.get("inference_batch_size") or 64)
        # as the training code scores without gradients: length-sorted chunks, put back in input order
        n = len(lengths)
        order = torch.argsort(lengths, stable=True) if n > chunk else torch.arange(n, device=self.device)
        parts = []
        for s in range(0, len(order), chunk):
            input_ids, mask = pad(ragged_select(ids, starts, lengths, order[s:s + chunk]), b["pad_token_id"])
            hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
            parts.append(pool(hidden, mask, b["pooling"]).float())
        feats = torch.cat(parts)
        out = torch.empty_like(feats)
        out[order] = feats
        return out

    def reward(self, prompts: list[str], responses: list[str], users: list[str], calibrated: bool = False) -> Tensor:
        """Reward (N,) of each (prompt, response) for its user; ``calibrated``: (r - reward_mean) / reward_std."""
        if not (len(prompts) == len(responses) == len(users)):
            raise ValueError(f"prompts, responses and users differ in length: {len(prompts)}, {len(responses)}, "
                             f"{len(users)}")
        self.user_rows(users)  # unknown users fail before the transformer runs
        return self.reward_from_features(self.features(prompts, responses), users, calibrated)


def _load_transformer(meta: dict, root: Path, merged: bool, device: torch.device, base_model: str | None,
                      dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    import transformers

    from plrm.backbones import models

    # a causal-LM export needs the LM head; a reward-model export reads hidden states
    AutoModel = transformers.AutoModelForCausalLM if meta.get("kind") == "lm" else transformers.AutoModel  # noqa: N806

    b, files = meta["backbone"], meta["files"]
    quant = b["quantization"]["kind"] if b.get("quantization") else "none"
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if merged:
        if not files.get("merged"):
            raise ExportError(f"{root} holds no merged model (export with --merge)")
        return AutoModel.from_pretrained(root / files["merged"], **kwargs).to(device).eval()
    if files.get("model"):  # finetune=full
        return AutoModel.from_pretrained(root / files["model"], **kwargs).to(device).eval()
    if base_model is not None:
        path = base_model
    elif Path(b["resolved_model"]).is_dir() or not Path(b["resolved_model"]).is_absolute():
        path = b["resolved_model"]  # the directory it was trained from, or a Hub id
    else:
        path = models.resolve(b["model"])  # an offline alias, rebuilt in this machine's cache
    kwargs["revision"] = b.get("revision")
    if quant != "none":
        from transformers import BitsAndBytesConfig

        q = b["quantization"]
        config = (BitsAndBytesConfig(load_in_8bit=True) if quant == "8bit" else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q["bnb_4bit_quant_type"],
            bnb_4bit_use_double_quant=q["bnb_4bit_double_quant"], bnb_4bit_compute_dtype=dtype))
        kwargs.update(quantization_config=config, device_map={"": str(device)})
    model = AutoModel.from_pretrained(path, **kwargs)
    if quant != "none":
        from peft import prepare_model_for_kbit_training

        # as in training: the same fp32 casts, and no AVX512-BF16 repacking of the 4-bit weights
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    else:
        model = model.to(device)
    if files.get("adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, root / files["adapter"])
    return model.eval()


def load_exported(path: str | Path, merged: bool = False, device: str | torch.device = "cpu",
                  base_model: str | None = None, dtype: str | None = None,
                  trust_remote_code: bool = False) -> ExportedRewardModel | ExportedLMRewardModel:
    """Read a ``plrm export`` directory. ``merged``: use the merged transformer instead of base + adapter;
    ``base_model``: where the base model is now (default: the path or Hub id it was trained from, or its
    offline alias); ``dtype``: override the recorded weights dtype; ``trust_remote_code``: needed (and only
    honoured) when the export's model ships its own modeling code."""
    from safetensors.torch import load_file

    root = Path(path).expanduser()
    if not (root / META_FILE).is_file():
        raise ExportError(f"{root} is not a plrm export (no {META_FILE})")
    meta = json.loads((root / META_FILE).read_text())
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ExportError(f"{root}: export format {meta.get('format')} v{meta.get('format_version')} is not one "
                          f"this plrm reads ({FORMAT} v{FORMAT_VERSION} or older)")
    device = torch.device(device)
    lm = meta.get("kind") == "lm"
    if lm and merged:
        raise ExportError(f"{root} is a causal-LM export: it has no merged model (its reward needs the base model "
                          "without the adapter too)")
    tensor_file = meta["files"]["user_tokens"] if lm else meta["files"]["head"]
    tensors = {k: v.to(device) for k, v in load_file(str(root / tensor_file)).items()} if tensor_file else {}
    b = meta["backbone"]
    if b.get("trust_remote_code") and not trust_remote_code:
        raise ExportError(f"the base model {b['model']!r} runs its own modeling code; pass trust_remote_code=True "
                          "if you trust it")
    encoder = tokenizer = None
    if "model" in b:  # a Hugging Face backbone: features come from text
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # load reports of expected mismatches (a causal LM's lm_head)
        hf_logging.disable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(root / meta["files"]["tokenizer"])
        torch_dtype = getattr(torch, dtype or b["dtype"])
        with warnings.catch_warnings():  # peft calls an API transformers 5 deprecates; nothing a user can act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated")
            encoder = _load_transformer(meta, root, merged, device, base_model, torch_dtype, trust_remote_code)
        encoder.requires_grad_(False)
    elif merged:
        raise ExportError(f"{root} holds no transformer to merge (backbone '{b['name']}')")
    if lm:
        return ExportedLMRewardModel(meta, tensors, encoder, tokenizer, device)
    return ExportedRewardModel(meta, tensors, encoder, tokenizer, device)
