"""LoRA reward-model training: plrm (``transformer`` backbone + ``bt``) beside TRL's ``RewardTrainer``.

    python benchmarks/bench_trl.py                 # Qwen2-architecture model (hidden 256, 4 layers), 24 steps
    python benchmarks/bench_trl.py --quick         # tiny-random:qwen2, 6 steps: a smoke run of the same code

Both train the same Qwen2-architecture model (random weights, plrm's byte tokenizer: nothing is downloaded) with
the same LoRA configuration (r 8, alpha 16, no dropout, q_proj and v_proj, a trainable linear reward head on the
last token), the same AdamW learning rate, fp32 on CPU, on the same pairs: the attribute world's texts
(``attribute_world n_users=40``) tokenized once by plrm, so both read identical token ids. Each side trains one
epoch over the same ``steps x pairs`` pairs in a fresh process:

- plrm: the pairs' batches from plrm's datamodule (chosen and rejected ragged, padded per batch) and
  ``GlobalBT.training_step`` (chosen and rejected in one forward) with its ``configure_optimizers``;
- TRL: ``RewardTrainer`` (pre-tokenized ``chosen_ids`` / ``rejected_ids``, its collator right-pads chosen and
  rejected into one batch, one forward), ``AutoModelForSequenceClassification`` with peft's SEQ_CLS LoRA.

A third side is plrm with ``backbone.packing: true`` (the batch's sequences packed into rows, no compute on
padding): the before / after of packing in the same run.

Reported per side: real (non-padding) tokens per second over the steps after ``--warmup``, the padded share of
the tokens run, median step time, and the process's peak RSS (model load included; torch's CPU allocator has no
peak counter). Writes ``benchmarks/results/trl_cpu.{json,md}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tables import write_report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results"
LORA = dict(r=8, alpha=16.0, dropout=0.0, targets=["q_proj", "v_proj"])
LR = 1e-4
SIDES = ("trl", "plrm", "plrm_packed")


def rss_mib() -> float:
    """This process's resident memory now (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def small_qwen2(out: Path, hidden: int, layers: int) -> Path:
    """A Qwen2-architecture model with random weights and plrm's byte tokenizer, saved once under ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from plrm.backbones import models

    path = out / f"qwen2-h{hidden}-l{layers}"
    if (path / "config.json").is_file():
        return path
    tok = AutoTokenizer.from_pretrained(models.resolve("tiny-random:qwen2"))
    n = len(tok)
    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=hidden // 32, num_key_value_heads=2, vocab_size=n,
                      max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def datamodule(model_path: str, pairs: int, packing: bool = False):
    """plrm's datamodule over the attribute world with the transformer backbone (its tokenization), train rows."""
    from plrm.backbones.transformer import TransformerBackbone
    from plrm.data.attributes import AttributeWorld
    from plrm.data.datamodule import PreferenceDataModule, PreparedData
    from plrm.data.splits import TRAIN, make_split

    data = AttributeWorld(AttributeWorld.Config(n_users=40)).load()
    cfg = TransformerBackbone.Config(model=model_path, lora_r=LORA["r"], lora_alpha=LORA["alpha"],
                                     lora_dropout=LORA["dropout"], lora_target_modules=LORA["targets"],
                                     lr=LR, max_length=1024, packing=packing)
    prepared = PreparedData(data, TransformerBackbone(cfg))
    split = make_split(data.pairs.data.table, 0, 0.5, 0.5, 0.0, need_support=1, source="bench")
    return prepared, split, PreferenceDataModule(prepared, split, batch_size=pairs), split.rows(TRAIN)


def pick_rows(train_rows, steps: int, pairs: int):
    gen = torch.Generator().manual_seed(0)
    return torch.from_numpy(train_rows)[torch.randperm(len(train_rows), generator=gen)[:steps * pairs]]


