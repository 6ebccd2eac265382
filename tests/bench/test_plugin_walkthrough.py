"""CONTRIBUTING.md's plugin walk-through, done as a third-party author would: the files it shows are written to
an empty folder outside the repository, installed with pip, and must appear in `plrm list` and `plrm recipes
list`, run from their recipe by name, and join the rows and columns of a `methods: all, datasets: all` benchmark
-- next to a plugin whose import raises, which is reported while the benchmark runs on.

The walk-through and plugins/plrm-shrinkage may import from plrm only the plugin API that CONTRIBUTING.md lists
("What a plugin may import"): PUBLIC_API below is that list, checked against the table both ways, and every plrm
name the plugins' code uses (imports, and attributes of imported plrm modules) is checked against it."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import plrm.errors
from plrm.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
FILE_BLOCK = re.compile(r"<!-- plugin-file: (?P<path>\S+) -->\n```\w+\n(?P<body>.*?)```", re.S)
ERROR_CLASSES = {name for name, obj in vars(plrm.errors).items()
                 if isinstance(obj, type) and issubclass(obj, plrm.errors.PlrmError)}

# plrm's plugin API: module -> the names a plugin may import from it. CONTRIBUTING.md's table "What a plugin may
# import" documents exactly these; anything else in plrm is internal.
PUBLIC_API: dict[str, set[str]] = {
    "plrm.methods.base": {"PersonalizedRewardModel", "MethodConfig", "AdaptConfig", "QuasiNewtonConfig",
                          "SeenUsersData"},
    "plrm.methods.peruser": {"fit_per_user", "fit_per_user_sets"},
    "plrm.methods.heads": {"PerUserHeads"},
    "plrm.methods.episodic": {"EpisodicRewardModel", "EpisodeConfig"},
    "plrm.methods.losses": {"bradley_terry_nll", "masked_bradley_terry_nll", "reduce_nll", "robust_objective"},
    "plrm.methods.meta": {"adapt", "query_losses", "pad_groups", "episode_split"},
    "plrm.config": {"opt"},
    "plrm.data.source": {"DatasetSource", "PreferenceData", "FeatureTable", "EncoderRequest"},
    "plrm.data.published": {"PublishedConfig", "resolve_files", "read_table", "require_columns", "malformed",
                            "LoadReport"},
    "plrm.capabilities": {"FEATURES", "USERS", "TEXT", "SHARED_PAIRS", "REFERENCE", "ORACLE", "LM", "TOKEN_STATES"},
    "plrm.distributed": {"to_device"},
    "plrm.errors": ERROR_CLASSES,  # every class: PlrmError and its subclasses
}


def write_walkthrough(root: Path) -> list[str]:
    text = (REPO / "CONTRIBUTING.md").read_text()
    written = []
    for m in FILE_BLOCK.finditer(text):
        path = root / m.group("path")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(m.group("body"))
        written.append(m.group("path"))
    return written


def plrm(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "COLUMNS": "300", "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("PLRM_PLUGINS", None)
    env.pop("PLRM_DISABLE_PLUGIN_AUTOLOAD", None)
    return subprocess.run([sys.executable, "-m", "plrm.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600, check=False)


# ---- the plugin API ------------------------------------------------------------------------------------------
def _dotted(node: ast.expr) -> list[str] | None:
    """``cap.FEATURES.lower`` -> ['cap', 'FEATURES', 'lower']; None for anything but a chain of names."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def plrm_names_used(source: str) -> set[str]:
    """Every plrm name a module's code uses, dotted: what it imports from plrm, and each attribute it reads from
    an imported plrm module or name (``cap.FEATURES`` after ``from plrm import capabilities as cap``)."""
    bound: dict[str, str] = {}  # local name -> the dotted plrm name it stands for
    used: set[str] = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "plrm":
                    used.add(alias.name)
                    bound[alias.asname or "plrm"] = alias.name if alias.asname else "plrm"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "plrm":
            for alias in node.names:
                used.add(f"{node.module}.{alias.name}")
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):  # whole chains only: `plrm.methods` inside `plrm.methods.base.X` is no use
        chain = _dotted(node) if isinstance(node, ast.Attribute) and id(node) not in inner else None
        if chain and chain[0] in bound:
            used.add(".".join([bound[chain[0]], *chain[1:]]))
    return used


def outside_public_api(name: str) -> bool:
    """Whether a dotted plrm name is neither an API module nor a listed name of one (attributes of a listed
    name, ``PersonalizedRewardModel.adapt``, come with it)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        if module in PUBLIC_API:
            return i < len(parts) and parts[i] not in PUBLIC_API[module]
    return True


def api_violations(files: list[Path], root: Path) -> list[str]:
    return [f"{f.relative_to(root)}: {name}" for f in files
            for name in sorted(plrm_names_used(f.read_text())) if outside_public_api(name)]


def documented_api() -> dict[str, set[str]]:
    """CONTRIBUTING.md's table "What a plugin may import": module -> the names in backticks on its row."""
    text = (REPO / "CONTRIBUTING.md").read_text()
    section = text[text.index("**What a plugin may import.**"):]
    section = section[:section.index("**Errors a plugin raises.**")]
    rows = re.findall(r"^\| `(plrm[\w.]*)` \| ([^|]*) \|", section, re.M)
    assert rows, "no table in CONTRIBUTING.md's 'What a plugin may import'"
    return {module: set(re.findall(r"`(\w+)`", names)) for module, names in rows}


