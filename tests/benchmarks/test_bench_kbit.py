"""The 4-bit upcast benchmark runs (its --quick mode): the setting changes the dtype of the unquantized weights."""

import json

import pytest


@pytest.mark.slow
def test_quick_kbit_benchmark_keeps_unquantized_weights_in_bf16_without_the_upcast(tmp_path, run_benchmark):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "kbit.json"
    run_benchmark("bench_kbit.py", "--quick", "--steps", "2", "--out", str(out), timeout=300)
    r = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file()
    up, no = r["runs"]["upcast"]["param_mib_by_dtype"], r["runs"]["no_upcast"]["param_mib_by_dtype"]
    assert "bfloat16" not in up and no["bfloat16"] > 0          # peft's preparation casts them all to fp32
    assert up["uint8"] == no["uint8"] > 0                        # the same 4-bit weights either way
    assert r["ratio"]["param_bytes"] < 1
    assert r["mean_feature_difference"] < 1e-2                   # the same model, in bf16 arithmetic
