"""PReF interactive sessions (PReF, Shenfeld et al., arXiv 2503.06358, §4.2, Algorithm 2) for many new users:
plrm's session, every user at once, against the same algorithm one user at a time, and against the authors'
per-user procedure.

    python benchmarks/bench_active.py              # 1,000 new users x 40 questions (about 10 minutes on 2 cores)
    python benchmarks/bench_active.py --quick      # 100 new users x 10 questions: a smoke run of the same code

World: recipe ``pref_dense`` (64-d features, K = 4 true functions, Dirichlet(0.1) users, Bradley-Terry labels,
pairs shared by ~100 users) with 2,000 users, half of them new, and 6,000 shared train pairs; PReF is trained
once (split seed 0, J from the spectrum's elbow) and every variant starts from that checkpoint. A new user's
candidate pool is their 300 support pairs; answers are the pool's labels.

Variants, all asking ``--budget`` questions of each new user (the first one the pool's first in seeded order):
- 'plrm': ``plrm.eval.active.run_session``, as ``plrm adapt --active`` runs it: each round scores every
  remaining candidate of every user in one batch, takes a per-user argmax and refits every user with one
  batched Newton solve (``PReF.adapt``). Timed once with the test pairs scored only after the last answer,
  and once with a curve point after every answer (what ``plrm adapt --active`` writes).
- 'per-user': the same algorithm (same acquisition score, the same Newton refit with PReF's beta and steps)
  one user at a time, in a Python loop: what a direct port of Algorithm 2 does. Its questions and final user
  vectors must equal plrm's; the script checks both.
- 'authors': the procedure of the authors' ``discover_user.py`` (idanshen/PReF_code), re-implemented here:
  after every answer the user vector is refit from a random start by 5,000 SGD steps (lr 0.01) on the mean
  binary cross-entropy of the answers, and the next question is the candidate v maximizing
  sigma'(u.v)^2 v^T Sigma^-1 v with Sigma = 0.001 I + sum over answers of sigma'(u.v) v v^T, found by a Python
  loop over the candidates. It takes seconds per user, so it runs on ``--authors-users`` users and its users/s
  is extrapolated from them.

Reported: users/s of each variant and plrm's ratio to each; unseen-user test accuracy and AUROC after the last
answer for each (for 'authors', on its users only, beside plrm's on the same users). Writes
``benchmarks/results/active_cpu.{json,md}`` (``--out`` to change). One torch thread unless --threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def pool_differences(model, dm, pool: np.ndarray) -> torch.Tensor:
    """phi(x, y+) - phi(x, y-) of every candidate: (U, P_max, J), zeros past a user's pool."""
    valid = pool >= 0
    batch = dm.batch(torch.from_numpy(pool[valid]))
    out = torch.zeros(*pool.shape, model.n_basis, dtype=torch.float64)
    out[torch.from_numpy(valid)] = model.embedding_difference(batch).double()
    return out


