"""PReF (Shenfeld et al., arXiv 2503.06358): SVD initialization, the pointwise head fit, batched Newton for new
users, end to end."""

import datasets
import numpy as np
import pytest
import scipy.optimize
import torch

from plrm import capabilities as cap
from plrm import runner
from plrm.backbones.precomputed import PrecomputedFeatures
from plrm.data.datamodule import PreferenceDataModule, PreparedData
from plrm.data.hooks import SeenUsers
from plrm.data.source import PreferenceData
from plrm.data.splits import make_split
from plrm.methods.pref import PReF, elbow, newton_logistic, ridge_head, svd_factors
from plrm.recipe import build_section


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
def test_pref_learns_personal_rewards_and_reports_the_spectrum(tmp_path, tiny_overrides):
    result = runner.fit("quickstart", tiny_overrides + [
        "methods.bt.max_epochs=10", "~methods.lore", "+methods.pref={}", "methods.pref.rank=3",
        "methods.pref.lr=0.01", "methods.pref.max_epochs=20", "methods.pref.max_steps=-1",
        "methods.pref.batch_size=256"], show=False)
    res = result.per_seed[0]
    assert res["pref"]["unseen"]["accuracy"] > res["bt"]["unseen"]["accuracy"] + 0.03
    diag = res["pref"]["diagnostics"]
    s = np.asarray(diag["singular_values"])
    assert len(s) == 20 and (s[:-1] >= s[1:]).all() and s[-1] > 0
    assert diag["rank"] == 3 and diag["rank_rule"] == "fixed"


def tiny_dm(tiny_overrides):
    from plrm.recipe import load_recipe

    recipe = load_recipe("quickstart", tiny_overrides)
    prepared = runner.prepare(recipe)
    return PreferenceDataModule(prepared, runner.seed_split(recipe, prepared, 0))


def test_random_init_ablation_keeps_the_random_parameters_but_reports_the_spectrum(tiny_overrides):
    dm = tiny_dm(tiny_overrides)
    torch.manual_seed(0)
    model = PReF(PReF.Config(rank=3, init="random"), n_users=dm.n_users, feature_dim=dm.feature_dim)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.before_fit(SeenUsers(dm))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert len(model.diagnostics()["singular_values"]) == 20
    svd = PReF(PReF.Config(rank=3), n_users=dm.n_users, feature_dim=dm.feature_dim)
    svd.before_fit(SeenUsers(dm))
    assert not torch.allclose(svd.user_vectors, before["user_vectors"])


def test_elbow_keeps_the_components_before_the_bend():
    assert elbow(np.array([10, 9, 8, 7, 1, 1, 1, 1.0])) == 4
    assert elbow(np.array([10, 1, 1, 1, 1.0])) == 1
    assert elbow(np.array([5.0, 4.0])) == 2            # too short to bend: keep all
    assert elbow(np.array([3.0, 3.0, 3.0])) == 3       # flat: no elbow, keep all


def test_rank_elbow_finds_the_worlds_number_of_true_functions_and_reloads(tmp_path, tiny_overrides):
    """The tiny world has K=3 true reward functions; J from the elbow is 3, and `plrm test` rebuilds the
    J-sized model from the checkpoint although the recipe says 'elbow'."""
    result = runner.fit("quickstart", tiny_overrides + [
        "data.users_per_pair=10", "~methods.bt", "~methods.lore", "+methods.pref={}", "methods.pref.rank=elbow",
        "methods.pref.max_steps=50"], show=False)
    diag = result.per_seed[0]["pref"]["diagnostics"]
    assert diag["rank"] == 3 and diag["rank_rule"] == "elbow"
    again = runner.test(result.run_dir, show=False)
    assert again.per_seed[0]["pref"]["unseen"] == result.per_seed[0]["pref"]["unseen"]


