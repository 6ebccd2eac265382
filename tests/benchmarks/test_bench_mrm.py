"""The MRM step benchmark still runs (its --quick mode), and its equality check of the three paths holds."""

import json

import pytest


@pytest.mark.slow
def test_quick_benchmark_runs_and_the_paths_agree(tmp_path, run_benchmark):
    out = tmp_path / "mrm.json"
    run_benchmark("bench_mrm.py", "--quick", "--out", str(out), timeout=300)
    (record,) = json.loads(out.read_text())["results"]
    assert record["users"] == 64
    assert record["max_abs_loss_diff"] < 1e-5 and record["max_abs_grad_diff"] < 1e-4
    assert len(record["seconds_vectorized"]) == 3 and record["speedup_vs_loop_per_user"] > 0
    # the step split into phi of the batch and the inner loop alone, each timed on every repetition
    assert len(record["seconds_phi_only"]) == len(record["seconds_inner_loop"]) == 3
    assert record["speedup_inner"] > 0
    assert "speed-up" in out.with_suffix(".md").read_text()


def test_mrm_study_rejects_an_unknown_part_before_running_anything(tmp_path, run_benchmark):
    proc = run_benchmark("mrm_study.py", "--parts", "mrm_prism,nope", "--out-dir", str(tmp_path), expect_rc=2)
    assert ("unknown part(s) ['nope']; choose from mrm_prism_calibrated, mrm_prism, mrm_prism_minority, mrm_tldr, "
            "mrm_personalllm, mrm_worlds") in proc.stderr
    assert not any(tmp_path.iterdir())


def test_mrm_study_report_only_refuses_parts_it_cannot_rewrite(tmp_path, run_benchmark):
    proc = run_benchmark("mrm_study.py", "--report-only", "--parts", "mrm_prism,mrm_tldr", "--out-dir", str(tmp_path),
                         expect_rc=2)
    assert ("--report-only rewrites only mrm_prism_calibrated, mrm_prism, mrm_prism_minority, mrm_worlds, not "
            "mrm_tldr") in proc.stderr
    assert not any(tmp_path.iterdir())
