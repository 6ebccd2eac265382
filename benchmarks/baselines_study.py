"""The baselines against the low-rank world's known truth, 5 split seeds (recipes/baselines_lowrank.yaml).

    python benchmarks/baselines_study.py                      # 3 worlds x 5 seeds -> benchmarks/results/baselines_*
    python benchmarks/baselines_study.py --parts groups --seeds 0 1    # a part, fewer seeds

1. ``plain`` (the recipe's world: 100 seen users x 50 train pairs, D = 16, K = 4, Dirichlet(0.05) users): with
   that many pairs Individual RM comes close to the personal oracle on seen users, and from k <= 3 support pairs
   it is far below LoRe on new users (When Personalization Meets Reality, Dong et al., arXiv 2502.19158, §5:
   per-user models need data no new user has).
2. ``minority`` (the same world, 10% of the users with negated true weights: they prefer what the majority
   dislikes): every personalized method beats the Global RM on the mean accuracy of the minority's worst 10%
   (Dong et al. Fig. 5), on seen users and on new users adapted from k = 10 pairs.
3. ``groups`` (Dirichlet(0.001): every user is one of K = 4 pure types, well separated): PAL with K prototypes
   recovers the planted groups, the adjusted Rand index between each seen user's largest mixture weight and
   their type >= 0.9 (PAL, Chen et al., arXiv 2406.08469).

Every number comes from the runs (``runner.fit``); the tables and the checks are written to
benchmarks/results/baselines_<part>.{md,json} with the command, the machine and the wall time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from plrm import runner
from plrm.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COMMON = ["logger.kind=none", "trainer.progress_bar=false", "run.overwrite=true"]
PARTS = {
    "plain": [],
    "minority": ["data.minority_fraction=0.1"],
    "groups": ["data.alpha=0.001"],
}
GROUP_METHODS = ("bt", "lore", "pal_a", "pal_b")  # the groups part trains only these
ORACLES = ("oracle/personal", "oracle/non-personalized")


def stat(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def pct(s: dict | None) -> str:
    return "n/a" if s is None else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def run_part(part: str, seeds: list[int], out: Path) -> tuple[runner.RunResult, object]:
    overrides = [*COMMON, *PARTS[part], f"split.seeds={seeds}", f"run.output_dir={out}", f"run.name={part}"]
    recipe = load_recipe("baselines_lowrank", overrides)
    if part == "groups":
        keep = [m for m in recipe.methods if m not in GROUP_METHODS]
        recipe = load_recipe("baselines_lowrank", overrides + [f"~methods.{m}" for m in keep])
    return runner.fit(recipe, show=False), recipe


def accuracy_rows(result: runner.RunResult, seeds: list[int]) -> dict:
    """entry -> seen / unseen / fewshot k -> stat over seeds."""
    rows = {}
    entries = list(result.per_seed[seeds[0]])
    for entry in entries:
        per = [result.per_seed[s][entry] for s in seeds]
        row = {}
        for group in ("seen", "unseen"):
            vals = [p[group]["accuracy"] for p in per if p.get(group)]
            row[group] = stat(vals) if vals else None
        for fs in per[0].get("fewshot") or []:
            vals = [next(f["accuracy"] for f in p["fewshot"] if f["k"] == fs["k"]) for p in per]
            row[f"k={fs['k']}"] = stat(vals)
        rows[entry] = row
    return rows


def minority_worst(result: runner.RunResult, minority: np.ndarray, seeds: list[int], unseen_k: int) -> dict:
    """entry -> group -> stat over seeds of the mean accuracy of the worst 10% of minority users."""
    frame = result.per_user
    user_index = frame["user_id"].str.slice(4).astype(int).to_numpy()
    frame = frame.assign(minority=minority[user_index])
    out: dict[str, dict] = {}
    for (method, group), rows in frame[frame["minority"]].groupby(["method", "group"]):
        if group == "unseen":
            rows = rows[rows["k"] == unseen_k]
        vals = []
        for seed in seeds:
            acc = np.sort(rows[rows["seed"] == seed]["accuracy"].to_numpy())
            if len(acc):
                vals.append(float(acc[:max(1, int(np.ceil(0.1 * len(acc))))].mean()))
        if vals:
            out.setdefault(method, {})[group] = stat(vals)
    return out


def pal_groups(run_dir: Path, truth: dict, seeds: list[int], split_users) -> dict:
    """method -> stat over seeds of the ARI between argmax_k w_u (seen users) and the planted type."""
    types = truth["user_weights"].argmax(1)
    out = {}
    for method in ("pal_a", "pal_b"):
        aris = []
        for seed in seeds:
            ckpt = run_dir / f"seed-{seed}" / f"{method}.ckpt"
            if not ckpt.exists():
                continue
            logits = torch.load(ckpt, weights_only=True)["state_dict"]["user_logits"]
            users = split_users[seed]
            ids = np.asarray([int(u[4:]) for u in users["ids"]])
            seen = users["seen"]
            aris.append(float(adjusted_rand_score(types[ids[seen]], logits[seen].argmax(1).numpy())))
        if aris:
            out[method] = stat(aris) | {"per_seed": aris}
    return out


def render(part: str, rows: dict, checks: list[tuple[str, bool, str]], extra: list[str], meta: dict) -> str:
    ks = sorted({int(c[2:]) for r in rows.values() for c in r if c.startswith("k=")})
    lines = [f"# Baselines on the low-rank world: {part}", "", f"Command: `{meta['command']}` ({meta['seconds']} s, "
             f"{meta['date']}); {meta['machine']}.", "", meta["world"], "",
             "| method | seen | unseen (k=10) | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---" * (3 + len(ks)) + "|"]
    for entry, r in rows.items():
        lines.append(f"| {entry} | {pct(r['seen'])} | {pct(r['unseen'])} | "
                     + " | ".join(pct(r.get(f"k={k}")) for k in ks) + " |")
    lines += ["", "Accuracy in % (mean ± std over split seeds, each the mean over users; few-shot columns: unseen "
              "users adapted on k pairs).", ""] + extra + ["", "## Checks", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {what} ({detail})" for what, ok, detail in checks]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    args = ap.parse_args()
    failed = 0
    for part in args.parts:
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            result, recipe = run_part(part, args.seeds, Path(tmp))
            prepared = runner.prepare(recipe)
            truth = prepared.data.truth
            rows = accuracy_rows(result, args.seeds)
            checks, extra, payload = [], [], {"rows": rows}
            if part == "plain":
                ind, lore, oracle = rows["individual"], rows["lore"], rows["oracle/personal"]
                gap = oracle["seen"]["mean"] - ind["seen"]["mean"]
                checks.append(("Individual RM's seen accuracy within 3 points of the personal oracle", gap <= 0.03,
                               f"{pct(ind['seen'])} vs {pct(oracle['seen'])}"))
                for k in (1, 2, 3):
                    d = lore[f"k={k}"]["mean"] - ind[f"k={k}"]["mean"]
                    checks.append((f"LoRe at least 10 points above Individual RM on new users at k={k}", d >= 0.10,
                                   f"{pct(lore[f'k={k}'])} vs {pct(ind[f'k={k}'])}"))
            if part == "minority":
                worst = minority_worst(result, truth["minority"], args.seeds, recipe.split.k)
                payload["minority_worst_10pct"] = worst
                extra += ["Mean accuracy (%) of the worst 10% of minority users (10% of all users; seen, and unseen "
                          f"adapted on k={recipe.split.k}):", "", "| method | seen | unseen |", "|---|---|---|"]
                extra += [f"| {m} | {pct(g.get('seen'))} | {pct(g.get('unseen'))} |" for m, g in worst.items()]
                bt = worst["bt"]
                for method, g in worst.items():
                    if method == "bt" or method in ORACLES or method.startswith("oracle/"):
                        continue
                    for group in ("seen", "unseen"):
                        if group in g:
                            checks.append((f"{method} above the Global RM on the minority's worst 10% ({group})",
                                           g[group]["mean"] > bt[group]["mean"],
                                           f"{pct(g[group])} vs {pct(bt[group])}"))
            if part == "groups":
                split_users = {}
                for seed in args.seeds:
                    split = runner.seed_split(recipe, prepared, seed)
                    seen = np.zeros(len(split.user_ids), dtype=bool)
                    seen[split.seen_users] = True
                    split_users[seed] = {"ids": split.user_ids.astype(str), "seen": seen}
                aris = pal_groups(result.run_dir, truth, args.seeds, split_users)
                payload["ari"] = aris
                extra += ["Adjusted Rand index between each seen user's largest PAL mixture weight and their planted "
                          "type (K = 4 prototypes, K = 4 types):", ""]
                for m, a in aris.items():
                    per_seed = ", ".join(f"{x:.3f}" for x in a["per_seed"])
                    extra.append(f"- {m}: {a['mean']:.3f} ± {a['std']:.3f} (per seed {per_seed})")
                for m, a in aris.items():
                    checks.append((f"{m} recovers the planted groups (ARI >= 0.9)", a["mean"] >= 0.9,
                                   f"{a['mean']:.3f}"))
        seconds = round(time.time() - start)
        meta = {"command": f"python benchmarks/baselines_study.py --parts {part} --seeds "
                           + " ".join(map(str, args.seeds)),
                "seconds": seconds, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "machine": f"{platform.platform()}, torch {torch.__version__}",
                "world": "World: " + {"plain": "recipes/baselines_lowrank.yaml as is",
                                      "minority": "baselines_lowrank with data.minority_fraction=0.1",
                                      "groups": "baselines_lowrank with data.alpha=0.001 (near-pure types); "
                                                "methods bt, lore, pal_a, pal_b"}[part]}
        payload |= {"checks": [{"check": c, "pass": ok, "detail": d} for c, ok, d in checks], "meta": meta}
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"baselines_{part}.json").write_text(json.dumps(payload, indent=1) + "\n")
        (RESULTS / f"baselines_{part}.md").write_text(render(part, rows, checks, extra, meta))
        failed += sum(not ok for _, ok, _ in checks)
        print(f"{part}: {seconds} s, {sum(ok for _, ok, _ in checks)}/{len(checks)} checks pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