def run_plrm(model_path: str, steps: int, pairs: int, warmup: int, packing: bool = False) -> dict:
    from plrm.backbones.transformer import pack_rows
    from plrm.methods.bt import GlobalBT

    prepared, split, dm, train = datamodule(model_path, pairs, packing)
    rows = pick_rows(train, steps, pairs)
    torch.manual_seed(0)
    model = GlobalBT(GlobalBT.Config(lr=LR, weight_decay=0.0), n_users=len(split.user_ids),
                     feature_dim=prepared.backbone.feature_dim, encoder=prepared.backbone.encoder())
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    model.train()
    times, tokens, padded, seen = [], [], [], 0
    rss = [rss_mib()]  # after setup (model, data, optimizer), before the first step
    for i, batch, seconds in plrm_steps(model, opt, dm, rows, steps, pairs, rss):
        lengths = torch.cat([batch["chosen"]["lengths"], batch["rejected"]["lengths"]])
        seen += int(lengths.sum())
        if i >= warmup:
            times.append(seconds)
            tokens.append(int(lengths.sum()))
            width = int(lengths.max())  # tokens the model runs: padded rows, or packed rows of that width
            padded.append(width * (len(pack_rows(lengths.tolist(), width)[2]) if packing else len(lengths)))
    return {"times": times, "tokens": tokens, "padded": padded, "all_tokens": seen, "rss_setup_mib": rss[0],
            "rss_training_peak_mib": max(rss)}


def plrm_steps(model, opt, dm, rows, steps: int, pairs: int, rss: list):
    """Train ``model`` with ``opt`` on ``steps`` batches of ``pairs`` of ``rows`` (plrm's own training step),
    appending the RSS after each; yields (step, batch, seconds since the previous step ended)."""
    last = time.perf_counter()
    for i in range(steps):
        batch = dm.batch(rows[i * pairs:(i + 1) * pairs])
        loss = model.training_step(batch, i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        now = time.perf_counter()
        rss.append(rss_mib())
        yield i, batch, now - last
        last = now


def StepClock(record: dict, warmup: int, trainer, on_timed):  # noqa: N802 (builds a TrainerCallback)
    """A TrainerCallback that times TRL's steps: the RSS before the first step and after each one into
    ``record['rss']``, each step after ``warmup`` into ``record['times']``, and ``on_timed(step, tokens)`` with the
    step's number and TRL's own count of its tokens. ``trainer()`` returns the trainer (built after the callback)."""
    from transformers import TrainerCallback

    state = {"last": None, "tokens": 0}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):
            record["rss"].append(rss_mib())  # after setup (model, data, optimizer), before the first step

        def on_step_begin(self, args, st, control, **kw):
            if state["last"] is None:
                state["last"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            now = time.perf_counter()
            record["rss"].append(rss_mib())
            total = trainer()._total_train_tokens
            if st.global_step > warmup:
                record["times"].append(now - state["last"])
                on_timed(st.global_step, int(total - state["tokens"]))
            state["last"], state["tokens"] = now, total

    return Clock()


def run_trl(model_path: str, steps: int, pairs: int, warmup: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    prepared, _, dm, train = datamodule(model_path, pairs)
    rows = pick_rows(train, steps, pairs)
    batch = dm.batch(rows)  # every pair's chosen and rejected ids, ragged: split per item

    def ids(items) -> list[list[int]]:
        return [seq.tolist() for seq in torch.split(items["ids"], items["lengths"].tolist())]

    dataset = Dataset.from_dict({"chosen_ids": ids(batch["chosen"]), "rejected_ids": ids(batch["rejected"])})
    tok = AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["targets"], task_type="SEQ_CLS", bias="none")
    record = {"times": [], "tokens": [], "padded": [], "rss": []}
    clock = StepClock(record, warmup, lambda: trainer,
                      lambda step, tokens: record["tokens"].append(tokens))

    args = RewardConfig(output_dir=tempfile.mkdtemp(prefix="trl_bench_"), per_device_train_batch_size=pairs,
                        max_steps=steps, learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant",
                        warmup_steps=0, logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True,
                        dataloader_num_workers=0, max_length=None, disable_dropout=True, seed=0, bf16=False,
                        fp16=False, gradient_checkpointing=False)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=lora,
                            callbacks=[clock])
    pads = []
    collate = trainer.data_collator

    def counting(features):
        out = collate(features)
        pads.append(int(out["input_ids"].numel()))
        return out

    trainer.data_collator = counting
    trainer.train()
    record["padded"] = pads[warmup:warmup + len(record["times"])]
    record["all_tokens"] = int(trainer._total_train_tokens)  # TRL's own count of attention-mask tokens
    record["rss_setup_mib"], record["rss_training_peak_mib"] = record["rss"][0], max(record.pop("rss"))
    return record


