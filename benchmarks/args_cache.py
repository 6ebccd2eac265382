"""ARGS with KV caches against the naive ARGS that re-runs both models on the whole prefix for every candidate.

    python benchmarks/args_cache.py                  # SmolLM2-135M policy + LoRA SmolLM2 reward model, CPU, fp32
                                                     # -> benchmarks/results/args_cache.{json,md}
    python benchmarks/args_cache.py --model tiny-random:qwen2 --new-tokens 4 --out /tmp/args.json   # a quick check

Both implementations decode the same prompts with the same models (ARGS, Khanov et al., arXiv 2402.01694: top-k
of the policy, score log pi + w r, greedy) and must return the same tokens:

- plrm (``args_decode``): the policy and the reward model each keep a KV cache; per step the policy runs one token
  per prompt and the RM one token per candidate (its cache expanded to the B*k candidates and collapsed to the
  chosen ones).
- naive (``args_decode(cached=False)``): per step the policy re-runs prompt + response so far, and the RM re-runs
  prompt + response so far + candidate for each of the B*k candidates.

The reward model is LoRe (rank 4) on a LoRA SmolLM2 whose adapter and basis are set to random values (a trained
RM costs the same). Each variant runs in a fresh process (peak resident memory is that process's, models
included); the cached one several times (median), the naive one once. Generated tokens/s counts each prompt's
tokens up to its stop token.
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
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A Pref-LaMP-style prompt: the LaMP-5 instruction and an abstract (~190 tokens with SmolLM2's chat template).
ABSTRACT = (
    "We study how reward models trained on the preferences of many users can be adapted to a new user from a "
    "handful of comparisons. Existing approaches either fine-tune a separate model per user, which does not scale, "
    "or condition a single model on a learned user embedding, which forgets rare users. We propose a low-rank "
    "factorization in which every user's reward is a convex combination of a small set of shared basis rewards, "
    "learned jointly from all users, and a new user's weights are fitted in closed form from a few labelled pairs. "
    "On three benchmarks the method matches per-user fine-tuning with two orders of magnitude fewer parameters "
    "and generalizes to unseen users from as few as four comparisons, while remaining cheap to evaluate at scale.")
PROMPTS = [f"Generate a title for the following abstract of a paper: {ABSTRACT}",
           f"Generate a title for the following abstract of a paper: {ABSTRACT[:len(ABSTRACT) * 2 // 3]}"]


def build(model: str, seed: int = 0):
    from plrm.backbones.transformer import TransformerBackbone
    from plrm.data.datamodule import PreparedData
    from plrm.data.files import PreferenceFiles
    from plrm.decoding.guides import SequenceGuide
    from plrm.decoding.policy import Policy, PolicyConfig
    from plrm.methods.lore import LoRe

    with tempfile.TemporaryDirectory() as tmp:  # two users' pairs: the RM's backbone is prepared on data
        path = Path(tmp) / "pairs.jsonl"
        path.write_text("".join(json.dumps({"user_id": f"u{u}", "prompt": p, "chosen": "A title.",
                                            "rejected": "Another title."}) + "\n"
                                for u in range(2) for p in PROMPTS))
        prepared = PreparedData(PreferenceFiles(PreferenceFiles.Config(path=str(path))).load(),
                                TransformerBackbone(TransformerBackbone.Config(model=model, dtype="float32",
                                                                               lora_dropout=0.0, max_length=1024)))
    torch.manual_seed(seed)
    method = LoRe(LoRe.Config(rank=4), n_users=2, feature_dim=prepared.backbone.feature_dim,
                  encoder=prepared.backbone.encoder())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in method.named_parameters():
            if "lora_B" in name or name == "user_logits":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    guide = SequenceGuide(method.eval(), prepared.backbone)
    policy = Policy.load(PolicyConfig(model=model, dtype="float32"))
    return policy, guide


def child(args) -> None:
    """One variant in this process: decode, print a JSON line."""
    from plrm.decoding.args import args_decode

    torch.set_num_threads(args.threads)
    policy, guide = build(args.model)
    p, g = policy.tokenize(PROMPTS[:args.prompts]), guide.tokenize(PROMPTS[:args.prompts])
    users = torch.arange(args.prompts) % 2
    runs = []
    for _ in range(args.repeats):
        out = args_decode(policy, guide, p, g, users, k=args.k, weight=args.weight,
                          max_new_tokens=args.new_tokens, cached=args.variant == "plrm")
        runs.append({"seconds": out.seconds, "tokens": out.n_tokens})
    print(json.dumps({"variant": args.variant, "runs": runs, "tokens": out.tokens,
                      "prompt_tokens": p["lengths"].tolist(), "rm_prompt_tokens": g["lengths"].tolist(),
                      "text": [policy.backbone.tokenizer().decode(t) for t in out.tokens],
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(args, variant: str, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model", args.model, "--k", str(args.k),
           "--weight", str(args.weight), "--new-tokens", str(args.new_tokens), "--prompts", str(args.prompts),
           "--threads", str(args.threads), "--repeats", str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="offline:smollm2")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=2, choices=[1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs of the cached variant (median)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/args_cache.json"))
    ap.add_argument("--child", choices=["plrm", "naive"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.variant = args.child
        return child(args)
    plrm = run_child(args, "plrm", args.repeats)
    naive = run_child(args, "naive", 1)
    equal = plrm["tokens"] == naive["tokens"]
    tps = {v["variant"]: statistics.median(r["tokens"] / r["seconds"] for r in v["runs"]) for v in (plrm, naive)}
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(__file__).relative_to(ROOT)), *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(), "machine": platform.platform(), "processor": platform.processor(),
        "torch": torch.__version__, "threads": args.threads, "model": args.model, "k": args.k, "weight": args.weight,
        "new_tokens": args.new_tokens, "prompts": args.prompts, "prompt_tokens": plrm["prompt_tokens"],
        "rm_prompt_tokens": plrm["rm_prompt_tokens"], "same_tokens": equal,
        "tokens_per_second": tps, "speedup": tps["plrm"] / tps["naive"],
        "seconds": {"plrm": statistics.median(r["seconds"] for r in plrm["runs"]),
                    "naive": naive["runs"][0]["seconds"]},
        "peak_rss_mib": {"plrm": plrm["peak_rss_mib"], "naive": naive["peak_rss_mib"]},
        "generated_tokens": plrm["runs"][0]["tokens"], "text": plrm["text"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# ARGS with KV caches vs naive ARGS ({args.model}, CPU fp32, {args.threads} threads)", "",
          f"Command: `{result['command']}` ({result['date']}, {result['processor'] or result['machine']}, "
          f"torch {result['torch']}).", "",
          f"{args.prompts} prompt(s) of {plrm['prompt_tokens']} policy tokens ({plrm['rm_prompt_tokens']} for the "
          f"RM), k = {args.k}, w = {args.weight}, up to {args.new_tokens} new tokens, greedy; "
          f"{result['generated_tokens']} tokens generated.", "",
          "| variant | generated tokens/s | seconds | peak RSS (MiB) |", "|---|---|---|---|",
          f"| plrm (KV caches, median of {args.repeats}) | {tps['plrm']:.2f} | {result['seconds']['plrm']:.1f} | "
          f"{plrm['peak_rss_mib']:.0f} |",
          f"| naive (full re-run per candidate) | {tps['naive']:.3f} | {result['seconds']['naive']:.1f} | "
          f"{naive['peak_rss_mib']:.0f} |", "",
          f"**Speed-up: {result['speedup']:.1f}x**; same tokens: **{equal}**.", "",
          "Generated (plrm): " + " / ".join(repr(t) for t in plrm["text"])]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if not equal:
        sys.exit("cached and naive ARGS generated different tokens")


if __name__ == "__main__":
    main()