def per_user_session(d_pool: torch.Tensor, pool: np.ndarray, budget: int, beta: float, steps: int,
                     acquisition: str) -> tuple[np.ndarray, torch.Tensor]:
    """Algorithm 2 with PReF's Newton refit and acquisition, one user at a time (the reference)."""
    from plrm.methods.pref import logistic_hessian, newton_logistic

    n_users = len(pool)
    asked = np.full((n_users, budget), -1, dtype=np.int64)
    lams = torch.zeros(n_users, d_pool.shape[-1])
    for u in range(n_users):
        size = int((pool[u] >= 0).sum())
        d_u = d_pool[u, :size]
        remaining = np.ones(size, dtype=bool)
        picks = [0]
        remaining[0] = False
        for t in range(1, budget + 1):
            answered = d_u[picks]
            owner = torch.zeros(len(picks), dtype=torch.long)
            lam = newton_logistic(answered, owner, 1, beta, steps)                     # (1, J)
            if t == budget:
                break
            hess = logistic_hessian(answered, owner, lam, beta)[0]                      # (J, J)
            cand = torch.from_numpy(np.flatnonzero(remaining))
            d = d_u[cand]
            solved = torch.linalg.solve(hess, d.T).T
            sq_norm = (d * solved).sum(-1)
            if acquisition == "hessian_norm":
                score = sq_norm.sqrt()
            else:
                p = torch.sigmoid(d @ lam[0].double())
                score = torch.log1p(p * (1 - p) * sq_norm)
            best = int(cand[int(torch.argmax(score.float()))])
            picks.append(best)
            remaining[best] = False
        asked[u] = pool[u, picks]
        lams[u] = lam[0]
    return asked, lams


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def authors_session(d_pool: torch.Tensor, pool: np.ndarray, budget: int, sgd_steps: int, seed: int
                    ) -> tuple[np.ndarray, torch.Tensor]:
    """The authors' procedure (see the module docstring), one user at a time."""
    gen = torch.Generator().manual_seed(seed)
    n_users, _, j = d_pool.shape
    asked = np.full((n_users, budget), -1, dtype=np.int64)
    lams = torch.zeros(n_users, j)
    for u in range(n_users):
        size = int((pool[u] >= 0).sum())
        vectors = d_pool[u, :size].float().numpy()
        candidates = list(range(size))
        picks: list[int] = []
        lam = None
        for t in range(budget):
            if t == 0:
                nxt = 0
            else:
                sigma = 0.001 * np.eye(j)
                for v in vectors[picks]:
                    sigma = sigma + _sigmoid(lam @ v) * (1 - _sigmoid(lam @ v)) * np.outer(v, v)
                inverse = np.linalg.inv(sigma)
                best, nxt = -np.inf, None
                for i in candidates:
                    v = vectors[i]
                    s = _sigmoid(lam @ v)
                    value = (s * (1 - s)) ** 2 * (v @ inverse @ v)
                    if value > best:
                        best, nxt = value, i
            candidates.remove(nxt)
            picks.append(nxt)
            x = torch.from_numpy(vectors[picks])
            y = torch.ones(len(picks))                    # answers: the pool's labels, pairs oriented chosen first
            w = torch.randn(j, generator=gen).requires_grad_(True)
            opt = torch.optim.SGD([w], lr=0.01)
            for _ in range(sgd_steps):
                opt.zero_grad()
                torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y).backward()
                opt.step()
            lam = w.detach().double().numpy()
        asked[u] = pool[u, picks]
        lams[u] = torch.from_numpy(lam).float()
    return asked, lams