def child(side: str, model_path: str, steps: int, pairs: int, warmup: int, threads: int, out: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    if side == "trl":
        rec = run_trl(model_path, steps, pairs, warmup)
    else:
        rec = run_plrm(model_path, steps, pairs, warmup, packing=side == "plrm_packed")
    rec["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps(rec))


def summarize(rec: dict) -> dict:
    return {"tokens_per_second": sum(rec["tokens"]) / sum(rec["times"]),
            "step_seconds_median": statistics.median(rec["times"]), "timed_steps": len(rec["times"]),
            "real_tokens": sum(rec["tokens"]), "epoch_tokens": rec["all_tokens"],
            "padding_share": 1 - sum(rec["tokens"]) / max(sum(rec["padded"]), 1),
            "peak_rss_mib": rec["peak_rss_mib"], "rss_setup_mib": rec["rss_setup_mib"],
            "training_rss_growth_mib": rec["rss_training_peak_mib"] - rec["rss_setup_mib"]}


def side_parser(doc: str, sides, steps: int, warmup: int, threads: int, results: str) -> argparse.ArgumentParser:
    """The command line of the benchmarks that train one model on several sides, each in a fresh process
    (this one and bench_dpo_trl.py): defaults ``steps``, ``warmup``, ``threads``, ``results/<results>.json``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny-random:qwen2, 6 steps, 1 warmup")
    ap.add_argument("--steps", type=int, default=None, help=f"optimizer steps per side (default {steps}; quick 6)")
    ap.add_argument("--warmup", type=int, default=None,
                    help=f"steps left out of the timing (default {warmup}; quick 1)")
    ap.add_argument("--pairs", type=int, default=8, help="pairs per step")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the Qwen2-architecture model")
    ap.add_argument("--layers", type=int, default=4, help="its layers")
    ap.add_argument("--rounds", type=int, default=2, help="speed runs of each side, alternating (best counts)")
    ap.add_argument("--threads", type=int, default=threads, help="torch threads in each process")
    ap.add_argument("--out", default=None, help=f"JSON path (default benchmarks/results/{results}.json; "
                                                f"--quick: /tmp/{results.removesuffix('_cpu')}_quick.json)")
    ap.add_argument("--child", choices=list(sides), help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    return ap


# glibc keeps freed blocks and returns them to the kernel on its own schedule, so the RSS of a speed run mixes live
# memory with the allocator's caching, which differs between two programs that allocate alike. A memory run makes
# glibc map every block over 64 KiB on its own and unmap it on free: its RSS is the live memory (slower: not timed).
LIVE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def run_child(script: str, side: str, kind: str, model_path: str, args, steps: int, warmup: int) -> dict:
    """``script --child side`` in a fresh process (``kind`` 'memory': under :data:`LIVE_MEMORY`); its JSON record."""
    part = Path(tempfile.mkdtemp()) / f"{side}-{kind}.json"
    cmd = [sys.executable, script, "--child", side, "--model-path", model_path, "--child-out", str(part),
           "--steps", str(steps), "--warmup", str(warmup), "--pairs", str(args.pairs), "--threads", str(args.threads)]
    env = {**os.environ, **LIVE_MEMORY} if kind == "memory" else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
        raise SystemExit(f"{Path(script).name}: the {side} {kind} process failed (exit {proc.returncode})")
    return json.loads(part.read_text())


def run_sides(sides, rounds: int, child_run, summarize, key: str) -> dict:
    """Speed runs of every side, alternating for ``rounds`` rounds (each side's best by ``key`` counts: this CPU's
    speed drifts), then one memory run of each: side -> its best run's summary with the live-memory figures."""
    speed: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side in sides:
            speed[side].append(child_run(side, "speed"))
            print(f"{side}: {summarize(speed[side][-1])[key]:,.2f} {key.replace('_', ' ')}", flush=True)
    out = {}
    for side in sides:
        best = max(speed[side], key=lambda rec: summarize(rec)[key])
        mem = child_run(side, "memory")
        out[side] = {**summarize(best), "raw": best, f"{key}_runs": [summarize(rec)[key] for rec in speed[side]],
                     "live_peak_rss_mib": mem["peak_rss_mib"], "live_rss_setup_mib": mem["rss_setup_mib"],
                     "live_peak_above_setup_mib": mem["peak_rss_mib"] - mem["rss_setup_mib"],
                     "memory_run_epoch_tokens": mem["all_tokens"]}
        print(f"{side}: live peak RSS {out[side]['live_peak_rss_mib']:.0f} MiB", flush=True)
    return out


def model_and_out(args, results: str) -> tuple[str, str, Path]:
    """The model a :func:`side_parser` command trains (built once for the full run), its label, the JSON path."""
    from plrm.backbones import models

    if args.quick:
        model_path, label = str(models.resolve("tiny-random:qwen2")), "tiny-random:qwen2 (hidden 64, 2 layers)"
    else:
        model_path = str(small_qwen2(Path(tempfile.gettempdir()) / "plrm-bench-trl", args.hidden, args.layers))
        label = f"Qwen2 architecture, hidden {args.hidden}, {args.layers} layers, random weights"
    quick = Path(f"/tmp/{results.removesuffix('_cpu')}_quick.json")
    return model_path, label, Path(args.out) if args.out else (quick if args.quick else RESULTS / f"{results}.json")


def main() -> int:
    args = side_parser(__doc__, SIDES, steps=24, warmup=4, threads=2, results="trl_cpu").parse_args()
    steps = args.steps or (6 if args.quick else 24)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 4)
    if args.child:
        child(args.child, args.model_path, steps, args.pairs, warmup, args.threads, args.child_out)
        return 0
    warnings.filterwarnings("ignore")
    model_path, label, out = model_and_out(args, "trl_cpu")
    started = datetime.datetime.now(datetime.timezone.utc)

    def child_run(side: str, kind: str) -> dict:
        return run_child(__file__, side, kind, model_path, args, steps, warmup)

    sides = run_sides(SIDES, args.rounds, child_run, summarize, "tokens_per_second")
    import peft
    import transformers
    import trl
    result = {"command": "python benchmarks/bench_trl.py" + (" --quick" if args.quick else ""),
              "started": started.isoformat(timespec="seconds"), "python": platform.python_version(),
              "machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "trl": trl.__version__, "peft": peft.__version__},
              "model": label, "rounds": args.rounds, "steps": steps, "warmup": warmup, "pairs": args.pairs,
              "lora": LORA, "lr": LR,
              "sides": sides,
              "ratio": ratios(sides, "plrm", "trl"), "ratio_packed": ratios(sides, "plrm_packed", "trl"),
              "packing": ratios(sides, "plrm_packed", "plrm")}
    write_report(out, result, markdown(result))
    return 0


def ratios(sides: dict, a: str, b: str) -> dict:
    """Side ``a`` over side ``b``: tokens/s, live peak RSS and the live peak above setup."""
    return {"tokens_per_second": sides[a]["tokens_per_second"] / sides[b]["tokens_per_second"],
            "live_peak_rss": sides[a]["live_peak_rss_mib"] / sides[b]["live_peak_rss_mib"],
            "live_peak_above_setup": sides[a]["live_peak_above_setup_mib"] / sides[b]["live_peak_above_setup_mib"]}


def markdown(r: dict) -> str:
    s = r["sides"]
    row = lambda name, v: (f"| {name} | {v['tokens_per_second']:,.0f} | {v['step_seconds_median']:.3f} | "  # noqa: E731
                           f"{100 * v['padding_share']:.0f} % | {v['live_peak_rss_mib']:,.0f} | "
                           f"{v['live_rss_setup_mib']:,.0f} | {v['live_peak_above_setup_mib']:,.0f} | "
                           f"{v['peak_rss_mib']:,.0f} |")
    return "\n".join([
        "# LoRA reward training: plrm beside TRL's RewardTrainer (CPU)", "",
        f"`{r['command']}` — {r['started']}, Python {r['python']}, torch {r['versions']['torch']}, transformers "
        f"{r['versions']['transformers']}, TRL {r['versions']['trl']}, peft {r['versions']['peft']}; "
        f"{r['machine']}, {r['cpu_count']} CPUs, {r['threads']} torch threads per process.", "",
        f"Model: {r['model']}, fp32. LoRA r {r['lora']['r']}, alpha {r['lora']['alpha']}, dropout "
        f"{r['lora']['dropout']}, {', '.join(r['lora']['targets'])}; AdamW lr {r['lr']}. {r['pairs']} pairs per "
        f"step, {r['steps']} steps ({r['warmup']} warm-up steps not timed), the same pairs and token ids on both "
        "sides (attribute world, 40 users).", "",
        "| | real tokens/s | median step s | padding run | live peak RSS MiB | live RSS after setup | "
        "live peak above setup | peak RSS, default malloc |", "|---|---|---|---|---|---|---|---|",
        row("TRL RewardTrainer", s["trl"]), row("plrm transformer + bt", s["plrm"]),
        row("plrm transformer + bt, `packing: true`", s["plrm_packed"]), "",
        f"plrm / TRL: **{r['ratio']['tokens_per_second']:.2f}x** tokens/s at **{r['ratio']['live_peak_rss']:.2f}x** "
        f"live peak RSS ({r['ratio']['live_peak_above_setup']:.2f}x the live peak above setup).", "",
        f"plrm with packing / TRL: **{r['ratio_packed']['tokens_per_second']:.2f}x** tokens/s at "
        f"**{r['ratio_packed']['live_peak_rss']:.2f}x** live peak RSS "
        f"({r['ratio_packed']['live_peak_above_setup']:.2f}x the live peak above setup). Packing against plrm's "
        f"padded batches (before / after): {r['packing']['tokens_per_second']:.2f}x tokens/s, "
        f"{r['packing']['live_peak_above_setup']:.2f}x the live peak above setup.", "",
        "Packing (`backbone.packing: true`): each training batch's chosen and rejected sequences are packed first-fit "
        "decreasing into rows as long as the batch's longest sequence; position ids restart per sequence and "
        "transformers' attention keeps the sequences apart (block-diagonal causal mask), so features and LoRA "
        "gradients equal the padded batch's to float rounding (tests/backbones/test_transformer.py). TRL's "
        "RewardTrainer has no padding-free mode.", "",
        f"Tokens/s: the faster of {r['rounds']} runs of each side, alternating, with the default allocator (runs: TRL "
        f"{', '.join(f'{x:,.0f}' for x in s['trl']['tokens_per_second_runs'])}; plrm "
        f"{', '.join(f'{x:,.0f}' for x in s['plrm']['tokens_per_second_runs'])}; plrm packed "
        f"{', '.join(f'{x:,.0f}' for x in s['plrm_packed']['tokens_per_second_runs'])}). Memory comes from another run "
        "of each side in which glibc maps every block over 64 KiB on its own and unmaps it when freed "
        "(`MALLOC_MMAP_THRESHOLD_=65536`, "
        "`MALLOC_TRIM_THRESHOLD_=0`), so RSS is the memory alive: with the default allocator the RSS also holds "
        "what glibc keeps cached, which differs between two programs that allocate alike (last column). Peak RSS "
        "counts each process's imports, the dataset and the model as loaded; the peak above setup is what training "
        "adds at its highest (activations of the longest batch, gradients, optimizer state).", ""])


if __name__ == "__main__":
    sys.exit(main())
