"""PRM, P-RLHF's personalized reward model (Li et al., arXiv 2402.05133; Dong et al., arXiv 2502.19158 §3.2): the
alpha-weighted loss by hand, what each term trains, the refused linear head, new users (generic and fit_offset),
the known truth of a low-rank world, and the soft-token model on a tiny transformer.

Measured once (torch 1 thread, 2-core machine under load), thresholds frozen below with a margin:

* low-rank world (D 16, K 4, Dirichlet 0.05, 100 seen users x 50 pairs, k 10), 20 epochs: alpha 0.5 seen 0.998
  (personal oracle 1.0), generic user 0.826 vs the non-personalized oracle 0.835, unseen with fit_offset 0.996 vs
  the generic user's 0.813; alpha 0: personal 0.8352 = generic 0.8352.
* two opposite user groups on text, tiny Qwen2 transformer, 4 epochs: seen 1.0, unseen (fit_offset, k 3) 1.0, the
  generic user 0.48 over all users.
"""

import copy
import math
import pickle

import numpy as np
import pytest
import torch

from plrm import runner
from plrm.errors import RecipeError
from plrm.eval.metrics import summarize
from plrm.eval.protocol import adapt_unseen
from plrm.methods.base import CONDITIONED
from plrm.methods.prm import PRM, SoftTokenPRM
from plrm.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _sp(x: float) -> float:
    """-log sigmoid(x)."""
    return math.log1p(math.exp(-x))


# ---- the frozen-feature model by hand ------------------------------------------------------------------------------
def _toy(alpha: float) -> tuple[PRM, dict]:
    """D 2, H 2, T 1, user_dim 1. W_phi = I, b_1 = 0, W_e = (1, -1), w_2 = (1, 1): r(phi, e) = relu(phi_1 + e) +
    relu(phi_2 - e). e_0 = 0.5, o = (0.5, -1.5): user 0 has e = 1, user 1 has e = -1."""
    model = PRM(PRM.Config(alpha=alpha, hidden=2, user_dim=1), n_users=2, feature_dim=2)
    with torch.no_grad():
        model.item_layer.weight.copy_(torch.eye(2))
        model.item_layer.bias.zero_()
        model.user_layer.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model.out.weight.copy_(torch.tensor([[1.0, 1.0]]))
        model.user_tokens.generic_tokens.fill_(0.5)
        model.user_tokens.offsets.copy_(torch.tensor([0.5, -1.5]).view(2, 1, 1))
    batch = {"user_idx": torch.tensor([0, 1, 0, 1]),
             "chosen": torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]),
             "rejected": torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 3.0]]),
             "pair_weight": torch.tensor([2.0, 0.0, 1.0, 1.0])}
    return model, batch


def test_loss_on_a_four_row_toy_equals_the_hand_value():
    """Personal logits: row 1 (u0): r+ = relu(2) + relu(-1) = 2, r- = relu(1) + relu(0) = 1 -> 1; row 2 (u1): 2 - 1
    = 1; row 3 (u0): 3 - 1 = 2; row 4 (u1): 1 - 4 = -3. Generic (e_0 = 0.5): 1.5 - 1 = 0.5, 1 - 1.5 = -0.5,
    2.5 - 0.5 = 2, 0.5 - 3 = -2.5. Loss = alpha mean(w l_personal) + (1 - alpha) mean(w l_generic), with the
    pair weights w = (2, 0, 1, 1) in both terms."""
    w = [2.0, 0.0, 1.0, 1.0]
    personal = sum(wi * _sp(x) for wi, x in zip(w, [1.0, 1.0, 2.0, -3.0])) / 4
    generic = sum(wi * _sp(x) for wi, x in zip(w, [0.5, -0.5, 2.0, -2.5])) / 4
    for alpha in (0.5, 0.25, 1.0, 0.0):
        model, batch = _toy(alpha)
        torch.testing.assert_close(model.preference_logit(batch), torch.tensor([1.0, 1.0, 2.0, -3.0]))
        torch.testing.assert_close(model.generic_preference_logit(batch), torch.tensor([0.5, -0.5, 2.0, -2.5]))
        expected = alpha * personal + (1 - alpha) * generic
        assert model.loss(batch).item() == pytest.approx(expected, rel=1e-6), alpha


