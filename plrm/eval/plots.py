"""Figures written into run directories (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402


def active_curves(summary: dict, path: Path, title: str) -> None:
    """Unseen-user accuracy and AUROC vs answers, one line (mean, ±1 std band) per method and strategy.

    ``summary``: label -> strategy -> rows {"t", "accuracy": {mean, std, n}, "auroc": {...}}.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, by_strategy in summary.items():
        for strategy, rows in by_strategy.items():
            if not rows:
                continue
            t = [r["t"] for r in rows]
            for ax, metric in zip(axes, ("accuracy", "auroc")):
                mean = [100 * r[metric]["mean"] for r in rows]
                std = [100 * r[metric]["std"] for r in rows]
                (line,) = ax.plot(t, mean, label=f"{label} ({strategy})",
                                  linestyle="-" if strategy == "uncertainty" else "--")
                ax.fill_between(t, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.15, linewidth=0)
    for ax, name in zip(axes, ("accuracy (%)", "AUROC (%)")):
        ax.set_xlabel("answers from the new user")
        ax.set_ylabel(f"unseen users' test {name}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
