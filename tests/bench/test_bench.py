"""plrm bench: the matrix, skipped and failed cells, resume after an interrupt or a kill, shards + merge, report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from plrm import cli
from plrm.bench import run as bench_run
from plrm.bench.records import FAILED, SKIPPED, read_records
from plrm.bench.report import PLOTS, merge
from plrm.bench.run import run_bench
from plrm.bench.spec import Unit, load_bench, parse_shard, shard_units
from plrm.recipe import RecipeError, builtin_recipes

# bench/quick shrunk to seconds: 60 users x 10 pairs, three methods, two seeds
TINY = ["dataset_options.lowrank_world.n_users=60", "dataset_options.lowrank_world.pairs_per_user=10",
        "dataset_options.lowrank_world.n_train_prompts=300", "dataset_options.lowrank_world.n_test_prompts=20",
        "dataset_options.lowrank_world.test_prompts_per_user=10", "dataset_options.lowrank_world.feature_dim=16",
        "method_options.bt.max_epochs=3", "method_options.lore.max_epochs=5", "method_options.pref.max_epochs=3",
        "bench.methods=[bt,lore,pref]", "bench.k=3", "bench.k_list=[1,3]", "cell.logger.kind=none"]


def tiny(out: Path, *extra: str) -> list[str]:
    return [*TINY, f"bench.output_dir={out}", *extra]


def above_cost(report: Path) -> str:
    """report.md without its last section (wall times and memory differ between runs)."""
    return report.read_text().split("## Cost")[0]


def metrics_of(records: list[dict] | dict) -> dict:
    recs = records.values() if isinstance(records, dict) else records
    return {Unit(r["dataset"], r["method"], r["seed"]).key: (r["status"], r.get("metrics", {}).get("seen"),
                                                            r.get("metrics", {}).get("fewshot"), r.get("oracles"))
            for r in recs}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted, unsharded tiny benchmark: the reference the other tests compare with."""
    out = tmp_path_factory.mktemp("full")
    spec = load_bench("bench/quick", tiny(out))
    return run_bench(spec, show=False)


# ---- the recipe ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(n for n in builtin_recipes() if n.startswith("bench/")))
def test_builtin_bench_recipes_validate_and_say_how_to_run(name):
    spec = load_bench(name)
    assert spec.units(), name
    text = builtin_recipes()[name].read_text()
    assert text.startswith("# ") and f"plrm bench --recipe {name}" in text


def test_units_are_ordered_and_shards_partition_them():
    spec = load_bench("bench/quick", ["bench.methods=[bt,lore]", "bench.seeds=[0,1,2]"])
    keys = [u.key for u in spec.units()]
    assert keys[:4] == ["lowrank_world/bt/seed-0", "lowrank_world/bt/seed-1", "lowrank_world/bt/seed-2",
                        "lowrank_world/lore/seed-0"]
    shards = [shard_units(spec.units(), (i, 4)) for i in range(4)]
    assert sorted(u.key for s in shards for u in s) == sorted(keys)  # disjoint and complete
    assert [u.key for u in shards[1]] == [keys[1], keys[5]]
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) == (0, 1)
    for bad in ("4/4", "1", "a/b", "0/0"):
        with pytest.raises(RecipeError, match=rf"--shard '{bad}': expected i/N with 0 <= i < N"):
            parse_shard(bad)


def test_a_methods_own_backbone_replaces_the_cells_and_groups_its_units():
    spec = load_bench("bench/text", ["bench.methods=[pdpo,bt,genarm,lore]", "bench.seeds=[0,1]"])
    assert [u.key for u in spec.units()][::2] == ["attribute_world/pdpo/seed-0", "attribute_world/genarm/seed-0",
                                                 "attribute_world/bt/seed-0", "attribute_world/lore/seed-0"]
    pdpo, bt = (spec.cell_recipe(Unit("attribute_world", m, 0), "-") for m in ("pdpo", "bt"))
    assert (pdpo.backbone.name, bt.backbone.name) == ("causal_lm", "frozen_encoder")
    assert "backbone" not in pdpo.raw["methods"]["pdpo"] and pdpo.backbone.config.chat_template == "never"