def _random_model(alpha: float, **options) -> tuple[PRM, dict]:
    torch.manual_seed(0)
    model = PRM(PRM.Config(alpha=alpha, **options), n_users=5, feature_dim=6)
    with torch.no_grad():  # trained-looking per-user state (offsets start at 0, cluster logits uniform)
        getattr(model.user_tokens, model.user_tokens.user_state[0]).normal_()
    g = torch.Generator().manual_seed(1)
    batch = {"user_idx": torch.tensor([0, 2, 2, 3, 0, 3]), "chosen": torch.randn(6, 6, generator=g),
             "rejected": torch.randn(6, 6, generator=g), "pair_weight": torch.ones(6)}
    return model, batch


def test_with_alpha_one_the_generic_user_learns_only_through_the_personal_rows():
    """e_u = e_0 + o_u, so through the personal rows d/de_0 = sum_u d/do_u; with alpha 1 that is all of e_0's
    gradient (the generic term is absent); with alpha 0.5 the generic term adds to it."""
    model, batch = _random_model(1.0)
    model.loss(batch).backward()
    tokens = model.user_tokens
    assert tokens.offsets.grad[[1, 4]].abs().sum() == 0 and tokens.offsets.grad[[0, 2, 3]].abs().min() > 0
    torch.testing.assert_close(tokens.generic_tokens.grad, tokens.offsets.grad.sum(0), rtol=1e-5, atol=1e-7)
    model, batch = _random_model(0.5)
    model.loss(batch).backward()
    tokens = model.user_tokens
    assert not torch.allclose(tokens.generic_tokens.grad, tokens.offsets.grad.sum(0), rtol=1e-3, atol=1e-5)


def test_with_alpha_zero_the_offsets_get_exactly_zero_gradient():
    model, batch = _random_model(0.0)
    model.loss(batch).backward()
    grad = model.user_tokens.offsets.grad
    assert grad is None or torch.count_nonzero(grad) == 0
    assert model.user_tokens.generic_tokens.grad.abs().sum() > 0 and model.item_layer.weight.grad.abs().sum() > 0


def test_a_linear_head_on_features_is_refused_with_the_reason():
    with pytest.raises(RecipeError, match=r"prm head: linear on frozen features cannot personalize: .* the user's "
                                          r"term v_e\^T e_u is the same for y\+ and y-, so it cancels"):
        PRM(PRM.Config(head="linear"), n_users=3, feature_dim=4)
    with pytest.raises(RecipeError, match="prm init: vocab copies rows of a transformer's input embeddings"):
        PRM(PRM.Config(init="vocab"), n_users=3, feature_dim=4)


def test_adapts_new_users_follows_the_adapt_option():
    assert PRM.adapts_new_users == "generic"
    assert PRM(PRM.Config(), n_users=2, feature_dim=3).adapts_new_users == "generic"
    assert PRM(PRM.Config(adapt="fit_offset"), n_users=2, feature_dim=3).adapts_new_users == "yes"
    assert PRM.adapts_new_users == "generic"  # the class (what `plrm list` shows) keeps the faithful default


