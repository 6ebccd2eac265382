"""LoRe's few-shot adaptation (eq. 11) of many new users: the Adam path against batched projected Newton.

    python benchmarks/bench_adapt.py              # 100,000 new users x 9 pairs, B = 10 (about 2 minutes)
    python benchmarks/bench_adapt.py --quick      # 5,000 users: a smoke run of the same code

The world is LoRe's PersonalLLM-size few-shot setting seen from the frozen basis. Each new user has
Dirichlet(0.01) weights over K = B = 10 reward functions. Their pairs are d = R(x, y+) - R(x, y-) with R the true
functions of N(0, 1) features, so d ~ N(0, I) once the basis is learned (up to a rotation, which neither solver
sees). Each pair is labelled by the user's true reward. Every user has 9 support pairs and 50 held-out pairs.

Both paths go through ``LoRe.adapt`` on one model whose basis is the identity:
- 'adam': adapt_steps = 300 full-batch Adam steps at adapt_lr 0.1 on softmax logits (plrm's default, LoRe App.
  B.1), every user at once (plrm.methods.peruser);
- 'newton': adapt_solver 'newton', every user's weights solved on the simplex to its KKT conditions
  (plrm.methods.simplex), adapt_ridge 1e-4 (the default; 1e-3 and 1e-2 order fewer held-out pairs).
Reported: users/s of each (best of --reps), the ratio, held-out pair accuracy of each, the largest KKT
residual over users, and the largest distance to scipy's SLSQP solving 200 users one at a time.

Writes benchmarks/results/adapt_cpu.{json,md} (``--out`` to change). torch on 2 threads unless --threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

from plrm.methods.lore import LoRe
from plrm.methods.simplex import fit_simplex, gradient_and_hessian, kkt_residual, pad_pairs

RANK, ALPHA, RIDGE = 10, 0.01, 1e-4


def world(n_users: int, k: int, n_test: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    true = torch.distributions.Dirichlet(torch.full((RANK,), ALPHA)).sample((n_users,))   # (U, B)

    def pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = torch.randn(n_users * n, RANK)
        owner = torch.arange(n_users).repeat_interleave(n)
        return d * torch.sign((d * true[owner]).sum(1))[:, None], owner

    support, owner = pairs(k)
    test, test_owner = pairs(n_test)
    return {"support": support, "owner": owner, "test": test, "test_owner": test_owner, "n_users": n_users}


def adapt(w: dict, solver: str) -> tuple[torch.Tensor, float]:
    model = LoRe(LoRe.Config(rank=RANK, adapt_solver=solver, adapt_ridge=RIDGE), n_users=w["n_users"],
                 feature_dim=RANK)
    with torch.no_grad():
        model.basis.weight.copy_(torch.eye(RANK))
    support = {"chosen": w["support"], "rejected": torch.zeros_like(w["support"]), "user_idx": w["owner"],
               "pair_weight": torch.ones(len(w["owner"]))}
    start = time.perf_counter()
    model.adapt(support, torch.arange(w["n_users"]))
    seconds = time.perf_counter() - start
    return torch.softmax(model.user_logits.detach(), -1), seconds


def accuracy(w: dict, weights: torch.Tensor) -> float:
    return float(((w["test"] * weights[w["test_owner"]]).sum(1) > 0).double().mean())


def slsqp(d: np.ndarray) -> np.ndarray:
    b = d.shape[1]
    out = minimize(lambda x: np.logaddexp(0, -(d @ x)).mean() + RIDGE * ((x - 1 / b) ** 2).sum(), np.full(b, 1 / b),
                   jac=lambda x: -(d / (1 + np.exp(d @ x))[:, None]).mean(0) + 2 * RIDGE * (x - 1 / b),
                   method="SLSQP", bounds=[(0, 1)] * b, options={"ftol": 1e-15, "maxiter": 1000},
                   constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1, "jac": lambda x: np.ones(b)}])
    return out.x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="5,000 users")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each path (best kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_users = 5000 if args.quick else args.users
    w = world(n_users, k=9, n_test=50)

    seconds: dict[str, list[float]] = {"adam": [], "newton": []}
    weights = {}
    for rep in range(args.reps):  # the two paths alternate, so drifts in machine speed hit both
        for solver in ("adam", "newton"):
            weights[solver], t = adapt(w, solver)
            seconds[solver].append(t)
            print(f"rep {rep} {solver}: {t:.2f} s", file=sys.stderr)

    d, mask = pad_pairs(w["support"].double(), w["owner"], n_users)
    g, _ = gradient_and_hessian(weights["newton"].double(), d, mask, RIDGE)
    kkt = float(kkt_residual(weights["newton"].double(), g).max())
    check_users = range(0, n_users, max(1, n_users // 200))
    gap = max(float(np.abs(slsqp(w["support"][w["owner"] == u].double().numpy())
                           - weights["newton"][u].double().numpy()).max()) for u in check_users)
    fit = fit_simplex(w["support"], w["owner"], n_users, ridge=RIDGE)
    results = {
        "command": "python benchmarks/bench_adapt.py" + (" --quick" if args.quick else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.platform()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "users": n_users, "support_pairs": 9, "test_pairs": 50, "rank": RANK, "alpha": ALPHA, "ridge": RIDGE,
        "seconds": {s: min(t) for s, t in seconds.items()}, "seconds_all": seconds,
        "users_per_second": {s: n_users / min(t) for s, t in seconds.items()},
        "speedup_newton_over_adam": min(seconds["adam"]) / min(seconds["newton"]),
        "held_out_accuracy": {s: accuracy(w, weights[s]) for s in weights},
        "newton_iterations": fit.iterations, "kkt_residual_max": kkt,
        "slsqp_users_compared": len(check_users), "slsqp_max_abs_diff": gap,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "adapt_cpu_quick" if args.quick else "adapt_cpu"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    r = results
    md = [f"# LoRe eq. 11 for {n_users:,} new users x 9 pairs: Adam path vs batched projected Newton", "",
          f"Command: `{r['command']}`. Machine: {r['machine']}. {r['date']}.", "",
          "| path | seconds (best of %d) | users/s | held-out accuracy |" % args.reps, "|---|---|---|---|"]
    for s, label in (("adam", "Adam, 300 full-batch steps (default)"), ("newton", "projected Newton to KKT")):
        md.append(f"| {label} | {r['seconds'][s]:.2f} | {r['users_per_second'][s]:,.0f} | "
                  f"{100 * r['held_out_accuracy'][s]:.2f} % |")
    md += ["", f"Newton over Adam: **{r['speedup_newton_over_adam']:.1f}x** faster. Newton iterations: "
               f"{r['newton_iterations']}; largest KKT residual over all users {r['kkt_residual_max']:.1e}; largest "
               f"|w - w_SLSQP| over {r['slsqp_users_compared']} users solved one at a time by scipy "
               f"{r['slsqp_max_abs_diff']:.1e}.", ""]
    (out / f"{name}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
