"""MRM's meta-training step: the vmapped inner loop (plrm) against a per-user Python loop, in the same run.

    python benchmarks/bench_mrm.py                  # -> benchmarks/results/mrm_step.{json,md}, ~1 min
    python benchmarks/bench_mrm.py --quick --out /tmp/mrm_step.json

One step of Algorithm 2 of MRM (Cai et al., arXiv 2601.18731) for a meta-batch of 64 users: episode split, inner
loop from w0 on each user's support pairs, query losses, Robust Personalization Objective, backward through the
inner steps (second order), Adam step on w0 and the basis.

- vectorized: exactly what ``MRM.training_step`` runs (``model.meta_losses`` -> ``model.outer_objective``),
  the inner loop as torch.func grad + vmap over padded, masked users;
- loop (per-user forward): the same step one user (task) at a time, the way MAML code built on learn2learn's
  clone()/adapt() runs: the user's pairs through the basis, the inner loop with
  ``torch.autograd.grad(create_graph=True)`` (plrm.methods.meta.reference_adapt), the query loss;
- loop (shared forward): a conservative reference that isolates the inner loop: phi of the whole batch in one
  GEMM, as plrm does, then only the inner loop and the query losses one user at a time.
All three use the same episode split (support / query) and the same RPO. Two more timings split the step: phi of
the batch alone (forward and backward: what every variant pays in full), and the inner loop alone (from
precomputed pair inputs, vectorized vs per-user loop).

Before timing, both variants' query losses and outer gradients are checked equal on the same episode. Steps
alternate between the variants; the reported ratio is the median of per-repetition ratios. One torch thread.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plrm.methods import meta  # noqa: E402
from plrm.methods.mrm import MRM  # noqa: E402

WORKLOADS = {
    # name: (users, pairs per user, feature dim, method options)
    "PRISM-like, linear basis K=2, 1 inner step": (64, 7, 4096, {"n_basis": 2, "inner_steps": 1}),
    "PRISM-like, linear basis K=2, 3 inner steps": (64, 7, 4096, {"n_basis": 2, "inner_steps": 3}),
    "TLDR-like, linear basis K=2, 1 inner step": (64, 125, 4096, {"n_basis": 2, "inner_steps": 1}),
    "PRISM-like, no basis (MLP 64-64-1 adapted), 1 inner step": (64, 7, 64, {"basis": "none", "hidden": 64}),
    # recipes/mrm_prism.yaml's world and MRM settings: 64-d features, K=4, 3 inner steps, support 50%
    "mrm_prism recipe, linear basis K=4, 3 inner steps": (64, 7, 64, {"n_basis": 4, "inner_steps": 3,
                                                                       "support_fraction": 0.5}),
}


def make_batch(users: int, pairs: int, dim: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = users * pairs
    return {"user_idx": torch.arange(users).repeat_interleave(pairs), "chosen": torch.randn(n, dim, generator=g),
            "rejected": torch.randn(n, dim, generator=g), "pair_weight": torch.ones(n)}


def loop_losses(model: MRM, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """Reference, shared forward: phi of the whole batch at once, then inner loop and query loss per user."""
    users, group = torch.unique(batch["user_idx"], return_inverse=True)
    return loop_episode_losses(model, model.pair_inputs(batch), group, len(users), generator)


def loop_episode_losses(model: MRM, x: torch.Tensor, group: torch.Tensor, n_users: int,
                        generator: torch.Generator) -> torch.Tensor:
    """The inner loop and query losses one user at a time, from given pair inputs (``MRM.episode_losses``'s
    reference)."""
    c = model.config
    is_support = meta.episode_split(group, n_users, c.support_fraction, generator)
    losses = []
    for g in range(n_users):
        mine = group == g
        fast = meta.reference_adapt(model.logit_fn, model.fast0(), [x[mine & is_support]], c.inner_steps,
                                    c.inner_lr, c.first_order, c.loss_reduction)[0]
        losses.append(meta.reduce_nll(-F.logsigmoid(model.logit_fn(fast, x[mine & ~is_support])), c.loss_reduction))
    return torch.stack(losses)


def task_loop_losses(model: MRM, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """Reference, per-user forward: each task's support and query pairs through the model on their own."""
    c = model.config
    users, group = torch.unique(batch["user_idx"], return_inverse=True)
    is_support = meta.episode_split(group, len(users), c.support_fraction, generator)
    losses = []
    for g in range(len(users)):
        mine = group == g
        support = {k: v[mine & is_support] for k, v in batch.items()}
        query = {k: v[mine & ~is_support] for k, v in batch.items()}
        fast = meta.reference_adapt(model.logit_fn, model.fast0(), [model.pair_inputs(support)], c.inner_steps,
                                    c.inner_lr, c.first_order, c.loss_reduction)[0]
        losses.append(meta.reduce_nll(-F.logsigmoid(model.logit_fn(fast, model.pair_inputs(query))), c.loss_reduction))
    return torch.stack(losses)


