"""MRM (Cai et al., arXiv 2601.18731): reward formula, eq. 11 adaptation by hand, vectorized adaptation, the user-batch loader,
meta-training end to end with its ablations, and reload."""

import math

import numpy as np
import pytest
import torch

from plrm import registry, runner
from plrm.data.datamodule import PreferenceDataModule
from plrm.data.hooks import MethodHooks
from plrm.data.splits import TRAIN, make_split
from plrm.methods import meta
from plrm.methods.mrm import MRM
from plrm.recipe import RecipeError, build_section, load_recipe


def _model(**changes):
    return MRM(MRM.Config(**changes), n_users=3, feature_dim=2)


def test_reward_is_the_weighted_sum_of_base_functions():
    """A = [[1, 0], [1, 1]] (K=2, D=2), h = (2, 3): phi = (2, 5); user 1's w = (0.5, -1): r = 1 - 5 = -4."""
    model = _model()
    with torch.no_grad():
        model.basis.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        model.user_params[1] = torch.tensor([0.5, -1.0])
    torch.testing.assert_close(model.reward(torch.tensor([[2.0, 3.0]]), torch.tensor([1])), torch.tensor([-4.0]))


def test_adapt_is_one_gradient_step_from_w0_by_hand():
    """Eq. 11 with phi = identity, w0 = (1, 0), alpha = 0.5 and two support pairs d1 = (1, 1), d2 = (-1, 2):
    grad of eq. 7's sum of -log sigmoid(w.d) = -sum sigmoid(-w0.d) d = -(sigmoid(-1) (1, 1) + sigmoid(1) (-1, 2)).
    The other users' rows and every shared tensor stay as they were."""
    model = _model(inner_lr=0.5)
    with torch.no_grad():
        model.basis.weight.copy_(torch.eye(2))
        model.w0.copy_(torch.tensor([1.0, 0.0]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    support = {"user_idx": torch.tensor([2, 2]), "chosen": torch.tensor([[1.0, 1.0], [-1.0, 2.0]]),
               "rejected": torch.zeros(2, 2)}
    model.adapt(support, torch.tensor([2]))
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    grad = -np.array([s(-1) * 1 + s(1) * -1, s(-1) * 1 + s(1) * 2])
    np.testing.assert_allclose(model.user_params[2].detach().numpy(), np.array([1.0, 0.0]) - 0.5 * grad, rtol=1e-6)
    for k, v in model.state_dict().items():
        if k == "user_params":
            torch.testing.assert_close(v[:2], before[k][:2], rtol=0, atol=0)
        else:
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize("basis", ["linear", "mlp", "none"])
def test_adapt_vectorized_equals_one_user_at_a_time(basis):
    torch.manual_seed(0)
    model = MRM(MRM.Config(basis=basis, hidden=8, inner_steps=3, inner_lr=0.3), n_users=6, feature_dim=5)
    users = torch.tensor([0, 2, 3, 5])
    user_idx = torch.tensor([0, 0, 2, 3, 3, 3, 5])
    support = {"user_idx": user_idx, "chosen": torch.randn(7, 5), "rejected": torch.randn(7, 5)}
    model.adapt(support, users)
    together = model.user_params.detach().clone()
    for u in users.tolist():
        rows = user_idx == u
        model.adapt({k: v[rows] for k, v in support.items()}, torch.tensor([u]))
    torch.testing.assert_close(model.user_params, together, rtol=1e-5, atol=1e-6)
    # per-user rewards come from each user's own adapted parameters
    h = torch.randn(4, 5)
    r = model.reward(h, torch.tensor([0, 2, 3, 5]))
    for i, u in enumerate([0, 2, 3, 5]):
        torch.testing.assert_close(r[i], model.reward(h[i:i + 1], torch.tensor([u]))[0])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_meta_losses_equal_the_per_user_reference_on_the_same_episode(reduction):
    """MRM's batched episode (split, padding, vmapped inner loop, query losses) equals the per-user autograd
    loop run on the same support / query split, and so do the outer gradients (eq. 7's summed loss too)."""
    torch.manual_seed(1)
    model = MRM(MRM.Config(n_basis=3, inner_steps=2, inner_lr=0.4, loss_reduction=reduction), n_users=4,
                feature_dim=6)
    user_idx = torch.tensor([3, 0, 0, 3, 1, 0, 3, 3, 1, 0])
    batch = {"user_idx": user_idx, "chosen": torch.randn(10, 6), "rejected": torch.randn(10, 6),
             "pair_weight": torch.ones(10)}
    losses = model.meta_losses(batch, torch.Generator().manual_seed(5))
    model.outer_objective(losses).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    users, group = torch.unique(user_idx, return_inverse=True)
    support = meta.episode_split(group, len(users), 0.1, torch.Generator().manual_seed(5))
    d = model.basis(batch["chosen"] - batch["rejected"])
    fast = meta.reference_adapt(model.logit_fn, {"w": model.w0}, [d[support & (group == g)] for g in range(3)],
                                2, 0.4, reduction=reduction)
    nll = [-torch.nn.functional.logsigmoid(d[~support & (group == g)] @ f["w"]) for g, f in enumerate(fast)]
    ref = torch.stack([n.sum() if reduction == "sum" else n.mean() for n in nll])
    torch.testing.assert_close(losses, ref)
    model.outer_objective(ref).backward()
    for n, g in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-5, atol=1e-7)


def test_users_with_a_single_pair_have_no_query_and_the_step_is_skipped():
    """One pair per user: the episode puts it in support, no user has a query set, so there is no outer loss
    and training_step skips the batch (returns None) instead of averaging nothing."""
    model = MRM(MRM.Config(n_basis=2), n_users=3, feature_dim=4)
    batch = {"user_idx": torch.tensor([0, 2]), "chosen": torch.randn(2, 4), "rejected": torch.randn(2, 4),
             "pair_weight": torch.ones(2)}
    assert model.meta_losses(batch).shape == (0,)
    assert model.training_step(batch, 0) is None


def _prism_like(tmp_path, *extra):
    """A small PRISM-like world: many users with 7 noisy pairs each on their own random response pairs."""
    return ["data.n_users=300", "data.pairs_per_user=7", "data.n_train_prompts=1500", "data.n_test_prompts=60",
            "data.test_prompts_per_user=30", "data.feature_dim=16", "data.n_functions=3", "data.alpha=0.05",
            "data.labels=bradley_terry", "data.pair_choice=random", "split.k=5", "eval.k_list=[1,5]",
            "methods.bt.max_epochs=10", "~methods.lore", "+methods.mrm={}", "methods.mrm.n_basis=3",
            "methods.mrm.inner_lr=0.3", "methods.mrm.loss_reduction=mean", "methods.mrm.inner_steps=3", "methods.mrm.support_fraction=0.5",
            "methods.mrm.lr=0.005", "methods.mrm.max_epochs=10",
            "logger.kind=none", f"run.output_dir={tmp_path}", "trainer.progress_bar=false", *extra]


def test_user_batches_hold_every_train_pair_of_their_users_once_per_epoch(tmp_path):
    recipe = load_recipe("quickstart", _prism_like(tmp_path))
    prepared = runner.prepare(recipe)
    split = runner.seed_split(recipe, prepared, 0)
    dm = PreferenceDataModule(prepared, split, users_per_batch=4, seed=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == math.ceil(len(split.seen_users) / 4)
    rows = torch.cat([b["row"] for b in batches]).numpy()
    assert sorted(rows.tolist()) == sorted(split.rows(TRAIN).tolist())      # every train pair, once
    for b in batches:
        users = b["user_idx"]
        assert len(torch.unique(users)) <= 4
        assert (torch.diff(users) != 0).sum() == len(torch.unique(users)) - 1  # grouped by user


def test_mrm_learns_personal_rewards_and_reloads(tmp_path):
    result = runner.fit("quickstart", _prism_like(tmp_path), show=False)
    res = result.per_seed[0]
    assert res["mrm"]["unseen"]["accuracy"] > res["bt"]["unseen"]["accuracy"] + 0.03
    assert res["mrm"]["seen"]["accuracy"] > res["bt"]["seen"]["accuracy"] + 0.03
    assert len(res["mrm"]["diagnostics"]["w0"]) == 3
    again = runner.test(result.run_dir, show=False)
    assert again.per_seed[0]["mrm"]["unseen"] == res["mrm"]["unseen"]
    assert again.per_seed[0]["mrm"]["seen"] == res["mrm"]["seen"]


@pytest.mark.parametrize("variant", [
    ["methods.mrm.meta_learning=false", "methods.mrm.adapt_steps=50"],
    ["methods.mrm.rpo=false"],
    ["methods.mrm.gamma=0.0"],
    ["methods.mrm.basis=none", "methods.mrm.hidden=8"],
    ["methods.mrm.basis=mlp", "methods.mrm.hidden=8", "methods.mrm.first_order=true"],
])
def test_ablations_train_and_beat_chance(tmp_path, variant):
    result = runner.fit("quickstart", _prism_like(tmp_path, "~methods.bt", "methods.mrm.max_epochs=2", *variant),
                        show=False)
    res = result.per_seed[0]["mrm"]
    assert res["unseen"]["accuracy"] > 0.55 and res["seen"]["accuracy"] > 0.55


def test_no_meta_learning_trains_user_weights_and_fits_new_users_from_the_common_init(tmp_path):
    recipe = load_recipe("quickstart", _prism_like(tmp_path, "~methods.bt", "methods.mrm.meta_learning=false",
                                                   "methods.mrm.max_epochs=2"))
    prepared = runner.prepare(recipe)
    split = runner.seed_split(recipe, prepared, 0)
    torch.manual_seed(0)
    model = runner.build_model(recipe, "mrm", prepared, len(split.user_ids))
    assert model.users_per_batch is None and model.user_params.requires_grad
    init = model.w0.detach().clone()
    dm = PreferenceDataModule(prepared, split, batch_size=256, users_per_batch=model.users_per_batch)
    trainer = runner.make_trainer(recipe, "mrm", model, dm)
    trainer.fit(model, datamodule=dm)
    seen = torch.from_numpy(split.seen_users)
    assert not torch.allclose(model.user_params[seen], init.expand(len(seen), -1))   # trained per user
    unseen = torch.from_numpy(split.unseen_users)
    torch.testing.assert_close(model.user_params[unseen], init.expand(len(unseen), -1))  # untouched until adapt
    torch.testing.assert_close(model.w0, init)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("rho", "0", r"methods\.mrm\.rho: must be in \(0, 1\], got 0\.0"),
    ("gamma", "-1", r"methods\.mrm\.gamma: must be >= 0, got -1\.0"),
    ("support_fraction", "1.0", r"methods\.mrm\.support_fraction: must be in \(0, 1\), got 1\.0"),
    ("basis", "cnn", "basis"),
    ("loss_reduction", "median", "methods.mrm.loss_reduction: expected 'sum' | 'mean', got 'median'"),
    ("meta_batch_size", "0", r"methods\.mrm\.meta_batch_size: must be >= 1, got 0"),
    ("inner_steps", "-1", r"methods\.mrm\.inner_steps: must be >= 0, got -1"),
])
def test_config_errors_name_the_key(tmp_path, key, value, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("quickstart", _prism_like(tmp_path, f"methods.mrm.{key}={value}"))


def test_basis_none_needs_meta_learning():
    problems: list[str] = []
    build_section(MRM.Config, {"basis": "none", "meta_learning": False}, "methods.mrm", problems)
    assert problems == ["methods.mrm.basis: none with meta_learning: false would train a whole MLP per user from its "
                        "own few pairs; Table 2 removes one component at a time"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"rho": 0.0}, "methods.mrm.rho: must be in (0, 1], got 0.0"),
    ({"rho": 1.5}, "methods.mrm.rho: must be in (0, 1], got 1.5"),
    ({"gamma": -0.1}, "methods.mrm.gamma: must be >= 0, got -0.1"),
    ({"support_fraction": 1.0}, "methods.mrm.support_fraction: must be in (0, 1), got 1.0"),
    ({"meta_batch_size": 0}, "methods.mrm.meta_batch_size: must be >= 1, got 0"),
    ({"inner_steps": -1}, "methods.mrm.inner_steps: must be >= 0, got -1"),
])
def test_out_of_range_options_name_their_key(changes, message):
    problems: list[str] = []
    build_section(MRM.Config, changes, "methods.mrm", problems)
    assert problems == [message]


