"""Similar-user RM (Dong et al., arXiv 2502.19158, §5): seen users' Individual RMs; a new user scored by the head of
the seen user whose head orders most of their support pairs as they did. Agreement and ties by hand, the
vectorized match equal to one user at a time, the no-support fallback, checkpoints, and known truth."""

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from plrm import runner
from plrm.data.datamodule import PreferenceDataModule
from plrm.errors import PlrmError
from plrm.eval.protocol import adapt_unseen, evaluate
from plrm.export import export
from plrm.methods.similar_user import SimilarUserRM
from plrm.recipe import build_section, load_recipe
from tests.conftest import calibration_world, export_support

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

D = 2


def _model(n_users=6, heads=((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)), **changes):
    """Seen users 0, 1, 2 with linear heads v_0 = (1, 0), v_1 = (0, 1), v_2 = (-1, 0); the others unseen."""
    torch.manual_seed(0)
    model = SimilarUserRM(SimilarUserRM.Config(**changes), n_users=n_users, feature_dim=D)
    with torch.no_grad():
        model.heads.weight[:len(heads)] = torch.tensor(heads)
    model.fit_seen_users(SimpleNamespace(users=torch.arange(len(heads))))
    return model


def _pairs(user_idx, diffs):
    """Support pairs whose chosen minus rejected features are ``diffs``."""
    diffs = torch.tensor(diffs)
    return {"user_idx": torch.tensor(user_idx), "chosen": diffs, "rejected": torch.zeros_like(diffs)}


def test_the_mean_head_is_the_seen_users_and_reward_follows_match():
    """Mean of the seen heads: (0, 1/3), in the last row. A user matched to seen user 1 is scored by v_1."""
    model = _model()
    torch.testing.assert_close(model.heads.weight[model.mean_row], torch.tensor([0.0, 1 / 3]))
    with torch.no_grad():
        model.match[4] = 1
    h = torch.tensor([[2.0, 5.0], [2.0, 5.0]])
    torch.testing.assert_close(model.reward(h, torch.tensor([0, 4])), torch.tensor([2.0, 5.0]))