def vectorized_losses(model: MRM, batch: dict, generator: torch.Generator) -> torch.Tensor:
    return model.meta_losses(batch, generator)


def inner_only(model: MRM, x: torch.Tensor, group: torch.Tensor, episode_fn, seed: int) -> float:
    """The part of a step that vectorization changes: inner loop, query losses, RPO and their backward (to w0
    and to the pair inputs x), with phi of the batch computed beforehand (x is a leaf)."""
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    x.grad = None
    losses = episode_fn(model, x, group, int(group.max()) + 1, torch.Generator().manual_seed(seed))
    model.outer_objective(losses).backward()
    return time.perf_counter() - start


def step(model: MRM, optimizer, batch: dict, losses_fn, seed: int) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    model.outer_objective(losses_fn(model, batch, torch.Generator().manual_seed(seed))).backward()
    optimizer.step()
    return time.perf_counter() - start


def check_equal(options: dict, batch: dict, dim: int) -> dict:
    out = {}
    grads = []
    for fn in (vectorized_losses, loop_losses, task_loop_losses):
        torch.manual_seed(0)
        model = MRM(MRM.Config(inner_lr=0.3, loss_reduction="mean", **options), n_users=64, feature_dim=dim)
        losses = fn(model, batch, torch.Generator().manual_seed(7))
        model.outer_objective(losses).backward()
        grads.append((losses.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (la, ga), *others = grads
    out["max_abs_loss_diff"] = max(float((la - lb).abs().max()) for lb, _ in others)
    out["max_abs_grad_diff"] = max(float((ga[n] - gb[n]).abs().max()) for _, gb in others for n in ga)
    out["max_abs_grad"] = max(float(ga[n].abs().max()) for n in ga)
    for lb, gb in others:
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-6)
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-5)
    return out