def test_uncertainty_is_the_hessian_norm_of_a_hand_computed_2d_example():
    """J=2, phi = identity, lambda = (1, 0), beta = 1. One answered pair d = (2, 0): sigma'(2) = s (1 - s) with
    s = sigmoid(2), so H = diag(1 + 4 s (1 - s), 1). Candidates (1, 0) and (0, 1): ||d||_{H^-1} is
    1 / sqrt(1 + 4 s (1 - s)) and 1 -- the direction already asked about is the less uncertain one."""
    model = PReF(PReF.Config(rank=2, adapt_beta=1.0, acquisition="hessian_norm"), n_users=1, feature_dim=2)
    with torch.no_grad():
        model.phi.weight.copy_(torch.eye(2))
        model.user_vectors.copy_(torch.tensor([[1.0, 0.0]]))
    users = torch.tensor([0])
    answered = {"user_idx": torch.tensor([0]), "chosen": torch.tensor([[2.0, 0.0]]),
                "rejected": torch.tensor([[0.0, 0.0]])}
    candidates = {"user_idx": torch.tensor([0, 0]), "chosen": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
                  "rejected": torch.zeros(2, 2)}
    s = 1.0 / (1.0 + np.exp(-2.0))
    expected = [1.0 / np.sqrt(1.0 + 4.0 * s * (1.0 - s)), 1.0]
    np.testing.assert_allclose(model.uncertainty(answered, users, candidates).numpy(), expected, rtol=1e-6)
    # with nothing answered H = beta I: the score is ||d|| / sqrt(beta)
    none = {"user_idx": torch.tensor([], dtype=torch.long), "chosen": torch.zeros(0, 2), "rejected": torch.zeros(0, 2)}
    np.testing.assert_allclose(model.uncertainty(none, users, candidates).numpy(), [1.0, 1.0], rtol=1e-6)
    # the information gain weighs ||d||^2_{H^-1} by the candidate's own sigma'(lambda . d): sigma'(1) and sigma'(0)
    model.config.acquisition = "information"
    s1 = 1.0 / (1.0 + np.exp(-1.0))
    gain = [np.log1p(s1 * (1 - s1) * expected[0] ** 2), np.log1p(0.25)]
    np.testing.assert_allclose(model.uncertainty(answered, users, candidates).numpy(), gain, rtol=1e-6)


@pytest.mark.parametrize(("changes", "message"), [
    ({"adapt_beta": 0.0}, "methods.pref.adapt_beta: must be > 0, got 0.0"),
    ({"rank": 0}, "methods.pref.rank: must be >= 1, got 0"),
    ({"max_steps": -1, "max_epochs": -1}, "methods.pref.max_epochs: -1 together with max_steps: -1 never stops "
                                          "training; give one of them a limit"),
])
def test_config_errors(changes, message):
    problems: list[str] = []
    build_section(PReF.Config, changes, "methods.pref", problems)
    assert problems == [message]
    problems = []
    build_section(PReF.Config, {"rank": "elbow"}, "methods.pref", problems)
    assert problems == []


def test_svd_factors_is_reproducible_on_a_degenerate_spectrum():
    """Sparse data: each user labels their own 10 pairs, so every singular value is sqrt(10). ARPACK returned
    different vectors on each call here; the factors must be identical call after call."""
    rng = np.random.default_rng(0)
    user = np.repeat(np.arange(60), 10)
    sign = rng.choice([-1.0, 1.0], 600)
    first = svd_factors(user, np.arange(600), sign, 60, 600, 20)
    np.testing.assert_allclose(first[2], np.sqrt(10.0), rtol=1e-5)
    for _ in range(3):
        again = svd_factors(user, np.arange(600), sign, 60, 600, 20)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)


def test_svd_factors_converges_on_a_dense_world_with_a_flat_spectral_tail():
    """1,000 labelling users x 300 of 6,000 shared pairs (pref_dense at 2,000 users): PROPACK's default budget of
    10 J Lanczos steps does not converge for J = 20; the retry does, and equals LAPACK's dense SVD."""
    rng = np.random.default_rng(0)
    n_users, n_pairs, k = 2000, 6000, 4
    lam, phi = rng.dirichlet([0.1] * k, size=n_users), rng.normal(size=(k, n_pairs))
    user = np.repeat(np.arange(1000), 300)
    pair = np.concatenate([rng.choice(n_pairs, 300, replace=False) for _ in range(1000)])
    logit = 3 * (lam[user] * phi[:, pair].T).sum(1)
    sign = np.where(rng.random(len(user)) < 1 / (1 + np.exp(-logit)), 1.0, -1.0)
    _, _, s = svd_factors(user, pair, sign, n_users, n_pairs, rank=20)
    dense = np.zeros((n_users, n_pairs))
    dense[user, pair] = sign
    np.testing.assert_allclose(s, np.linalg.svd(dense, compute_uv=False)[:20], rtol=1e-4)


def test_propack_retries_with_budgets_capped_by_memory(monkeypatch):
    """At 100,000 users x 100,001 pairs a retry with min(users, pairs) Lanczos steps would allocate 74.5 GiB; the
    retries stop at the budget whose bases fit PROPACK_WORK_BYTES, then the error names the matrix."""
    import scipy.sparse

    from plrm.methods import pref

    budgets = []

    def never_converges(matrix, k, solver, random_state, maxiter=None):
        budgets.append(maxiter)
        raise np.linalg.LinAlgError(f"k={k} singular triplets did not converge within kmax={maxiter}")

    monkeypatch.setattr(pref.scipy.sparse.linalg, "svds", never_converges)
    matrix = scipy.sparse.csr_matrix((100_000, 100_001))
    with pytest.raises(np.linalg.LinAlgError, match=r"100000 x 100001 training sign matrix did not converge in "
                                                    r"1342 Lanczos steps.*rank: J\) or init: random"):
        pref._propack(matrix, 10)
    assert budgets == [None, 400, 1342]                  # 2 GiB / (8 x 200,001 numbers per step) = 1342 steps
