"""benchmarks/scaling.py's slopes, from hand-made unit records (the script itself runs hours of plrm bench)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("scaling", ROOT / "benchmarks" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(seconds: float, rss: float, train: float) -> dict:
    return {"wall_seconds": seconds, "peak_rss_mb": rss,
            "metrics": {"train_seconds": train, "adapt_seconds": 1.0, "eval_seconds": seconds - train - 1.0}}


def test_slopes_over_the_sizes_each_method_ran_at(scaling):
    sizes = [1000, 10000, 100000]
    by_size = {
        1000: {"lin": record(2.0, 100, 1.0), "quad": record(1.0, 50, 0.5), "once": record(5.0, 10, 1.0)},
        10000: {"lin": record(20.0, 100, 10.0), "quad": record(100.0, 50, 50.0)},
        100000: {"lin": record(200.0, 100, 100.0)},                # quad was not run at 100k (--methods-at)
    }
    table = scaling.scaling_table(sizes, ["lin", "quad", "once"], by_size)
    assert table["lin"]["sizes"] == sizes
    assert table["lin"]["slope_seconds"] == pytest.approx(1.0)       # 10x users, 10x seconds
    assert table["lin"]["slope_train"] == pytest.approx(1.0)
    assert table["lin"]["slope_adapt"] == pytest.approx(0.0)         # constant
    assert table["lin"]["slope_memory"] == pytest.approx(0.0)
    assert table["quad"]["sizes"] == [1000, 10000]
    assert table["quad"]["slope_seconds"] == pytest.approx(2.0)      # 10x users, 100x seconds
    assert table["once"] == {"missing_sizes": [10000, 100000]}


def test_slope_needs_two_positive_points(scaling):
    assert scaling.slope([1000], [3.0]) is None
    assert scaling.slope([1000, 10000], [0.0, 5.0]) is None
    assert scaling.slope([100, 1000, 10000], [1.0, 10.0, 100.0]) == pytest.approx(1.0)