@pytest.fixture(scope="module")
def site(tmp_path_factory, broken_plugin_writer) -> Path:
    """The walk-through package pip-installed into its own site directory, beside a broken plugin."""
    src = tmp_path_factory.mktemp("author")
    assert write_walkthrough(src) == ["plrm-signflip/pyproject.toml", "plrm-signflip/plrm_signflip/method.py",
                                      "plrm-signflip/plrm_signflip/world.py",
                                      "plrm-signflip/plrm_signflip/recipes/signflip_quickstart.yaml"]
    (src / "plrm-signflip" / "plrm_signflip" / "__init__.py").write_text("")
    target = tmp_path_factory.mktemp("site")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(target), str(src / "plrm-signflip")],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    broken_plugin_writer(target)
    return target


@pytest.mark.slow
def test_installed_plugin_is_listed_with_its_distribution(site, tmp_path):
    proc = plrm(["list"], site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any("signed_bt" in ln and "plrm-signflip 0.1.0" in ln for ln in lines)
    assert any("sign_world" in ln and "plrm-signflip 0.1.0" in ln and "CC0-1.0" in ln for ln in lines)
    assert "ImportError: boom: missing dependency" in proc.stdout
    recipes = plrm(["recipes", "list"], site, tmp_path)
    assert recipes.returncode == 0, recipes.stderr
    assert re.search(r"^signflip_quickstart +plrm-signflip 0\.1\.0 +signed_bt vs Global RM", recipes.stdout, re.M)


@pytest.mark.slow
def test_plugin_recipe_runs_by_name_and_its_buffer_state_adapts_new_users(site, tmp_path):
    """`plrm fit --recipe signflip_quickstart` finds the recipe in the installed package; the per-user sign,
    fitted for seen users by fit_seen_users, puts signed_bt above the global model; `plrm adapt --pairs` saves
    new users' signs, a buffer named in user_state."""
    proc = plrm(["fit", "--recipe", "signflip_quickstart", f"run.output_dir={tmp_path}", "logger.kind=none",
                 "trainer.progress_bar=false"], site, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "signflip_quickstart"
    results = json.loads((run_dir / "results.json").read_text())
    summary = results["summary"]
    for group in ("seen", "unseen"):  # measured: seen 86.3 vs 72.7, unseen 84.7 vs 67.0
        assert summary["signed_bt"][group]["accuracy"]["mean"] > summary["bt"][group]["accuracy"]["mean"] + 0.1
    assert {(p["registry"], p["name"], p["distribution"]) for p in results["plugins"]} == {
        ("methods", "signed_bt", "plrm-signflip"), ("datasets", "sign_world", "plrm-signflip")}

    # six new users of the same world (seed 0: the same direction v), under new ids and prompts
    pairs = tmp_path / "new_users.parquet"
    make = subprocess.run([sys.executable, "-c", f"""
from plrm_signflip.world import SignWorld
data = SignWorld(SignWorld.Config(n_users=6)).load()
frame = data.pairs.to_pandas()
frame["user_id"], frame["prompt"] = "new_" + frame["user_id"], "new " + frame["prompt"]
frame.to_parquet({str(pairs)!r})
print(" ".join(str(int(s)) for s in data.truth["sign"]))
"""], env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=120)
    assert make.returncode == 0, make.stderr[-3000:]
    true_signs = [float(s) for s in make.stdout.split()]
    proc = plrm(["adapt", "--run", str(run_dir), "--pairs", str(pairs)], site, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = load_checkpoint(run_dir / "seed-0" / "signed_bt.users-new_users.ckpt")
    assert set(saved["state_dict"]) == {"sign"}
    assert saved["state_dict"]["sign"].tolist() == true_signs  # 30 pairs each: every sign recovered


@pytest.mark.slow
def test_plugin_joins_an_all_by_all_benchmark(site, tmp_path):
    recipe = tmp_path / "everything.yaml"
    recipe.write_text("""
extends: bench/quick
bench:
  name: everything
  methods: all
  datasets: all
  seeds: [0]
dataset_options:
  lowrank_world: {n_users: 60, pairs_per_user: 10, n_train_prompts: 300, n_test_prompts: 20,
                  test_prompts_per_user: 10, feature_dim: 16}
  attribute_world: {n_users: 20}
method_options:                # every method joins; each trains only a few steps here
  lore: {max_epochs: 5}
  lore_alt: {max_epochs: 5}
  mrm: {max_epochs: 3}
  individual: {max_steps: 20}
  similar_user: {max_steps: 20}
  further_ft: {max_epochs: 3}
  mpu: {max_epochs: 3}
  mpu_avg: {max_epochs: 3}
  prm: {max_epochs: 3}
  vpl: {max_epochs: 2}
  gpo: {max_steps: 10}
  pal_a: {max_epochs: 3}
  pal_b: {max_epochs: 3}
cell:
  logger: {kind: none}
""")
    proc = plrm(["bench", "--recipe", str(recipe), f"bench.output_dir={tmp_path}"], site, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "plugin broken_method (broken-plugin 0.0.1) failed to load" in proc.stdout
    out = tmp_path / "everything"
    results = json.loads((out / "results.json").read_text())
    cells = {(c["dataset"], c["method"]): c for c in results["cells"]}
    # the plugin's method is a row of every dataset it can run on, its dataset a column for every method
    assert cells[("lowrank_world", "signed_bt")]["status"] == "done"
    assert {m for (d, m), c in cells.items() if d == "sign_world" and c["status"] == "done"} >= {
        "bt", "lore", "lore_alt", "mrm", "shrunk_individual", "signed_bt"}
    assert cells[("sign_world", "pref")]["skipped_reason"] == (
        "method 'pref' needs item pairs shared across users (pair_id) ('shared_pairs'), which dataset 'sign_world' "
        "with backbone 'precomputed' does not provide")
    signed = cells[("sign_world", "signed_bt")]["summary"]["unseen"]["accuracy"]["mean"]
    bt = cells[("sign_world", "bt")]["summary"]["unseen"]["accuracy"]["mean"]
    assert signed > bt + 0.1  # a per-user sign is what this world needs; one global direction cannot serve both
    assert cells[("attribute_world", "bt")]["skipped_reason"].startswith("backbone 'precomputed' needs")
    assert cells[("preference_files", "bt")]["skipped_reason"].startswith("dataset 'preference_files' needs data.path")
    assert cells[("prism", "lore")]["skipped_reason"].startswith("data not available here")
    assert not [c for c in results["cells"] if c.get("errors")]
    assert results["broken_plugins"][0]["name"] == "broken_method"
    report = (out / "report.md").read_text()
    assert "## sign_world (plugin: plrm-signflip 0.1.0)" in report  # plugin rows are marked with their package
    assert "| signed_bt (plugin: plrm-signflip 0.1.0) |" in report
    assert "## Plugins that failed to load (left out)" in report and "broken_method" in report
    plugin_rec = next(r for r in results["records"] if r["method"] == "signed_bt" and r["status"] == "done")
    assert {"registry": "methods", "name": "signed_bt", "distribution": "plrm-signflip"}.items() <= \
        plugin_rec["plugins"][0].items()


# ---- the plugin API, checked without installing anything ------------------------------------------------------
def test_public_api_is_the_table_in_contributing():
    documented = documented_api()
    assert set(documented) == set(PUBLIC_API)
    for module, names in PUBLIC_API.items():
        if module != "plrm.errors":  # its row says "every class"; the errors table lists them
            assert documented[module] == names, module


def test_every_error_class_is_in_contributings_errors_table():
    text = (REPO / "CONTRIBUTING.md").read_text()
    section = text[text.index("**Errors a plugin raises.**"):text.index("**Rules plrm enforces.**")]
    assert set(re.findall(r"^\| `(\w+)`", section, re.M)) == ERROR_CLASSES


def test_public_api_names_exist():
    import importlib

    for module, names in PUBLIC_API.items():
        missing = [n for n in names if not hasattr(importlib.import_module(module), n)]
        assert not missing, f"{module} has no {missing}"


def test_the_scan_flags_internal_names():
    source = """
import plrm.data.datamodule
import plrm.methods.base
from plrm import capabilities as cap, registry
from plrm.methods.base import FACTORED, PersonalizedRewardModel
from plrm.methods import lore
needs = {cap.FEATURES.lower(), cap.unmet}
move = plrm.data.datamodule.to_device
base = plrm.methods.base.PersonalizedRewardModel.adapt
"""
    assert sorted(n for n in plrm_names_used(source) if outside_public_api(n)) == [
        "plrm.capabilities.unmet", "plrm.data.datamodule", "plrm.data.datamodule.to_device",
        "plrm.methods.base.FACTORED", "plrm.methods.lore", "plrm.registry"]


def test_walkthrough_imports_only_the_public_api(tmp_path):
    write_walkthrough(tmp_path)
    files = sorted(tmp_path.rglob("*.py"))
    assert [f.name for f in files] == ["method.py", "world.py"]
    assert api_violations(files, tmp_path) == []


def test_example_plugin_imports_only_the_public_api():
    root = REPO / "plugins" / "plrm-shrinkage"
    files = sorted((root / "plrm_shrinkage").rglob("*.py"))
    assert files
    assert api_violations(files, root) == []
