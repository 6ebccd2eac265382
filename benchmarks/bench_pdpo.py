"""P-DPO's training step: plrm's construction against the authors' (P-RLHF), same model, same pairs, same run.

    python benchmarks/bench_pdpo.py                       # -> benchmarks/results/pdpo_step.{json,md}
    python benchmarks/bench_pdpo.py --model tiny-random:qwen2 --steps 3 --out /tmp/pdpo.json   # a quick check

Both variants train P-DPO (Li et al., arXiv 2402.05133) with alpha = 0.5 on B preference pairs per step: the
loss alpha * DPO(u) + (1 - alpha) * DPO(u_0) over the same pairs, with a LoRA policy and soft user tokens.

- plrm (``PDPO.loss``): the personal and the generic term from the same B pairs in one forward of 4B sequences
  (chosen and rejected, each with the user's and the generic user's tokens); the reference log-probabilities
  are read from the cache filled once before training (the reference is frozen).
- authors' construction (P-RLHF ``utils.py`` + ``user_dpo_trainer.py``): every pair duplicated with user 0, so
  covering the same B pairs takes a batch of 2B rows (4B sequences), and the reference model runs on every row
  at every step (adapter off, 4B more sequences without gradients).

Both use plrm's causal_lm forward (left padding, last-R logits), so the ratio measures the construction only.
Throughput is response tokens of the B pairs' sequences per second of a full step (forward, backward, AdamW);
memory is the peak resident set of a fresh process running only that variant. Steps alternate between the
variants; medians. Before timing, the two losses are checked equal on the same batch (they are the same objective).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plrm.backbones.causal_lm import CausalLMBackbone  # noqa: E402
from plrm.data.attributes import AttributeWorld  # noqa: E402
from plrm.data.datamodule import PreparedData  # noqa: E402
from plrm.methods.base import concat_inputs  # noqa: E402
from plrm.methods.losses import dpo_logits  # noqa: E402
from plrm.methods.pdpo import PDPO  # noqa: E402


def build(model_name: str, pairs: int, seed: int = 0):
    """The P-DPO model on a LoRA causal LM, and a batch of ``pairs`` attribute-world pairs of distinct users."""
    data = AttributeWorld(AttributeWorld.Config(n_users=max(8, pairs), pairs_per_user=4, n_train_prompts=40,
                                                n_test_prompts=4, test_pairs_per_user=1, attributes=["formality"],
                                                attributes_per_user=1, n_responses=2, seed=seed)).load()
    backbone = CausalLMBackbone(CausalLMBackbone.Config(model=model_name, dtype="float32", lora_dropout=0.0,
                                                        max_length=192))
    prepared = PreparedData(data, backbone)
    user_ids = data.pairs.data.table["user_id"].to_numpy(zero_copy_only=False).astype(str)
    _, user_of_row = np.unique(user_ids, return_inverse=True)
    torch.manual_seed(seed)
    model = PDPO(PDPO.Config(alpha=0.5, balance_users=False), n_users=int(user_of_row.max()) + 1,
                 feature_dim=backbone.feature_dim, encoder=backbone.encoder())
    rows = torch.arange(pairs)
    batch = {"user_idx": torch.from_numpy(user_of_row[:pairs]).long(), "pair_weight": torch.ones(pairs),
             "chosen": backbone.inputs(prepared.chosen_item[rows]),
             "rejected": backbone.inputs(prepared.rejected_item[rows])}
    return model, batch


def authors_loss(model: PDPO, batch: dict) -> torch.Tensor:
    """P-RLHF's construction: the batch's pairs twice (user u, then user 0), the reference on every row."""
    n, beta, alpha = len(batch["user_idx"]), model.config.beta, model.config.alpha
    rows = concat_inputs(batch["chosen"], batch["chosen"], batch["rejected"], batch["rejected"])  # 4B sequences
    tokens = torch.cat([model.user_tokens(batch["user_idx"]), model.user_tokens.generic(n)])
    logps = model.encoder.sequence_logprob(rows, torch.cat([tokens, tokens])).view(2, 2 * n)   # (chosen, rejected)
    with torch.no_grad(), model.encoder.reference():
        ref = model.encoder.sequence_logprob(rows).view(2, 2 * n)
    per_row = -F.logsigmoid(dpo_logits(logps[0], logps[1], ref[0], ref[1], beta))              # (2B,)
    return alpha * per_row[:n].mean() + (1 - alpha) * per_row[n:].mean()


def plrm_loss(model: PDPO, batch: dict) -> torch.Tensor:
    return model.loss(batch)


VARIANTS = {"plrm": plrm_loss, "authors": authors_loss}


def step(model: PDPO, batch: dict, loss_fn, optimizer) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    loss_fn(model, batch).backward()
    optimizer.step()
    return time.perf_counter() - start


def response_tokens(batch: dict) -> int:
    """Response tokens of the B pairs, counted once per term (personal and generic): what a step trains on."""
    n = 0
    for side in ("chosen", "rejected"):
        n += int((batch[side]["lengths"] - batch[side]["prompt_lengths"]).sum())
    return 2 * n


def peak_memory(args, variant: str) -> float:
    """Peak RSS (MB) of a fresh process that builds the model and runs 2 steps of one variant."""
    cmd = [sys.executable, __file__, "--model", args.model, "--pairs", str(args.pairs), "--steps", "2",
           "--memory-of", variant]  # the peak is reached in the first step; the second checks it holds
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="offline:smollm2", help="causal_lm model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--pairs", type=int, default=4, help="B, preference pairs per step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pdpo_step.json"))
    ap.add_argument("--memory-of", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, batch = build(args.model, args.pairs)
    model.train()
    with torch.no_grad():  # what PDPO.before_fit does once per training: fill the reference cache
        model.item_statistics(concat_inputs(batch["chosen"], batch["rejected"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if args.memory_of:
        for _ in range(args.steps):
            step(model, batch, VARIANTS[args.memory_of], optimizer)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return

    with torch.no_grad():
        a, b = plrm_loss(model, batch), authors_loss(model, batch)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # the same objective
    print(f"losses equal: {float(a):.6f}", flush=True)
    for fn in VARIANTS.values():  # warm-up
        step(model, batch, fn, optimizer)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.steps):
        for name, fn in VARIANTS.items():
            times[name].append(step(model, batch, fn, optimizer))
    tokens = response_tokens(batch)
    result = {name: {"step_seconds": t, "median_seconds": statistics.median(t),
                     "tokens_per_second": tokens / statistics.median(t)} for name, t in times.items()}
    for name in VARIANTS:
        result[name]["peak_rss_mb"] = peak_memory(args, name)
        print(f"{name:8s} {result[name]['median_seconds']:.3f} s/step  {result[name]['tokens_per_second']:.0f} "
              f"tokens/s  peak RSS {result[name]['peak_rss_mb']:.0f} MB", flush=True)
    speedup = result["authors"]["median_seconds"] / result["plrm"]["median_seconds"]
    payload = {"command": " ".join(["python benchmarks/bench_pdpo.py", *(shlex.quote(a) for a in sys.argv[1:])]),
               "date": datetime.date.today().isoformat(),
               "machine": f"{platform.platform(terse=True)}, Python {platform.python_version()}, "
                          f"torch {torch.__version__}, {args.threads} threads",
               "model": args.model, "pairs_per_step": args.pairs, "response_tokens_per_step": tokens,
               "steps": args.steps, "variants": result, "speedup": speedup,
               "memory_ratio": result["authors"]["peak_rss_mb"] / result["plrm"]["peak_rss_mb"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(payload))
    print(f"plrm {speedup:.2f}x the authors' construction; wrote {out} and {out.with_suffix('.md')}")


def markdown(p: dict) -> str:
    r = p["variants"]
    lines = [
        "# P-DPO training step: plrm vs the authors' construction", "",
        f"`{p['command']}` ({p['date']}; {p['machine']}). Model `{p['model']}` with LoRA r 8 and 8 soft tokens per "
        f"user; {p['pairs_per_step']} pairs per step ({p['response_tokens_per_step']} response tokens counting "
        f"both terms); median of {p['steps']} alternating steps.", "",
        "| variant | s / step | response tokens / s | peak RSS MB |", "|---|---|---|---|",
        f"| plrm: both terms from one batch, cached reference | {r['plrm']['median_seconds']:.3f} | "
        f"{r['plrm']['tokens_per_second']:.0f} | {r['plrm']['peak_rss_mb']:.0f} |",
        f"| authors: pairs duplicated for user 0, reference every step | {r['authors']['median_seconds']:.3f} | "
        f"{r['authors']['tokens_per_second']:.0f} | {r['authors']['peak_rss_mb']:.0f} |", "",
        f"**plrm: {p['speedup']:.2f}x the throughput**, peak memory ratio (authors / plrm) "
        f"{p['memory_ratio']:.2f}. Both losses were checked equal on the same batch before timing.", "",
        "Where the difference comes from: per step both run the policy forward and backward on 4B sequences; the "
        "authors' construction also runs the reference model on those 4B sequences (it recomputes what never "
        "changes), while plrm reads each item's reference log-probability from a cache filled once.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
