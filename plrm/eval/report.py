"""Results across seeds: mean +- std, the printed table, results.json."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

GROUPS = ("seen", "unseen", "overall")


def mean_std(values: list) -> dict | None:
    """{mean, std, n} over the values that are not None or NaN (std with ddof=1; 0.0 for one value); None if
    none is left."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    arr = np.asarray(vals, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": len(arr)}




def aggregate(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """{seed: {entry: metrics}} -> {entry: {group: {metric: {mean, std, n}}, 'fewshot': {k: {...}}}}."""
    entries: list[str] = []
    for res in per_seed.values():
        entries += [e for e in res if e not in entries]
    out: dict[str, dict] = {}
    for entry in entries:
        runs = [res[entry] for res in per_seed.values() if entry in res]
        agg: dict = {}
        for group in GROUPS:
            groups = [r.get(group) for r in runs]
            if all(g is None for g in groups):
                agg[group] = None
                continue
            keys = next(g for g in groups if g is not None).keys()
            agg[group] = {k: mean_std([g.get(k) if g else None for g in groups]) for k in keys}
        ks = sorted({row["k"] for r in runs for row in r.get("fewshot", [])})
        agg["fewshot"] = {str(k): mean_std([row["accuracy"] for r in runs for row in r.get("fewshot", [])
                                            if row["k"] == k]) for k in ks}
        for extra in ("train_seconds", "adapt_seconds"):
            if any(extra in r for r in runs):
                agg[extra] = mean_std([r.get(extra) for r in runs])
        if any(r.get("policy") for r in runs):  # the policy stage's numbers (plrm.eval.policy_stage)
            keys = list(dict.fromkeys(k for r in runs for k in (r.get("policy") or {})))
            agg["policy"] = {k: mean_std([(r.get("policy") or {}).get(k) for r in runs]) for k in keys}
        out[entry] = agg
    return out


def format_stat(stat: dict | None, pct: bool = True) -> str:
    """A ``mean_std`` cell as printed: "mean ± std" (in % when ``pct``), the mean alone for one seed, "n/a"
    for a missing statistic."""
    if stat is None:
        return "n/a"
    scale = 100.0 if pct else 1.0
    if stat["n"] > 1:
        return f"{stat['mean'] * scale:.1f} ± {stat['std'] * scale:.1f}"
    return f"{stat['mean'] * scale:.1f}"


def render(summary: dict[str, dict], k: int, worst: str = "accuracy_worst_10pct",
           console: Console | None = None) -> None:
    console = console or Console(width=max(120, shutil.get_terminal_size().columns))
    table = Table(title=f"accuracy (%), mean over users; unseen users adapted on k={k} pairs")
    for col in ("method", "seen", "unseen", "overall", "worst 10% (overall)", "AUROC (overall)"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for entry, agg in summary.items():
        if all(agg.get(group) is None for group in GROUPS):  # a row of no reward model (the policy baselines)
            continue

        def g(group, key="accuracy"):
            return (agg.get(group) or {}).get(key) if agg.get(group) else None
        table.add_row(entry, format_stat(g("seen")), format_stat(g("unseen")), format_stat(g("overall")),
                      format_stat(g("overall", worst)), format_stat(g("overall", "auroc")))
    console.print(table)
    ks = sorted({int(x) for agg in summary.values() for x in agg.get("fewshot", {})})
    if ks:
        curve = Table(title="few-shot curve: unseen accuracy (%) vs support pairs k")
        curve.add_column("method")
        for k_i in ks:
            curve.add_column(f"k={k_i}", justify="right")
        for entry, agg in summary.items():
            if agg.get("fewshot"):
                curve.add_row(entry, *[format_stat(agg["fewshot"].get(str(k_i))) for k_i in ks])
        console.print(curve)


POLICY_COLUMNS = (("RM acc.", "rm_accuracy", True), ("policy acc.", "policy_accuracy", True),
                  ("base policy acc.", "base_policy_accuracy", True), ("lambda", "lambda", False),
                  ("ROUGE-1", "rouge1", True), ("ROUGE-L", "rougeL", True), ("BERTScore-F1", "bertscore_f1", True),
                  ("win rate vs zero-shot", "win_rate", True), ("ties", "tie_rate", True))


def render_policy(summary: dict[str, dict], console: Console | None = None) -> None:
    """The policy stage's table (unseen users; Selection Crisis Tables 4-5): a row per method and per baseline
    (zero_shot, icl, icl_rag), a column for each metric some row has."""
    rows = {e: agg["policy"] for e, agg in summary.items() if agg.get("policy")}
    if not rows:
        return
    console = console or Console(width=max(120, shutil.get_terminal_size().columns))
    columns = [c for c in POLICY_COLUMNS if any(r.get(c[1]) for r in rows.values())]
    table = Table(title="policy stage (%, unseen users): reward-guided decoding with each reward model")
    table.add_column("method")
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    for entry, stats in rows.items():
        table.add_row(entry, *[format_stat(stats.get(key), pct) for _, key, pct in columns])
    console.print(table)


def render_active(summary: dict, matches: dict, skipped: dict, console: Console | None = None,
                  max_columns: int = 8) -> None:
    """Table of interactive-session curves: unseen accuracy (%) vs answers, per method and strategy."""
    console = console or Console(width=max(120, shutil.get_terminal_size().columns))
    ts = sorted({row["t"] for by in summary.values() for rows in by.values() for row in rows})
    if len(ts) > max_columns:  # a readable subset; results.json has every t
        picks = np.unique(np.round(np.linspace(0, len(ts) - 1, max_columns)).astype(int))
        ts = [ts[i] for i in picks]
    table = Table(title="interactive sessions: unseen accuracy (%) vs answers")
    table.add_column("method (strategy)")
    for t in ts:
        table.add_column(f"t={t}", justify="right")
    for label, by in summary.items():
        for strategy, rows in by.items():
            at = {row["t"]: row["accuracy"] for row in rows}
            table.add_row(f"{label} ({strategy})", *[format_stat(at.get(t)) for t in ts])
    console.print(table)
    for label, m in matches.items():
        if m is None:
            continue
        reached = f"after {m['answers']} answers" if m["answers"] else "not within the budget"
        console.print(f"{label}: {m['target']} reaches {m['reference']}'s accuracy at t={m['reference_t']} "
                      f"({100 * m['reference_value']:.1f}%) {reached}")
    for what, why in skipped.items():
        console.print(f"{what}: skipped ({why})")


def write_json(path: Path, payload: dict) -> None:
    """Atomic JSON write (a crash never leaves half a results file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
