"""A benchmark's results: ``results.json`` (every record + per-cell mean +- std), ``report.md`` and the figures,
from the unit records of one directory or of several shards (``plrm bench --merge``).

report.md is a pure function of the records' metrics, in the recipe's order, except for its last section
("Cost": wall times and memory), so an interrupted-and-resumed benchmark and an uninterrupted one give the same
report above that section.
"""

from __future__ import annotations

import datetime as dt
import math
import platform
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from plrm import __version__  # noqa: E402
from plrm.bench.records import DONE, FAILED, SKIPPED, SPEC_FILE, broken_plugins, git_commit, read_records  # noqa: E402
from plrm.bench.spec import BenchSpec, Unit, load_bench  # noqa: E402
from plrm.eval import report as run_report  # noqa: E402
from plrm.eval.policy_stage import policy_correlations  # noqa: E402
from plrm.recipe import RecipeError  # noqa: E402

_fmt = run_report.format_stat  # "mean ± std" in %, "n/a" for a missing statistic: the same cells as `plrm fit` prints
WORST = ("accuracy_worst_10pct", "accuracy_worst_20pct", "accuracy_worst_50pct")
PLOTS = ("fewshot.png", "worst_users.png", "per_user.png", "accuracy_vs_time.png")  # + rm_vs_*.png with a policy stage


# ---- aggregation ---------------------------------------------------------------------------------------------
def cells(records: list[dict]) -> list[dict]:
    """One entry per (dataset, method) in record order: status over seeds, mean +- std of every metric."""
    order: dict[tuple[str, str], list[dict]] = {}
    for rec in records:
        order.setdefault((rec["dataset"], rec["method"]), []).append(rec)
    out = []
    for (dataset, method), recs in order.items():
        done = [r for r in recs if r["status"] == DONE]
        statuses = {r["status"] for r in recs}
        status = DONE if statuses == {DONE} else SKIPPED if statuses == {SKIPPED} else \
            FAILED if not done else "partial"
        cell = {"dataset": dataset, "method": method, "status": status,
                "seeds": sorted(r["seed"] for r in recs), "seeds_done": sorted(r["seed"] for r in done)}
        backbone = next((r["recipe"].get("backbone") for r in done if isinstance(r.get("recipe"), dict)), None)
        if isinstance(backbone, dict) and backbone.get("name"):
            cell["backbone"] = " ".join(str(backbone[k]) for k in ("name", "model") if backbone.get(k))
        if done:
            cell["summary"] = run_report.aggregate({r["seed"]: {method: r["metrics"]} for r in done})[method]
            for key in ("wall_seconds", "peak_rss_mb", "peak_gpu_mb"):
                cell[key] = run_report.mean_std([r.get(key) for r in done])
        reasons = sorted({r["reason"] for r in recs if r["status"] == SKIPPED})
        if reasons:
            cell["skipped_reason"] = "; ".join(reasons)
        errors = [{"seed": r["seed"], "error": r["error"], "traceback": r.get("traceback", ""),
                   "stage": r.get("stage", ""), "log": r.get("log", "")} for r in recs if r["status"] == FAILED]
        if errors:
            cell["errors"] = errors
        out.append(cell)
    return out


def oracles(records: list[dict]) -> dict[str, dict]:
    """dataset -> oracle name -> summary over seeds (one record per dataset and seed supplies them)."""
    per: dict[str, dict[int, dict]] = {}
    for rec in records:
        if rec["status"] == DONE and rec.get("oracles"):
            per.setdefault(rec["dataset"], {}).setdefault(rec["seed"], rec["oracles"])
    return {d: run_report.aggregate(by_seed) for d, by_seed in per.items()}


# ---- report.md ---------------------------------------------------------------------------------------------------
def _get(summary: dict | None, group: str, key: str = "accuracy") -> dict | None:
    return ((summary or {}).get(group) or {}).get(key)


