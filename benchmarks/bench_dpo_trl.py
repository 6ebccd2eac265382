"""LM preference training: plrm's GenARM and P-DPO beside TRL's ``DPOTrainer`` (CPU).

    python benchmarks/bench_dpo_trl.py             # Qwen2-architecture model (hidden 256, 4 layers), 10 steps
    python benchmarks/bench_dpo_trl.py --quick     # tiny-random:qwen2, 6 steps: a smoke run of the same code

The LM-method counterpart of ``bench_trl.py`` (plrm's reward-model training beside TRL's ``RewardTrainer``), and
built the same way: the same Qwen2-architecture model with random weights and plrm's byte tokenizer (nothing is
downloaded), fp32 on CPU, the same LoRA configuration (r 8, alpha 16, no dropout, q_proj and v_proj), AdamW at the
same learning rate without weight decay, beta 0.1 on every side, on the same pairs: the attribute world's texts
(``attribute_world n_users=40``) tokenized once by plrm's ``causal_lm`` backbone (chat template on the prompt,
EOS after each response), so every side reads identical token ids. Each side trains one epoch over the same
``steps x pairs`` pairs in a fresh process, the pairs in the same order and batches (TRL with
``train_sampling_strategy="sequential"``):

- TRL: ``DPOTrainer`` with peft's CAUSAL_LM LoRA and ``precompute_ref_log_probs=True`` (the reference model, the
  base model with the adapter disabled, runs once over the epoch's pairs before training, in batches of the
  training batch size, TRL's default; timed apart from the steps). The only change to TRL is a subclass whose
  ``_prepare_dataset`` takes the pre-tokenized ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` as they are
  instead of tokenizing text; its collator right-pads chosen and rejected into one batch of 2B sequences, one
  forward per step.
- plrm GenARM (Xu et al., "GenARM: Reward Guided Generation with Autoregressive Reward Model for Test-time
  Alignment", arXiv 2410.08193): DPO's loss with the reference term removed (pi_ref = 1), so no reference pass
  at all; plrm's datamodule batches (ragged, left-padded per batch), ``GenARM.training_step`` (chosen and
  rejected in one forward of 2B sequences) and its ``configure_optimizers``.
- plrm P-DPO (Li et al., "Personalized Language Modeling from Personalized Human Feedback", arXiv 2402.05133):
  alpha DPO(u) + (1 - alpha) DPO(u_0) with alpha 0.5 and 8 soft user tokens per user; its reference
  log-probabilities are computed once per distinct item before training (what ``PDPO.before_fit`` does, in
  batches of 2 x pairs sequences like TRL's: ``inference_batch_size``; timed apart), and each step
  runs the policy on 4B sequences (chosen and rejected, each after the user's tokens and after the generic
  user's).

Two more sides run GenARM and P-DPO with ``backbone.packing: true``: each training forward packs its sequences
(P-DPO's soft tokens included) first-fit decreasing into rows as long as the batch's longest, position ids
restarting per sequence, and projects only the response-predicting positions onto the vocabulary; the before /
after of packing in the same run, on the same batches. The check process also asserts that the packed GenARM and
P-DPO losses and LoRA gradients equal the padded ones on the first batch.

Pairings. (a) GenARM against DPOTrainer with precomputed reference log-probabilities: per step both run the LoRA
policy forward and backward on the same 2B sequences and read no reference model, so tokens/s compare the same
work; TRL's one-time reference pass is reported beside it (GenARM needs none). (b) P-DPO against the same
DPOTrainer run: P-DPO trains two DPO terms on every pair (4B policy sequences, each 8 soft tokens longer) where DPO
trains one, so at equal efficiency it makes half the pairs per second; it is reported as pairs/s and as policy
tokens/s (every real token the policy forward runs on, P-DPO's two terms both counted, soft tokens not) and
positions/s (every position of the padded policy batch, soft tokens and padding included: the raw work rate).

Before timing, a check process builds plrm's models and TRL's trainer on the first batch with the same LoRA weights
(drawn away from the initial adapter, so the policy differs from the reference) and asserts: TRL's precomputed
reference log-probabilities equal P-DPO's reference cache; TRL's DPO loss with them equals plrm's DPO loss
(``dpo_logits`` + ``dpo_loss`` over plrm's ``sequence_logprob``, one P-DPO term without soft tokens); TRL's loss
with zero reference log-probabilities equals ``GenARM.loss``, and its LoRA gradients equal GenARM's.

Reported per side: real (non-padding) tokens of the pairs per second over the steps after ``--warmup``, pairs/s,
response tokens/s, policy tokens/s, positions/s, median step time, the padded share of the positions run, the one-time
reference pass, and the live peak RSS of a separate run in which glibc maps every block over 64 KiB on its own
(``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``; see ``results/trl_cpu.md``). Writes
``benchmarks/results/dpo_trl_cpu.{json,md}`` (``--out`` to change).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tables import write_report  # noqa: E402
from bench_trl import (  # noqa: E402
    LORA,
    LR,
    StepClock,
    model_and_out,
    pick_rows,
    plrm_steps,
    rss_mib,
    run_child,
    run_sides,
    side_parser,
)

RESULTS = Path(__file__).resolve().parent / "results"
BETA = 0.1          # DPO's beta on every side (TRL's default; it does not change the work of a step)
ALPHA = 0.5         # P-DPO's alpha (P-RLHF's)
SIDES = ("trl", "genarm", "pdpo", "genarm_packed", "pdpo_packed")
LABELS = {"trl": "TRL DPOTrainer, precomputed reference", "genarm": "plrm GenARM (no reference)",
          "pdpo": "plrm P-DPO (alpha 0.5, cached reference)",
          "genarm_packed": "plrm GenARM, `packing: true`", "pdpo_packed": "plrm P-DPO, `packing: true`"}


# ---- data -----------------------------------------------------------------------------------------------------
def lm_datamodule(model_path: str, pairs: int, packing: bool = False):
    """plrm's datamodule over the attribute world with the causal_lm backbone (its tokenization), train rows."""
    from plrm.backbones.causal_lm import CausalLMBackbone
    from plrm.data.attributes import AttributeWorld
    from plrm.data.datamodule import PreferenceDataModule, PreparedData
    from plrm.data.splits import TRAIN, make_split

    data = AttributeWorld(AttributeWorld.Config(n_users=40)).load()
    cfg = CausalLMBackbone.Config(model=model_path, lora_r=LORA["r"], lora_alpha=LORA["alpha"],
                                  lora_dropout=LORA["dropout"], lora_target_modules=LORA["targets"], lr=LR,
                                  weight_decay=0.0, max_length=1024, dtype="float32", inference_batch_size=2 * pairs,
                                  packing=packing)
    prepared = PreparedData(data, CausalLMBackbone(cfg))
    split = make_split(data.pairs.data.table, 0, 0.5, 0.5, 0.0, need_support=1, source="bench")
    return prepared, split, PreferenceDataModule(prepared, split, batch_size=pairs), split.rows(TRAIN)


