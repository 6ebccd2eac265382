"""Interactive sessions (plrm/eval/active.py, `plrm adapt --active`): protocol, answers, errors, outputs."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from plrm import runner
from plrm.cli import main
from plrm.data.datamodule import PreferenceDataModule
from plrm.data.splits import SUPPORT, make_split
from plrm.eval.active import SessionError, _answers, _batch, answers_to_match, run_session


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """PReF and LoRe on a tiny dense world (each pair labeled by ~10 users), unseen users with 20-pair pools."""
    out = tmp_path_factory.mktemp("runs")
    from tests.conftest import TINY_WORLD

    result = runner.fit("quickstart", TINY_WORLD + [
        "data.users_per_pair=10", "data.labels=bradley_terry", "~methods.bt", "methods.lore.rank=3",
        "methods.lore.max_epochs=3", "+methods.pref={}", "methods.pref.rank=3", "methods.pref.max_steps=100",
        "eval.k_list=[1,3,5]", "split.k=5", "logger.kind=none", f"run.output_dir={out}",
        "trainer.progress_bar=false"], show=False)
    return result


def session_parts(result, label: str):
    run = runner.Run.open(result.run_dir)
    return run.load_method(label, 0), run.datamodule(0)


@pytest.mark.parametrize("label", ["pref", "lore"])
def test_random_session_at_t_answers_is_the_k_shot_protocol(dense_run, label):
    """Random questions are each user's support pool in the split's seeded order, so after t answers the
    session's unseen accuracy is exactly the few-shot protocol's at k = t."""
    model, dm = session_parts(dense_run, label)
    session = run_session(model, dm, budget=5, strategy="random", eval_at=[1, 3, 5], worst_fractions=[0.1])
    fewshot = {row["k"]: row["accuracy"] for row in dense_run.per_seed[0][label]["fewshot"]}
    assert [row["accuracy"] for row in session.curve] == [fewshot[1], fewshot[3], fewshot[5]]


def test_uncertainty_session_asks_distinct_pairs_from_each_users_own_pool(dense_run):
    model, dm = session_parts(dense_run, "pref")
    active = run_session(model, dm, budget=8, strategy="uncertainty", eval_at=[8], worst_fractions=[0.1])
    random = run_session(model, dm, budget=8, strategy="random", eval_at=[8], worst_fractions=[0.1])
    split = dm.split
    users = split.unseen_users
    assert active.asked.shape == (len(users), 8) and (active.asked >= 0).all()
    assert (split.role[active.asked] == SUPPORT).all()
    np.testing.assert_array_equal(split.row_user[active.asked], np.repeat(users[:, None], 8, axis=1))
    assert all(len(set(row)) == 8 for row in active.asked.tolist())
    np.testing.assert_array_equal(active.asked[:, 0], random.asked[:, 0])      # Algorithm 2: t=1 is random
    assert (active.asked[:, 1:] != random.asked[:, 1:]).any()                  # then the score decides
    np.testing.assert_array_equal(split.support_rank[random.asked], np.tile(np.arange(8), (len(users), 1)))


def test_uncertainty_picks_the_highest_scoring_candidate(dense_run):
    """Round 2 asks each user the candidate with the largest score given the model fit to the first answer."""
    model, dm = session_parts(dense_run, "pref")
    session = run_session(model, dm, budget=2, strategy="uncertainty", eval_at=[2], worst_fractions=[0.1])
    model, dm = session_parts(dense_run, "pref")
    users = torch.from_numpy(dm.split.unseen_users)
    first = np.sort(session.asked[:, 0])
    model.adapt(_batch(dm, first, None, "cpu"), users)
    rows = np.setdiff1d(dm.split.rows(SUPPORT), first)
    scores = model.uncertainty(_batch(dm, first, None, "cpu"), users, _batch(dm, rows, None, "cpu")).numpy()
    best = pd.DataFrame({"user": dm.split.row_user[rows], "row": rows, "score": scores}) \
        .sort_values("score").groupby("user").tail(1).sort_values("user")["row"].to_numpy()
    np.testing.assert_array_equal(session.asked[:, 1], best)


def test_oracle_answers_flip_the_rows_the_user_truly_prefers_the_other_way(dense_run):
    _, dm = session_parts(dense_run, "pref")
    flip = _answers(dm, "oracle")
    personal = dm.prepared.data.oracle_logits["oracle/personal"]
    np.testing.assert_array_equal(flip, personal < 0)
    assert flip.any()  # Bradley-Terry labels disagree with the truth on some rows
    rows = np.flatnonzero(flip)[:3]
    batch, raw = _batch(dm, rows, flip, "cpu"), dm.batch(torch.from_numpy(rows))
    torch.testing.assert_close(batch["chosen"], raw["rejected"])
    torch.testing.assert_close(batch["rejected"], raw["chosen"])


def test_session_errors_name_the_problem(dense_run):
    model, dm = session_parts(dense_run, "pref")
    lore, _ = session_parts(dense_run, "lore")
    with pytest.raises(SessionError, match=r"budget T=21 exceeds the candidate pool of \d+ unseen user\(s\), e.g. "
                                           r"user 'user\d+' with 20 support pairs"):
        run_session(model, dm, 21, "random", [1], [0.1])
    with pytest.raises(SessionError, match=r"eval_at \[0, 9\] outside 1..budget=5"):
        run_session(model, dm, 5, "random", [0, 9], [0.1])
    with pytest.raises(SessionError, match="LoRe has no uncertainty score; only strategy 'random' applies"):
        run_session(lore, dm, 5, "uncertainty", [5], [0.1])
    with pytest.raises(SessionError, match="strategy must be one of"):
        run_session(model, dm, 5, "greedy", [5], [0.1])
    with pytest.raises(SessionError, match="budget must be >= 1, got 0"):
        run_session(model, dm, 0, "random", [], [0.1])
    all_seen = make_split(dm.prepared.data.pairs.data.table, 0, 0.0, 0.0, 0.0, need_support=0)
    with pytest.raises(SessionError, match="the split has no unseen users to run a session with"):
        run_session(model, PreferenceDataModule(dm.prepared, all_seen), 5, "random", [5], [0.1])
    dm.prepared.data.oracle_logits = {}  # this dm was built for this test alone (session_parts)
    with pytest.raises(SessionError, match="answers=oracle needs a dataset with a personal oracle"):
        run_session(model, dm, 5, "random", [5], [0.1], answers="oracle")


def test_answers_to_match():
    curves = {"random": [{"t": 1, "accuracy": 0.6}, {"t": 4, "accuracy": 0.8}],
              "uncertainty": [{"t": 1, "accuracy": 0.6}, {"t": 2, "accuracy": 0.81}, {"t": 4, "accuracy": 0.9}]}
    assert answers_to_match(curves)["answers"] == 2
    curves["uncertainty"][1]["accuracy"] = 0.7
    assert answers_to_match(curves)["answers"] == 4
    assert answers_to_match({"random": curves["random"]}) is None


def test_cli_active_writes_curves_plot_and_asked_pairs(dense_run, capsys):
    assert main(["adapt", "--run", str(dense_run.run_dir), "--active", "--budget", "6", "--eval-at", "2", "6"]) == 0
    out = capsys.readouterr().out
    assert "pref (uncertainty)" in out and "pref (random)" in out and "lore (random)" in out
    assert "lore (uncertainty): skipped (LoRe has no uncertainty score)" in out
    res = json.loads((dense_run.run_dir / "active_results.json").read_text())
    assert set(res["summary"]) == {"lore", "pref"} and set(res["summary"]["pref"]) == {"uncertainty", "random"}
    assert [r["t"] for r in res["summary"]["pref"]["uncertainty"]] == [2, 6]
    png = (dense_run.run_dir / "active_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    asked = pd.read_parquet(dense_run.run_dir / "seed-0" / "pref.active-uncertainty.parquet")
    assert len(asked) == 6 * asked["user_id"].nunique() and asked["t"].max() == 6


def test_cli_active_rejects_k_and_pairs(dense_run, capsys):
    assert main(["adapt", "--run", str(dense_run.run_dir), "--active", "--k", "3"]) == 2
    assert "--active asks the run's unseen users up to --budget questions" in capsys.readouterr().err


def test_a_run_without_any_method_that_adapts_has_nothing_to_ask(tmp_path, tiny_overrides, monkeypatch):
    from plrm.methods.bt import GlobalBT

    run = runner.fit("quickstart", tiny_overrides + ["~methods.lore", "methods.bt.max_epochs=1"], show=False)
    monkeypatch.setattr(GlobalBT, "adapts_new_users", "no")
    with pytest.raises(SessionError, match="no method of the run can adapt new users"):
        runner.active(run.run_dir, budget=3, show=False)
    assert not (run.run_dir / "active_results.json").exists()
