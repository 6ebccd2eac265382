"""LoRe's full-batch training step over frozen features: the per-batch pair differences against the difference
table built once per run (``difference_cache``), beside a bandwidth probe of the same two passes and the
per-user loop of benchmarks/bench_lore.py.

    python benchmarks/bench_difference.py             # PersonalLLM-sized: 45,000 pairs x 4,096 (a few minutes)
    python benchmarks/bench_difference.py --quick     # small world: a smoke run of the same code

Workload: bench_lore.py's (LoRe, Bose et al., arXiv 2504.14439, §5: 1,000 seen users x 45 pairs, D = 4096,
B = 10), every train pair in every step, plrm's LoRe defaults and optimizer. Paths, each a whole step (batch,
forward, backward, optimizer step):
- ``per-batch``: what a run did before the table: the batch gathers both sides' features from the item feature
  table (two fresh (P, D) tensors, as the datamodule's ``batch``) and the model subtracts them (a third);
- ``table``: the batch is the (P, D) difference table itself (plrm.data.datamodule, built once, timed apart);
- ``table-bf16``: the table stored in bf16 and the step run under CPU autocast to bf16, what
  ``trainer.precision: bf16-mixed`` does (its loss and gradients compared with the fp32 table's, not equal);
- ``loop``: bench_lore.py's per-user Python loop on pre-gathered sides (the reference implementation).
Probe: the two GEMMs a step cannot avoid, X A^T (P, B) and G^T X (B, D), timed alone on the same table, and a
copy of the table into a mapped buffer (memory bandwidth). Reported: seconds per step (median of interleaved
repetitions), the table's effective GB/s (two passes over P x D x 4 bytes per step), each path's time over the
probe's, and the table path's speed-up over the per-batch path and over the loop; loss and gradients of the two
plrm paths compared.

Writes benchmarks/results/difference_cpu.{json,md} (``--out`` to change); torch on 1 thread unless --threads
(benchmarks/README.md: one thread, so that a 2-core machine's other core absorbs background load).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lore import QUICK, Loop, Vectorized, Workload, train_step  # noqa: E402

from plrm.data.lowrank import LowRankWorld  # noqa: E402
from plrm.items import item_keys  # noqa: E402


def world(w: Workload) -> dict:
    """The item feature table and each train pair's chosen / rejected row in it, user by user."""
    data = LowRankWorld(LowRankWorld.Config(
        n_users=w.n_users, pairs_per_user=w.pairs_per_user, n_train_prompts=w.n_train_prompts, n_test_prompts=10,
        test_prompts_per_user=1, feature_dim=w.feature_dim, n_functions=w.n_functions, alpha=w.alpha,
        seed=0)).load()
    table = data.pairs.data.table
    train = np.flatnonzero(table["split"].to_numpy(zero_copy_only=False) == "train")

    def column(name: str) -> np.ndarray:
        return table[name].to_numpy(zero_copy_only=False)[train]

    prompts = column("prompt")
    _, user_idx = np.unique(column("user_id"), return_inverse=True)
    return {"features": torch.from_numpy(np.ascontiguousarray(data.features.matrix)),
            "chosen": torch.from_numpy(data.features.rows_of(item_keys(prompts, column("chosen")))),
            "rejected": torch.from_numpy(data.features.rows_of(item_keys(prompts, column("rejected")))),
            "user_idx": torch.from_numpy(user_idx.astype(np.int64)), "pair_weight": torch.ones(len(train))}


def per_batch(d: dict) -> dict:
    """The batch as the datamodule builds it without the table: both sides gathered from the features."""
    return {"user_idx": d["user_idx"], "pair_weight": d["pair_weight"],
            "chosen": d["features"][d["chosen"]], "rejected": d["features"][d["rejected"]]}