def split_items(items: dict) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and response ids of each item of a ragged causal_lm batch."""
    prompts, responses = [], []
    for seq, p in zip(torch.split(items["ids"], items["lengths"].tolist()), items["prompt_lengths"].tolist()):
        prompts.append(seq[:p].tolist())
        responses.append(seq[p:].tolist())
    return prompts, responses


def trl_dataset(batch: dict):
    """TRL's pre-tokenized preference rows from a plrm batch: the pair's prompt ids, chosen and rejected ids."""
    from datasets import Dataset

    prompts, chosen = split_items(batch["chosen"])
    prompts_r, rejected = split_items(batch["rejected"])
    assert prompts == prompts_r, "a pair's chosen and rejected items must share their prompt tokens"
    return Dataset.from_dict({"prompt_ids": prompts, "chosen_ids": chosen, "rejected_ids": rejected})


# ---- the sides ----------------------------------------------------------------------------------------------------
def plrm_model(method: str, prepared, split):
    """plrm's GenARM or P-DPO on the backbone's LoRA causal LM, beta BETA, plain mean over pairs (as TRL)."""
    from plrm.methods.genarm import GenARM
    from plrm.methods.pdpo import PDPO

    torch.manual_seed(0)
    cls = GenARM if method == "genarm" else PDPO
    extra = {"alpha": ALPHA} if method == "pdpo" else {}
    cfg = cls.Config(beta=BETA, lr=LR, weight_decay=0.0, balance_users=False, **extra)
    return cls(cfg, n_users=len(split.user_ids), feature_dim=prepared.backbone.feature_dim,
               encoder=prepared.backbone.encoder())


def reference_pass(model, batch: dict) -> tuple[float, int]:
    """P-DPO's one-time reference pass (``before_fit``): each distinct item of the epoch's pairs once, in item order,
    adapter off, no soft tokens; then training steps only index the cache. Seconds and sequences run."""
    import numpy as np

    from plrm.backbones.causal_lm import select_rows
    from plrm.methods.base import concat_inputs

    start = time.perf_counter()
    items = concat_inputs(batch["chosen"], batch["rejected"])
    _, first = np.unique(items["item"].numpy(), return_index=True)
    with torch.no_grad():
        model.item_statistics(select_rows(items, torch.from_numpy(first)))
    model.reference_ready = True
    return time.perf_counter() - start, len(first)


def counts(batch: dict, method: str, n_tokens: int, packing: bool = False) -> dict:
    """What a step of ``method`` runs on: real tokens of the pairs (each sequence once), response tokens, policy
    tokens (P-DPO: both terms), and the positions of the policy batch (soft tokens count as positions): padded
    rows, or with ``packing`` the packed rows of the same width (P-DPO packs both terms' sequences together, as
    its one forward does)."""
    from plrm.backbones.transformer import pack_rows

    lengths = torch.cat([batch["chosen"]["lengths"], batch["rejected"]["lengths"]])
    prompts = torch.cat([batch["chosen"]["prompt_lengths"], batch["rejected"]["prompt_lengths"]])
    terms, prefix = (2, n_tokens) if method == "pdpo" else (1, 0)
    tokens = int(lengths.sum())
    width = int(lengths.max()) + prefix
    rows = len(pack_rows((lengths + prefix).tolist() * terms, width)[2]) if packing else terms * len(lengths)
    return {"tokens": tokens, "response": int((lengths - prompts).sum()), "policy": terms * tokens,
            "positions": rows * width,
            "real_positions": terms * (tokens + len(lengths) * prefix), "pairs": len(batch["user_idx"])}


def run_plrm(side: str, model_path: str, steps: int, pairs: int, warmup: int) -> dict:
    method, packing = side.removesuffix("_packed"), side.endswith("_packed")
    prepared, split, dm, train = lm_datamodule(model_path, pairs, packing)
    rows = pick_rows(train, steps, pairs)
    model = plrm_model(method, prepared, split)
    ref_seconds, ref_sequences = 0.0, 0
    if method == "pdpo":
        ref_seconds, ref_sequences = reference_pass(model, dm.batch(rows))
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    model.train()
    n_tokens = getattr(model.config, "n_tokens", 0)
    record = {"times": [], "steps": [], "ref_seconds": ref_seconds, "ref_sequences": ref_sequences,
              "optimizer": f"{type(opt).__name__}(fused={opt.defaults.get('fused')})",
              "lrs": sorted({g["lr"] for g in opt.param_groups})}
    seen = 0
    rss = [rss_mib()]  # after setup (model, data, reference pass, optimizer), before the first step
    for i, batch, seconds in plrm_steps(model, opt, dm, rows, steps, pairs, rss):
        c = counts(batch, method, n_tokens, packing)
        seen += c["tokens"]
        if i >= warmup:
            record["times"].append(seconds)
            record["steps"].append(c)
    record.update(all_tokens=seen, rss_setup_mib=rss[0], rss_training_peak_mib=max(rss))
    return record


def trl_trainer(model_path: str, dataset, steps: int, pairs: int, callbacks=(), timing: dict | None = None):
    """TRL's DPOTrainer on pre-tokenized rows: LoRA (CAUSAL_LM), precomputed reference log-probabilities, rows
    in dataset order. ``timing`` receives the seconds of the reference precompute."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer reading token ids as given (its own preparation would tokenize prompt/chosen/rejected text)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            start = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            if timing is not None:
                timing["ref_seconds"] = time.perf_counter() - start
            return out

    tok = AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["targets"], task_type="CAUSAL_LM", bias="none")
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl_dpo_bench_"), per_device_train_batch_size=pairs,
                     max_steps=steps, learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant",
                     warmup_steps=0, logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True,
                     dataloader_num_workers=0, max_length=None, disable_dropout=True, seed=0, bf16=False,
                     fp16=False, gradient_checkpointing=False, beta=BETA, loss_type=["sigmoid"],
                     precompute_ref_log_probs=True, precompute_ref_batch_size=pairs, padding_free=False,
                     train_sampling_strategy="sequential")
    return PreTokenizedDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                                  peft_config=lora, callbacks=list(callbacks))


