"""PReF (papers/002): SVD initialization, the pointwise head fit, batched Newton for new users, end to end."""

import datasets
import numpy as np
import pytest
import scipy.optimize
import torch

from plrm import capabilities as cap
from plrm import runner
from plrm.backbones.precomputed import PrecomputedFeatures
from plrm.data.datamodule import PreferenceDataModule, PreparedData
from plrm.data.source import PreferenceData
from plrm.data.splits import make_split
from plrm.methods.pref import PReF, newton_logistic, ridge_head, svd_factors


def test_svd_recovers_a_planted_low_rank_sign_matrix():
    """A = sign(Lambda* Phi*) for rank-2 factors, every entry observed: the rank-2 SVD factors reproduce the
    signs of A almost everywhere, and its top-2 singular values carry most of A's energy."""
    rng = np.random.default_rng(0)
    n_users, n_pairs = 60, 80
    truth = rng.standard_normal((n_users, 2)) @ rng.standard_normal((2, n_pairs))
    signs = np.sign(truth)
    users, pairs = np.meshgrid(np.arange(n_users), np.arange(n_pairs), indexing="ij")
    lam, phi, s = svd_factors(users.ravel(), pairs.ravel(), signs.ravel(), n_users, n_pairs, rank=2)
    assert lam.shape == (60, 2) and phi.shape == (2, 80) and s[0] >= s[1] > 0
    agreement = (np.sign(lam @ phi) == signs).mean()
    assert agreement > 0.9, agreement
    assert (s ** 2).sum() / (signs ** 2).sum() > 0.6


def test_svd_rank_must_fit_the_matrix():
    with pytest.raises(ValueError, match=r"rank J=5 must be smaller than both the number of users \(4\)"):
        svd_factors(np.array([0, 1]), np.array([0, 1]), np.array([1.0, -1.0]), 4, 10, rank=5)


def test_ridge_head_primal_and_dual_forms_agree_and_fit_exact_targets():
    """Targets made by a known W are recovered (tiny ridge), whether P > D (primal) or P < D (dual)."""
    torch.manual_seed(0)
    w_true = torch.randn(3, 5)
    for n_pairs in (40, 4):
        x = torch.randn(n_pairs, 5)
        w = ridge_head(x, x @ w_true.T, ridge=1e-9)
        torch.testing.assert_close(x @ w.T, x @ w_true.T, rtol=1e-4, atol=1e-4)


def test_batched_newton_matches_a_per_user_scipy_reference():
    """Each user's lambda minimizes sum_i -log sigmoid(lambda . d_i) + beta/2 ||lambda||^2; scipy's L-BFGS on
    each user separately finds the same minimizer."""
    rng = np.random.default_rng(1)
    counts = [3, 7, 1, 5]
    owner = np.repeat(np.arange(4), counts)
    diffs = rng.standard_normal((len(owner), 3))
    beta = 0.5
    batched = newton_logistic(torch.from_numpy(diffs).float(), torch.from_numpy(owner), 4, beta, steps=30).numpy()
    for u in range(4):
        d = diffs[owner == u]

        def objective(lam, d=d):
            margins = d @ lam
            return np.logaddexp(0.0, -margins).sum() + 0.5 * beta * lam @ lam

        reference = scipy.optimize.minimize(objective, np.zeros(3), method="L-BFGS-B", options={"gtol": 1e-10}).x
        np.testing.assert_allclose(batched[u], reference, rtol=1e-3, atol=1e-4)


def test_pair_matrix_orients_every_users_answer_to_one_canonical_pair():
    """Two users answer the same item pair in opposite ways: one entry is +1, the other -1, same column."""
    columns = {"user_id": ["a", "b", "a", "b"], "prompt": ["x", "x", "z", "z"],
               "chosen": ["y1", "y2", "w1", "w1"], "rejected": ["y2", "y1", "w2", "w2"],
               "pair_id": ["x:1-2", "x:1-2", "z:1-2", "z:1-2"], "split": ["train", "train", "test", "test"],
               "chosen_emb": [[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [2.0, 0.0]],
               "rejected_emb": [[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [0.0, 2.0]]}
    data = PreferenceData("toy", datasets.Dataset.from_dict(columns), provides=frozenset({cap.TEXT}))
    prepared = PreparedData(data, PrecomputedFeatures(PrecomputedFeatures.Config()))
    split = make_split(data.pairs.data.table, 0, 0.0, 0.0, 0.0, need_support=0)
    pm = PreferenceDataModule(prepared, split).pair_matrix(np.arange(4))
    assert pm.n_pairs == 2
    assert pm.pair_idx.tolist() == [0, 0, 1, 1]
    assert pm.sign[0] == -pm.sign[1] and pm.sign[2] == pm.sign[3]


@pytest.mark.slow
def test_pref_learns_personal_rewards_and_svd_sets_the_spectrum(tmp_path, tiny_overrides):
    result = runner.fit("quickstart", tiny_overrides + [
        "methods.bt.max_epochs=10", "~methods.lore", "+methods.pref={}", "methods.pref.rank=3",
        "methods.pref.lr=0.01", "methods.pref.max_epochs=20"], show=False)
    res = result.per_seed[0]
    assert res["pref"]["unseen"]["accuracy"] > res["bt"]["unseen"]["accuracy"] + 0.03
    state = torch.load(result.run_dir / "seed-0" / "pref.ckpt", weights_only=True)["state_dict"]
    s = state["singular_values"]
    assert (s[:-1] >= s[1:]).all() and s[-1] > 0


def test_random_init_ablation_skips_the_svd(tmp_path, tiny_overrides):
    result = runner.fit("quickstart", tiny_overrides + [
        "~methods.bt", "~methods.lore", "+methods.pref={}", "methods.pref.rank=3", "methods.pref.init=random",
        "methods.pref.max_epochs=2"], show=False)
    state = torch.load(result.run_dir / "seed-0" / "pref.ckpt", weights_only=True)["state_dict"]
    assert (state["singular_values"] == 0).all()


def test_adapt_beta_must_be_positive():
    with pytest.raises(ValueError, match="adapt_beta must be > 0"):
        PReF.Config(adapt_beta=0.0)