def test_metrics(model, dm, users: np.ndarray, worst: list[float]) -> dict:
    """Unseen-user test accuracy (mean over users) and pooled AUROC of ``users`` under the model's state."""
    from plrm.eval.metrics import summarize
    from plrm.eval.protocol import score_rows

    rows = dm.test_rows(unseen=True)
    owner = dm.row_user[torch.from_numpy(rows)].numpy()
    rows = rows[np.isin(owner, users)]
    logits = score_rows(model, dm, rows)
    metrics, _, _ = summarize(logits, dm.row_user[torch.from_numpy(rows)], users, dm.n_users, worst)
    return {"accuracy": metrics["accuracy"], "auroc": metrics["auroc"], "n_users": metrics["n_users"],
            "n_pairs": metrics["n_pairs"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 users (100 new), budget 10, 1 authors' user")
    ap.add_argument("--budget", type=int, default=None, help="questions per new user (default 40; quick 10)")
    ap.add_argument("--authors-users", type=int, default=None,
                    help="new users the authors' procedure runs on (default 3; quick 1)")
    ap.add_argument("--authors-steps", type=int, default=5000, help="SGD steps per refit (authors: 5000)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--runs", default=None, help="where the training run goes (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/active_cpu.json; "
                                                "--quick: /tmp/active_quick.json)")
    args = ap.parse_args()
    import warnings

    from plrm import runner
    from plrm.eval.active import candidate_pools, run_session

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = args.budget or (10 if args.quick else 40)
    n_authors = args.authors_users if args.authors_users is not None else (1 if args.quick else 3)
    n_users = 200 if args.quick else 2000
    out = Path(args.out) if args.out else (Path("/tmp/active_quick.json") if args.quick else
                                           RESULTS / "active_cpu.json")
    runs = args.runs or tempfile.mkdtemp(prefix="bench_active_")
    overrides = [f"data.n_users={n_users}", f"data.n_train_prompts={n_users * 3}", "split.seeds=[0]",
                 "logger.kind=none", "trainer.progress_bar=false", f"trainer.num_threads={args.threads or 0}",
                 f"run.output_dir={runs}", "~methods.bt", "~methods.lore", "~methods.pref_no_svd",
                 "~methods.pref_no_reg", "~methods.pref_eq8", "eval.k_list=[1]"]
    started = datetime.datetime.now(datetime.timezone.utc)
    fit_start = time.perf_counter()
    fitted = runner.fit("pref_dense", overrides, show=False)
    fit_seconds = time.perf_counter() - fit_start
    run = runner.Run.open(fitted.run_dir)
    dm = run.datamodule(0)
    worst = run.recipe.eval.worst_fractions

    def fresh():
        return run.load_method("pref", 0)

    model = fresh()
    users, pool = candidate_pools(dm, budget)
    cfg = model.config
    print(f"{len(users)} new users, pools of {int((pool >= 0).sum(1).min())}-{int((pool >= 0).sum(1).max())} "
          f"candidates, J = {model.n_basis}, budget {budget}; PReF trained in {fit_seconds:.0f} s", flush=True)

    timings, metrics = {}, {}
    start = time.perf_counter()
    session = run_session(model, dm, budget, "uncertainty", [budget], worst, "labels")
    timings["plrm"] = time.perf_counter() - start
    metrics["plrm"] = test_metrics(model, dm, users, worst)
    plrm_lams = model.user_vectors[torch.from_numpy(users)].detach().clone()
    print(f"plrm: {timings['plrm']:.2f} s", flush=True)

    model = fresh()
    start = time.perf_counter()
    run_session(model, dm, budget, "uncertainty", list(range(1, budget + 1)), worst, "labels")
    timings["plrm_curve"] = time.perf_counter() - start
    print(f"plrm with a curve point per answer: {timings['plrm_curve']:.2f} s", flush=True)

    model = fresh()
    start = time.perf_counter()
    with torch.no_grad():
        d_pool = pool_differences(model, dm, pool)
        ref_asked, ref_lams = per_user_session(d_pool, pool, budget, cfg.adapt_beta, cfg.adapt_steps,
                                               cfg.acquisition)
    timings["per_user"] = time.perf_counter() - start
    with torch.no_grad():
        model.user_vectors[torch.from_numpy(users)] = ref_lams
    metrics["per_user"] = test_metrics(model, dm, users, worst)
    same_questions = float((ref_asked == session.asked).mean())
    lam_diff = float((ref_lams - plrm_lams).abs().max())
    print(f"per-user: {timings['per_user']:.2f} s; same questions {same_questions:.4f}, "
          f"max |lambda diff| {lam_diff:.2e}", flush=True)

    picked = users[:n_authors]
    start = time.perf_counter()
    with torch.no_grad():
        d_sub = pool_differences(model, dm, pool[:n_authors])
    auth_asked, auth_lams = authors_session(d_sub, pool[:n_authors], budget, args.authors_steps, seed=0)
    timings["authors"] = time.perf_counter() - start
    with torch.no_grad():
        model.user_vectors[torch.from_numpy(picked)] = auth_lams
    metrics["authors"] = test_metrics(model, dm, picked, worst)
    with torch.no_grad():
        model.user_vectors[torch.from_numpy(users)] = plrm_lams
    metrics["plrm_on_authors_users"] = test_metrics(model, dm, picked, worst)
    print(f"authors: {timings['authors']:.2f} s for {n_authors} user(s)", flush=True)

    users_per_s = {"plrm": len(users) / timings["plrm"], "plrm_curve": len(users) / timings["plrm_curve"],
                   "per_user": len(users) / timings["per_user"], "authors": n_authors / timings["authors"]}
    result = {
        "command": "python benchmarks/bench_active.py" + (" --quick" if args.quick else ""),
        "started": started.isoformat(timespec="seconds"), "python": platform.python_version(),
        "machine": platform.machine(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
        "world": {"recipe": "pref_dense", "overrides": overrides, "new_users": int(len(users)),
                  "pool_size": int((pool >= 0).sum(1).max()), "J": int(model.n_basis), "budget": budget,
                  "adapt_beta": cfg.adapt_beta, "adapt_steps": cfg.adapt_steps, "acquisition": cfg.acquisition},
        "fit_seconds": fit_seconds, "seconds": timings, "users_per_s": users_per_s,
        "ratio": {"plrm_vs_per_user": users_per_s["plrm"] / users_per_s["per_user"],
                  "plrm_vs_authors": users_per_s["plrm"] / users_per_s["authors"],
                  "plrm_curve_vs_authors": users_per_s["plrm_curve"] / users_per_s["authors"]},
        "authors_users": n_authors, "authors_sgd_steps": args.authors_steps,
        "same_questions_as_per_user": same_questions, "max_abs_lambda_diff_vs_per_user": lam_diff,
        "metrics": metrics,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    if same_questions < 0.99 or lam_diff > 1e-4:
        print("the per-user reference does not ask the same questions as plrm's session", file=sys.stderr)
        return 1
    return 0


def markdown(r: dict) -> str:
    w, m, u = r["world"], r["metrics"], r["users_per_s"]

    def row(name: str, key: str, users: str, mkey: str | None = None) -> str:
        met = m.get(mkey or key)
        return (f"| {name} | {users} | {r['seconds'][key]:.2f} | {u[key]:.3g} | "
                f"{u['plrm'] / u[key]:.1f}x | {100 * met['accuracy']:.1f} | {100 * met['auroc']:.1f} |"
                if met else f"| {name} | {users} | {r['seconds'][key]:.2f} | {u[key]:.3g} | "
                f"{u['plrm'] / u[key]:.1f}x | | |")

    n = w["new_users"]
    lines = [
        f"# PReF interactive sessions: {n} new users x {w['budget']} questions", "",
        f"`{r['command']}` — {r['started']}, Python {r['python']}, torch {r['torch']}, {r['machine']}, "
        f"{r['cpus']} torch thread(s). World: recipe `{w['recipe']}` with {n * 2} users ({n} new), candidate "
        f"pools of {w['pool_size']} support pairs, J = {w['J']}; PReF refit: Newton, beta {w['adapt_beta']}, "
        f"{w['adapt_steps']} steps; acquisition `{w['acquisition']}`. PReF trained in {r['fit_seconds']:.0f} s "
        "(not in any timing).", "",
        "| variant | users | seconds | users/s | plrm's speed-up | unseen acc % | AUROC % |",
        "|---|---|---|---|---|---|---|",
        row("plrm (`run_session`, all users at once)", "plrm", str(n)),
        row("plrm, a curve point after every answer", "plrm_curve", str(n), "plrm"),
        row("same algorithm, one user at a time", "per_user", str(n)),
        row(f"authors' procedure ({r['authors_sgd_steps']} SGD steps per refit, Python loop over candidates)",
            "authors", str(r["authors_users"])),
        "",
        f"- The one-user-at-a-time loop asks the same questions as plrm's session for "
        f"{100 * r['same_questions_as_per_user']:.2f} % of (user, round) and ends at user vectors within "
        f"{r['max_abs_lambda_diff_vs_per_user']:.1e}: the speed-up is vectorization alone.",
        f"- The authors' procedure ran on {r['authors_users']} user(s): unseen accuracy "
        f"{100 * m['authors']['accuracy']:.1f} %, AUROC {100 * m['authors']['auroc']:.1f} % on their "
        f"{m['authors']['n_pairs']} test pairs, against plrm's {100 * m['plrm_on_authors_users']['accuracy']:.1f} % "
        f"and {100 * m['plrm_on_authors_users']['auroc']:.1f} % on the same users and pairs (its refit is "
        "unregularized and stops after a fixed number of SGD steps from a random start).",
        f"- plrm vs the authors' procedure: **{r['ratio']['plrm_vs_authors']:.0f}x** users/s "
        f"({r['ratio']['plrm_curve_vs_authors']:.0f}x with a curve point per answer); vs the same algorithm "
        f"one user at a time: **{r['ratio']['plrm_vs_per_user']:.1f}x**.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
