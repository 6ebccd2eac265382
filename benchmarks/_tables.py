"""Markdown table helpers shared by the benchmark scripts (pref_study.py, mrm_study.py, the TRL and k-bit
benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: Path, result: dict, markdown: str) -> None:
    """``result`` as JSON at ``out`` and ``markdown`` beside it (``.md``), printed too."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


def pct(stat: dict | None) -> str:
    """A metric aggregated over seeds ({mean, std, n}) as 'mean ± std' in percent ('n/a' when absent)."""
    if stat is None:
        return "n/a"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}" if stat["n"] > 1 else f"{100 * stat['mean']:.1f}"


def fewshot_table(summary: dict, corner: str = "method") -> list[str]:
    """Unseen accuracy by few-shot k, one row per method that adapts new users."""
    ks = sorted({int(k) for agg in summary.values() for k in agg.get("fewshot", {})})
    lines = [f"| {corner} | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for label, agg in summary.items():
        if agg.get("fewshot"):
            lines.append(f"| {label} | " + " | ".join(pct(agg["fewshot"].get(str(k))) for k in ks) + " |")
    return lines