def run_trl(model_path: str, steps: int, pairs: int, warmup: int) -> dict:
    prepared, _, dm, train = lm_datamodule(model_path, pairs)
    rows = pick_rows(train, steps, pairs)
    batches = [dm.batch(rows[i * pairs:(i + 1) * pairs]) for i in range(steps)]  # what each step trains on
    dataset = trl_dataset(dm.batch(rows))
    record = {"times": [], "steps": [], "rss": [], "trl_tokens": []}

    def timed(step: int, tokens: int) -> None:
        record["steps"].append(counts(batches[step - 1], "trl", 0))
        record["trl_tokens"].append(tokens)

    clock = StepClock(record, warmup, lambda: trainer, timed)

    timing: dict = {}
    trainer = trl_trainer(model_path, dataset, steps, pairs, [clock], timing)
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    # TRL's own count of attention-mask tokens, per step: the same pairs as plrm's batch of that step
    assert record["trl_tokens"] == [s["tokens"] for s in record["steps"]], "TRL's batches are not plrm's"
    record.update(all_tokens=int(trainer._total_train_tokens), ref_seconds=timing.get("ref_seconds", 0.0),
                  ref_sequences=2 * len(dataset), optimizer=f"{type(opt).__name__}(fused={opt.defaults.get('fused')})",
                  lrs=sorted({g["lr"] for g in opt.param_groups}))
    record["rss_setup_mib"], record["rss_training_peak_mib"] = record["rss"][0], max(record.pop("rss"))
    return record