def _num(stat: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not stat:
        return "-"
    return f"{stat['mean'] * scale:.{digits}f}"


def plugin_origins(records: list[dict]) -> dict[tuple[str, str], str]:
    """(registry, name) -> "<distribution> <version>" of every method and dataset that came from a plugin
    package, from the provenance stored in the records (``plugins``)."""
    out: dict[tuple[str, str], str] = {}
    for rec in records:
        for p in rec.get("plugins") or ():
            out.setdefault((p["registry"], p["name"]), f"{p['distribution']} {p['version']}".strip())
    return out


def markdown(spec: BenchSpec, cell_list: list[dict], oracle_rows: dict, broken: list[dict], k: int,
             plots: list[str], plugins: dict[tuple[str, str], str] | None = None,
             records: list[dict] | None = None) -> str:
    b = spec.bench
    plugins = plugins or {}

    def method(name: str) -> str:
        origin = plugins.get(("methods", name))
        return f"{name} (plugin: {origin})" if origin else name

    def dataset_name(name: str) -> str:
        origin = plugins.get(("datasets", name))
        return f"{name} (plugin: {origin})" if origin else name

    lines = [f"# Benchmark `{b.name}`", ""]
    if spec.description:
        lines += [spec.description, ""]
    n_done = sum(c["status"] == DONE for c in cell_list)
    lines += [f"{len(cell_list)} cells ({n_done} complete) over split seeds {list(b.seeds)}; accuracy in % (mean ± std "
              f"over seeds, each the mean over users); unseen users adapted on k={k} pairs. Worst-q% columns: the "
              "mean accuracy of the q% worst unseen users."
              + (" \"(plugin: package version)\" marks a method or dataset an installed plugin package brings."
                 if plugins else ""), ""]
    datasets = list(dict.fromkeys(c["dataset"] for c in cell_list))
    for dataset in datasets:
        rows = [c for c in cell_list if c["dataset"] == dataset and "summary" in c]
        if not rows and dataset not in oracle_rows:
            continue
        lines += [f"## {dataset_name(dataset)}", "",
                  "| method | seen | unseen | overall | worst 10% | worst 20% | worst 50% | AUROC | seeds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        mixed = len({c.get("backbone") for c in rows}) > 1  # methods on their own backbones: say which
        entries = [(method(c["method"]) + (f" [{c.get('backbone')}]" if mixed else "")
                    + ("" if c["status"] == DONE else f" ({c['status']})"), c["summary"],
                    f"{len(c['seeds_done'])}/{len(c['seeds'])}") for c in rows]
        entries += [(name, s, "") for name, s in oracle_rows.get(dataset, {}).items()]
        for name, s, seeds in entries:
            lines.append(f"| {name} | {_fmt(_get(s, 'seen'))} | {_fmt(_get(s, 'unseen'))} | "
                         f"{_fmt(_get(s, 'overall'))} | " + " | ".join(_fmt(_get(s, 'unseen', w)) for w in WORST)
                         + f" | {_fmt(_get(s, 'overall', 'auroc'))} | {seeds} |")
        ks = sorted({int(x) for c in rows for x in c["summary"].get("fewshot", {})})
        if ks:
            lines += ["", f"Few-shot curve on {dataset}: unseen accuracy (%) vs support pairs k", "",
                      "| method | " + " | ".join(f"k={x}" for x in ks) + " |", "|---|" + "---|" * len(ks)]
            for c in rows:
                fs = c["summary"].get("fewshot", {})
                if fs:
                    lines.append(f"| {method(c['method'])} | " + " | ".join(_fmt(fs.get(str(x))) for x in ks) + " |")
        lines += policy_lines(dataset, rows, records or [], method)
        lines.append("")
    skipped = [c for c in cell_list if c["status"] == SKIPPED]
    if skipped:
        lines += ["## Skipped cells", "", "| dataset | method | why |", "|---|---|---|"]
        lines += [f"| {dataset_name(c['dataset'])} | {method(c['method'])} | {_cell(c['skipped_reason'])} |"
                  for c in skipped]
        lines.append("")
    failed = [c for c in cell_list if c.get("errors")]
    if failed:
        lines += ["## Failed cells", ""]
        for c in failed:
            for e in c["errors"]:
                lines += [f"- **{dataset_name(c['dataset'])} × {method(c['method'])}**, seed {e['seed']} "
                          f"({e['stage']}): `{_one(e['error'])}`"
                          + (f" — log: `{e['log']}`" if e["log"] else ""), "",
                          "  <details><summary>traceback</summary>", "", "  ```",
                          *["  " + t for t in e["traceback"].rstrip().splitlines()], "  ```", "  </details>", ""]
    if broken:
        lines += ["## Plugins that failed to load (left out)", "", "| group | name | from | error |",
                  "|---|---|---|---|"]
        lines += [f"| {p['group']} | {p['name']} | {p['distribution']} | {_cell(p['error'])} |" for p in broken]
        lines.append("")
    if plots:
        lines += ["## Figures", ""] + [f"![{p}]({p})" for p in plots] + [""]
    done = [c for c in cell_list if "summary" in c]
    if done:
        lines += ["## Cost", "", "Wall time and peak memory vary between runs and machines; everything above does not.",
                  "", "| dataset | method | train s | adapt s | unit wall s | peak RSS MiB | peak GPU MiB |",
                  "|---|---|---|---|---|---|---|"]
        for c in done:
            s = c["summary"]
            lines.append(f"| {dataset_name(c['dataset'])} | {method(c['method'])} | "
                         f"{_num(s.get('train_seconds'), digits=2)} | "
                         f"{_num(s.get('adapt_seconds'), digits=3)} | {_num(c.get('wall_seconds'), digits=1)} | "
                         f"{_num(c.get('peak_rss_mb'), digits=0)} | {_num(c.get('peak_gpu_mb'), digits=0)} |")
        lines.append("")
    return "\n".join(lines)


def dataset_correlations(dataset: str, records: list[dict], unit: str = "method") -> list[dict]:
    """The policy stage's rank correlations between methods on one dataset (plrm.eval.policy_stage)."""
    per_seed: dict[int, dict] = {}
    for r in records:
        if r["status"] == DONE and r["dataset"] == dataset and (r.get("metrics") or {}).get("policy"):
            per_seed.setdefault(r["seed"], {})[r["method"]] = r["metrics"]
    return policy_correlations(per_seed, unit)


def policy_lines(dataset: str, rows: list[dict], records: list[dict], method) -> list[str]:
    """The Selection Crisis paper's tables (Tables 4-5, 9-12) for one dataset: RM accuracy, policy accuracy,
    ROUGE-1/L, BERTScore-F1 and the circular win rate per method, then the rank correlations between them."""
    rows = [c for c in rows if (c["summary"].get("policy"))]
    if not rows:
        return []
    columns = [c for c in run_report.POLICY_COLUMNS if any(r["summary"]["policy"].get(c[1]) for r in rows)]
    out = ["", f"Policy stage on {dataset} (unseen users, %): a base policy decoding under each reward model; lambda "
              "chosen on seen users' test pairs", "",
           "| method | " + " | ".join(t for t, _, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    per_seed: dict[int, dict] = {}  # the rows of no reward model: one record per seed supplies them
    for r in records:
        if r["status"] == DONE and r["dataset"] == dataset and r.get("baselines"):
            per_seed.setdefault(r["seed"], r["baselines"])
    for name, agg in run_report.aggregate(per_seed).items():
        stats = agg.get("policy") or {}
        out.append(f"| {name} (no reward model) | " + " | ".join(_fmt(stats.get(key), pct) if stats.get(key) else ""
                                                                for _, key, pct in columns) + " |")
    for c in rows:
        stats = c["summary"]["policy"]
        out.append(f"| {method(c['method'])} | " + " | ".join(_fmt(stats.get(key), pct) for _, key, pct in columns)
                   + " |")
    skipped = [c for c in records if c["status"] == DONE and c["dataset"] == dataset
               and (c.get("metrics") or {}).get("policy_skipped")]
    for c in {r["method"]: r for r in skipped}.values():
        out.append(f"\n{method(c['method'])}: no policy stage ({_one(c['metrics']['policy_skipped'])})")
    corr = dataset_correlations(dataset, records)
    if corr:
        out += ["", "Rank correlations between methods (unit: one point per method, its mean over seeds; Kendall "
                    "tau-b with a 95% bootstrap interval over seeds where there are several; with a handful of "
                    "methods these are very noisy):", "",
                "| x | y | n | Kendall tau-b | 95% CI | Spearman | Pearson |", "|---|---|---|---|---|---|---|"]
        for r in corr:
            ci = r.get("kendall_tau_b_ci95")
            out.append(f"| {r['x']} | {r['y']} | {r['n']} | {r['kendall_tau_b']:.2f} | "
                       + (f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-")
                       + f" | {r['spearman']:.2f} | {r['pearson']:.2f} |")
    return out


def _lines(text: str) -> list[str]:
    """The meaningful lines of ``text``: whitespace collapsed, blank and rule-only lines (----, ====) left out."""
    lines = (" ".join(line.split()) for line in str(text or "").splitlines())
    return [line for line in lines if line.strip("-=*_~#:. ")]


def _one(text: str) -> str:
    """The first meaningful line of an error, for an inline code span (no backticks, no pipes)."""
    lines = _lines(text)
    return lines[0].replace("|", "\\|").replace("`", "'")[:300] if lines else ""


def _cell(text: str, limit: int = 600) -> str:
    """``text`` as one Markdown table cell: its lines joined into one, ``|`` escaped and ``<`` written as an
    entity (so an error's ``<class ...>`` is not taken for HTML). A text longer than ``limit`` (a Hub error with
    its advice, say) keeps its first meaningful line and says where the whole of it is."""
    lines = _lines(text)
    joined = " ".join(lines)
    if len(joined) > limit:
        first = lines[0]
        joined = (first if len(first) <= limit // 2 else first[:limit // 2].rstrip() + "…") + \
            " … (full text in results.json)"
    return joined.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


# ---- figures -----------------------------------------------------------------------------------------------------
def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _grid(n: int, width: float = 5.2, height: float = 4.0):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def figures(cell_list: list[dict], oracle_rows: dict, records: list[dict], out: Path, title: str) -> list[str]:
    done = [c for c in cell_list if "summary" in c]
    datasets = list(dict.fromkeys(c["dataset"] for c in done))
    if not datasets:
        return []
    methods = list(dict.fromkeys(c["method"] for c in done))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    written = []

    fig, axes = _grid(len(datasets))  # few-shot curves
    for ax, dataset in zip(axes, datasets):
        for c in (c for c in done if c["dataset"] == dataset):
            fs = c["summary"].get("fewshot") or {}
            ks = sorted(int(x) for x in fs if fs[x])
            if not ks:
                continue
            mean = np.array([100 * fs[str(x)]["mean"] for x in ks])
            std = np.array([100 * fs[str(x)]["std"] for x in ks])
            ax.plot(ks, mean, marker="o", label=c["method"], color=colors[c["method"]])
            ax.fill_between(ks, mean - std, mean + std, color=colors[c["method"]], alpha=0.15, linewidth=0)
        for name, style in (("oracle/personal", "--"), ("oracle/non-personalized", ":")):
            s = _get(oracle_rows.get(dataset, {}).get(name), "unseen")
            if s:
                ax.axhline(100 * s["mean"], color="gray", linestyle=style, label=name)
        ks_all = sorted({int(x) for c in done if c["dataset"] == dataset for x in c["summary"].get("fewshot") or {}})
        ax.set_xscale("log")
        if ks_all:
            ax.set_xticks(ks_all, [str(x) for x in ks_all])
            ax.minorticks_off()
        ax.set_xlabel("support pairs per unseen user (k)")
        ax.set_ylabel("unseen users' test accuracy (%)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: few-shot curves (mean ± std over seeds)")
    _save(fig, out / "fewshot.png")
    written.append("fewshot.png")

    fig, axes = _grid(len(datasets), width=6.0)  # worst-users bars
    groups = [("mean", "accuracy"), ("worst 50%", WORST[2]), ("worst 20%", WORST[1]), ("worst 10%", WORST[0])]
    for ax, dataset in zip(axes, datasets):
        rows = [c for c in done if c["dataset"] == dataset and c["summary"].get("unseen")]
        width = 0.8 / max(len(rows), 1)
        for i, c in enumerate(rows):
            stats = [_get(c["summary"], "unseen", key) for _, key in groups]
            ax.bar(np.arange(len(groups)) + i * width, [100 * s["mean"] if s else 0 for s in stats], width,
                   yerr=[100 * s["std"] if s else 0 for s in stats], label=c["method"], color=colors[c["method"]],
                   capsize=2)
        ax.set_xticks(np.arange(len(groups)) + width * (len(rows) - 1) / 2, [g for g, _ in groups])
        lows = [100 * s["mean"] for c in rows for s in (_get(c["summary"], "unseen", k) for _, k in groups) if s]
        if lows:  # start near the lowest bar: the differences between methods are what the figure is for
            ax.set_ylim(max(0.0, 10 * np.floor(min(lows) / 10) - 10), 100)
        ax.set_ylabel("unseen users' test accuracy (%)")
        ax.set_title(dataset)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"{title}: mean and worst-q% unseen users")
    _save(fig, out / "worst_users.png")
    written.append("worst_users.png")

    fig, axes = _grid(len(datasets), width=6.0)  # per-user distributions
    for ax, dataset in zip(axes, datasets):
        names, values = [], []
        for c in (c for c in done if c["dataset"] == dataset):
            accs = [100 * a for r in records if r["status"] == DONE and r["dataset"] == dataset
                    and r["method"] == c["method"] for a in r.get("per_user", {}).get("unseen", [])]
            if accs:
                names.append(c["method"])
                values.append(accs)
        if values:
            parts = ax.violinplot(values, showmedians=True)
            for body, name in zip(parts["bodies"], names):
                body.set_facecolor(colors[name])
            ax.set_xticks(np.arange(1, len(names) + 1), names, rotation=30, ha="right")
        ax.set_ylabel("per-user test accuracy (%), unseen users, all seeds")
        ax.set_title(dataset)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{title}: per-user accuracy distributions")
    _save(fig, out / "per_user.png")
    written.append("per_user.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.5))  # accuracy vs train time
    markers = "osD^v<>Pp*"
    for c in done:
        acc = _get(c["summary"], "unseen") or _get(c["summary"], "overall")
        t = c["summary"].get("train_seconds")
        if not acc or not t:
            continue
        ax.errorbar(max(t["mean"], 1e-3), 100 * acc["mean"], yerr=100 * acc["std"], color=colors[c["method"]],
                    marker=markers[datasets.index(c["dataset"]) % len(markers)], capsize=2, linestyle="none")
        ax.annotate(c["method"], (max(t["mean"], 1e-3), 100 * acc["mean"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    for i, dataset in enumerate(datasets):
        ax.plot([], [], markers[i % len(markers)], color="gray", label=dataset)
    ax.set_xscale("log")
    ax.set_xlabel("train wall time per seed (s, log scale)")
    ax.set_ylabel("unseen accuracy (%) (overall where no unseen users)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="dataset")
    ax.set_title(f"{title}: accuracy vs training time")
    _save(fig, out / "accuracy_vs_time.png")
    written.append("accuracy_vs_time.png")
    policy = [d for d in datasets if any((c["summary"].get("policy") or {}).get("policy_accuracy")
                                         for c in done if c["dataset"] == d)]
    if policy:  # RM accuracy against policy accuracy and against ROUGE-1: the Selection Crisis paper's Fig. 1, Table 6
        for y_key, y_label, name in (("policy_accuracy", "policy accuracy", "rm_vs_policy.png"),
                                     ("rouge1", "ROUGE-1 of the guided generations", "rm_vs_rouge.png")):
            fig, axes = _grid(len(policy), width=6.5, height=4.5)
            drawn = False
            for ax, dataset in zip(axes, policy):
                for c in (c for c in done if c["dataset"] == dataset):
                    pol = c["summary"].get("policy") or {}
                    x, y = pol.get("rm_accuracy"), pol.get(y_key)
                    if not x or not y:
                        continue
                    drawn = True
                    ax.errorbar(100 * x["mean"], 100 * y["mean"], xerr=100 * x["std"], yerr=100 * y["std"],
                                color=colors[c["method"]], marker="o", capsize=2, linestyle="none")
                    ax.annotate(c["method"], (100 * x["mean"], 100 * y["mean"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
                corr = next((r for r in dataset_correlations(dataset, records)
                             if {r["x"], r["y"]} == {"rm_accuracy", y_key}), None)
                stats = (f"tau={corr['kendall_tau_b']:.2f}, rho={corr['spearman']:.2f}, r={corr['pearson']:.2f} "
                         f"(n={corr['n']} methods)") if corr else "fewer than 3 methods: no correlation"
                ax.set_title(f"{dataset}: {stats}", fontsize=9)
                ax.set_xlabel("RM accuracy, unseen users (%)")
                ax.set_ylabel(f"{y_label}, unseen users (%)")
                ax.grid(alpha=0.3)
            fig.suptitle(f"{title}: RM accuracy vs {y_label}", fontsize=10)
            if drawn:
                _save(fig, out / name)
                written.append(name)
            else:
                plt.close(fig)
    return written


# ---- writing -----------------------------------------------------------------------------------------------------
def write(spec: BenchSpec, records: list[dict], out: Path, broken: list[dict], show: bool = True,
          sources: list[str] | None = None) -> dict:
    """results.json, report.md and the figures of ``records`` into ``out``; returns the results payload."""
    out.mkdir(parents=True, exist_ok=True)
    cell_list = cells(records)
    oracle_rows = oracles(records)
    plots = figures(cell_list, oracle_rows, records, out, spec.bench.name)
    payload = {
        "bench": spec.bench.name, "recipe": spec.raw, "plrm_version": __version__, "git_commit": git_commit(),
        "python": platform.python_version(),
        "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "merged_from": sources or [], "broken_plugins": broken,
        "cells": cell_list, "oracles": oracle_rows, "records": records}
    run_report.write_json(out / "results.json", payload)
    text = markdown(spec, cell_list, oracle_rows, broken, spec.bench.k, plots, plugin_origins(records), records)
    tmp = out / "report.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "report.md")
    _log_wandb(spec, cell_list, oracle_rows, out, plots)
    if show:
        n_failed = sum(bool(c.get("errors")) for c in cell_list)
        print(f"wrote {out / 'report.md'}, {out / 'results.json'} and {len(plots)} figures"
              + (f"; {n_failed} cell(s) had failures (see the report)" if n_failed else ""))
    return payload


def _log_wandb(spec: BenchSpec, cell_list: list[dict], oracle_rows: dict, out: Path, plots: list[str]) -> None:
    """One summary run in the benchmark's W&B group (when the cells log to W&B): the table and the figures."""
    logger = (spec.cell.get("logger") or {})
    if logger.get("kind", "wandb") != "wandb":
        return
    from plrm.tracking import wandb_mode, wandb_settings

    mode = wandb_mode(logger.get("mode", "auto"))
    if mode == "disabled":
        return
    import wandb

    columns = ["dataset", "method", "status", "seen", "unseen", "overall", "worst_10pct_unseen", "auroc", "seeds"]
    table = wandb.Table(columns=columns)
    for c in cell_list:
        s = c.get("summary")

        def mean(group, key="accuracy", s=s):
            stat = _get(s, group, key)
            return stat["mean"] if stat else None
        table.add_data(c["dataset"], c["method"], c["status"], mean("seen"), mean("unseen"), mean("overall"),
                       mean("unseen", WORST[0]), mean("overall", "auroc"), len(c["seeds_done"]))
    group = logger.get("group") or spec.bench.name
    run = wandb.init(project=logger.get("project", "plrm"), entity=logger.get("entity"), group=group,
                     name=f"{spec.bench.name}/summary", job_type="bench-summary", dir=str(out), mode=mode,
                     config=spec.raw, settings=wandb_settings(), reinit="finish_previous")
    run.log({"bench/summary": table, **{f"bench/{p.removesuffix('.png')}": wandb.Image(str(out / p)) for p in plots}})
    run.finish()


def merge(dirs: list[str | Path], out: str | Path | None = None, show: bool = True) -> dict:
    """Build one report from the records of several shard directories of the same benchmark."""
    dirs = [Path(d).expanduser() for d in dirs]
    specs = {}
    for d in dirs:
        if not (d / SPEC_FILE).is_file():
            raise RecipeError(f"--merge: {d} is not a benchmark directory (no {SPEC_FILE})")
        specs[d] = (d / SPEC_FILE).read_text()
    first = dirs[0]
    for d, text in specs.items():
        if text != specs[first]:
            raise RecipeError(f"--merge: {d} ran a different benchmark recipe than {first} (compare their "
                              f"{SPEC_FILE}); shards must come from the same recipe and overrides")
    spec = load_bench(yaml.safe_load(specs[first]))
    found: dict[str, dict] = {}
    for d in dirs:
        for key, rec in read_records(d).items():
            if key not in found or (found[key]["status"] != DONE and rec["status"] == DONE):
                found[key] = {**rec, **({"run_dir": str(d / rec["run_dir"])} if rec.get("run_dir") else {})}
    units = spec.units()
    missing = [u.key for u in units if u.key not in found]
    records = [found[u.key] for u in units if u.key in found]
    if out is None:
        parents = {d.resolve().parent for d in dirs}
        if len(parents) != 1:
            raise RecipeError("--merge: the shard directories have different parents; say where to write with --out")
        out = parents.pop()
    out = Path(out).expanduser()
    if show and missing:
        print(f"plrm bench --merge: {len(missing)} unit(s) have no record in these directories (e.g. "
              f"{', '.join(missing[:3])}); the report covers the others")
    return write(spec, records, out, broken=broken_plugins(), show=show, sources=[str(d) for d in dirs])


__all__ = ["Unit", "cells", "figures", "markdown", "merge", "oracles", "plugin_origins", "write"]
