"""Scaling in the number of users: time and peak memory of fit + adapt + evaluate per method, log-log slopes.

    python benchmarks/scaling.py                          # 1k, 10k, 100k users; every feature method (hours)
    python benchmarks/scaling.py --sizes 1000 10000 --methods bt lore pref mrm
    python benchmarks/scaling.py --quick                  # 200, 400, 800 users, bt and lore: a smoke run

Each size is one `plrm bench --recipe bench/lowrank` run (split seed 0) with the world resized:
- ``n_users`` users, half of them unseen and adapted on k = 9 pairs;
- D = 1024 features (memory stays in bounds at 100k users);
- 45 train pairs per seen user, and each user tested on 20 of the 1,000 test prompts, so the rows to score
  grow with the users.
Every method keeps its bench/lowrank settings (epochs, batch size), so its work per user is fixed. A method whose
time grows faster than the users has a hot path that does.

The benchmark's own unit records give, per method and size: the unit's wall seconds (fit + adapt at every k +
evaluation), their split into training / adaptation / evaluation, and the unit's peak RSS. A least-squares line
through (log users, log seconds) gives each method's slope. The target is a slope <= 1.1; the table names any
method above it.

Writes benchmarks/results/scaling.{md,json,png} (``--out``); the bench directories go under ``--work``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FEATURE_METHODS = ["bt", "lore", "lore_alt", "pref", "mrm", "individual", "further_ft", "similar_user", "mpu",
                   "mpu_avg", "prm", "vpl", "gpo", "pal_a", "pal_b"]
SLOPE_TARGET = 1.1


def bench_size(n_users: int, methods: list[str], work: Path, threads: int) -> Path:
    out = work / f"users-{n_users}"
    world = "dataset_options.lowrank_world"
    cmd = [sys.executable, "-m", "plrm.cli", "bench", "--recipe", "bench/lowrank", "cell.logger.kind=none",
           "bench.seeds=[0]", f"bench.methods=[{','.join(methods)}]", f"{world}.n_users={n_users}",
           f"{world}.feature_dim=1024", f"{world}.test_prompts_per_user=20", f"cell.trainer.num_threads={threads}",
           "--out", str(out)]
    print(" ".join(cmd[2:]), file=sys.stderr)
    done = subprocess.run(cmd, check=False)  # a failed cell is recorded by the benchmark itself
    if not (out / "results.json").is_file():  # the benchmark itself died (killed for memory, bad input)
        raise SystemExit(f"scaling: the {n_users:,}-user benchmark exited with status {done.returncode} before "
                         f"writing {out / 'results.json'}; its finished cells are under {out / 'cells'}, and "
                         "rerunning the same command resumes it")
    return out


def records(bench_dir: Path) -> dict[str, dict]:
    data = json.loads((bench_dir / "results.json").read_text())
    return {r["method"]: r for r in data["records"] if r.get("status") == "done"}


def slope(sizes: list[int], values: list[float]) -> float | None:
    points = [(math.log(n), math.log(v)) for n, v in zip(sizes, values) if v and v > 0]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def scaling_table(sizes: list[int], methods: list[str], by_size: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Per method: its seconds, peak RSS and phase seconds at the sizes it ran at, and their log-log slopes; a
    method measured at fewer than two sizes gets only ``missing_sizes``."""
    table = {}
    for m in methods:
        measured = [n for n in sizes if by_size[n].get(m)]
        if len(measured) < 2:
            table[m] = {"missing_sizes": [n for n in sizes if n not in measured]}
            continue
        runs = [by_size[n][m] for n in measured]
        seconds = [r["wall_seconds"] for r in runs]
        memory = [r["peak_rss_mb"] for r in runs]
        parts = {p: [r["metrics"].get(f"{p}_seconds") for r in runs] for p in ("train", "adapt", "eval")}
        table[m] = {"sizes": measured, "seconds": seconds, "peak_rss_mb": memory,
                    **{f"{p}_seconds": v for p, v in parts.items()},
                    "slope_seconds": slope(measured, seconds), "slope_memory": slope(measured, memory),
                    **{f"slope_{p}": slope(measured, v) for p, v in parts.items()}}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--methods", nargs="+", default=FEATURE_METHODS)
    parser.add_argument("--quick", action="store_true", help="200, 400, 800 users; bt and lore")
    parser.add_argument("--work", default="/tmp/plrm_scaling", help="where the bench directories go")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per unit (0: torch's default)")
    parser.add_argument("--methods-at", nargs="+", default=[], metavar="N:M1,M2",
                        help="run only these methods at size N (e.g. 100000:bt,lore,pref,mrm); a method measured at "
                             "two sizes or more gets its slope over those")
    args = parser.parse_args()
    sizes, methods = ([200, 400, 800], ["bt", "lore"]) if args.quick else (sorted(args.sizes), args.methods)
    only = {int(n): spec.split(",") for n, spec in (item.split(":", 1) for item in args.methods_at)}
    work = Path(args.work)
    by_size = {n: records(bench_size(n, [m for m in methods if m in only.get(n, methods)], work, args.threads))
               for n in sizes}

    table = scaling_table(sizes, methods, by_size)

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    name = "scaling_quick" if args.quick else "scaling"
    command = "python benchmarks/scaling.py" + (" --quick" if args.quick else
                                                f" --sizes {' '.join(map(str, sizes))} --methods {' '.join(methods)}"
                                                + "".join(f" --methods-at {x}" for x in args.methods_at))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"command": command, "date": stamp, "machine": platform.platform(),
                                                  "sizes": sizes, "methods": table}, indent=2) + "\n")

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    md = [f"# Scaling in users: {', '.join(f'{n:,}' for n in sizes)} users, D = 1024 (bench/lowrank settings)", "",
          f"Command: `{command}`. Machine: {platform.platform()}. {stamp}.", "",
          "| method | " + " | ".join(f"s at {n:,}" for n in sizes)
          + " | slope (time) | slope train / adapt / eval | slope (peak RSS) |",
          "|---" * (len(sizes) + 4) + "|"]
    over = []
    for m, row in table.items():
        if "missing_sizes" in row:
            md.append(f"| {m} | " + " | ".join("" for _ in sizes) + f" | missing at {row['missing_sizes']} | | |")
            continue
        at = dict(zip(row["sizes"], row["seconds"]))
        md.append(f"| {m} | " + " | ".join(f"{at[n]:.1f}" if n in at else "—" for n in sizes)
                  + f" | **{fmt(row['slope_seconds'])}** | {fmt(row['slope_train'])} / {fmt(row['slope_adapt'])}"
                  f" / {fmt(row['slope_eval'])} | {fmt(row['slope_memory'])} |")
        if row["slope_seconds"] is not None and row["slope_seconds"] > SLOPE_TARGET:
            over.append(m)
    md += ["", f"Target: slope <= {SLOPE_TARGET}. Above it: {', '.join(over) if over else 'none'}.", ""]
    (out / f"{name}.md").write_text("\n".join(md))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for m, row in table.items():
        if "missing_sizes" in row:
            continue
        axes[0].loglog(row["sizes"], row["seconds"], "o-", label=f"{m} ({fmt(row['slope_seconds'])})")
        axes[1].loglog(row["sizes"], row["peak_rss_mb"], "o-", label=m)
    axes[0].set(xlabel="users", ylabel="seconds (fit + adapt + evaluate)", title="time (legend: slope)")
    axes[1].set(xlabel="users", ylabel="peak RSS (MB)", title="memory")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)
    print("\n".join(md))


if __name__ == "__main__":
    main()