# ---- the loss check -----------------------------------------------------------------------------------------------
def run_check(model_path: str, pairs: int) -> dict:
    """plrm's losses against TRL's on the first batch, same LoRA weights (see the module docstring)."""
    from plrm.methods.base import concat_inputs
    from plrm.methods.losses import dpo_logits, dpo_loss

    prepared, split, dm, train = lm_datamodule(model_path, pairs)
    batch = dm.batch(pick_rows(train, 1, pairs))
    genarm, pdpo = plrm_model("genarm", prepared, split), plrm_model("pdpo", prepared, split)
    reference_pass(pdpo, batch)
    trainer = trl_trainer(model_path, trl_dataset(batch), 1, pairs)
    mine = dict(genarm.encoder.model.named_parameters())
    theirs = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert sorted(theirs) == sorted(n for n, p in mine.items() if p.requires_grad) and theirs, "LoRA names differ"
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained adapter: the policy is no longer the reference
        for name, p in theirs.items():
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            mine[name].copy_(p)
    genarm.train()
    trainer.model.train()
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(pairs)])
    items = concat_inputs(batch["chosen"], batch["rejected"])

    ref_trl = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
    ref_plrm = pdpo.reference_logps[items["item"]]
    torch.testing.assert_close(ref_plrm, ref_trl.to(ref_plrm.dtype), rtol=1e-5, atol=1e-4)

    with torch.no_grad():
        trl_dpo = trainer._compute_loss(trainer.model, dict(inputs), False)
        lp = genarm.encoder.sequence_logprob(items)
        plrm_dpo = dpo_loss(dpo_logits(lp[:pairs], lp[pairs:], ref_plrm[:pairs], ref_plrm[pairs:], BETA))
    torch.testing.assert_close(plrm_dpo, trl_dpo, rtol=1e-5, atol=1e-5)

    zeros = {"ref_chosen_logps": torch.zeros(pairs), "ref_rejected_logps": torch.zeros(pairs)}
    trl_genarm = trainer._compute_loss(trainer.model, {**inputs, **zeros}, False)
    plrm_genarm = genarm.loss(batch)
    torch.testing.assert_close(plrm_genarm, trl_genarm, rtol=1e-5, atol=1e-5)
    trl_genarm.backward()
    plrm_genarm.backward()
    grad_diff = max(float((mine[n].grad - p.grad).abs().max()) for n, p in theirs.items())
    grad_scale = max(float(p.grad.abs().max()) for p in theirs.values())
    assert grad_diff <= 1e-4 * grad_scale + 1e-6, f"LoRA gradients differ by {grad_diff} (scale {grad_scale})"
    packed = {"genarm": packed_against_padded(genarm, batch), "pdpo": packed_against_padded(pdpo, batch)}
    return {"pairs": pairs, "reference_max_abs_diff": float((ref_plrm - ref_trl).abs().max()),
            "dpo_loss": {"plrm": float(plrm_dpo), "trl": float(trl_dpo)},
            "genarm_loss": {"plrm": float(plrm_genarm), "trl": float(trl_genarm)},
            "genarm_lora_grad_max_abs_diff": grad_diff, "genarm_lora_grad_max_abs": grad_scale,
            "packed": packed, "agreed": True}


