"""LoRe (Bose et al., arXiv 2504.14439): reward formula, eq. 11 adaptation, and recovery of the true subspace."""

import numpy as np
import pytest
import torch

from plrm import runner
from plrm.data.datamodule import PreferenceDataModule
from plrm.eval.protocol import adapt_unseen, evaluate
from plrm.methods.lore import LoRe
from plrm.recipe import load_recipe


def test_reward_is_simplex_weighted_basis():
    """A = [[1, 0], [0, 2], [1, 1]] (B=3, D=2), e = (1, 3): R = A e = (1, 6, 4).
    User 0 logits (0, 0, ln 2) -> w = (1/4, 1/4, 1/2): r = 1/4 + 6/4 + 2 = 3.75."""
    model = LoRe(LoRe.Config(rank=3), n_users=2, feature_dim=2)
    with torch.no_grad():
        model.basis.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
        model.user_logits[0] = torch.tensor([0.0, 0.0, float(np.log(2.0))])
    r = model.reward(torch.tensor([[1.0, 3.0]]), torch.tensor([0]))
    torch.testing.assert_close(r, torch.tensor([3.75]))
    # user 1 has zero logits: uniform weights, r = (1 + 6 + 4) / 3
    torch.testing.assert_close(model.reward(torch.tensor([[1.0, 3.0]]), torch.tensor([1])), torch.tensor([11 / 3]))


def _support(n_users=6, pairs=5, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    users = torch.arange(n_users)
    user_idx = users.repeat_interleave(pairs)
    return {"user_idx": user_idx, "chosen": torch.randn(len(user_idx), dim, generator=g),
            "rejected": torch.randn(len(user_idx), dim, generator=g)}, users


def test_adapt_vectorized_equals_one_user_at_a_time_and_touches_nothing_shared():
    support, users = _support()
    model = LoRe(LoRe.Config(rank=4, adapt_steps=40), n_users=10, feature_dim=8)
    basis_before = model.basis.weight.detach().clone()
    other_before = model.user_logits[6:].detach().clone()
    model.adapt(support, users)
    together = model.user_logits[:6].detach().clone()
    torch.testing.assert_close(model.basis.weight, basis_before, rtol=0, atol=0)   # bit-identical
    torch.testing.assert_close(model.user_logits[6:], other_before, rtol=0, atol=0)
    for u in range(6):
        rows = support["user_idx"] == u
        one = {k: v[rows] for k, v in support.items()}
        model.adapt(one, torch.tensor([u]))
        torch.testing.assert_close(model.user_logits[u], together[u], rtol=1e-5, atol=1e-6)


def test_adapt_recovers_each_users_weights_from_their_pairs():
    """Pairs labelled by a one-hot user (true w = e_j over a fixed basis): after eq. 11 the user's largest
    weight is on basis function j, and the support pairs are ordered correctly."""
    torch.manual_seed(0)
    model = LoRe(LoRe.Config(rank=4, adapt_steps=300), n_users=4, feature_dim=8)
    support, users = _support(n_users=4, pairs=20, dim=8)
    with torch.no_grad():
        basis_diff = model.basis(support["chosen"] - support["rejected"])            # (P, B)
        true_j = support["user_idx"]                                                 # user u likes function u
        flip = basis_diff.gather(1, true_j[:, None])[:, 0] < 0
    support["chosen"], support["rejected"] = (torch.where(flip[:, None], support["rejected"], support["chosen"]),
                                              torch.where(flip[:, None], support["chosen"], support["rejected"]))
    model.adapt(support, users)
    assert model.user_weights(users).argmax(-1).tolist() == [0, 1, 2, 3]
    assert (model.preference_logit(support) > 0).float().mean() > 0.9


def _principal_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    qa, _ = np.linalg.qr(a)
    qb, _ = np.linalg.qr(b)
    return np.linalg.svd(qa.T @ qb, compute_uv=False)


@pytest.mark.slow
def test_recovers_true_subspace_and_nears_oracle(tmp_path):
    """On a world with K=3 true directions in D=16, LoRe with B=3 learns a basis whose row space matches
    span(V): all principal cosines > 0.9; unseen accuracy is within 6 points of the (100%) personal oracle
    and far above the non-personalized one."""
    recipe = load_recipe("quickstart", [
        "data.n_users=300", "data.pairs_per_user=30", "data.n_train_prompts=1000", "data.n_test_prompts=100",
        "data.test_prompts_per_user=30", "data.feature_dim=16", "data.n_functions=3", "data.alpha=0.05",
        "~methods.bt", "methods.lore.rank=3", "methods.lore.max_epochs=30", "methods.lore.lr=0.05",
        "logger.kind=none", f"run.output_dir={tmp_path}", "trainer.progress_bar=false"])
    result = runner.fit(recipe, show=False)
    prepared = runner.prepare(recipe)
    ckpt = torch.load(tmp_path / "quickstart" / "seed-0" / "lore.ckpt", weights_only=True)
    basis = ckpt["state_dict"]["basis.weight"].numpy()                  # (B, D)
    cos = _principal_cosines(basis.T, prepared.data.truth["directions"])  # V: (D, K)
    assert cos.min() > 0.9, cos
    res = result.per_seed[0]
    assert res["lore"]["unseen"]["accuracy"] > res["oracle/personal"]["unseen"]["accuracy"] - 0.06
    assert res["lore"]["unseen"]["accuracy"] > res["oracle/non-personalized"]["unseen"]["accuracy"] + 0.05


def test_unseen_state_depends_only_on_support(tmp_path, tiny_overrides):
    """Adapting twice from the same k support pairs gives the same state; the test pairs never enter adapt."""
    recipe = load_recipe("quickstart", tiny_overrides)
    prepared = runner.prepare(recipe)
    split = runner.seed_split(recipe, prepared, 0)
    model = runner.build_model(recipe, "lore", prepared, len(split.user_ids))
    dm = PreferenceDataModule(prepared, split)
    adapt_unseen(model, dm, 3)
    first = model.user_logits.detach().clone()
    ev = evaluate(model, dm, 3, [1, 3], [0.1])
    torch.testing.assert_close(model.user_logits, first, rtol=0, atol=0)
    assert [r["k"] for r in ev.metrics["fewshot"]] == [1, 3]
    assert ev.metrics["unseen"]["accuracy"] == ev.metrics["fewshot"][1]["accuracy"]
