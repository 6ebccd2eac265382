"""Backbone throughput: the feature cache, and LoRA reward training tokens/s on CPU and on a GPU.

Three parts, each compared with a naive implementation measured in the same run (ratios, not absolute times):

* ``cache`` -- features of a text dataset (the attribute world, ``offline:minilm``): naive = encode every row's
  chosen and rejected text as it comes (what a per-row pipeline does); plrm = encode each unique item once
  into the cache (cold), then a second run that reads the cache (warm).
* ``lora_cpu`` -- LoRe training steps through LoRA on the tiny random Qwen2 / LLaMA (fp32, and 4-bit NF4) with
  the attribute world's real token lengths: plrm = chosen and rejected in one forward with dynamic padding;
  naive = two forwards (chosen, then rejected) padded to max_length.
* ``gpu`` -- the same comparison at Qwen2.5-0.5B's shape (random weights: no Hub on the device machine) in bf16
  with LoRA, 4-bit and 8-bit QLoRA, and bf16 LoRA with gradient checkpointing: tokens/s and peak memory.

    python benchmarks/bench_backbone.py --parts cache lora_cpu      # CPU, writes results/backbone_cpu.{md,json}
    python benchmarks/bench_backbone.py --parts gpu                 # on a CUDA machine: results/backbone_gpu.*
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).parent / "results"


def matmul_gflops(device: str = "cpu", n: int = 1024) -> float:
    """A speed probe taken next to every timing (this CPU's speed varies several-fold over minutes); bf16 on GPU."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    for _ in range(2):
        a @ a
    sync(device)
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ a
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ---- cache ------------------------------------------------------------------------------------------------------
def bench_cache(n_users: int) -> dict:
    from plrm.backbones.frozen import FrozenEncoder
    from plrm.backbones.text import item_texts
    from plrm.data.attributes import AttributeWorld
    from plrm.data.datamodule import PreparedData, build_item_index

    data = AttributeWorld(AttributeWorld.Config(n_users=n_users)).load()
    cache_dir = tempfile.mkdtemp(prefix="plrm-bench-cache-")
    config = FrozenEncoder.Config(model="offline:minilm", cache_dir=cache_dir, progress=False)
    rows = data.n_rows
    out = {"dataset": f"attribute_world n_users={n_users}", "rows": rows, "probe_gflops_before": matmul_gflops()}

    # naive: every row's two texts, no dedup, no cache (same model, tokenization, batch size)
    backbone = FrozenEncoder(config)
    items = build_item_index(data)
    backbone._resolve()
    from plrm.backbones.frozen import _LazyEncoder

    encode = _LazyEncoder(backbone, backbone.tokenizer(), backbone.use_chat(backbone.tokenizer()))
    prompts, responses = item_texts(data, items)
    per_row = [f"{prompts[i]}\x1f{responses[i]}" for i in
               torch.cat([torch.from_numpy(items.chosen_item), torch.from_numpy(items.rejected_item)]).tolist()]
    encode(per_row[:64])  # load the model outside the timing
    start = time.perf_counter()
    for s in range(0, len(per_row), config.inference_batch_size):
        encode(per_row[s:s + config.inference_batch_size])
    naive = time.perf_counter() - start

    cold = PreparedData(data, FrozenEncoder(config)).backbone.stats()
    warm_start = time.perf_counter()
    warm = PreparedData(data, FrozenEncoder(config)).backbone.stats()
    warm_seconds = time.perf_counter() - warm_start
    out.update({
        "texts_per_row_pass": len(per_row), "unique_items": cold["items"],
        "naive_seconds": naive, "naive_texts_per_second": len(per_row) / naive,
        "cold_seconds": cold["encode_seconds"], "cold_encoded": cold["encoded"],
        "warm_seconds": warm_seconds, "warm_encoded": warm["encoded"],
        "speedup_cold": naive / cold["encode_seconds"], "speedup_warm": naive / warm_seconds,
        "probe_gflops_after": matmul_gflops(),
    })
    return out


# ---- LoRA training steps ----------------------------------------------------------------------------------------
def _static_loss(model, batch: dict, max_length: int) -> torch.Tensor:
    """The naive step: chosen and rejected in two forwards, each padded to max_length."""
    from plrm.backbones.text import pool

    enc = model.encoder

    def features(items):
        n = len(items["lengths"])
        ids = torch.full((n, max_length), enc.pad_id, dtype=torch.long, device=items["ids"].device)
        mask = torch.arange(max_length, device=ids.device)[None, :] < items["lengths"][:, None]
        ids[mask] = items["ids"]
        hidden = enc.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return pool(hidden, mask.long(), enc.pooling).float()

    zc, zr = model.item_embedding(features(batch["chosen"])), model.item_embedding(features(batch["rejected"]))
    return model.nll(model.pair_logit(zc, zr, batch["user_idx"]), batch)


def time_steps(model, batches: list[dict], loss_fn, device: str, autocast: bool, warmup: int = 3) -> dict:
    opt = torch.optim.AdamW(model.optimizer_groups(), lr=1e-4)
    model.train()
    times, tokens = [], []
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i, batch in enumerate(batches):
        sync(device)
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
            tokens.append(int(batch["chosen"]["lengths"].sum() + batch["rejected"]["lengths"].sum()))
    out = {"step_seconds_median": statistics.median(times), "tokens_per_second": sum(tokens) / sum(times),
           "real_tokens_per_step": statistics.mean(tokens), "timed_steps": len(times)}
    if str(device).startswith("cuda"):
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _lore(backbone, n_users: int, device: str):
    from plrm.methods.lore import LoRe

    torch.manual_seed(0)
    model = LoRe(LoRe.Config(rank=4), n_users=n_users, feature_dim=backbone.feature_dim, encoder=backbone.encoder())
    return model.to(device)  # nn.Module.to: a 4-bit model already on `device` stays as loaded


def _dynamic_loss(model, batch: dict) -> torch.Tensor:
    return model.loss(batch)


def compare(model, batches, max_length, device, autocast) -> dict:
    naive = time_steps(model, batches, lambda m, b: _static_loss(m, b, max_length), device, autocast)
    plrm = time_steps(model, batches, _dynamic_loss, device, autocast)
    return {"plrm": plrm, "naive": naive, "speedup": plrm["tokens_per_second"] / naive["tokens_per_second"]}


def bench_lora_cpu(steps: int, pairs: int) -> dict:
    from plrm.backbones.transformer import TransformerBackbone
    from plrm.data.attributes import AttributeWorld
    from plrm.data.datamodule import PreferenceDataModule, PreparedData
    from plrm.data.splits import TRAIN, make_split

    data = AttributeWorld(AttributeWorld.Config(n_users=40)).load()
    out = {"dataset": "attribute_world n_users=40", "pairs_per_step": pairs, "configs": {}}
    for arch in ("qwen2", "llama"):
        for quant in ("none", "4bit"):
            cfg = TransformerBackbone.Config(model=f"tiny-random:{arch}", quantization=quant, lora_dropout=0.0,
                                             max_length=1024)  # byte tokens: the longest items fit
            prepared = PreparedData(data, TransformerBackbone(cfg))
            split = make_split(data.pairs.data.table, 0, 0.5, 0.5, 0.0, need_support=1, source="bench")
            dm = PreferenceDataModule(prepared, split, batch_size=pairs)
            gen = torch.Generator().manual_seed(0)
            rows = torch.from_numpy(split.rows(TRAIN))
            batches = [dm.batch(rows[torch.randperm(len(rows), generator=gen)[:pairs]]) for _ in range(steps + 2)]
            model = _lore(prepared.backbone, len(split.user_ids), "cpu")
            probe = matmul_gflops()
            out["configs"][f"{arch} {'fp32' if quant == 'none' else 'nf4'} LoRA"] = {
                **compare(model, batches, cfg.max_length, "cpu", autocast=False), "probe_gflops": probe}
    return out


# ---- GPU ----------------------------------------------------------------------------------------------------------
def qwen05b_dir() -> str:
    """Qwen2.5-0.5B's architecture (hidden 896, 24 layers, 14 heads / 2 KV heads, vocab 151,936) with random
    weights, saved once in bf16: the device machine has no Hub access."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    path = Path(tempfile.gettempdir()) / "plrm-qwen2.5-0.5b-shape"
    if not (path / "config.json").is_file():
        cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                          max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
    return str(path)


def synthetic_batches(steps: int, pairs: int, max_length: int, vocab: int, device: str) -> list[dict]:
    """Token batches with chat-like length spread: each sequence 25%..100% of max_length tokens."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        def side():
            lengths = torch.randint(max_length // 4, max_length + 1, (pairs,), generator=gen)
            return {"ids": torch.randint(0, vocab, (int(lengths.sum()),), generator=gen).to(device),
                    "lengths": lengths.to(device)}
        out.append({"chosen": side(), "rejected": side(), "user_idx": torch.randint(0, 64, (pairs,)).to(device),
                    "pair_weight": torch.ones(pairs, device=device)})
    return out


def bench_gpu(steps: int, pairs: int, max_length: int) -> dict:
    from plrm.backbones.transformer import TransformerBackbone

    path = qwen05b_dir()
    device = "cuda"
    out = {"device": torch.cuda.get_device_name(0), "model": "Qwen2.5-0.5B shape, random weights",
           "pairs_per_step": pairs, "max_length": max_length, "lora_r": 16, "configs": {},
           "probe_tflops": matmul_gflops("cuda", 8192) / 1e3}
    batches = synthetic_batches(steps + 3, pairs, max_length, 151936, device)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    gc = {"gradient_checkpointing": True}
    configs = [("warm-up (not reported)", {}), ("bf16 LoRA", {}), ("bf16 LoRA + grad. checkpointing", gc),
               ("4-bit NF4 QLoRA", {"quantization": "4bit"}), ("4-bit NF4 QLoRA + grad. checkpointing",
                                                               {"quantization": "4bit", **gc}),
               ("8-bit QLoRA + grad. checkpointing", {"quantization": "8bit", **gc})]
    for name, opts in configs:
        torch.cuda.empty_cache()
        cfg = TransformerBackbone.Config(model=path, lora_r=16, lora_alpha=32, lora_dropout=0.0, dtype="bfloat16",
                                         max_length=max_length, lora_target_modules="all-linear", **opts)
        backbone = TransformerBackbone(cfg)
        backbone._resolve()
        backbone.pad_id = 0
        model = _lore(backbone, 64, device).to(device)
        weights = torch.cuda.memory_allocated() / 2**30
        try:
            result = {**compare(model, batches, max_length, device, autocast=True), "model_memory_gib": weights}
        except Exception as e:  # noqa: BLE001 - report, keep measuring the other configs
            result = {"error": f"{type(e).__name__}: {e}"[:300]}
        if not name.startswith("warm-up"):
            out["configs"][name] = result
        del model
    return out


# ---- report -------------------------------------------------------------------------------------------------------
def write(name: str, results: dict, lines: list[str]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def step_table(configs: dict, memory: bool) -> list[str]:
    head = "| config | plrm tokens/s | naive tokens/s | speed-up |"
    head += " weights GiB | plrm peak GiB | naive peak GiB |" if memory else ""
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, r in configs.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} |")
            continue
        row = f"| {name} | {r['plrm']['tokens_per_second']:,.0f} | {r['naive']['tokens_per_second']:,.0f} | " \
              f"{r['speedup']:.2f}x |"
        if memory:
            row += f" {r['model_memory_gib']:.2f} | {r['plrm']['peak_memory_gib']:.2f} | " \
                   f"{r['naive']['peak_memory_gib']:.2f} |"
        lines.append(row)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["cache", "lora_cpu", "gpu"], default=["cache", "lora_cpu"])
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per config")
    parser.add_argument("--pairs", type=int, default=16, help="preference pairs per step")
    parser.add_argument("--cache-users", type=int, default=100, help="attribute world users for the cache part")
    parser.add_argument("--gpu-pairs", type=int, default=8)
    parser.add_argument("--gpu-max-length", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests); writes *_quick results")
    args = parser.parse_args()
    suffix = "_quick" if args.quick else ""
    if args.quick:
        args.steps, args.pairs, args.cache_users = 2, 4, 10
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "command": "python benchmarks/bench_backbone.py " + " ".join(sys.argv[1:])}
    if "cache" in args.parts or "lora_cpu" in args.parts:
        results, lines = {"env": env}, ["# Backbones on CPU", "", f"`{env['command']}` (torch {torch.__version__}, "
                                                                    f"{env['threads']} threads)", ""]
        if "cache" in args.parts:
            c = results["cache"] = bench_cache(args.cache_users)
            lines += ["## Feature extraction (offline:minilm) on " + c["dataset"], "",
                      "| | texts encoded | seconds | texts/s of the dataset's rows | speed-up |",
                      "|---|---|---|---|---|",
                      f"| naive: every row's chosen + rejected | {c['texts_per_row_pass']} | "
                      f"{c['naive_seconds']:.1f} | "
                      f"{c['texts_per_row_pass'] / c['naive_seconds']:.0f} | 1.0x |",
                      f"| plrm, cold cache: unique items once | {c['cold_encoded']} | {c['cold_seconds']:.1f} | "
                      f"{c['texts_per_row_pass'] / c['cold_seconds']:.0f} | {c['speedup_cold']:.1f}x |",
                      f"| plrm, warm cache (second run) | {c['warm_encoded']} | {c['warm_seconds']:.2f} | "
                      f"{c['texts_per_row_pass'] / c['warm_seconds']:.0f} | {c['speedup_warm']:.0f}x |", "",
                      f"Matmul probe {c['probe_gflops_before']:.0f} -> {c['probe_gflops_after']:.0f} GFLOP/s.", ""]
        if "lora_cpu" in args.parts:
            r = results["lora_cpu"] = bench_lora_cpu(args.steps, args.pairs)
            lines += [f"## LoRe training through LoRA, tiny random models, {r['pairs_per_step']} pairs/step "
                      f"({r['dataset']} token lengths)", "",
                      "plrm: chosen + rejected in one forward, dynamic padding. naive: two forwards padded to "
                      "max_length (1024).", "", *step_table(r["configs"], memory=False), ""]
        write(f"backbone_cpu{suffix}", results, lines)
    if "gpu" in args.parts:
        r = bench_gpu(args.steps, args.gpu_pairs, args.gpu_max_length)
        r["env"] = env
        lines = [f"# Backbones on GPU: {r['device']}", "", f"`{env['command']}`", "",
                 f"{r['model']}; LoRA r={r['lora_r']} on all linear layers; {r['pairs_per_step']} pairs/step, "
                 f"sequences of {r['max_length'] // 4}-{r['max_length']} tokens; bf16 autocast. plrm: one forward "
                 f"for chosen + rejected with dynamic padding; naive: two forwards padded to {r['max_length']}. "
                 f"Tokens/s counts real (non-pad) tokens. bf16 matmul probe: {r['probe_tflops']:.0f} TFLOP/s.", "",
                 *step_table(r["configs"], memory=True)]
        write(f"backbone_gpu{suffix}", r, lines)


if __name__ == "__main__":
    main()