TINY_LM = "tiny-random:qwen2"
TEXT_TINY = [f"{k}.backbone.{o}" for k in ("cell", "method_options.pdpo", "method_options.genarm")
             for o in (f"model={TINY_LM}", "max_length=256")] + [
    "dataset_options.attribute_world.n_users=8", "dataset_options.attribute_world.pairs_per_user=4",
    "dataset_options.attribute_world.n_train_prompts=12", "dataset_options.attribute_world.n_test_prompts=4",
    "dataset_options.attribute_world.test_pairs_per_user=2", "bench.k=2", "bench.k_list=[2]",
    "method_options.pdpo.adapt_steps=2", "method_options.mrm.max_epochs=2", "method_options.lore.max_epochs=5",
    "method_options.bt.max_epochs=3", "method_options.pref.max_epochs=3"]


@pytest.mark.slow
def test_text_bench_runs_feature_and_lm_methods_each_on_its_own_backbone(tmp_path):
    """bench/text on a tiny random LM: the six methods finish on the attribute world, each on its backbone, and on
    a feature-only world the LM methods' causal_lm (which needs text) is skipped with that reason."""
    spec = load_bench("bench/text", [*TEXT_TINY, f"bench.output_dir={tmp_path}",
                                     "bench.datasets=[attribute_world,lowrank_world]",
                                     "dataset_options.lowrank_world.backbone.name=precomputed",
                                     "dataset_options.lowrank_world.n_users=20",
                                     "dataset_options.lowrank_world.feature_dim=8"])
    outcome = run_bench(spec, show=False)
    records = read_records(outcome.bench_dir)
    for m in ("bt", "lore", "pref", "mrm", "pdpo", "genarm"):
        rec = records[f"attribute_world/{m}/seed-0"]
        assert rec["status"] == "done", (m, rec.get("error"))
        assert rec["recipe"]["backbone"]["name"] == ("causal_lm" if m in ("pdpo", "genarm") else "frozen_encoder")
        assert 0 <= rec["metrics"]["unseen"]["accuracy"] <= 1
        assert records[f"lowrank_world/{m}/seed-0"]["status"] == ("skipped" if m in ("pdpo", "genarm") else "done")
    assert records["lowrank_world/pdpo/seed-0"]["reason"] == (
        "backbone 'causal_lm' needs prompt and response text ('text'), which dataset 'lowrank_world' does not provide")
    report = (outcome.bench_dir / "report.md").read_text()
    assert f"| pdpo [causal_lm {TINY_LM}] |" in report and f"| bt [frozen_encoder {TINY_LM}] |" in report
    assert "| bt |" in report.split("## lowrank_world")[1]  # one backbone on that world: no label
    assert not outcome.failed


def test_methods_all_includes_the_installed_plugin():
    spec = load_bench("bench/quick")
    assert {"bt", "lore", "lore_alt", "mrm", "pref", "shrunk_individual"} <= set(spec.method_names())


def test_bench_recipe_errors_name_their_key_path():
    with pytest.raises(RecipeError) as err:
        load_bench("bench/quick", ["method_options.lorre.rank=3", "bench.seeds=zero", "data.name=x",
                                   "cell.methods.bt.lr=1"])
    text = str(err.value)
    assert "method_options.lorre: unknown method; did you mean 'lore'?" in text
    assert "bench.seeds: expected list[int], got 'zero'" in text
    assert "data: unknown top-level key" in text and "(a run recipe? use `plrm fit`)" in text
    assert "cell.methods: not a section a benchmark shares" in text
    with pytest.raises(RecipeError, match=r"cell lowrank_world x lore: 1 problem\(s\):\n  methods.lore.rnak: unknown "
                                          r"key; did you mean 'rank'\?[\s\S]*from method_options.lore"):
        load_bench("bench/quick", ["method_options.lore.rnak=3"])


def test_datasets_all_lists_unconfigured_datasets_as_skipped():
    spec = load_bench("bench/quick", ["bench.datasets=all"])
    assert "preference_files" in spec.dataset_names()
    assert spec.not_configured["preference_files"] == (
        "dataset 'preference_files' needs data.path; set dataset_options.preference_files.path to include it")