def build_table(d: dict) -> torch.Tensor:
    out = torch.empty(len(d["chosen"]), d["features"].shape[1])
    for s in range(0, len(out), 4096):  # the datamodule's chunked fill
        torch.sub(d["features"][d["chosen"][s:s + 4096]], d["features"][d["rejected"][s:s + 4096]],
                  out=out[s:s + 4096])
    return out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    w = replace(Workload(), **QUICK) if args.quick else Workload()
    d = world(w)
    table_seconds = timed(lambda: d.__setitem__("table", build_table(d)))
    x = d["table"]
    p, dim = x.shape
    gb = p * dim * 4 / 1e9

    # exactness: the two plrm paths' loss and gradients from the same parameters
    a, b = Vectorized(w, seed=0), Vectorized(w, seed=0)
    batch_plain = per_batch(d)
    batch_table = {"user_idx": d["user_idx"], "pair_weight": d["pair_weight"], "difference": x}
    losses, grads = [], []
    for v, batch in ((a, batch_plain), (b, batch_table)):
        v.optimizer.zero_grad()
        loss = v.loss(batch)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append([q.grad.clone() for q in v.parameters()])
    grad_diff = max(float((g1 - g2).abs().max() / g1.abs().max()) for g1, g2 in zip(*grads))
    del batch_plain
    # bf16-mixed: the table in bf16 (plrm.data.datamodule under bf16 precision), the step under autocast
    c = Vectorized(w, seed=0)
    batch_bf16 = {**batch_table, "difference": x.bfloat16()}

    def bf16_loss(v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return v.loss(batch_bf16)

    c.optimizer.zero_grad()
    loss_bf16 = bf16_loss(c)
    loss_bf16.backward()
    bf16_grad_diff = max(float((g1 - q.grad).abs().max() / g1.abs().max()) for g1, q in zip(grads[1], c.parameters()))
    loss_bf16 = float(loss_bf16.detach())

    def bf16_step():
        c.optimizer.zero_grad(set_to_none=True)
        loss = bf16_loss(c)
        loss.backward()
        c.optimizer.step()

    loop = Loop(w, a.model.basis.weight)
    gathered = per_batch(d)  # the loop's pre-gathered sides (bench_lore's setting)
    basis = torch.randn(w.rank, dim)
    grad_out = torch.randn(p, w.rank)
    buffer = torch.empty_like(x)
    buffer.copy_(x)  # its pages mapped before timing
    times = {"per-batch": [], "table": [], "table-bf16": [], "loop": [], "probe": [], "copy": []}
    for r in range(args.reps):
        order = ["per-batch", "table", "table-bf16", "loop"]
        for name in (order if r % 2 == 0 else order[::-1]):
            if name == "per-batch":
                times[name].append(timed(lambda: train_step(a, per_batch(d))))
            elif name == "table":
                times[name].append(timed(lambda: train_step(b, batch_table)))
            elif name == "table-bf16":
                times[name].append(timed(bf16_step))
            else:
                times[name].append(timed(lambda: train_step(loop, gathered)))
        times["probe"].append(timed(lambda: (x @ basis.T, grad_out.T @ x)))  # the forward and the weight gradient
        times["copy"].append(timed(lambda: buffer.copy_(x)))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_difference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.system()} {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "pairs": p, "dim": dim, "table_gb": gb, "table_build_s": table_seconds, "reps": args.reps,
        "seconds_per_step": med, "all_seconds": times,
        "table_effective_gb_s": 2 * gb / med["table"], "copy_gb_s": 2 * gb / med["copy"],
        "over_probe": {k: med[k] / med["probe"] for k in ("per-batch", "table", "table-bf16", "loop")},
        "speedup_table_over_per_batch": med["per-batch"] / med["table"],
        "speedup_table_over_loop": med["loop"] / med["table"],
        "speedup_bf16_table_over_loop": med["loop"] / med["table-bf16"],
        "speedup_bf16_table_over_table": med["table"] / med["table-bf16"],
        "loss_per_batch": losses[0], "loss_table": losses[1], "max_rel_grad_diff": grad_diff,
        "loss_table_bf16": loss_bf16, "max_rel_grad_diff_bf16": bf16_grad_diff,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "difference_cpu_quick" if args.quick else "difference_cpu"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# LoRe full-batch step: per-batch differences vs the difference table ({result['written_at']})", "",
        f"`{result['command']}` -- {result['machine']}; {p:,} pairs x {dim} features, table {gb:.2f} GB (built "
        f"once in {table_seconds:.2f} s); medians of {args.reps} interleaved repetitions.", "",
        "| path | s/step | x probe (two fp32 GEMM passes) | speed-up of the fp32 table over it |",
        "|---|---|---|---|",
        f"| per-batch (before: two gathers + subtraction per step) | {med['per-batch']:.3f} | "
        f"{result['over_probe']['per-batch']:.2f} | {result['speedup_table_over_per_batch']:.2f}x |",
        f"| table (difference_cache) | {med['table']:.3f} | {result['over_probe']['table']:.2f} | 1 |",
        f"| table in bf16, autocast (`trainer.precision: bf16-mixed`) | {med['table-bf16']:.3f} | "
        f"{result['over_probe']['table-bf16']:.2f} | {1 / result['speedup_bf16_table_over_table']:.2f}x |",
        f"| per-user loop (bench_lore.py) | {med['loop']:.3f} | {result['over_probe']['loop']:.2f} | "
        f"{result['speedup_table_over_loop']:.2f}x |",
        f"| probe: X A^T and G^T X alone | {med['probe']:.3f} | 1 | |", "",
        f"Table path: {result['table_effective_gb_s']:.1f} GB/s effective over two passes; a copy of the table "
        f"moves {result['copy_gb_s']:.1f} GB/s (read + write). Loss {losses[0]:.6f} (per-batch) vs {losses[1]:.6f} "
        f"(table); gradients within {grad_diff:.1e} of the largest entry.", "",
        f"bf16 table: **{result['speedup_bf16_table_over_loop']:.2f}x the per-user loop**, "
        f"{result['speedup_bf16_table_over_table']:.2f}x the fp32 table, half its memory "
        f"({gb / 2:.2f} GB). Not exact: loss {loss_bf16:.6f} vs {losses[1]:.6f} (fp32 table), gradients within "
        f"{bf16_grad_diff:.1e} of the largest entry (bf16 rounding of the table and of the GEMMs' outputs). "
        "End to end, `plrm fit --recipe quickstart trainer.precision=bf16-mixed` gives the fp32 run's accuracies "
        "within 0.2 points (README).",
    ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
