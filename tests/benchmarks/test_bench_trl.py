"""The plrm-beside-TRL LoRA benchmark runs (its --quick mode): both sides train on the same token ids."""

import json

import pytest


@pytest.mark.slow
def test_quick_trl_benchmark_trains_both_sides_on_the_same_tokens(tmp_path, run_benchmark):
    out = tmp_path / "trl.json"
    run_benchmark("bench_trl.py", "--quick", "--steps", "4", "--warmup", "1", "--threads", "1", "--rounds", "1", "--out", str(out),
                  timeout=400)
    r = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file()
    plrm, trl = r["sides"]["plrm"], r["sides"]["trl"]
    assert plrm["timed_steps"] == trl["timed_steps"] == 3
    # one epoch over the same pairs: every real token is counted once on each side (TRL's own token counter
    # against plrm's ragged lengths); only the order of the pairs differs (TRL shuffles)
    assert plrm["epoch_tokens"] == trl["epoch_tokens"] > 0
    assert 0 <= plrm["padding_share"] < 1 and 0 <= trl["padding_share"] < 1
    assert r["ratio"]["tokens_per_second"] > 0 and plrm["live_peak_rss_mib"] > 0
    assert plrm["memory_run_epoch_tokens"] == trl["memory_run_epoch_tokens"] == plrm["epoch_tokens"]
    # packing runs the same tokens in fewer padded slots
    packed = r["sides"]["plrm_packed"]
    assert packed["epoch_tokens"] == plrm["epoch_tokens"] and packed["real_tokens"] == plrm["real_tokens"]
    assert packed["padding_share"] < plrm["padding_share"]
    assert r["packing"]["tokens_per_second"] > 0 and r["ratio_packed"]["live_peak_rss"] > 0