# ---- running -------------------------------------------------------------------------------------------------------
def test_bench_writes_report_results_and_figures(full_run):
    out = full_run.bench_dir
    assert out.name == "quick" and not full_run.failed
    assert sorted(full_run.ran) == sorted(f"lowrank_world/{m}/seed-{s}" for m in ("bt", "lore", "pref") for s in (0, 1))
    results = json.loads((out / "results.json").read_text())
    assert len(results["records"]) == 6 and results["plrm_version"]
    rec = results["records"][0]
    for key in ("metrics", "oracles", "per_user", "train_seconds", "recipe", "versions", "git_commit", "peak_rss_mb"):
        assert key in rec or key in rec["metrics"], key
    assert rec["metrics"]["fewshot"][0]["k"] == 1 and rec["metrics"]["adapt_seconds"] >= 0
    assert rec["recipe"]["split"]["seeds"] == [rec["seed"]] and rec["recipe"]["methods"] == {"bt": {"name": "bt"} | {
        "lr": 0.01, "batch_size": 512, "max_epochs": 3}}
    lore = next(c for c in results["cells"] if c["method"] == "lore")
    assert lore["status"] == "done" and lore["summary"]["unseen"]["accuracy"]["n"] == 2
    report = (out / "report.md").read_text()
    assert "| lore | " in report and "| oracle/personal | " in report and "k=3" in report
    for plot in PLOTS:
        with Image.open(out / plot) as img:
            assert img.size[0] > 400 and img.size[1] > 300
        assert f"![{plot}]({plot})" in report
    assert (out / "runs" / "lowrank_world" / "lore" / "seed-1" / "results.json").is_file()
    assert (out / "runs" / "lowrank_world" / "lore" / "seed-1.log").is_file()


def test_rerun_runs_nothing_and_keeps_the_report(full_run):
    before = above_cost(full_run.bench_dir / "report.md")
    again = run_bench(load_bench("bench/quick", tiny(full_run.bench_dir.parent)), show=False)
    assert again.ran == [] and len(again.kept) == 6
    assert above_cost(again.bench_dir / "report.md") == before


def test_changed_options_rerun_only_the_changed_cells(tmp_path):
    spec = load_bench("bench/quick", tiny(tmp_path, "bench.methods=[bt,lore]", "bench.seeds=[0]"))
    run_bench(spec, show=False)
    changed = run_bench(load_bench("bench/quick", tiny(tmp_path, "bench.methods=[bt,lore]", "bench.seeds=[0]",
                                                       "method_options.lore.rank=2")), show=False)
    assert changed.ran == ["lowrank_world/lore/seed-0"] and changed.kept == ["lowrank_world/bt/seed-0"]


def test_unmet_needs_are_skipped_with_the_reason(tmp_path):
    spec = load_bench("bench/quick", tiny(tmp_path, "bench.datasets=[lowrank_world,attribute_world]",
                                          "bench.methods=[bt]", "bench.seeds=[0]",
                                          "dataset_options.attribute_world.n_users=20"))
    outcome = run_bench(spec, show=False)
    rec = read_records(outcome.bench_dir)["attribute_world/bt/seed-0"]
    assert rec["status"] == SKIPPED
    assert rec["reason"] == ("backbone 'precomputed' needs a feature vector per (prompt, response) ('features'), "
                             "which dataset 'attribute_world' does not provide")
    report = (outcome.bench_dir / "report.md").read_text()
    assert "## Skipped cells" in report and "| attribute_world | bt | backbone 'precomputed' needs" in report
    assert not outcome.failed


def test_a_failing_cell_is_reported_and_the_others_complete(tmp_path, monkeypatch, capsys):
    from plrm.methods.lore import LoRe

    def boom(self, batch, batch_idx):
        raise RuntimeError("boom in lore's training step")

    monkeypatch.setattr(LoRe, "training_step", boom)
    code = cli.main(["bench", "--recipe", "bench/quick", *tiny(tmp_path, "bench.seeds=[0]")])
    assert code == 1
    records = read_records(tmp_path / "quick")
    assert records["lowrank_world/lore/seed-0"]["status"] == FAILED
    assert records["lowrank_world/lore/seed-0"]["error"] == "RuntimeError: boom in lore's training step"
    assert "in boom" in records["lowrank_world/lore/seed-0"]["traceback"]
    assert {records[f"lowrank_world/{m}/seed-0"]["status"] for m in ("bt", "pref")} == {"done"}
    report = (tmp_path / "quick" / "report.md").read_text()
    assert "## Failed cells" in report and "`RuntimeError: boom in lore's training step`" in report
    assert "| bt | " in report and "| pref | " in report
    assert "FAILED (RuntimeError: boom" in capsys.readouterr().out
    monkeypatch.undo()  # the fixed method runs on the rerun: only the failed cell runs again
    again = run_bench(load_bench("bench/quick", tiny(tmp_path, "bench.seeds=[0]")), show=False)
    assert again.ran == ["lowrank_world/lore/seed-0"] and not again.failed


