"""Refactor invariance: `plrm bench --recipe bench/quick` and the quickstart must give the committed numbers.

A refactor that changes no maths changes no number. This script runs bench/quick (every installed feature-based
method, plugins included, 2 split seeds) in a temporary directory and compares

* its ``report.md`` above the "Cost" section (times differ run to run) with
  ``results/invariance/bench_quick_report.md``,
* every cell's per-seed metrics (seen / unseen / overall / few-shot, full float precision) with
  ``results/invariance/bench_quick_metrics.json``,

and the quickstart's printed table with ``results/invariance/quickstart_table.txt``. A float metric that moved
by at most 1e-6 (the order of a float32 sum changed, no maths did) is listed apart and does not fail the check;
so is a method registered after the reference was recorded (the baselines of Dong et al. and Rezk et al., or
P-DPO and GenARM, skipped here because they need a causal LM): its cells, its rows of the report's tables and of
its "Skipped cells" table are set aside, since there is no reference number to keep. Any other difference fails.
The committed copies were written on main before the architecture refactor (commit 4dd5b31) with ``--write``.

    python benchmarks/invariance.py            # compare; exit 1 and show the differences when any
    python benchmarks/invariance.py --write    # record the current numbers as the reference
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REF = HERE / "results" / "invariance"
METRIC_GROUPS = ("seen", "unseen", "overall")
TIMED = {"adapt_seconds", "train_seconds", "eval_seconds"}
ROUNDING = 1e-6  # |difference| of a float metric at or below this: float32 summation order, reported apart


# report.md marks plugin rows since the reference was recorded: the marks and their legend are not numbers
PLUGIN_MARK = re.compile(r" \(plugin: [^)]*\)")
PLUGIN_LEGEND = ' "(plugin: package version)" marks a method or dataset an installed plugin package brings.'


def report_above_cost(path: Path) -> str:
    text = path.read_text().replace(PLUGIN_LEGEND, "")
    return PLUGIN_MARK.sub("", text.split("\n## Cost", 1)[0].rstrip() + "\n")


def set_aside_new_methods(report: str, metrics: dict, reference: dict) -> tuple[str, dict, list[str]]:
    """The report and metrics without the cells of methods registered after the reference was recorded (run or
    skipped by capability on this world: they have no reference numbers to keep), and a line for each."""
    known = {key.split("/")[1] for key in reference}
    new = sorted({key.split("/")[1] for key in metrics} - known)
    kept = {k: v for k, v in metrics.items() if k.split("/")[1] not in new}
    lines = [line for line in report.split("\n") if not any(line.startswith("| ") and f"| {m} |" in line
                                                             for m in new)]
    text = "\n".join(lines)
    empty = "## Skipped cells\n\n| dataset | method | why |\n|---|---|---|\n\n"
    text = text.replace(empty, "")
    new_cells = {tuple(k.split("/")[:2]) for k in metrics if k.split("/")[1] in new}       # (dataset, method)
    done = {c for c in new_cells
            if all(v != "skipped" for k, v in metrics.items() if tuple(k.split("/")[:2]) == c)}
    text = re.sub(r"^(\d+) cells \((\d+) complete\)",
                  lambda m: f"{int(m.group(1)) - len(new_cells)} cells ({int(m.group(2)) - len(done)} complete)",
                  text, count=1, flags=re.M)
    return text, kept, [f"(new method, {'run' if any(c[1] == m for c in done) else 'skipped'} on this world, "
                        f"not in the reference) {m}" for m in new]


def cell_metrics(bench_dir: Path) -> dict:
    """{'<dataset>/<method>/seed-<s>': metrics without wall times} of every finished unit."""
    out = {}
    for rec_path in sorted((bench_dir / "cells").glob("*/*/seed-*.json")):
        rec = json.loads(rec_path.read_text())
        if rec["status"] != "done":
            out[f"{rec['dataset']}/{rec['method']}/seed-{rec['seed']}"] = rec["status"]
            continue
        m = {k: v for k, v in rec["metrics"].items() if k not in TIMED}
        out[f"{rec['dataset']}/{rec['method']}/seed-{rec['seed']}"] = m
    return out


def diff(ref, new, path: str = "") -> list[str]:
    if isinstance(ref, dict) and isinstance(new, dict):
        found = []
        for k in sorted(set(ref) | set(new)):
            if k not in ref or k not in new:
                found.append(f"{path}/{k}: only in {'reference' if k in ref else 'this run'}")
            else:
                found += diff(ref[k], new[k], f"{path}/{k}")
        return found
    if isinstance(ref, list) and isinstance(new, list) and len(ref) == len(new):
        return [d for i, (a, b) in enumerate(zip(ref, new)) for d in diff(a, b, f"{path}[{i}]")]
    if isinstance(ref, float) and isinstance(new, float) and (ref == new or (math.isnan(ref) and math.isnan(new))):
        return []
    if isinstance(ref, float) and isinstance(new, float) and abs(ref - new) <= ROUNDING:
        return [f"(rounding) {path}: reference {ref!r}, this run {new!r}"]
    return [] if ref == new else [f"{path}: reference {ref!r}, this run {new!r}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="record this run's numbers as the reference")
    args = ap.parse_args()
    env = {**os.environ, "WANDB_MODE": "offline", "HF_DATASETS_OFFLINE": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0"}
    plrm = [sys.executable, "-m", "plrm.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([*plrm, "bench", "--recipe", "bench/quick"], cwd=tmp, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        quick = subprocess.run([*plrm, "fit", "--recipe", "quickstart"], cwd=tmp, env=env, check=True,
                               capture_output=True, text=True).stdout
        bench_dir = tmp / "bench" / "quick"
        report = report_above_cost(bench_dir / "report.md")
        metrics = cell_metrics(bench_dir)
    lines = quick.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if "accuracy (%), mean over users" in line), 0)
    table = "".join(line for line in lines[first:] if not line.startswith("run directory"))
    if args.write:
        REF.mkdir(parents=True, exist_ok=True)
        (REF / "bench_quick_report.md").write_text(report)
        (REF / "bench_quick_metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
        (REF / "quickstart_table.txt").write_text(table)
        print(f"wrote the reference to {REF}")
        return 0
    problems = []
    reference = json.loads((REF / "bench_quick_metrics.json").read_text())
    report, metrics, new_methods = set_aside_new_methods(report, metrics, reference)
    problems += new_methods
    if report != (REF / "bench_quick_report.md").read_text():
        problems.append("bench/quick report.md differs above its Cost section")
    problems += [f"bench/quick metrics {d}" for d in diff(reference, metrics)]
    if table.strip() != (REF / "quickstart_table.txt").read_text().strip():
        problems.append("quickstart table differs:\n" + table)
    rounding = [p for p in problems if p.startswith(("(new method", )) or "(rounding)" in p]
    problems = [p for p in problems if p not in rounding]
    for p in rounding + problems:
        print(p)
    verdict = "identical to the reference" if not problems else f"{len(problems)} difference(s)"
    if rounding and not problems:
        verdict += (f", but for {len(rounding)} float metric(s) that moved by at most {ROUNDING:g} (summation order)"
                    " and methods newer than the reference, listed above")
    print("invariance: " + verdict)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