def test_personalllm_recipe_keeps_lowrank_personalllm_world_split_and_lore():
    """The MRM-vs-LoRe benchmark at PersonalLLM size runs on exactly the foundation recipe's data flags."""
    a, b = load_recipe("mrm_personalllm"), load_recipe("lowrank_personalllm")
    for section in ("data", "split", "eval"):
        assert a.raw[section] == b.raw[section], section
    assert a.raw["methods"]["lore"] == b.raw["methods"]["lore"]


def test_meta_training_checkpoints_and_resumes_under_lightning(tmp_path):
    """Lightning saves MRM's meta-parameters, per-user table and Adam state mid-training and resumes from them.
    The check fails if the checkpoint were ignored: the resumed model is built from another seed (so its own
    initialization differs), and at the start of resumed training it must hold exactly the saved w0, basis and
    per-user table, Adam's saved step count and moments, and the saved global step."""
    import lightning as L

    recipe = load_recipe("quickstart", _prism_like(tmp_path, "~methods.bt", "methods.mrm.max_epochs=1"))
    prepared = runner.prepare(recipe)
    split = make_split(prepared.data.pairs.data.table, 0, unseen_fraction=0.5, test_fraction=0.5, val_fraction=0.0,
                       need_support=recipe.split.k, source=recipe.data.name)
    torch.manual_seed(0)
    model = registry.methods.get("mrm")(recipe.methods["mrm"].config, n_users=len(split.user_ids),
                                        feature_dim=prepared.backbone.feature_dim)
    dm = PreferenceDataModule(prepared, split, users_per_batch=model.users_per_batch, seed=0)
    kwargs = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                  limit_val_batches=0, enable_checkpointing=False)
    first = L.Trainer(max_epochs=1, default_root_dir=tmp_path, callbacks=[MethodHooks(dm)], **kwargs)
    first.fit(model, datamodule=dm)
    ckpt = tmp_path / "mid.ckpt"
    first.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    saved_adam = state["optimizer_states"][0]["state"]
    assert {"w0", "basis.weight", "user_params"} <= set(state["state_dict"]) and saved_adam
    steps = first.global_step

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.step = trainer.global_step
            self.params = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.adam = {k: {n: t.clone() for n, t in v.items()} for k, v in trainer.optimizers[0].state_dict()["state"].items()}

    torch.manual_seed(123)  # another initialization: ignoring the checkpoint would start from it
    resumed_model = registry.methods.get("mrm")(recipe.methods["mrm"].config, n_users=len(split.user_ids),
                                                feature_dim=prepared.backbone.feature_dim)
    assert not torch.equal(resumed_model.w0, state["state_dict"]["w0"])
    probe = AtStart()
    second = L.Trainer(max_epochs=2, default_root_dir=tmp_path, callbacks=[probe, MethodHooks(dm)], **kwargs)
    second.fit(resumed_model, datamodule=dm, ckpt_path=ckpt)
    assert probe.step == steps and second.global_step == 2 * steps
    for name in ("w0", "basis.weight", "user_params"):
        assert torch.equal(probe.params[name], state["state_dict"][name]), name
    for key, moments in saved_adam.items():
        for n, t in moments.items():
            assert torch.equal(probe.adam[key][n], t), (key, n)
    assert not torch.equal(resumed_model.w0, state["state_dict"]["w0"])  # and it trained on from there


def test_a_plain_trainer_without_the_data_hooks_is_refused(tmp_path):
    """MRM's seen users get their state from fit_seen_users; a Trainer that would never call it must not train
    it silently wrong."""
    import lightning as L

    from plrm.errors import PlrmError

    recipe = load_recipe("quickstart", _prism_like(tmp_path, "~methods.bt", "methods.mrm.max_epochs=1"))
    prepared = runner.prepare(recipe)
    split = runner.seed_split(recipe, prepared, 0)
    model = runner.build_model(recipe, "mrm", prepared, len(split.user_ids))
    dm = PreferenceDataModule(prepared, split, users_per_batch=model.users_per_batch)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False)
    with pytest.raises(PlrmError, match=r"add plrm.data.hooks.MethodHooks\(datamodule\) to the Trainer's callbacks"):
        trainer.fit(model, datamodule=dm)


def test_mrm_copies_and_pickles_whatever_its_basis():
    import copy
    import pickle

    for basis in ("linear", "none"):
        model = MRM(MRM.Config(basis=basis, hidden=4), n_users=3, feature_dim=5)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert type(clone) is type(model)
            for k, v in model.state_dict().items():
                assert torch.equal(clone.state_dict()[k], v)