def test_interrupt_keeps_finished_units_and_a_rerun_completes_them(tmp_path, monkeypatch, full_run):
    calls = []
    real = bench_run.run_unit

    def interrupted_after_two(spec, unit, bench_dir, cache):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(unit.key)
        return real(spec, unit, bench_dir, cache)

    monkeypatch.setattr(bench_run, "run_unit", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_bench(load_bench("bench/quick", tiny(tmp_path)), show=False)
    assert sorted(read_records(tmp_path / "quick")) == sorted(calls)
    assert not (tmp_path / "quick" / "report.md").exists()
    monkeypatch.undo()
    done = run_bench(load_bench("bench/quick", tiny(tmp_path)), show=False)
    assert sorted(done.ran) == sorted(set(full_run.ran) - set(calls)) and sorted(done.kept) == sorted(calls)
    assert above_cost(done.bench_dir / "report.md") == above_cost(full_run.bench_dir / "report.md")
    assert metrics_of(done.records) == metrics_of(full_run.records)


@pytest.mark.slow
def test_killed_benchmark_resumes_with_only_the_missing_units(tmp_path, full_run):
    """A real `plrm bench` process killed with SIGKILL once two units are recorded; the rerun finishes the rest
    and its report equals the uninterrupted run's."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = [sys.executable, "-m", "plrm.cli", "bench", "--recipe", "bench/quick", *tiny(tmp_path),
            "method_options.lore.max_epochs=3000"]  # slow lore units: the kill lands while one runs
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cells = tmp_path / "quick" / "cells"
    deadline = time.time() + 120
    while len(list(cells.glob("*/*/seed-*.json"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    finished = read_records(tmp_path / "quick")
    assert 2 <= len(finished) < 6, proc.stderr.read()[-2000:]
    assert all(r["status"] == "done" for r in finished.values())
    assert "lowrank_world/lore/seed-0" not in finished  # killed while its 3000 epochs ran
    done = run_bench(load_bench("bench/quick", tiny(tmp_path)), show=False)
    assert sorted(done.kept) == sorted(finished)
    assert sorted(done.ran) == sorted(set(full_run.ran) - set(finished))
    assert above_cost(done.bench_dir / "report.md") == above_cost(full_run.bench_dir / "report.md")


def test_shards_merge_to_the_unsharded_results(tmp_path, full_run):
    for i in (0, 1):
        code = cli.main(["bench", "--recipe", "bench/quick", "--shard", f"{i}/2", *tiny(tmp_path)])
        assert code == 0
    shard_dirs = sorted((tmp_path / "quick").glob("shard-*-of-2"))
    assert [d.name for d in shard_dirs] == ["shard-0-of-2", "shard-1-of-2"]
    assert len(read_records(shard_dirs[0])) == 3 and len(read_records(shard_dirs[1])) == 3
    assert cli.main(["bench", "--merge", *map(str, shard_dirs)]) == 0
    merged = json.loads((tmp_path / "quick" / "results.json").read_text())
    assert metrics_of(merged["records"]) == metrics_of(full_run.records)
    assert above_cost(tmp_path / "quick" / "report.md") == above_cost(full_run.bench_dir / "report.md")
    assert merged["merged_from"] == [str(d) for d in shard_dirs]


def test_merge_refuses_shards_of_different_recipes(tmp_path):
    a = run_bench(load_bench("bench/quick", tiny(tmp_path / "a", "bench.methods=[bt]", "bench.seeds=[0]")),
                  shard=(0, 2), show=False).bench_dir
    b = run_bench(load_bench("bench/quick", tiny(tmp_path / "b", "bench.methods=[bt]", "bench.seeds=[1]")),
                  shard=(1, 2), show=False).bench_dir
    with pytest.raises(RecipeError, match=r"ran a different benchmark recipe than .*shard-0-of-2"):
        merge([a, b], out=tmp_path / "m", show=False)
    with pytest.raises(RecipeError, match=r"is not a benchmark directory \(no bench.yaml\)"):
        merge([tmp_path], show=False)


@pytest.mark.slow
def test_bench_quick_as_shipped_includes_the_example_plugin(tmp_path):
    """The built-in bench/quick, unchanged but for where it writes and its first seed only (tests/test_invariance.py
    runs it whole): every method, the installed example plugin's among them, with the figures."""
    assert cli.main(["bench", "--recipe", "bench/quick", f"bench.output_dir={tmp_path}", "bench.seeds=[0]"]) == 0
    results = json.loads((tmp_path / "quick" / "results.json").read_text())
    done = {(c["method"], tuple(c["seeds_done"])) for c in results["cells"] if c["status"] == "done"}
    feature_methods = ("bt", "lore", "lore_alt", "mrm", "pref", "shrunk_individual", "individual", "further_ft",
                       "similar_user", "mpu", "mpu_avg", "prm", "vpl", "gpo", "pal_a", "pal_b")
    assert done == {(m, (0,)) for m in feature_methods}
    skipped = {c["method"] for c in results["cells"] if c["status"] == "skipped"}
    assert skipped == {"pdpo", "genarm", "conditional", "rm_v2", "rag_judge"}  # they read text (transformer or causal LM)
    report = (tmp_path / "quick" / "report.md").read_text()
    assert "| shrunk_individual (plugin: plrm-shrinkage " in report
    plugin = next(r for r in results["records"] if r["method"] == "shrunk_individual")
    assert plugin["plugins"][0]["distribution"] == "plrm-shrinkage"
    for plot in PLOTS:
        assert (tmp_path / "quick" / plot).stat().st_size > 10_000


def test_recipes_show_and_copy_know_benchmark_recipes(tmp_path, capsys):
    assert cli.main(["recipes", "show", "bench/quick", "bench.seeds=[7]"]) == 0
    shown = capsys.readouterr().out
    assert "seeds:\n  - 7\n" in shown and "method_options:" in shown
    assert cli.main(["recipes", "copy", "bench/quick", str(tmp_path / "mine.yaml")]) == 0
    copied = (tmp_path / "mine.yaml").read_text()
    assert "#   plrm bench --recipe " in copied
    assert load_bench(str(tmp_path / "mine.yaml")).bench.name == "quick"


@pytest.mark.slow
def test_wandb_gets_one_group_with_a_summary_run(tmp_path, monkeypatch):
    """logger.kind=wandb (offline here): every unit is a W&B run of the group `<bench name>`, and a summary run
    in the same group holds the table of cells and the figures."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls, real_init = [], wandb.init

    def spy(*args, **kwargs):
        calls.append((kwargs["name"], kwargs["group"]))
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    overrides = [o for o in tiny(tmp_path, "bench.methods=[bt,lore]", "bench.seeds=[0]") if not o.startswith("cell.")]
    outcome = run_bench(load_bench("bench/quick", [*overrides, "cell.logger.kind=wandb"]), show=False)
    assert calls == [("lowrank_world/bt/seed-0/seed-0/bt", "quick"), ("lowrank_world/lore/seed-0/seed-0/lore", "quick"),
                     ("quick/summary", "quick")]
    summary = list((outcome.bench_dir / "wandb").glob("offline-run-*"))
    assert len(summary) == 1
    assert list(summary[0].glob("files/media/table/bench/summary_*.table.json"))
    assert len(list(summary[0].glob("files/media/images/bench/*.png"))) == len(PLOTS)
    assert len(list((outcome.bench_dir / "runs").rglob("offline-run-*"))) == 2


def test_a_dataset_that_fails_to_load_fails_its_cells_only(tmp_path):
    spec = load_bench("bench/quick", tiny(tmp_path, "bench.datasets=[preference_files,lowrank_world]",
                                          "bench.methods=[bt]", "bench.seeds=[0]",
                                          f"dataset_options.preference_files.path={tmp_path / 'missing.jsonl'}"))
    outcome = run_bench(spec, show=False)
    records = read_records(outcome.bench_dir)
    bad = records["preference_files/bt/seed-0"]
    assert bad["status"] == FAILED and bad["stage"] == "load dataset"
    assert bad["error"].startswith("DataValidationError: data.path: no preference files at")
    assert records["lowrank_world/bt/seed-0"]["status"] == "done"
    assert [r["dataset"] for r in outcome.failed] == ["preference_files"]


def test_bench_command_line_misuse_names_the_problem(tmp_path, capsys):
    assert cli.main(["bench"]) == 2
    assert "plrm bench needs --recipe NAME" in capsys.readouterr().err
    assert cli.main(["bench", "--merge", str(tmp_path), "--recipe", "bench/quick"]) == 2
    assert "--merge builds a report from finished shard directories; it takes no --recipe" in capsys.readouterr().err
    (tmp_path / "a" / "s0").mkdir(parents=True)
    (tmp_path / "b" / "s1").mkdir(parents=True)
    for d in ("a/s0", "b/s1"):
        (tmp_path / d / "bench.yaml").write_text("bench: {name: x}\n")
    with pytest.raises(RecipeError, match="the shard directories have different parents; say where to write with "
                                          "--out"):
        merge([tmp_path / "a" / "s0", tmp_path / "b" / "s1"], show=False)


def test_bench_recipe_sections_of_the_wrong_type_are_named():
    with pytest.raises(RecipeError) as err:
        load_bench("bench/quick", ["cell=3", "method_options=7", "dataset_options.lowrank_world=5"])
    text = str(err.value)
    assert "cell: expected a mapping of run-recipe sections, got int" in text
    assert "method_options: expected a mapping of name -> options, got int" in text
    assert "dataset_options.lowrank_world: expected a mapping of options, got int" in text
    with pytest.raises(RecipeError, match=r"override 'method_options=\[1\]' cannot be applied: .*\(a mapping can only "
                                          r"be replaced key by key, or deleted with ~key first\)"):
        load_bench("bench/quick", ["method_options=[1]"])


def test_report_marks_plugin_rows_and_keeps_every_table_cell_on_one_line():
    """Rows of a plugin's method or dataset say which package they come from; a multi-line reason (an offline
    Hub error) or one with a pipe stays inside its table cell, and the report points to the full text."""
    from plrm.bench.report import cells, markdown, plugin_origins

    hub_error = ("data not available here: prism: cannot download ['*.jsonl'] of the Hub dataset x/prism@main "
                 "(LocalEntryNotFoundError: An error happened while trying to locate the files on the Hub.\n\n"
                 + "Please check your connection | try again. " * 20 + "\n). Without network access, point "
                 "data.path at a copy")
    plugin = [{"registry": "methods", "name": "shrunk_individual", "distribution": "plrm-shrinkage",
               "version": "0.1.0", "entry_point": "plrm_shrinkage.method:ShrunkIndividualRM"}]
    metrics = {"seen": {"accuracy": 0.8}, "unseen": {"accuracy": 0.7}, "overall": {"accuracy": 0.75},
               "fewshot": [{"k": 1, "accuracy": 0.6}]}
    records = [
        {"dataset": "lowrank_world", "method": "shrunk_individual", "seed": 0, "status": "done", "metrics": metrics,
         "plugins": plugin},
        {"dataset": "lowrank_world", "method": "bt", "seed": 0, "status": "done", "metrics": metrics, "plugins": []},
        {"dataset": "prism", "method": "shrunk_individual", "seed": 0, "status": SKIPPED, "reason": hub_error,
         "plugins": plugin},
        {"dataset": "prism", "method": "bt", "seed": 0, "status": SKIPPED, "reason": hub_error, "plugins": []},
    ]
    broken = [{"group": "plrm.methods", "name": "bad", "distribution": "bad 1.0", "error": "ImportError: a\nb|c"}]
    text = markdown(load_bench("bench/quick"), cells(records), {}, broken, 3, [], plugin_origins(records))
    lines = text.splitlines()
    assert "| shrunk_individual (plugin: plrm-shrinkage 0.1.0) | 80.0 |" in text
    assert "| bt | 80.0 |" in text
    assert "\"(plugin: package version)\" marks a method or dataset" in text
    skipped = lines[lines.index("## Skipped cells") + 2:]
    skipped = skipped[:skipped.index("")]
    assert len(skipped) == 4  # header, separator, one row per cell: no line of the error spilled out
    assert skipped[2].startswith("| prism | shrunk_individual (plugin: plrm-shrinkage 0.1.0) | data not available")
    for row in skipped:
        assert row.replace("\\|", "").count("|") == 4, row
    assert skipped[2].endswith("… (full text in results.json) |")
    assert "Please check" not in text
    assert "| plrm.methods | bad | bad 1.0 | ImportError: a b\\|c |" in text  # short: joined, not cut

