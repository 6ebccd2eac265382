"""Test environment: no network, no W&B account, one torch thread (fastest for tiny models on 2 cores)."""

import json
import os
import random

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_UPDATE_DOWNLOAD_COUNTS"] = "0"
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

TINY_WORLD = ["data.n_users=80", "data.pairs_per_user=20", "data.n_train_prompts=300", "data.n_test_prompts=40",
              "data.test_prompts_per_user=10", "data.feature_dim=16", "data.n_functions=3", "data.alpha=0.05"]


@pytest.fixture(scope="session", autouse=True)
def plrm_cache(tmp_path_factory):
    """Tiny random models, converted SmolLM2 and feature caches go to a temp dir, never ~/.cache."""
    path = tmp_path_factory.mktemp("plrm-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("PLRM_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that turn the quickstart recipe into a run of a few seconds, written under tmp_path."""
    return TINY_WORLD + ["methods.bt.max_epochs=3", "methods.lore.max_epochs=3", "methods.lore.rank=3",
                         "eval.k_list=[1,3]", "split.k=3", "logger.kind=none", f"run.output_dir={tmp_path}",
                         "trainer.progress_bar=false"]


def write_broken_plugin(site) -> None:
    """An installed distribution under ``site`` (put it on PYTHONPATH) whose method entry point fails to import
    with 'ImportError: boom: missing dependency'."""
    (site / "broken_plugin").mkdir()
    (site / "broken_plugin" / "__init__.py").write_text('raise ImportError("boom: missing dependency")\n')
    dist_info = site / "broken_plugin-0.0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.0.1\n")
    (dist_info / "entry_points.txt").write_text("[plrm.methods]\nbroken_method = broken_plugin:Method\n")


@pytest.fixture(scope="session")
def broken_plugin_writer():
    """:func:`write_broken_plugin`, for tests in other folders (tests have no package to import it from)."""
    return write_broken_plugin


# ---- a small text world built in the test (backbone and LM-method tests) ------------------------------------------
# Two user groups with opposite length preferences (one prefers the long response, the other the short one), so a
# model must read the text and personalize to beat chance on both.
WORDS = ("river mountain cloud garden window paper music light forest stone bridge candle harbor meadow "
         "lantern orchard valley whisper").split()


def write_length_pairs(path, n_users=24, pairs_per_user=16, seed=0, opposite=True):
    """Pairs whose chosen response is the long one for even users and the short one for odd users."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for u in range(n_users):
            likes_long = u % 2 == 0 or not opposite
            for _ in range(pairs_per_user):
                topic = " and the ".join(r.sample(WORDS, 2))
                short = " ".join(r.choice(WORDS) for _ in range(3)) + "."
                long = " ".join(r.choice(WORDS) for _ in range(12)) + "."
                chosen, rejected = (long, short) if likes_long else (short, long)
                f.write(json.dumps({"user_id": f"u{u:02d}", "prompt": f"Tell me about the {topic}.",
                                    "chosen": chosen, "rejected": rejected}) + "\n")
    return path


@pytest.fixture
def length_pairs(tmp_path):
    return write_length_pairs(tmp_path / "pairs.jsonl")


def _text_recipe(tmp_path, data_path, backbone: dict, methods: dict, **extra) -> dict:
    recipe = {
        "description": "backbone test",
        "run": {"name": "run", "output_dir": str(tmp_path / "runs")},
        "data": {"name": "preference_files", "path": str(data_path)},
        "backbone": backbone,
        "split": {"seeds": [0], "k": 3},
        "eval": {"k_list": [1, 3]},
        "methods": methods,
        "logger": {"kind": "none"},
        "trainer": {"progress_bar": False},
    }
    for key, value in extra.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


@pytest.fixture
def text_recipe():
    """recipe(tmp_path, data_path, backbone, methods, **section_updates) -> a recipe dict over text pairs."""
    return _text_recipe


@pytest.fixture
def pairs_writer():
    """write_length_pairs(path, n_users, pairs_per_user, seed, opposite) for tests that need other sizes."""
    return write_length_pairs


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test: tiny models train several times faster on one thread of a shared
    2-core machine than on two (OpenMP synchronisation on every small op)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def calibration_world(tmp_path, method: str, *extra: str) -> list[str]:
    """quickstart overrides for the baselines' calibration world (recipes/baselines_lowrank.yaml's): D = 16, K = 4
    true directions, Dirichlet(0.05) users, 4 responses per prompt, 100 seen users x 50 train pairs and 100 unseen
    users, 100 test pairs each, k = 10; ``method`` alone, with its defaults unless ``extra`` says otherwise."""
    return ["data.n_users=200", "data.pairs_per_user=50", "data.n_train_prompts=2000", "data.n_test_prompts=300",
            "data.test_prompts_per_user=100", "data.feature_dim=16", "data.n_functions=4", "data.alpha=0.05",
            "data.n_responses=4", "split.k=10", "eval.k_list=[10]", "~methods.lore", "~methods.bt",
            f"+methods.{method}={{}}", "logger.kind=none", f"run.output_dir={tmp_path}", "trainer.progress_bar=false",
            *extra]


def export_support(run_dir, k: int, path, rename=lambda u: f"new-{u}") -> list[str]:
    """Write the unseen users' first k support pairs of a finished run (seed 0) to ``path`` as a canonical jsonl
    pairs file, row order kept and each user renamed by ``rename`` (as new users of `plrm adapt --pairs`); return
    the users' original ids, sorted."""
    import pandas as pd
    import yaml

    from plrm import runner
    from plrm.recipe import load_recipe

    recipe = load_recipe(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    pairs = runner.prepare(recipe).data.pairs.to_pandas()
    split = pd.read_parquet(run_dir / "seed-0" / "split.parquet")
    rows = split[(split.role == "support") & (split.support_rank < k)].row.to_numpy()
    frame = pairs.iloc[rows][["user_id", "prompt", "chosen", "rejected"]]
    frame.assign(user_id=frame.user_id.astype(str).map(rename)).to_json(path, orient="records", lines=True)
    return sorted(frame.user_id.astype(str).unique())
