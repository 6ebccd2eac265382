"""torch's default Adam against its fused kernel on CPU, on the per-user tables of plrm's baselines.

    python benchmarks/bench_optim.py             # the PersonalLLM-sized tables (about a minute)
    python benchmarks/bench_optim.py --quick     # small tables: a smoke run of the same code

plrm.methods.optim builds every Adam / AdamW with ``fused=True`` when all parameters are CPU tensors. Cases:
- ``step <table>``: optimizer steps alone on a parameter table with a fixed random gradient, default (for-loop)
  against fused, Adam (per-user fitting) and AdamW (Lightning training, weight decay 0.01);
- ``mpu adapt``: MPU's new-user adaptation as it runs (PerUserHeads.fit: forward, backward and step of 1,000 MLP
  heads 4,096 x 16 on 9 pairs each), one path per optimizer.
Reported per case: ms per step of each (best of --reps, the two interleaved so that other load hits both),
the ratio, and the largest |difference| of the parameters after the same steps (the same arithmetic, so rounding
only).

Writes benchmarks/results/optim_cpu.{json,md} (``--out`` to change). torch on 2 threads unless --threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

import plrm.methods.optim as optim
from plrm.methods.heads import PerUserHeads


def step_case(shape: tuple[int, ...], steps: int, decay: float | None) -> dict:
    """``steps`` optimizer steps on a (shape) table with one fixed gradient; returns seconds per step + params."""
    g = torch.Generator().manual_seed(0)
    start, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    out = {}
    for fused in (False, True):
        p = start.clone().requires_grad_(True)
        kwargs = {"fused": True} if fused else {"foreach": False}
        opt = (torch.optim.Adam([p], lr=1e-3, **kwargs) if decay is None
               else torch.optim.AdamW([p], lr=1e-3, weight_decay=decay, **kwargs))
        p.grad = grad.clone()
        opt.step()  # the moments are allocated here, outside the timing
        t = time.perf_counter()
        for _ in range(steps):
            opt.step()
        out[fused] = ((time.perf_counter() - t) / steps, p.detach())
    return out


def mpu_case(users: int, dim: int, hidden: int, pairs: int, steps: int) -> dict:
    g = torch.Generator().manual_seed(1)
    heads = PerUserHeads(users, dim, hidden, seed=0)
    start = {name: getattr(heads, name).detach().clone() for name in heads.names}
    chosen, rejected = torch.randn(users * pairs, dim, generator=g), torch.randn(users * pairs, dim, generator=g)
    owner = torch.arange(users).repeat_interleave(pairs)
    who = torch.arange(users)
    out = {}
    for fused in (False, True):
        optim.fused_on_cpu = lambda *a, _f=fused, **k: _f  # the switch plrm.methods.optim.adam reads
        t = time.perf_counter()
        fitted = heads.fit(start, who, chosen, rejected, owner, steps=steps, lr=1e-2)
        out[fused] = ((time.perf_counter() - t) / steps, torch.cat([v.flatten() for v in fitted.values()]))
    optim.fused_on_cpu = FUSED_ON_CPU
    return out


FUSED_ON_CPU = optim.fused_on_cpu


def best(run, reps: int) -> dict:
    """Best time per path over ``reps`` interleaved runs, and the parameters of the last."""
    times, params = {False: [], True: []}, {}
    for _ in range(reps):
        for fused, (sec, p) in run().items():
            times[fused].append(sec)
            params[fused] = p
    default, fused = min(times[False]), min(times[True])
    return {"default_ms": 1e3 * default, "fused_ms": 1e3 * fused, "speedup": default / fused,
            "max_abs_diff": float((params[False] - params[True]).abs().max())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small tables (smoke run)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    users, dim, hidden = (100, 256, 16) if args.quick else (1000, 4096, 16)
    steps = 5 if args.quick else 10
    cases = {
        f"step Adam {2 * users} x {dim} x {hidden} (MPU heads, training)": lambda: step_case(
            (2 * users, dim, hidden), steps, None),
        f"step AdamW {2 * users} x {dim} x {hidden} (MPU heads, training)": lambda: step_case(
            (2 * users, dim, hidden), steps, 0.01),
        f"step Adam {2 * users} x {dim} (Individual heads)": lambda: step_case((2 * users, dim), steps, None),
        f"mpu adapt {users} users x 9 pairs, {dim} x {hidden} heads": lambda: mpu_case(users, dim, hidden, 9, steps),
    }
    rows = {name: best(run, args.reps) for name, run in cases.items()}
    result = {"written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/bench_optim.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.system()} {platform.machine()}, torch {torch.__version__}, "
                         f"{args.threads} thread(s)", "cases": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "optim_cpu_quick" if args.quick else "optim_cpu"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Adam on CPU: torch's default against fused=True ({result['written_at']})", "",
             f"`{result['command']}` -- {result['machine']}; best of {args.reps} interleaved runs.", "",
             "| case | default ms/step | fused ms/step | speed-up | max abs param diff |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['default_ms']:.1f} | {r['fused_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['max_abs_diff']:.1e} |" for name, r in rows.items()]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
