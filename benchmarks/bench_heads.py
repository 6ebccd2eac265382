"""Per-user MLP heads on CPU: plrm's stacked ``PerUserHeads`` against a ``ModuleList`` of per-user heads.

    python benchmarks/bench_heads.py               # 1,000 users, D = 4096, H = 16 (a few minutes)
    python benchmarks/bench_heads.py --quick       # 200 users, D = 512: a smoke run of the same code

Both hold the same weights (one seeded head copied to every user, then perturbed per user): U heads
``r_u(z) = w2_u . relu(W1_u^T z + b1_u) + b2_u``. The ModuleList variant is what per-user baselines in the
papers' code do (a module per user, a Python loop over the users present in a batch); the stacked one is what
Individual RM, MPU and Further-FT train on in plrm (user-grouped ``bmm``, no loop).

1. Training step (forward, Bradley-Terry loss, backward, Adam step) on two kinds of batch:
   - random: 4,096 pairs drawn across all users (plrm's default batches: nearly every user is present);
   - grouped: every train pair (45) of 32 random users (the user-grouped batches of episodic methods).
   Outputs and gradients are checked equal before timing. The two variants alternate step by step; the figure is
   the median of each over the repetitions and the ratio the median of paired ratios.
2. Scoring every user on 1,000 items (evaluation): ``PerUserHeads.all_users`` vs a loop over the modules.
3. Peak memory of two training steps of each variant, each in a fresh process (ru_maxrss above the resident
   memory after building its data).

Writes benchmarks/results/heads_cpu.{json,md} (``--out`` to change). One intra-op thread unless --threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from plrm.methods.heads import PerUserHeads
from plrm.methods.optim import adam

ROOT = Path(__file__).resolve().parent


def build(n_users: int, dim: int, hidden: int, seed: int = 0) -> tuple[PerUserHeads, nn.ModuleList]:
    """The same U heads as stacked tensors and as a ModuleList."""
    stacked = PerUserHeads(n_users, dim, hidden, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in stacked.names:
            p = getattr(stacked, name)
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    modules = nn.ModuleList()
    for u in range(n_users):
        m = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        with torch.no_grad():
            m[0].weight.copy_(stacked.w1[u].T)
            m[0].bias.copy_(stacked.b1[u])
            m[2].weight.copy_(stacked.w2[u][None])
            m[2].bias.copy_(stacked.b2[u][None])
        modules.append(m)
    return stacked, modules


def loop_forward(modules: nn.ModuleList, z: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
    """The reference: one module call per user present in the batch."""
    out = z.new_empty(len(z))
    for u in torch.unique(users).tolist():
        rows = (users == u).nonzero()[:, 0]
        out[rows] = modules[u](z[rows]).squeeze(-1)
    return out


def batches(kind: str, n_users: int, dim: int, n: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if kind == "random":
            users = torch.randint(n_users, (4096,), generator=g)
        else:
            users = torch.randperm(n_users, generator=g)[:32].repeat_interleave(45)
        out.append((users, torch.randn(len(users), dim, generator=g), torch.randn(len(users), dim, generator=g)))
    return out


def step(forward, optimizer, batch) -> float:
    users, chosen, rejected = batch
    optimizer.zero_grad(set_to_none=True)
    loss = -F.logsigmoid(forward(chosen, users) - forward(rejected, users)).mean()
    loss.backward()
    optimizer.step()
    return loss.item()


def check_equal(stacked: PerUserHeads, modules: nn.ModuleList, batch) -> dict:
    users, chosen, rejected = batch
    a = stacked(chosen, users) - stacked(rejected, users)
    b = loop_forward(modules, chosen, users) - loop_forward(modules, rejected, users)
    (-F.logsigmoid(a).mean()).backward()
    (-F.logsigmoid(b).mean()).backward()
    u = int(users[0])
    grad_diff = float((stacked.w1.grad[u] - modules[u][0].weight.grad.T).abs().max())
    scale = float(stacked.w1.grad[u].abs().max())
    stacked.zero_grad(set_to_none=True)
    modules.zero_grad(set_to_none=True)
    return {"max_output_diff": float((a - b).detach().abs().max()), "max_grad_diff_relative": grad_diff / scale}


def time_steps(n_users: int, dim: int, hidden: int, kind: str, reps: int) -> dict:
    stacked, modules = build(n_users, dim, hidden)
    data = batches(kind, n_users, dim, reps + 1, seed=7)
    checks = check_equal(stacked, modules, data[0])
    opt_s = adam(stacked.parameters(), lr=1e-3)                   # what plrm trains with (fused on CPU)
    opt_m = torch.optim.Adam(modules.parameters(), lr=1e-3)     # the ModuleList as written without plrm
    step(stacked, opt_s, data[0])                             # warm-up (Adam state allocated)
    step(lambda z, u: loop_forward(modules, z, u), opt_m, data[0])
    ts, tm = [], []
    for batch in data[1:]:
        t = time.perf_counter()
        step(stacked, opt_s, batch)
        ts.append(time.perf_counter() - t)
        t = time.perf_counter()
        step(lambda z, u: loop_forward(modules, z, u), opt_m, batch)
        tm.append(time.perf_counter() - t)
    users_present = statistics.median(len(torch.unique(b[0])) for b in data)
    return {"kind": kind, "pairs": len(data[0][0]), "users_present": users_present, "checks": checks,
            "stacked_s": statistics.median(ts), "modulelist_s": statistics.median(tm),
            "ratio": statistics.median(m / s for s, m in zip(ts, tm))}


def time_scoring(n_users: int, dim: int, hidden: int, reps: int) -> dict:
    stacked, modules = build(n_users, dim, hidden)
    z = torch.randn(1000, dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = stacked.all_users(z)
        b = torch.stack([m(z).squeeze(-1) for m in modules], 1)
        diff = float((a - b).abs().max())
        ts, tm = [], []
        for _ in range(reps):
            t = time.perf_counter()
            stacked.all_users(z)
            ts.append(time.perf_counter() - t)
            t = time.perf_counter()
            torch.stack([m(z).squeeze(-1) for m in modules], 1)
            tm.append(time.perf_counter() - t)
    return {"items": len(z), "max_diff": diff, "stacked_s": statistics.median(ts),
            "modulelist_s": statistics.median(tm), "ratio": statistics.median(m / s for s, m in zip(ts, tm))}


def current_rss_kb() -> float:
    """This process's resident memory now, in KiB (ru_maxrss is a high-water mark, the imports' peak included)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1024