# ---- new users --------------------------------------------------------------------------------------------------
def test_generic_adaptation_gives_new_users_exactly_the_generic_user():
    model, batch = _random_model(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.adapt(batch, torch.tensor([2, 3]))
    offsets = model.user_tokens.offsets
    assert torch.count_nonzero(offsets[[2, 3]]) == 0
    assert torch.equal(offsets[[0, 1, 4]], before["user_tokens.offsets"][[0, 1, 4]])
    for key, value in model.state_dict().items():
        if key != "user_tokens.offsets":
            assert torch.equal(value, before[key]), key
    rows = batch["user_idx"] != 0
    new = {k: v[rows] for k, v in batch.items()}
    with torch.no_grad():
        torch.testing.assert_close(model.preference_logit(new), model.generic_preference_logit(new))


@pytest.mark.parametrize("user_model", ["individual", "cluster"])
def test_fit_offset_is_vectorized_per_user_and_leaves_shared_tensors_bit_identical(user_model):
    model, batch = _random_model(0.5, adapt="fit_offset", adapt_steps=40, user_model=user_model)
    (name,) = model.user_state
    before = {k: v.clone() for k, v in model.state_dict().items()}
    users = torch.tensor([0, 2, 3])
    model.adapt(batch, users)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    for key, value in after.items():
        if key == name:
            assert torch.equal(value[[1, 4]], before[key][[1, 4]]) and not torch.equal(value[users], before[key][users])
        else:
            assert torch.equal(value, before[key]), key                 # bit-identical shared tensors
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    for u in users.tolist():  # one user at a time gives the same state
        rows = batch["user_idx"] == u
        model.adapt({k: v[rows] for k, v in batch.items()}, torch.tensor([u]))
        torch.testing.assert_close(model.state_dict()[name][u], after[name][u], rtol=1e-5, atol=1e-6)
    if user_model == "individual":  # 2 pairs per user and a free offset: the support pairs are fitted
        with torch.no_grad():
            assert (model.preference_logit(batch) > 0).all()


def test_prm_copies_and_pickles_as_itself():
    model, _ = _random_model(0.5)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone) is PRM
        for k, v in model.state_dict().items():
            assert torch.equal(clone.state_dict()[k], v)


# ---- the known truth of a low-rank world -------------------------------------------------------------------------
@pytest.mark.slow
def test_low_rank_world_personal_near_the_oracle_generic_near_the_population_and_alpha_zero_is_generic(tmp_path):
    """alpha 0.5: seen users near the personal oracle, the generic user near the non-personalized oracle, and
    fit_offset on unseen users far above the generic user (what ``adapt: generic`` gives them), with every shared
    tensor untouched by adaptation. alpha 0: o never moves, so every user's preferences are the generic user's."""
    recipe = load_recipe("quickstart", [
        "data.n_users=200", "data.pairs_per_user=50", "data.n_train_prompts=2000", "data.n_test_prompts=300",
        "data.test_prompts_per_user=50", "data.feature_dim=16", "data.n_functions=4", "data.alpha=0.05",
        "split.k=10", "eval.k_list=[10]", "~methods.bt", "~methods.lore", "+methods.prm={adapt: fit_offset}",
        "+methods.prm_alpha0={name: prm, alpha: 0.0}", "logger.kind=none", f"run.output_dir={tmp_path}",
        "trainer.progress_bar=false"])
    result = runner.fit(recipe, show=False)
    res = result.per_seed[0]
    assert res["prm"]["adapts_new_users"] == "yes" and res["prm_alpha0"]["adapts_new_users"] == "generic"
    run = runner.Run.open(result.run_dir)
    dm = run.datamodule(0)
    split = dm.split

    def generic_accuracy(model, unseen: bool) -> float:
        rows = dm.test_rows(unseen=unseen)
        with torch.no_grad():
            logits = model.generic_preference_logit(dm.batch(torch.from_numpy(rows)))
        users = split.unseen_users if unseen else split.seen_users
        return summarize(logits, dm.row_user[torch.from_numpy(rows)], users, dm.n_users, [])[0]["accuracy"]

    prm = run.load_method("prm", 0)
    oracle, population = res["oracle/personal"], res["oracle/non-personalized"]
    assert res["prm"]["seen"]["accuracy"] >= oracle["seen"]["accuracy"] - 0.03              # measured 0.998 vs 1.0
    generic_seen = generic_accuracy(prm, unseen=False)
    assert abs(generic_seen - population["seen"]["accuracy"]) <= 0.05                      # measured 0.826 vs 0.835
    generic_unseen = generic_accuracy(prm, unseen=True)
    assert res["prm"]["unseen"]["accuracy"] >= generic_unseen + 0.1                        # measured 0.996 vs 0.813

    before = {k: v.clone() for k, v in prm.state_dict().items()}
    adapt_unseen(prm, dm, 10)
    unseen = torch.from_numpy(split.unseen_users)
    seen = torch.from_numpy(split.seen_users)
    for key, value in prm.state_dict().items():
        if key == "user_tokens.offsets":
            assert torch.equal(value[seen], before[key][seen]) and not torch.equal(value[unseen], before[key][unseen])
        else:
            assert torch.equal(value, before[key]), key

    flat = run.load_method("prm_alpha0", 0)
    assert torch.count_nonzero(flat.user_tokens.offsets) == 0                              # o never had a gradient
    assert res["prm_alpha0"]["seen"]["accuracy"] == generic_accuracy(flat, unseen=False)   # measured 0.8352 both
    rows = dm.test_rows(unseen=False)
    batch = dm.batch(torch.from_numpy(rows))
    with torch.no_grad():
        torch.testing.assert_close(flat.preference_logit(batch), flat.generic_preference_logit(batch))


