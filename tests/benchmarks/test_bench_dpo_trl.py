"""The plrm-beside-TRL DPO benchmark runs (its --quick mode): GenARM, P-DPO and TRL's DPOTrainer train on the same
token ids, in the same batches, after their losses were checked equal."""

import json

import pytest


@pytest.mark.slow
def test_quick_dpo_trl_benchmark_trains_every_side_on_the_same_tokens(tmp_path, run_benchmark):
    out = tmp_path / "dpo_trl.json"
    run_benchmark("bench_dpo_trl.py", "--quick", "--steps", "3", "--warmup", "1", "--threads", "1", "--rounds", "1",
                  "--out", str(out), timeout=400)
    r = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file()
    trl, genarm, pdpo = (r["sides"][side] for side in ("trl", "genarm", "pdpo"))
    assert trl["timed_steps"] == genarm["timed_steps"] == pdpo["timed_steps"] == 2
    # one epoch over the same pairs: TRL's own token counter (attention-mask tokens, checked step by step against
    # plrm's batches inside the TRL process) against plrm's ragged lengths
    assert trl["epoch_tokens"] == genarm["epoch_tokens"] == pdpo["epoch_tokens"] > 0
    assert trl["memory_run_epoch_tokens"] == genarm["memory_run_epoch_tokens"] == pdpo["memory_run_epoch_tokens"] \
        == trl["epoch_tokens"]
    # the same batches: the same pair tokens in the timed steps, and P-DPO runs the policy on each twice
    assert trl["real_tokens"] == genarm["real_tokens"] == pdpo["real_tokens"]
    assert pdpo["raw"]["steps"][0]["policy"] == 2 * trl["raw"]["steps"][0]["policy"]
    check = r["loss_check"]
    assert check["agreed"]
    assert check["dpo_loss"]["plrm"] == pytest.approx(check["dpo_loss"]["trl"], rel=1e-5, abs=1e-5)
    assert check["genarm_loss"]["plrm"] == pytest.approx(check["genarm_loss"]["trl"], rel=1e-5, abs=1e-5)
    assert check["dpo_loss"]["trl"] != pytest.approx(check["genarm_loss"]["trl"], abs=1e-3)  # the reference mattered
    assert trl["reference_sequences"] > 0 and pdpo["reference_sequences"] > 0 and genarm["reference_sequences"] == 0
    for pairing in ("genarm_vs_trl", "pdpo_vs_trl"):
        assert all(v > 0 for v in r["ratio"][pairing].values()), r["ratio"][pairing]
    assert all(0 <= side["padding_share"] < 1 for side in (trl, genarm, pdpo))
    # packing: the same pairs and tokens, run in fewer padded positions, after the check found them exact
    for method, padded in (("genarm", genarm), ("pdpo", pdpo)):
        packed = r["sides"][f"{method}_packed"]
        assert packed["timed_steps"] == padded["timed_steps"]
        assert packed["epoch_tokens"] == padded["epoch_tokens"] == packed["memory_run_epoch_tokens"]
        assert packed["real_tokens"] == padded["real_tokens"]
        assert packed["raw"]["steps"][0]["policy"] == padded["raw"]["steps"][0]["policy"]
        assert packed["padding_share"] < padded["padding_share"]
        assert packed["positions_per_second"] > 0 and packed["live_peak_rss_mib"] > 0
        assert all(v > 0 for v in r["packing"][method].values()) and r["ratio"][f"{method}_packed_vs_trl"]
        exact = check["packed"][method]
        assert exact["loss_packed"] == pytest.approx(exact["loss_padded"], rel=1e-5, abs=1e-5)
        assert exact["grad_max_abs_diff"] <= 1e-4 * exact["grad_max_abs"] + 1e-6
