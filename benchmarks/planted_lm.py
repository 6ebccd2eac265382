"""Planted preferences on real text: do the LM-level methods read the user?

    python benchmarks/planted_lm.py                            # lm_attributes_qwen, 3 seeds: a GPU job
    python benchmarks/planted_lm.py --recipe lm_attributes     # SmolLM2 on CPU: the demonstration size
    python benchmarks/planted_lm.py --quick                    # lm_attributes on a tiny random LM, 1 seed: plumbing

The world (recipe ``lm_attributes`` and its twins): two groups of users who prefer opposite poles of one attribute
(a formal vs a casual one-sentence answer to the same prompt). A global reward cannot beat 50% on both groups, so:

- P-DPO (soft user tokens; Li et al., arXiv 2402.05133) and the personalized GenARM (plrm's extension) must rank
  each user's preferred response higher on held-out pairs: >= 80% for unseen users after adaptation (their soft
  tokens fitted on k support pairs);
- global DPO (``dpo``: P-DPO with alpha = 0, every user the generic one) and GenARM (Xu et al., ICLR 2025, arXiv
  2410.08193) stay near 50%: precisely, at most the non-personalized oracle (the population-mean reward, which
  is above 50% only where one group outnumbers the other among the evaluated users) plus 5 points.

Writes ``benchmarks/results/planted_<recipe>.{md,json}`` (``--quick``: /tmp/planted_lm_quick) with the per-seed and
mean +- std accuracies and the two checks; the numbers come from the runs' results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _tables import fewshot_table, pct  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PERSONAL = ("pdpo", "genarm_user")
GLOBAL = ("dpo", "genarm")
UNSEEN_TARGET = 0.8   # the bar for personalized methods on unseen users
GLOBAL_SLACK = 0.05   # global methods at most the non-personalized oracle + this
ORACLES = ("oracle/personal", "oracle/non-personalized")
QUICK = ["backbone.model=tiny-random:qwen2", "backbone.max_length=256", "split.seeds=[0]",
         "methods.pdpo.adapt_steps=2", "methods.genarm_user.adapt_steps=2"]


def table(summary: dict) -> list[str]:
    lines = ["| method | kind | seen | unseen (adapted) | overall | train s |", "|---|---|---|---|---|---|"]
    for label in (*PERSONAL, *GLOBAL, *ORACLES):
        agg = summary.get(label)
        if agg is None:
            continue
        secs = f"{agg['train_seconds']['mean']:.0f}" if agg.get("train_seconds") else "-"
        kind = "personalized" if label in PERSONAL else "global" if label in GLOBAL else "oracle (true rewards)"
        lines.append(f"| {label} | {kind} | {pct((agg.get('seen') or {}).get('accuracy'))} | "
                     f"{pct((agg.get('unseen') or {}).get('accuracy'))} | "
                     f"{pct((agg.get('overall') or {}).get('accuracy'))} | {secs} |")
    return lines


def checks(summary: dict) -> dict[str, bool]:
    def unseen(label: str) -> float:
        return summary[label]["unseen"]["accuracy"]["mean"]

    ceiling = unseen("oracle/non-personalized") + GLOBAL_SLACK
    return {f"{m} unseen >= {UNSEEN_TARGET:.0%}": unseen(m) >= UNSEEN_TARGET for m in PERSONAL} | \
           {f"{m} unseen <= non-personalized oracle + {GLOBAL_SLACK:.0%} ({ceiling:.1%})": unseen(m) <= ceiling
            for m in GLOBAL}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=None, help="a recipe of the lm_attributes family (default: "
                                                   "lm_attributes_qwen; with --quick lm_attributes)")
    ap.add_argument("--quick", action="store_true", help="a tiny random LM and 1 seed: checks the plumbing only")
    ap.add_argument("--out-dir", default=None, help="where the table goes (default benchmarks/results)")
    ap.add_argument("--runs", default="runs/planted_lm", help="where the plrm run directories go")
    ap.add_argument("overrides", nargs="*", help="recipe overrides (key=value), as in plrm fit")
    args = ap.parse_args()
    args.recipe = args.recipe or ("lm_attributes" if args.quick else "lm_attributes_qwen")
    import warnings

    from plrm import runner

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    out_dir = Path(args.out_dir) if args.out_dir else (RESULTS if not args.quick else Path("/tmp/planted_lm_quick"))
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = ["logger.kind=none", "trainer.progress_bar=false", "run.overwrite=true",
                 f"run.output_dir={args.runs}", *(QUICK if args.quick else []), *args.overrides]
    command = " ".join(["python benchmarks/planted_lm.py", f"--recipe {args.recipe}",
                        *(["--quick"] if args.quick else []), *args.overrides])
    result = runner.fit(args.recipe, overrides, show=False)
    summary, ok = result.summary, checks(result.summary)
    per_seed = {str(s): {m: {g: (r[m].get(g) or {}).get("accuracy") for g in ("seen", "unseen")}
                         for m in (*PERSONAL, *GLOBAL, *ORACLES) if m in r} for s, r in result.per_seed.items()}
    name = f"planted_{args.recipe.replace('/', '_')}" + ("_quick" if args.quick else "")
    meta = {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "platform": platform.platform(), "recipe": args.recipe, "seeds": sorted(result.per_seed)}
    lines = [f"# Planted preferences: `{args.recipe}` ({len(result.per_seed)} seed(s))", "",
             f"`{command}` ({meta['date']}, {meta['platform']}). Two user groups prefer opposite formality; "
             "accuracy in % on held-out pairs (mean ± std over split seeds, each the mean over users); unseen users "
             "adapted on their k support pairs (P-DPO and the personalized GenARM fit their own soft tokens; global "
             "DPO and GenARM have no user to fit).", "", *table(summary), "",
             *fewshot_table({m: summary[m] for m in (*PERSONAL, *GLOBAL) if m in summary}, "unseen accuracy"), "",
             "## Checks", "", *[f"- {name_}: {'yes' if v else 'NO'}" for name_, v in ok.items()], "",
             "Per seed (seen / unseen):", "",
             *[f"- seed {s}: " + ", ".join(f"{m} {100 * v['seen']:.1f} / {100 * v['unseen']:.1f}"
                                          for m, v in rows.items() if v["seen"] is not None and v["unseen"] is not None)
               for s, rows in per_seed.items()], ""]
    (out_dir / f"{name}.md").write_text("\n".join(lines))
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "checks": ok, "summary": summary,
                                                      "per_seed": per_seed}, indent=1))
    print("\n".join(f"{k}: {'yes' if v else 'NO'}" for k, v in ok.items()))
    print(f"wrote {out_dir / name}.md (+ .json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