# ---- the soft-token model on a tiny transformer ------------------------------------------------------------------
@pytest.fixture
def prepared(length_pairs):
    from plrm.backbones.transformer import TransformerBackbone
    from plrm.data.datamodule import PreparedData
    from plrm.data.files import PreferenceFiles

    data = PreferenceFiles(PreferenceFiles.Config(path=str(length_pairs))).load()
    return PreparedData(data, TransformerBackbone(TransformerBackbone.Config(model="tiny-random:qwen2",
                                                                             dtype="float32", lora_dropout=0.0)))


def _lm_model(prepared, **options) -> SoftTokenPRM:
    torch.manual_seed(0)
    b = prepared.backbone
    model = PRM(PRM.Config(**options), n_users=4, feature_dim=b.feature_dim, encoder=b.encoder())
    with torch.no_grad():  # a trained-looking adapter (LoRA starts as the identity)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def _lm_batch(prepared, rows, users):
    b = prepared.backbone
    return {"user_idx": torch.tensor(users), "pair_weight": torch.ones(len(rows)),
            "chosen": b.inputs(torch.tensor([2 * r for r in rows])),
            "rejected": b.inputs(torch.tensor([2 * r + 1 for r in rows]))}


def select(items: dict, rows: list[int]) -> dict:
    from plrm.backbones.causal_lm import select_rows

    return select_rows(items, torch.tensor(rows))