def packed_against_padded(model, batch: dict) -> dict:
    """The method's loss and trainable gradients on ``batch`` padded and packed (the encoder's ``packing`` switched
    on; ``check_packing`` passes on the loaded model first): they must agree to float rounding."""
    from plrm.backbones.causal_lm import check_packing

    check_packing(model.encoder, "bench model")
    model.train()
    out = {}
    for packing in (False, True):
        model.encoder.packing = packing
        model.zero_grad(set_to_none=True)
        loss = model.loss(batch)
        loss.backward()
        out[packing] = (float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.encoder.packing = False
    (padded, g0), (packed, g1) = out[False], out[True]
    assert g0.keys() == g1.keys() and g0, "packing changed which parameters get gradients"
    diff = max(float((g1[n] - g0[n]).abs().max()) for n in g0)
    scale = max(float(g.abs().max()) for g in g0.values())
    assert abs(packed - padded) <= 1e-5 * max(1.0, abs(padded)), f"packed loss {packed} != padded {padded}"
    assert diff <= 1e-4 * scale + 1e-6, f"packed gradients differ by {diff} (scale {scale})"
    return {"loss_padded": padded, "loss_packed": packed, "grad_max_abs_diff": diff, "grad_max_abs": scale}


# ---- driver -------------------------------------------------------------------------------------------------------
def child(side: str, model_path: str, steps: int, pairs: int, warmup: int, threads: int, out: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    if side == "check":
        rec = run_check(model_path, pairs)
    elif side == "trl":
        rec = run_trl(model_path, steps, pairs, warmup)
    else:
        rec = run_plrm(side, model_path, steps, pairs, warmup)
    rec["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps(rec))


def summarize(rec: dict) -> dict:
    seconds = sum(rec["times"])
    total = {k: sum(s[k] for s in rec["steps"]) for k in rec["steps"][0]}
    return {"tokens_per_second": total["tokens"] / seconds, "pairs_per_second": total["pairs"] / seconds,
            "response_tokens_per_second": total["response"] / seconds,
            "policy_tokens_per_second": total["policy"] / seconds,
            "positions_per_second": total["positions"] / seconds,
            "step_seconds_median": statistics.median(rec["times"]), "timed_steps": len(rec["times"]),
            "real_tokens": total["tokens"], "epoch_tokens": rec["all_tokens"],
            "padding_share": 1 - total["real_positions"] / max(total["positions"], 1),
            "reference_seconds": rec["ref_seconds"], "reference_sequences": rec["ref_sequences"],
            "optimizer": rec["optimizer"], "learning_rates": rec["lrs"],
            "peak_rss_mib": rec["peak_rss_mib"], "rss_setup_mib": rec["rss_setup_mib"],
            "training_rss_growth_mib": rec["rss_training_peak_mib"] - rec["rss_setup_mib"]}


def main() -> int:
    args = side_parser(__doc__, [*SIDES, "check"], steps=10, warmup=2, threads=1, results="dpo_trl_cpu").parse_args()
    steps = args.steps or (6 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.child:
        child(args.child, args.model_path, steps, args.pairs, warmup, args.threads, args.child_out)
        return 0
    warnings.filterwarnings("ignore")
    model_path, label, out = model_and_out(args, "dpo_trl_cpu")
    started = datetime.datetime.now(datetime.timezone.utc)

    def child_run(side: str, kind: str) -> dict:  # memory runs: live memory (bench_trl.LIVE_MEMORY)
        return run_child(__file__, side, kind, model_path, args, steps, warmup)

    check = child_run("check", "check")
    print(f"losses agree: DPO {check['dpo_loss']['plrm']:.6f} (TRL {check['dpo_loss']['trl']:.6f}), GenARM "
          f"{check['genarm_loss']['plrm']:.6f} (TRL {check['genarm_loss']['trl']:.6f})", flush=True)
    sides = run_sides(SIDES, args.rounds, child_run, summarize, "pairs_per_second")
    import peft
    import transformers
    import trl

    def ratios(side: str, base: str = "trl") -> dict:
        a, b = sides[side], sides[base]
        keys = ("tokens_per_second", "pairs_per_second", "policy_tokens_per_second", "positions_per_second",
                "live_peak_rss_mib", "live_peak_above_setup_mib")
        return {key: a[key] / b[key] for key in keys}

    cmd = " ".join(["python benchmarks/bench_dpo_trl.py", *sys.argv[1:]])
    result = {"command": cmd, "started": started.isoformat(timespec="seconds"), "python": platform.python_version(),
              "machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "trl": trl.__version__, "peft": peft.__version__},
              "model": label, "rounds": args.rounds, "steps": steps, "warmup": warmup, "pairs": args.pairs,
              "lora": LORA, "lr": LR, "beta": BETA, "alpha": ALPHA,
              "loss_check": check, "sides": sides,
              "ratio": {"genarm_vs_trl": ratios("genarm"), "pdpo_vs_trl": ratios("pdpo"),
                        "genarm_packed_vs_trl": ratios("genarm_packed"), "pdpo_packed_vs_trl": ratios("pdpo_packed")},
              "packing": {"genarm": ratios("genarm_packed", "genarm"), "pdpo": ratios("pdpo_packed", "pdpo")}}
    write_report(out, result, markdown(result))
    return 0


def markdown(r: dict) -> str:
    s, c = r["sides"], r["loss_check"]
    g, p = r["ratio"]["genarm_vs_trl"], r["ratio"]["pdpo_vs_trl"]
    gp, pp = r["ratio"]["genarm_packed_vs_trl"], r["ratio"]["pdpo_packed_vs_trl"]
    pg, ppd = r["packing"]["genarm"], r["packing"]["pdpo"]
    cg, cp = c["packed"]["genarm"], c["packed"]["pdpo"]

    def per_round(side: str, work: int = 1) -> str:
        runs = zip(s[side]["pairs_per_second_runs"], s["trl"]["pairs_per_second_runs"])
        return ", ".join(f"{work * mine / theirs:.2f}x" for mine, theirs in runs)

    def row(side: str) -> str:
        v = s[side]
        return (f"| {LABELS[side]} | {v['tokens_per_second']:,.0f} | {v['pairs_per_second']:.2f} | "
                f"{v['response_tokens_per_second']:,.0f} | {v['policy_tokens_per_second']:,.0f} | "
                f"{v['positions_per_second']:,.0f} | "
                f"{v['step_seconds_median']:.3f} | {100 * v['padding_share']:.0f} % | "
                f"{v['reference_seconds']:.1f} s / {v['reference_sequences']} | {v['live_peak_rss_mib']:,.0f} | "
                f"{v['live_rss_setup_mib']:,.0f} | {v['live_peak_above_setup_mib']:,.0f} | {v['peak_rss_mib']:,.0f} |")

    return "\n".join([
        "# LM preference training: plrm's GenARM and P-DPO beside TRL's DPOTrainer (CPU)", "",
        f"`{r['command']}` — {r['started']}, Python {r['python']}, torch {r['versions']['torch']}, transformers "
        f"{r['versions']['transformers']}, TRL {r['versions']['trl']}, peft {r['versions']['peft']}; "
        f"{r['machine']}, {r['cpu_count']} CPUs, {r['threads']} torch threads per process.", "",
        f"Model: {r['model']}, fp32, plrm's byte tokenizer. LoRA r {r['lora']['r']}, alpha {r['lora']['alpha']}, "
        f"dropout {r['lora']['dropout']}, {', '.join(r['lora']['targets'])}; AdamW lr {r['lr']}, no weight decay; "
        f"beta {r['beta']} everywhere, P-DPO alpha {r['alpha']} with 8 soft tokens per user. {r['pairs']} pairs per "
        f"step, {r['steps']} steps ({r['warmup']} warm-up steps not timed): the same pairs, token ids, order and "
        "batches on every side (attribute world, 40 users; TRL reads plrm's token ids, sequential sampler).", "",
        "| | tokens/s | pairs/s | response tokens/s | policy tokens/s | positions/s | median step s | padding run | "
        "reference pass (once) / sequences | live peak RSS MiB | live RSS after setup | live peak above setup | "
        "peak RSS, default malloc |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(row(side) for side in SIDES), "",
        f"**(a) GenARM / TRL DPOTrainer: {g['tokens_per_second']:.2f}x tokens/s at {g['live_peak_rss_mib']:.2f}x live "
        f"peak RSS** ({g['live_peak_above_setup_mib']:.2f}x the live peak above setup). Per step both run the LoRA "
        "policy forward and backward on the same 2B sequences and no reference model (TRL reads its precomputed "
        "reference log-probabilities from the batch, GenARM has none), so this compares the same work.", "",
        f"**(b) P-DPO / TRL DPOTrainer: {p['pairs_per_second']:.2f}x pairs/s, {p['policy_tokens_per_second']:.2f}x "
        f"policy tokens/s ({p['positions_per_second']:.2f}x positions/s), {p['live_peak_rss_mib']:.2f}x live peak "
        f"RSS** ({p['live_peak_above_setup_mib']:.2f}x above setup). P-DPO trains two DPO terms on every pair, "
        "alpha DPO(u) + (1 - alpha) DPO(u_0): 4B policy sequences per step, each after 8 soft tokens, where DPO "
        "runs 2B; at equal efficiency it makes half the pairs per second. Policy tokens/s counts every real token "
        "the policy forward runs on (both P-DPO terms, soft tokens not counted), the work-normalized comparison; "
        "positions/s adds the soft tokens and the padding; tokens/s and response tokens/s count each pair's tokens "
        "once, like pairs/s.", "",
        f"**(c) Packing (`backbone.packing: true`), before / after on the same batches: GenARM "
        f"{pg['pairs_per_second']:.2f}x pairs/s at {pg['live_peak_above_setup_mib']:.2f}x the live peak above setup "
        f"({pg['live_peak_rss_mib']:.2f}x live peak RSS); P-DPO {ppd['pairs_per_second']:.2f}x pairs/s at "
        f"{ppd['live_peak_above_setup_mib']:.2f}x the live peak above setup ({ppd['live_peak_rss_mib']:.2f}x live peak "
        f"RSS).** Against TRL's DPOTrainer: GenARM packed {gp['tokens_per_second']:.2f}x tokens/s at "
        f"{gp['live_peak_rss_mib']:.2f}x live peak RSS ({gp['live_peak_above_setup_mib']:.2f}x above setup); P-DPO "
        f"packed {pp['pairs_per_second']:.2f}x pairs/s, {pp['policy_tokens_per_second']:.2f}x policy tokens/s, "
        f"{pp['live_peak_rss_mib']:.2f}x live peak RSS ({pp['live_peak_above_setup_mib']:.2f}x above setup). "
        "Packing puts each training forward's sequences (P-DPO's 8 soft tokens in front of each) first-fit "
        "decreasing into rows as long as the batch's longest, position ids restarting per sequence (transformers' "
        "block-diagonal causal mask), and projects only the positions that predict response tokens onto the "
        f"vocabulary; the padding run falls from {100 * s['genarm']['padding_share']:.0f} % to "
        f"{100 * s['genarm_packed']['padding_share']:.0f} % (GenARM) and from {100 * s['pdpo']['padding_share']:.0f} "
        f"% to {100 * s['pdpo_packed']['padding_share']:.0f} % (P-DPO). Exactness on this model's first batch (the "
        f"check process): GenARM loss {cg['loss_packed']:.6f} packed, {cg['loss_padded']:.6f} padded, LoRA "
        f"gradients within {cg['grad_max_abs_diff']:.1e} (largest {cg['grad_max_abs']:.1e}); P-DPO loss "
        f"{cp['loss_packed']:.6f} / {cp['loss_padded']:.6f}, gradients (LoRA and user tokens) within "
        f"{cp['grad_max_abs_diff']:.1e} (largest {cp['grad_max_abs']:.1e}); `tests/backbones/test_causal_lm.py` "
        "checks log-probabilities and gradients on tiny Qwen2 and LLaMA, with and without soft tokens.", "",
        f"Loss check (one batch of {c['pairs']} pairs, the same LoRA weights on both sides, drawn away from the "
        "initial adapter): TRL's precomputed reference log-probabilities equal P-DPO's reference cache (largest "
        f"difference {c['reference_max_abs_diff']:.1e}); TRL's DPO loss {c['dpo_loss']['trl']:.6f} equals plrm's "
        f"DPO loss {c['dpo_loss']['plrm']:.6f} (`dpo_logits` + `dpo_loss` over `CausalLM.sequence_logprob`: one "
        "P-DPO term without soft tokens); with zero reference log-probabilities TRL's loss "
        f"{c['genarm_loss']['trl']:.6f} equals `GenARM.loss` {c['genarm_loss']['plrm']:.6f}, and the LoRA "
        f"gradients agree to {c['genarm_lora_grad_max_abs_diff']:.1e} (largest gradient "
        f"{c['genarm_lora_grad_max_abs']:.1e}). `tests/methods/test_trl_oracle.py` checks the same losses on "
        "tiny-random:qwen2 with a full-weight policy.", "",
        f"Speed: the faster of {r['rounds']} runs of each side (by pairs/s), sides alternating, default allocator "
        f"(pairs/s of the runs: " + "; ".join(
            f"{side} " + ", ".join(f"{x:.2f}" for x in s[side]['pairs_per_second_runs']) for side in SIDES) + "). "
        "tokens/s counts the real (non-padding) tokens of the step's pairs, prompt and response, each sequence once; "
        "padding run is the share of padded positions in the policy batch (left padding in plrm, right padding in "
        "TRL, same width; packed sides: the unused tails of the packed rows). The reference pass runs once before "
        "training and is not in the step times: TRL runs the "
        f"base model on both sequences of every pair, P-DPO on each distinct item once (items can recur across "
        f"pairs), both in batches of {2 * r['pairs']} sequences. Memory comes from another run "
        "of each side with `MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0` (RSS is the memory alive, "
        "`results/trl_cpu.md` says why); peak RSS counts imports, data, model and the reference pass, the peak "
        "above setup what training adds at its highest.", "",
        "## Where the time goes", "",
        "Pairs/s of each plrm side over TRL's run of the same round (the runs next to each other in time): GenARM "
        f"{per_round('genarm')}; P-DPO {per_round('pdpo')} (per policy token {per_round('pdpo', 2)}: twice DPO's work "
        f"per pair, and not more); GenARM packed {per_round('genarm_packed')}; P-DPO packed "
        f"{per_round('pdpo_packed')} (per policy token {per_round('pdpo_packed', 2)}). The spread between rounds "
        "is this shared machine's drift (an earlier run of this script measured GenARM padded at 1.06x and "
        "0.99x TRL's): read (a) as parity to slightly ahead, not by its best round. Per step GenARM and "
        "DPOTrainer run the same model over the same padded positions (same batches, same width, "
        f"{100 * s['trl']['padding_share']:.0f} % padding on both); what differs is small at this vocabulary "
        "(261 byte tokens): TRL's fused LM head scores every position on CPU (it compacts to the response "
        "positions only on CUDA/XPU) and also computes entropy, mean logit and top-1 metrics, with a few host syncs "
        "(`.item()`) per step, while plrm projects only the last R + 1 positions (`logits_to_keep`); plrm left-pads "
        "ragged ids per batch, TRL's collator right-pads Python lists. No profile was taken: the padded difference "
        "is within the run-to-run spread.", "",
        "TRL skips no padding here: TRL 1.16's `padding_free` is disabled (it warns and falls back to padding). "
        "plrm's packing removes most of it (a row's unused tail is what is left: first-fit decreasing into rows of "
        "the longest sequence's width); its gain is bounded by the padding share the padded sides run "
        f"({100 * s['trl']['padding_share']:.0f} % of TRL's positions).", "",
        "P-DPO's memory: its peak above setup is "
        f"{r['ratio']['pdpo_vs_trl']['live_peak_above_setup_mib']:.2f}x TRL's because both of its terms (4B "
        "sequences) go through one forward and one backward, so the activations of twice DPO's sequences are alive "
        "at once; at the same compute, a backward per term (the generic term's sequences only after the personal "
        "term's graph is freed) would bring the peak near DPO's.", ""])


if __name__ == "__main__":
    sys.exit(main())