def test_model_agreement_by_hand():
    """New user 3, pairs d = (1, 1), (1, -2), (-1, 1): v_0 orders them +, +, - (agrees 2/3 if the user chose every
    first response), v_1 +, -, + (2/3), v_2 -, -, + (1/3): a tie of users 0 and 1 goes to the lower index, 0.
    New user 4, pairs (0, 1), (1, 1): v_1 agrees on both (1.0), v_0 on one (0.5; a zero margin is no agreement)."""
    model = _model()
    support = _pairs([3, 3, 3, 4, 4], [(1.0, 1.0), (1.0, -2.0), (-1.0, 1.0), (0.0, 1.0), (1.0, 1.0)])
    owner = torch.tensor([0, 0, 0, 1, 1])
    scores = model.agreement(support, owner, 2, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(scores, torch.tensor([[2 / 3, 2 / 3, 1 / 3], [0.5, 1.0, 0.0]]))
    model.adapt(support, torch.tensor([3, 4]))
    assert model.match.tolist() == [0, 1, 2, 0, 1, 5]


def test_only_seen_users_are_candidates_and_adapt_changes_only_match():
    """An unseen user's row (even a perfect head) is never matched; heads and `seen` stay bit-identical."""
    model = _model()
    with torch.no_grad():
        model.heads.weight[5] = torch.tensor([5.0, 5.0])   # agrees with everything below, but user 5 is unseen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.adapt(_pairs([4, 4], [(1.0, 1.0), (-1.0, 2.0)]), torch.tensor([4]))
    assert model.match[4] == 1
    for key, value in model.state_dict().items():
        if key != "match":
            assert torch.equal(value, before[key]), key
    assert torch.equal(model.match[[0, 1, 2, 3, 5]], before["match"][[0, 1, 2, 3, 5]])


@pytest.mark.parametrize("hidden", [0, 3])
def test_vectorized_match_equals_one_user_at_a_time(hidden):
    torch.manual_seed(1)
    model = SimilarUserRM(SimilarUserRM.Config(hidden=hidden), n_users=12, feature_dim=D)
    with torch.no_grad():
        for name in model.heads.names:
            p = getattr(model.heads, name)
            p.copy_(torch.randn(p.shape))
    model.fit_seen_users(SimpleNamespace(users=torch.arange(8)))
    g = torch.Generator().manual_seed(2)
    users = torch.tensor([8, 9, 10, 11])
    user_idx = users.repeat_interleave(6)[torch.randperm(24, generator=g)]
    support = {"user_idx": user_idx, "chosen": torch.randn(24, D, generator=g), "rejected": torch.randn(24, D, generator=g)}
    model.adapt(support, users)
    together = model.match.clone()
    for u in users.tolist():
        rows = support["user_idx"] == u
        model.adapt({k: v[rows] for k, v in support.items()}, torch.tensor([u]))
        # by hand: each seen head's share of this user's pairs it orders correctly, the first best
        own = [(model.heads(support["chosen"][rows], torch.full((6,), s)) >
                model.heads(support["rejected"][rows], torch.full((6,), s))).float().mean() for s in range(8)]
        assert together[u] == int(torch.stack(own).argmax())
    assert torch.equal(model.match, together)


def test_a_new_user_without_support_pairs_gets_the_mean_head_with_a_warning_or_an_error():
    model = _model()
    support = _pairs([3, 3], [(0.0, 1.0), (1.0, 1.0)])                       # user 4 has no pairs
    with pytest.warns(UserWarning, match="1 of 2 new users have no support pairs; they are scored by the seen "
                                         "users' mean head"):
        model.adapt(support, torch.tensor([3, 4]))
    assert model.match[3] == 1 and model.match[4] == model.mean_row
    torch.testing.assert_close(model.reward(torch.tensor([[3.0, 6.0]]), torch.tensor([4])), torch.tensor([2.0]))
    assert model.diagnostics() == {"fallback_users": 1, "fallback": "mean"}
    strict = _model(fallback="error")
    with pytest.raises(PlrmError, match=r"1 new user\(s\) have no support pairs to match with a seen user \(user "
                                        r"indices \[4\]\); give them pairs, or set fallback: mean"):
        strict.adapt(support, torch.tensor([3, 4]))


def test_an_untrained_model_refuses_to_match():
    model = SimilarUserRM(SimilarUserRM.Config(), n_users=4, feature_dim=D)
    with pytest.raises(PlrmError, match="similar_user has no seen users' heads to match new users with"):
        model.adapt(_pairs([3], [(1.0, 0.0)]), torch.tensor([3]))


def test_export_head_is_each_users_matched_head():
    model = _model()
    with torch.no_grad():
        model.match[3:] = torch.tensor([2, 0, 6])
    modules, weights = model.export_head()
    assert modules == [] and weights.shape == (6, D)
    assert torch.equal(weights[3:], model.heads.weight[[2, 0, 6]])


def test_bad_options_name_their_key():
    problems: list[str] = []
    build_section(SimilarUserRM.Config, {"fallback": "random"}, "methods.similar_user", problems)
    assert problems and "methods.similar_user.fallback" in problems[0], problems


def _world(tmp_path, *extra):
    return calibration_world(tmp_path, "similar_user", *extra)


@pytest.mark.slow
def test_known_truth_on_the_low_rank_world(tmp_path):
    """Measured (seed 0): at k = 10 the matched seen user leans on the same true reward function as the new user
    (their largest Dirichlet weight) for 0.96 of the unseen users, and for all 81 users of one clear type (largest
    weight >= 0.8); the 4 misses are mixed users (largest weight <= 0.53) whose main type is nearly a tie. Unseen
    accuracy 0.982 (Individual RM from scratch on the same 10 pairs: 0.924; non-personalized oracle 0.807); seen
    0.992, the Individual RM's."""
    recipe = load_recipe("quickstart", _world(tmp_path))
    prepared = runner.prepare(recipe)
    split = runner.seed_split(recipe, prepared, 0)
    torch.manual_seed(0)
    model = runner.build_model(recipe, "similar_user", prepared, len(split.user_ids))
    dm = PreferenceDataModule(prepared, split, batch_size=model.config.batch_size)
    runner.make_trainer(recipe, "similar_user", model, dm).fit(model, datamodule=dm)
    adapt_unseen(model, dm, 10)
    weights = prepared.data.truth["user_weights"][[int(u.removeprefix("user")) for u in split.user_ids]]
    dominant = torch.from_numpy(weights.argmax(1))                                 # (U,) each user's main function
    unseen = torch.from_numpy(split.unseen_users)
    assert bool(model.seen[model.match[unseen]].all())
    same_type = dominant[model.match[unseen]] == dominant[unseen]                  # (U_unseen,)
    clear = torch.from_numpy(weights[unseen.numpy()].max(1) >= 0.8)               # users of one main type
    assert same_type.float().mean() >= 0.93
    assert same_type[clear].float().mean() >= 0.98

    ev = evaluate(model, dm, 10, [10], [0.1])
    assert ev.metrics["unseen"]["accuracy"] >= 0.95
    assert ev.metrics["seen"]["accuracy"] >= 0.97


@pytest.mark.slow
def test_reload_and_new_users_from_a_pairs_file(tmp_path, tiny_overrides):
    """`plrm test` reloads the same scores; `plrm adapt --pairs` builds a model of the new users only, takes the
    run's seen heads from the checkpoint, and saves just ``match``, equal to the same users' match in the run;
    `plrm export` of the adapted run reproduces its rewards."""
    overrides = tiny_overrides + ["~methods.lore", "~methods.bt", "+methods.similar_user={}",
                                  "methods.similar_user.max_steps=100"]
    result = runner.fit("quickstart", overrides, show=False)
    res = result.per_seed[0]["similar_user"]
    assert res["diagnostics"] == {"fallback_users": 0, "fallback": "mean"}
    again = runner.test(result.run_dir, show=False).per_seed[0]["similar_user"]
    assert again["seen"] == res["seen"] and again["unseen"] == res["unseen"]

    runner.adapt(result.run_dir, k=3, show=False)
    in_run = torch.load(result.run_dir / "seed-0" / "similar_user.adapted-k3.ckpt", weights_only=True)["state_dict"]
    path = tmp_path / "newcomers.jsonl"
    new_ids = export_support(result.run_dir, 3, path)
    split = pd.read_parquet(result.run_dir / "seed-0" / "split.parquet")
    out = runner.adapt_new_users(result.run_dir, path, show=False)
    saved = torch.load(result.run_dir / "seed-0" / "similar_user.users-newcomers.ckpt", weights_only=True)
    assert sorted(saved["state_dict"]) == ["match"]
    user_ids = sorted(split.user_id.unique())
    index = [user_ids.index(u) for u in new_ids]
    assert torch.equal(saved["state_dict"]["match"], in_run["match"][index])
    assert out["per_seed"]["0"]["similar_user"]["support_accuracy"] > 0.6
    # plrm export of the adapted checkpoint: W = each user's matched head, checked against the method's rewards
    exported = export(result.run_dir, tmp_path / "export", checkpoint="similar_user.adapted-k3.ckpt", show=False)
    assert (exported / "head.safetensors").is_file()