def run(name: str, users: int, pairs: int, dim: int, options: dict, reps: int) -> dict:
    batch = make_batch(users, pairs, dim, seed=0)
    record = {"workload": name, "users": users, "pairs_per_user": pairs, "feature_dim": dim, "options": options,
              **check_equal(options, batch, dim)}
    fns = {"vectorized": vectorized_losses, "loop_shared_forward": loop_losses, "loop_per_user": task_loop_losses}
    models = {}
    for label in fns:
        torch.manual_seed(0)
        m = MRM(MRM.Config(inner_lr=0.3, loss_reduction="mean", **options), n_users=users, feature_dim=dim)
        models[label] = (m, torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3))
    for label in fns:  # warm-up
        step(*models[label], batch, fns[label], seed=0)
    times = {label: [] for label in fns}
    for r in range(reps):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for label in order:
            times[label].append(step(*models[label], batch, fns[label], seed=r + 1))
    # the same two computations with phi of the batch precomputed: the inner loop's share of the step
    inner_fns = {"inner_vectorized": lambda m, *a: m.episode_losses(*a), "inner_loop": loop_episode_losses}
    group = torch.unique(batch["user_idx"], return_inverse=True)[1]
    model = models["vectorized"][0]
    x = model.pair_inputs(batch).detach().requires_grad_(True)
    for label in inner_fns:
        inner_only(model, x, group, inner_fns[label], seed=0)
        times[label] = []
    # phi of the batch alone, forward and backward: the floor both paths pay in full
    times["phi_only"] = []
    for r in range(reps):
        for label in (list(inner_fns) if r % 2 == 0 else list(inner_fns)[::-1]):
            times[label].append(inner_only(model, x, group, inner_fns[label], seed=r + 1))
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        phi = model.pair_inputs(batch)
        if phi.requires_grad:  # basis: none has no phi to train: its pair inputs are the features themselves
            phi.sum().backward()
        times["phi_only"].append(time.perf_counter() - start)
    for label in times:
        record[f"seconds_{label}"] = times[label]
        record[f"median_ms_{label}"] = 1e3 * statistics.median(times[label])
    for label in ("loop_shared_forward", "loop_per_user"):
        record[f"speedup_vs_{label}"] = statistics.median(
            [lo / ve for lo, ve in zip(times[label], times["vectorized"])])
    record["speedup_inner"] = statistics.median(
        [lo / ve for lo, ve in zip(times["inner_loop"], times["inner_vectorized"])])
    print(f"{name}: " + ", ".join(f"{label} {record[f'median_ms_{label}']:.1f} ms" for label in times) +
          f"; x{record['speedup_vs_loop_per_user']:.1f} / x{record['speedup_vs_loop_shared_forward']:.1f}"
          f" / inner x{record['speedup_inner']:.1f}", flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions of the first workload only")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mrm_step.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    workloads = dict(list(WORKLOADS.items())[:1]) if args.quick else WORKLOADS
    reps = 3 if args.quick else args.reps
    results = [run(name, *spec, reps=reps) for name, spec in workloads.items()]
    report = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "quick": args.quick, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    lines = ["# MRM meta-training step: vmapped inner loop vs per-user loop", "",
             f"`{report['command']}` on {report['machine']['platform']}, torch {torch.__version__}, "
             f"{report['machine']['threads']} thread(s), {report['date']}.", "",
             "One outer step (episode, inner loop, query losses, RPO, second-order backward, Adam) for a "
             "meta-batch of 64 users; median of paired repetitions.", "",
             "| workload | vectorized (ms) | loop, per-user forward (ms) | speed-up | loop, shared forward (ms) "
             "| speed-up | phi of the batch alone (ms) | inner loop alone: vectorized / loop (ms) | speed-up "
             "| max abs loss / grad diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['workload']} ({r['users']} users x {r['pairs_per_user']} pairs, D={r['feature_dim']}) | "
                     f"{r['median_ms_vectorized']:.1f} | {r['median_ms_loop_per_user']:.1f} | "
                     f"**{r['speedup_vs_loop_per_user']:.1f}x** | {r['median_ms_loop_shared_forward']:.1f} | "
                     f"**{r['speedup_vs_loop_shared_forward']:.1f}x** | {r['median_ms_phi_only']:.1f} | "
                     f"{r['median_ms_inner_vectorized']:.1f} / {r['median_ms_inner_loop']:.1f} | "
                     f"**{r['speedup_inner']:.1f}x** | {r['max_abs_loss_diff']:.1e} / {r['max_abs_grad_diff']:.1e} |")
    lines += ["", "*phi of the batch alone*: the basis applied to the batch's chosen and rejected features, forward "
              "and backward, which every variant computes in full; at D = 4096 it is most of the vectorized step. "
              "*Inner loop alone*: episode split, inner loop, query losses, RPO and their backward from precomputed "
              "pair inputs (``MRM.episode_losses`` vs the per-user loop), the part vectorization changes."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
