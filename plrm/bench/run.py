"""Running a benchmark: every (dataset, method, seed) unit of a shard, resumable, one failure never stops it.

Benchmark directory (``<bench.output_dir>/<bench.name>``, or ``.../shard-<i>-of-<N>`` for ``--shard i/N``)::

    bench.yaml                          the resolved benchmark recipe (``--merge`` checks shards agree on it)
    cells/<dataset>/<method>/seed-<s>.json   one record per unit (plrm.bench.records): done (metrics), skipped
                                        (reason), failed (error)
    runs/<dataset>/<method>/seed-<s>/   the unit's ordinary run directory (checkpoint, split, per-user results)
                                        and log.txt (everything the run printed)
    results.json  report.md  *.png      written by plrm.bench.report at the end

A record is written atomically when its unit ends, so an interrupt (Ctrl-C, a killed job) loses at most the
unit in flight. Rerunning keeps every record whose recipe fingerprint is unchanged (done or skipped; failed
ones are retried unless ``bench.retry_failed`` is false) and runs only the rest.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import re
import resource
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from plrm import registry, runner
from plrm.bench import report
from plrm.bench.records import (
    DONE,
    FAILED,
    SKIPPED,
    SPEC_FILE,
    broken_plugins,
    git_commit,
    read_records,
    write_record,
)
from plrm.bench.spec import BenchSpec, Unit, shard_units
from plrm.data.datamodule import PreparedData
from plrm.data.published import DataUnavailableError
from plrm.eval.policy_stage import BASELINES

RUNS_DIR = "runs"


@dataclass
class BenchOutcome:
    bench_dir: Path
    records: list[dict]   # every record of this shard's units, after the run
    ran: list[str]        # unit keys run in this invocation
    kept: list[str]       # unit keys whose earlier records were reused

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if r["status"] == FAILED]


def bench_dir_of(spec: BenchSpec, shard: tuple[int, int], out_dir: str | Path | None = None) -> Path:
    base = Path(out_dir).expanduser() if out_dir else Path(spec.bench.output_dir).expanduser() / spec.bench.name
    return base if shard[1] == 1 else base / f"shard-{shard[0]}-of-{shard[1]}"


# ---- facts recorded with every result ------------------------------------------------------------------------
class PeakMemory:
    """Peak resident memory of this process during a block (Linux: the high-water mark is reset first through
    /proc/self/clear_refs; elsewhere the process's lifetime peak), and peak CUDA memory when a GPU is in use."""

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.scope = "unit"
        except OSError:
            self.scope = "process"
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        self.rss_mb = self._hwm_mb()
        self.gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None

    def _hwm_mb(self) -> float:
        try:
            m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            if m:
                return int(m.group(1)) / 1024
        except OSError:
            pass
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


# ---- one unit --------------------------------------------------------------------------------------------------
class _DataCache:
    """The loaded dataset + backbone of one (dataset options, backbone) at a time: units come grouped by dataset,
    so each dataset is loaded (and its features prepared) once per benchmark run, and freed after."""

    def __init__(self):
        self.key, self.value, self.prepared = None, None, None

    def get(self, recipe) -> tuple:
        key = json.dumps([recipe.raw["data"], recipe.raw.get("backbone"), recipe.raw.get("trainer")], sort_keys=True,
                         default=str)
        if key != self.key:
            self.key, self.value, self.prepared = key, None, None
            gc.collect()
            try:
                self.value = runner.load_data(recipe)
            except Exception as exc:  # kept: every unit of the dataset reports the same error without reloading
                self.value = exc
        return self.value

    def prepare(self, data, backbone) -> PreparedData:
        if self.prepared is None:
            self.prepared = PreparedData(data, backbone)
        return self.prepared


def _base_record(spec: BenchSpec, unit: Unit) -> dict:
    return {"bench": spec.bench.name, "dataset": unit.dataset, "method": unit.method, "seed": unit.seed,
            "fingerprint": spec.fingerprint(unit), "plugins": unit_plugins(unit)}


def unit_plugins(unit: Unit) -> list[dict]:
    """The plugin packages behind a unit's method and dataset, on every record (a skipped or failed one too), so
    that the report can mark plugin rows; a done record replaces it with the run's own (backbone included)."""
    try:
        return registry.plugin_provenance({"methods": [unit.method], "datasets": [unit.dataset]})
    except LookupError:  # a name that is not registered: its record says why elsewhere
        return []


def _error(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}


def run_unit(spec: BenchSpec, unit: Unit, bench_dir: Path, cache: _DataCache) -> dict:
    rec = _base_record(spec, unit)
    if unit.dataset in spec.not_configured:
        return {**rec, "status": SKIPPED, "reason": spec.not_configured[unit.dataset]}
    runs_dir = bench_dir / RUNS_DIR
    recipe = spec.cell_recipe(unit, str(runs_dir))
    run_dir = runs_dir / unit.dataset / unit.method / f"seed-{unit.seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"seed-{unit.seed}.log"
    rec["log"] = str(log_path.relative_to(bench_dir))
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        loaded = cache.get(recipe)
        if isinstance(loaded, DataUnavailableError):
            return {**rec, "status": SKIPPED, "reason": f"data not available here: {loaded}"}
        if isinstance(loaded, Exception):
            return {**rec, "status": FAILED, "stage": "load dataset", **_error(loaded)}
        data, backbone = loaded
        problems = runner.method_problems(recipe, data, backbone)
        if problems:
            return {**rec, "status": SKIPPED, "reason": "; ".join(p.split(": ", 1)[1] for p in problems)}
        start = time.perf_counter()
        try:
            with PeakMemory() as mem:
                prepared = cache.prepare(data, backbone)
                result = runner.fit(recipe, show=False, prepared=prepared)
        except Exception as exc:  # a failing cell is recorded and the benchmark goes on
            traceback.print_exc()
            return {**rec, "status": FAILED, "stage": "fit", **_error(exc)}
    seed_results = result.per_seed[unit.seed]
    per_user = result.per_user[result.per_user["method"] == unit.method]
    rec.update(
        status=DONE, metrics=seed_results[unit.method],
        oracles={k: v for k, v in seed_results.items() if k.startswith("oracle")},
        baselines={k: v for k, v in seed_results.items() if k in BASELINES},
        per_user={g: [round(float(a), 6) for a in per_user.loc[per_user["group"] == g, "accuracy"].dropna()]
                  for g in ("seen", "unseen")},
        wall_seconds=time.perf_counter() - start, peak_rss_mb=mem.rss_mb, peak_rss_scope=mem.scope,
        peak_gpu_mb=mem.gpu_mb, run_dir=str(run_dir.relative_to(bench_dir)), recipe=recipe.raw,
        versions=runner.versions(), plugins=runner.provenance(recipe), git_commit=git_commit(),
        finished_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    return rec


def _finished(rec: dict | None, fingerprint: str, retry_failed: bool) -> bool:
    if rec is None or rec.get("fingerprint") != fingerprint:
        return False
    return rec["status"] in (DONE, SKIPPED) or (rec["status"] == FAILED and not retry_failed)


def run_bench(spec: BenchSpec, shard: tuple[int, int] = (0, 1), out_dir: str | Path | None = None,
              show: bool = True) -> BenchOutcome:
    """Run the shard's units that have no current record; write records as they finish, then the report."""
    bench_dir = bench_dir_of(spec, shard, out_dir)
    bench_dir.mkdir(parents=True, exist_ok=True)
    spec_text = spec.to_yaml()
    (bench_dir / SPEC_FILE).write_text(spec_text)
    units = shard_units(spec.units(), shard)
    existing = read_records(bench_dir)
    todo = [u for u in units if not _finished(existing.get(u.key), spec.fingerprint(u), spec.bench.retry_failed)]
    kept = [u.key for u in units if u not in todo]
    say = print if show else (lambda *a, **k: None)
    for b in broken_plugins():
        say(f"plrm bench: plugin {b['name']} ({b['distribution']}) failed to load and is left out: {b['error']}")
    say(f"plrm bench {spec.bench.name}" + (f" shard {shard[0]}/{shard[1]}" if shard[1] > 1 else "")
        + f": {len(units)} (cell, seed) units, {len(kept)} already finished, {len(todo)} to run -> {bench_dir}")
    cache = _DataCache()
    ran = []
    try:
        for n, unit in enumerate(todo, 1):
            rec = run_unit(spec, unit, bench_dir, cache)
            write_record(bench_dir, unit, rec)
            ran.append(unit.key)
            say(f"[{n}/{len(todo)}] {unit.key}: {_one_line(rec)}")
    except (KeyboardInterrupt, SystemExit) as exc:  # Lightning turns Ctrl-C during training into SystemExit(1)
        say(f"\nplrm bench: interrupted; {len(ran)} unit(s) finished in this run are saved in {bench_dir}. "
            "Run the same command again to run only what is missing.")
        raise KeyboardInterrupt from exc
    records_now = read_records(bench_dir)
    records = [records_now[u.key] for u in units if u.key in records_now]
    report.write(spec, records, bench_dir, broken=broken_plugins(), show=show)
    return BenchOutcome(bench_dir, records, ran, kept)


def _one_line(rec: dict) -> str:
    if rec["status"] == DONE:
        m = rec["metrics"]
        unseen = (m.get("unseen") or {}).get("accuracy")
        seen = (m.get("seen") or {}).get("accuracy")
        parts = [f"seen {100 * seen:.1f}%" if seen is not None else "seen n/a",
                 f"unseen {100 * unseen:.1f}%" if unseen is not None else "unseen n/a",
                 f"{rec['wall_seconds']:.1f}s"]
        return "done, " + ", ".join(parts)
    if rec["status"] == SKIPPED:
        return f"skipped ({rec['reason']})"
    return f"FAILED ({rec['error'].splitlines()[0][:200]}; see {rec.get('log', 'the report')})"