def _peak_worker(variant: str, n_users: int, dim: int, hidden: int, kind: str, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    data = batches(kind, n_users, dim, 2, seed=11)
    if variant == "stacked":
        model = PerUserHeads(n_users, dim, hidden)
        forward = model
    else:
        model = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
                              for _ in range(n_users))

        def forward(z, u):
            return loop_forward(model, z, u)
    base = current_rss_kb()
    optimizer = adam(model.parameters(), lr=1e-3) if variant == "stacked" else torch.optim.Adam(model.parameters(),
                                                                                                   lr=1e-3)
    for batch in data:
        step(forward, optimizer, batch)
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)


def peak_memory(variant: str, n_users: int, dim: int, hidden: int, kind: str, threads: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_worker, args=(variant, n_users, dim, hidden, kind, threads, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "heads_cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_users, dim, hidden = (200, 512, 16) if args.quick else (1000, 4096, 16)
    start = time.time()
    steps = [time_steps(n_users, dim, hidden, kind, args.reps) for kind in ("random", "grouped")]
    scoring = time_scoring(n_users, dim, hidden, max(3, args.reps // 2))
    memory = {kind: {v: peak_memory(v, n_users, dim, hidden, kind, args.threads) for v in ("stacked", "modulelist")}
              for kind in ("random", "grouped")}
    result = {"command": "python benchmarks/bench_heads.py" + (" --quick" if args.quick else ""),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "seconds": round(time.time() - start),
              "machine": f"{platform.platform()}, {multiprocessing.cpu_count()} CPUs, torch {torch.__version__}, "
                         f"{args.threads} intra-op thread(s)",
              "n_users": n_users, "dim": dim, "hidden": hidden, "steps": steps, "scoring": scoring,
              "peak_mb": memory}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(render(result)) + "\n")
    print("\n".join(render(result)))


def render(r: dict) -> list[str]:
    lines = ["# Per-user MLP heads on CPU: stacked PerUserHeads vs a ModuleList of per-user heads", "",
             f"Command: `{r['command']}` ({r['seconds']} s, {r['date']})", "", f"Machine: {r['machine']}.", "",
             f"Workload: {r['n_users']} users, D = {r['dim']}, H = {r['hidden']} (one hidden layer, ReLU): "
             f"{r['n_users'] * (r['dim'] * r['hidden'] + 2 * r['hidden'] + 1):,} head parameters. Bradley-Terry "
             "loss, Adam (lr 1e-3): plrm's (`plrm.methods.optim.adam`, torch's fused kernel on CPU) for the stacked "
             "heads, torch's default for the ModuleList.", "",
             "| metric | stacked (plrm) | ModuleList | ratio |", "|---|---|---|---|"]
    for s in r["steps"]:
        what = (f"training step, {s['pairs']} random pairs ({s['users_present']:.0f} users present), steps/s"
                if s["kind"] == "random" else
                f"training step, user-grouped batch ({s['pairs']} pairs of {s['users_present']:.0f} users), steps/s")
        lines.append(f"| {what} | {1 / s['stacked_s']:.2f} | {1 / s['modulelist_s']:.2f} | {s['ratio']:.1f}x |")
    sc = r["scoring"]
    lines.append(f"| scoring all users on {sc['items']} items, s | {sc['stacked_s']:.3f} | {sc['modulelist_s']:.3f} "
                 f"| {sc['ratio']:.1f}x |")
    for kind, m in r["peak_mb"].items():
        lines.append(f"| peak RSS of two training steps ({kind} batches), MB | {m['stacked']:.0f} | "
                     f"{m['modulelist']:.0f} | {m['stacked'] / m['modulelist']:.2f}x |")
    checks = [s["checks"] for s in r["steps"]]
    lines += ["", "Time ratios are ModuleList time / stacked time (above 1: stacked is faster), medians of paired "
              "per-step ratios; the memory ratio is stacked / ModuleList.", "",
              "Checks before timing: batch logits equal within "
              f"{max(c['max_output_diff'] for c in checks):.1e}, gradients of a user's W1 within "
              f"{max(c['max_grad_diff_relative'] for c in checks):.1e} of its largest entry; scoring equal within "
              f"{sc['max_diff']:.1e}.", "",
              "What the figures say. Scoring every user at once is one einsum per layer and beats the loop. "
              "Training steps do not: (1) a dense Adam over the stacked (U, D, H) tensor reads and writes every "
              "user's row each step, while Adam over a ModuleList skips the heads that got no gradient -- with 32 "
              "users in a batch that is 30x less optimizer work (the same momentum effect is why plrm fits per-user "
              "heads full-batch where exact per-user independence matters); (2) a random batch gives each user a "
              "few rows, and padding them to the busiest user's count for one bmm moves about 3x the features "
              "the loop moves. Row-sparse (lazy) Adam on the per-user tables and length-bucketed bmm are the "
              "fixes to measure next."]
    return lines


if __name__ == "__main__":
    sys.exit(main())
