"""How fast the ``plrm`` command answers when it trains nothing: wall time and import time per command.

Each command runs in a fresh Python process (what a user waits for), in an empty temporary folder (so ``nope``
names no file and nothing is written), several times; the table gives the median. A second pass runs each
command under ``python -X importtime`` and sums the time of every import it made, and records whether torch,
Lightning and transformers were imported at all.

The commands that read the registries (``list``, ``recipes show|keys``, recipe errors) do so from plrm.catalog, a
file under ``$PLRM_CACHE/catalog`` that the first command after a change writes: the script points
``PLRM_CACHE`` at a temporary folder, times that first command (``plrm list``, catalog written) once, and then
measures every command with the catalog in place, as a user meets them from the second command on.

With ``--baseline REV`` the command line of git revision REV (its ``plrm/cli.py``, run against today's library)
is measured in the same run, so the table compares the two on the same machine under the same load:

    python benchmarks/cli_startup.py --baseline HEAD      # -> benchmarks/results/cli_startup.{md,json}
    python benchmarks/cli_startup.py --runs 2 --out /tmp/cli.json    # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
COMMANDS = [
    ["--help"],
    ["--version"],
    ["recipes", "list"],
    ["fit", "--recipe", "nope"],
    ["test", "--run", "nope"],
    ["list"],
    ["recipes", "keys"],
    ["recipes", "show", "quickstart"],
    ["recipes", "show", "mrm_prism"],
    ["fit", "--recipe", "quickstart", "--print-config"],
    ["fit", "--recipe", "quickstart", "methods.lore.rank=0"],
    ["profile", "--dataset", "nope"],
]
HEAVY = ("torch", "lightning", "transformers")


def run_once(prefix: list[str], args: list[str], cwd: Path, env: dict, importtime: bool) -> dict:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), *prefix, *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=600)
    out = {"seconds": time.perf_counter() - start, "exit": proc.returncode}
    if importtime:
        total, modules = 0, set()
        for line in proc.stderr.splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            fields = line.removeprefix("import time:").split("|")
            total += int(fields[0])
            modules.add(fields[2].strip())
        out.update(import_seconds=total / 1e6, heavy=[m for m in HEAVY if m in modules])
    return out


def measure(prefix: list[str], runs: int, import_runs: int, env: dict) -> dict[str, dict]:
    results = {}
    for args in COMMANDS:
        with tempfile.TemporaryDirectory() as tmp:
            walls = [run_once(prefix, args, Path(tmp), env, False) for _ in range(runs)]
            imports = [run_once(prefix, args, Path(tmp), env, True) for _ in range(import_runs)]
        key = "plrm " + " ".join(args)
        results[key] = {
            "exit": walls[0]["exit"], "wall_seconds": [w["seconds"] for w in walls],
            "wall_median": statistics.median(w["seconds"] for w in walls),
            "import_seconds": [i["import_seconds"] for i in imports],
            "import_median": statistics.median(i["import_seconds"] for i in imports),
            "heavy_imports": imports[0]["heavy"]}
        print(f"{key:36s} exit {walls[0]['exit']}  wall {results[key]['wall_median']:6.2f} s  imports "
              f"{results[key]['import_median']:6.2f} s  {','.join(imports[0]['heavy']) or '-'}", flush=True)
    return results


def baseline_cli(rev: str, folder: Path) -> list[str]:
    """``plrm/cli.py`` of git revision ``rev`` as a script in ``folder`` (it imports today's plrm library)."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:plrm/cli.py"], capture_output=True, text=True,
                          check=True).stdout
    path = folder / "plrm_cli_baseline.py"
    path.write_text(text)
    return [str(path)]