def test_a_transformer_gets_soft_user_tokens_in_front_of_the_text_and_a_linear_head(prepared):
    """Each row's reward is v^T h at its last token of [e_u, prompt + response], whatever the padding of the batch
    around it (checked against a forward of the row alone)."""
    model = _lm_model(prepared).eval()
    assert type(model) is SoftTokenPRM and model.reward_shape == CONDITIONED and model.adapts_new_users == "generic"
    assert isinstance(model.v_head, torch.nn.Linear) and model.user_tokens.offsets.shape == (4, 1, 64)
    items, users = prepared.backbone.inputs(torch.arange(5)), torch.tensor([0, 1, 2, 3, 1])
    assert len(set(items["lengths"].tolist())) > 1
    with torch.no_grad():
        got = model.reward(items, users)
        tokens = model.user_tokens(users)
        lm = model.encoder.model
        starts = (items["lengths"].cumsum(0) - items["lengths"]).tolist()
        for i, (s, n) in enumerate(zip(starts, items["lengths"].tolist())):
            ids = items["ids"][s:s + n][None]
            embeds = torch.cat([tokens[i:i + 1], lm.get_input_embeddings()(ids)], dim=1)
            hidden = lm(inputs_embeds=embeds).last_hidden_state[0, -1]
            torch.testing.assert_close(got[i], model.v_head(hidden)[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[1], model.reward(select(items, [1]), torch.tensor([0])))  # the user matters


def test_transformer_loss_terms_and_their_gradients(prepared):
    """alpha 1: the mean BT NLL of the personal logits; alpha 0: the generic user's, with exactly zero gradient on
    o; alpha 0.5: their average."""
    batch = _lm_batch(prepared, [0, 1, 2], [1, 1, 3])
    losses = {}
    for alpha in (1.0, 0.0, 0.5):
        model = _lm_model(prepared, alpha=alpha, balance_users=False)
        loss = model.loss(batch)
        with torch.no_grad():
            personal = -torch.nn.functional.logsigmoid(model.preference_logit(batch)).mean()
            generic = -torch.nn.functional.logsigmoid(model.generic_preference_logit(batch)).mean()
        torch.testing.assert_close(loss.detach(), alpha * personal + (1 - alpha) * generic, rtol=1e-5, atol=1e-6)
        loss.backward()
        grad = model.user_tokens.offsets.grad
        if alpha == 0.0:
            assert grad is None or torch.count_nonzero(grad) == 0
        else:
            assert grad[[0, 2]].abs().sum() == 0 and grad[[1, 3]].abs().min() > 0
        assert model.user_tokens.generic_tokens.grad.abs().sum() > 0
        assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
        losses[alpha] = loss.item()
    assert losses[1.0] != losses[0.0]


@pytest.mark.parametrize("adapt", ["generic", "fit_offset"])
def test_transformer_adaptation_moves_only_the_new_users_rows(prepared, adapt):
    model = _lm_model(prepared, adapt=adapt, adapt_steps=5, adapt_lr=0.05).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    support = _lm_batch(prepared, [0, 1, 2, 3], [2, 2, 3, 3])
    model.adapt(support, torch.tensor([2, 3]))
    for key, value in model.state_dict().items():
        if key == "user_tokens.offsets":
            assert torch.equal(value[[0, 1]], before[key][[0, 1]]) and not torch.equal(value[[2, 3]],
                                                                                       before[key][[2, 3]])
        else:
            assert torch.equal(value, before[key]), key
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n or "user_tokens" in n)
    with torch.no_grad():
        personal, generic = model.preference_logit(support), model.generic_preference_logit(support)
    if adapt == "generic":
        torch.testing.assert_close(personal, generic)
    else:
        assert not torch.allclose(personal, generic)


@pytest.mark.slow
def test_transformer_prm_separates_opposite_users_and_its_generic_user_does_not(tmp_path, length_pairs, text_recipe):
    """Even users prefer the long response, odd users the short one: the soft tokens separate them (seen, and
    unseen after fit_offset on 3 pairs); the generic user cannot please both (about half right over all users)."""
    backbone = {"name": "transformer", "model": "tiny-random:qwen2", "lr": 3e-3, "lora_dropout": 0.0,
                "dtype": "float32"}
    methods = {"prm": {"lr": 0.05, "batch_size": 16, "max_epochs": 4, "adapt": "fit_offset", "adapt_steps": 10,
                       "adapt_lr": 0.1}}
    result = runner.fit(text_recipe(tmp_path, length_pairs, backbone, methods, eval={"k_list": [3]}), show=False)
    res = result.per_seed[0]["prm"]
    assert res["seen"]["accuracy"] >= 0.9 and res["unseen"]["accuracy"] >= 0.9            # measured 1.0 and 1.0
    run = runner.Run.open(result.run_dir)
    model, dm = run.load_method("prm", 0), run.datamodule(0)
    rows = np.concatenate([dm.test_rows(unseen=False), dm.test_rows(unseen=True)])
    with torch.no_grad():
        generic = model.generic_preference_logit(dm.batch(torch.from_numpy(rows)))
    assert abs((generic > 0).float().mean().item() - 0.5) <= 0.15                            # measured 0.48