def markdown(payload: dict) -> str:
    now, before = payload["after"], payload.get("before")
    lines = ["# `plrm` startup: commands that train nothing", "",
             f"`{payload['command']}` ({payload['machine']}; load average {payload['load_average']} at the start: "
             "other processes shared the cores, so absolute times vary; compare within the table)", "",
             f"Wall time: median of {payload['runs']} fresh processes. Imports: the sum of `python -X importtime` "
             f"over every module imported (median of {payload['import_runs']}), and which of "
             f"{', '.join(HEAVY)} were imported."
             + (f" *Before*: `plrm/cli.py` of `{payload['baseline']}`, run against the same library in the same "
                "run." if before else ""), ""]
    if before:
        lines += ["| command | exit | wall s before | wall s now | imports s before | imports s now | heavy imports "
                  "before | heavy imports now |", "|---|---|---|---|---|---|---|---|"]
        for key, r in now.items():
            b = before[key]
            lines.append(f"| `{key}` | {r['exit']} | {b['wall_median']:.2f} | {r['wall_median']:.2f} | "
                         f"{b['import_median']:.2f} | {r['import_median']:.2f} | "
                         f"{', '.join(b['heavy_imports']) or 'none'} | {', '.join(r['heavy_imports']) or 'none'} |")
    else:
        lines += ["| command | exit | wall s | imports s | heavy imports |", "|---|---|---|---|---|"]
        for key, r in now.items():
            lines.append(f"| `{key}` | {r['exit']} | {r['wall_median']:.2f} | {r['import_median']:.2f} | "
                         f"{', '.join(r['heavy_imports']) or 'none'} |")
    if before:
        lines += ["", "Where the heavy imports are the same before and now, the command takes the same path in both "
                  "and the difference is the machine's load."]
    cold = payload.get("cold_list")
    if cold:
        lines += ["", f"The first command after plrm, a plugin or the installed packages changed writes the catalog "
                  f"(`$PLRM_CACHE/catalog`): `plrm list` then took {cold['seconds']:.2f} s here, importing "
                  f"{', '.join(cold['heavy']) or 'nothing heavy'}. Every command above ran after it."]
    lines += ["", "`plrm list`, `plrm recipes show|keys`, `fit --print-config` and recipe errors check the options of "
              "every method, dataset and backbone a recipe names. Methods subclass Lightning's LightningModule, so "
              "reading their options from the classes imports Lightning (torchmetrics, torch._dynamo): seconds. They "
              "now read them from plrm.catalog, a JSON description of the registries; a dataset whose options have "
              "cross-field checks in code (`__post_init__`) is checked with its real class, which imports "
              "plrm.data (no torch).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="fresh processes per command for the wall time (median)")
    ap.add_argument("--import-runs", type=int, default=3, help="processes per command under -X importtime")
    ap.add_argument("--baseline", default=None, metavar="REV", help="also measure plrm/cli.py of this git revision")
    ap.add_argument("--out", default=str(RESULTS / "cli_startup.json"), help="JSON file; the .md goes beside it")
    args = ap.parse_args()
    cache = tempfile.TemporaryDirectory()  # plrm.catalog's folder: empty, so the first command writes it
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PLRM_CACHE": cache.name}
    if args.baseline:  # the commit, not a moving name such as HEAD: the command reproduces this comparison
        args.baseline = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline],
                                       capture_output=True, text=True, check=True).stdout.strip()
    payload = {
        "command": "python benchmarks/cli_startup.py" + "".join(
            f" {flag} {value}" for flag, value, default in (("--runs", args.runs, 5),
                                                           ("--import-runs", args.import_runs, 3),
                                                           ("--baseline", args.baseline, None))
            if value != default),
        "machine": f"{platform.platform(terse=True)}, Python {platform.python_version()}, {os.cpu_count()} CPUs",
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()), "runs": args.runs,
        "import_runs": args.import_runs, "baseline": args.baseline}
    if args.baseline:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"before: plrm/cli.py of {args.baseline}")
            payload["before"] = measure(baseline_cli(args.baseline, Path(tmp)), args.runs, args.import_runs, env)
    print("now: plrm/cli.py of the working tree")
    with tempfile.TemporaryDirectory() as tmp:
        cold = run_once(["-m", "plrm.cli"], ["list"], Path(tmp), env, True)
    payload["cold_list"] = {"seconds": cold["seconds"], "heavy": cold["heavy"]}
    print(f"first command (writes the catalog): plrm list {cold['seconds']:.2f} s", flush=True)
    payload["after"] = measure(["-m", "plrm.cli"], args.runs, args.import_runs, env)
    cache.cleanup()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(payload))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
