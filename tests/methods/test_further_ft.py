"""Further-fine-tuned RM (Dong et al., arXiv 2502.19158, §5): the Global RM's head, fine-tuned per user for
``ft_epochs`` epochs of ceil(k / ft_batch_size) Adam steps. lr 0 is the Global RM exactly, the step count, one Adam
step by hand, the per-user fit equal to a loop of per-user modules, and known truth on the low-rank world."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plrm import runner
from plrm.methods.bt import GlobalBT
from plrm.methods.further_ft import FurtherFineTunedRM
from plrm.recipe import build_section

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

D = 3


def _model(n_users=5, **changes):
    torch.manual_seed(0)
    return FurtherFineTunedRM(FurtherFineTunedRM.Config(**changes), n_users=n_users, feature_dim=D)


def _support(counts: dict[int, int], seed=1):
    g = torch.Generator().manual_seed(seed)
    user_idx = torch.cat([torch.full((n,), u) for u, n in counts.items()])
    user_idx = user_idx[torch.randperm(len(user_idx), generator=g)]                 # not grouped by user
    return {"user_idx": user_idx, "chosen": torch.randn(len(user_idx), D, generator=g),
            "rejected": torch.randn(len(user_idx), D, generator=g)}


def test_lr_zero_gives_the_global_rm_exactly():
    model = _model(ft_lr=0.0, ft_epochs=3)
    support = _support({0: 7, 2: 40, 3: 1})
    model.adapt(support, torch.tensor([0, 2, 3, 4]))
    v = model.global_head.weight[0]
    assert torch.equal(model.heads.weight[[0, 2, 3, 4]], v.expand(4, D))
    torch.testing.assert_close(model.preference_logit(support),
                               model.global_head(support["chosen"] - support["rejected"])[:, 0], rtol=0, atol=0)


def test_the_global_rm_is_bt_from_the_same_seed():
    """Same initial v as plrm's bt built after the same seed, and the same training loss on a batch."""
    model = _model()
    torch.manual_seed(0)
    bt = GlobalBT(GlobalBT.Config(), n_users=5, feature_dim=D)
    assert torch.equal(model.global_head.weight, bt.head_linear.weight)
    batch = {**_support({0: 3, 1: 5}), "pair_weight": torch.rand(8)}
    torch.testing.assert_close(model.loss(batch), bt.loss(batch), rtol=0, atol=0)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained == ["global_head.weight"]  # Lightning trains v only


def test_one_epoch_is_ceil_k_over_batch_size_steps(monkeypatch):
    """ft_batch_size 4, ft_epochs 2: a user with 3 pairs takes 2 * 1 steps, one with 10 pairs 2 * 3, one with 8
    pairs 2 * 2, one without pairs none (keeps v); one vectorized fit per distinct step count."""
    model = _model(n_users=6, ft_batch_size=4, ft_epochs=2, ft_lr=0.1)
    calls = []
    fit = model.heads.fit

    def spy(init, users, *args, **kwargs):
        calls.append((users.tolist(), args[3]))  # (chosen, rejected, owner, steps, lr)
        return fit(init, users, *args, **kwargs)

    monkeypatch.setattr(model.heads, "fit", spy)
    model.adapt(_support({1: 3, 2: 10, 4: 8, 5: 3}), torch.tensor([1, 2, 3, 4, 5]))
    assert sorted(calls) == [([1, 5], 2), ([2], 6), ([4], 4)]
    assert torch.equal(model.heads.weight[3], model.global_head.weight[0])
    assert model.finetune_steps(torch.tensor([0, 1, 4, 5, 30])).tolist() == [0, 2, 2, 4, 16]
    assert _model(ft_batch_size=32).finetune_steps(torch.tensor([30, 32, 33])).tolist() == [1, 1, 2]  # k = 30: one step


def test_one_step_by_hand():
    """Adam's first step moves each coordinate by lr * sign(gradient) (m_hat / sqrt(v_hat) = g / |g|). v = (1, 0, 0),
    one pair with h+ - h- = (1, 1, -1): gradient -sigmoid(-1) (1, 1, -1), so v_u = v + 0.1 (1, 1, -1)."""
    model = _model(n_users=1, ft_lr=0.1)
    with torch.no_grad():
        model.global_head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
    support = {"user_idx": torch.tensor([0]), "chosen": torch.tensor([[1.0, 1.0, -1.0]]), "rejected": torch.zeros(1, D)}
    model.adapt(support, torch.tensor([0]))
    torch.testing.assert_close(model.heads.weight[0], torch.tensor([1.1, 0.1, -0.1]), rtol=0, atol=1e-6)


def test_fine_tuning_equals_a_loop_of_per_user_modules_and_touches_nothing_shared():
    """Each user: an nn.Linear started at v, trained alone by Adam on their mean NLL for their number of steps."""
    model = _model(n_users=6, ft_batch_size=4, ft_lr=0.05)
    counts = {0: 9, 2: 4, 5: 13}
    support = _support(counts)
    users = torch.tensor([0, 2, 5])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.adapt(support, users)
    for u, n in counts.items():
        m = nn.Linear(D, 1, bias=False)
        m.weight.data = model.global_head.weight.detach().clone()
        opt = torch.optim.Adam(m.parameters(), lr=0.05)
        rows = support["user_idx"] == u
        for _ in range(-(-n // 4)):
            opt.zero_grad()
            (-F.logsigmoid((m(support["chosen"][rows]) - m(support["rejected"][rows]))[:, 0]).mean()).backward()
            opt.step()
        torch.testing.assert_close(model.heads.weight[u], m.weight.detach()[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(model.global_head.weight, before["global_head.weight"])
    assert torch.equal(model.heads.weight[[1, 3, 4]], before["heads.weight"][[1, 3, 4]])


def test_export_head_is_the_fine_tuned_heads():
    model = _model()
    modules, weights = model.export_head()
    assert modules == [] and torch.equal(weights, model.heads.weight)


@pytest.mark.parametrize(("changes", "message"), [
    ({"ft_batch_size": 0}, "methods.further_ft.ft_batch_size: must be >= 1, got 0"),
    ({"ft_epochs": -1}, "methods.further_ft.ft_epochs: must be >= 0, got -1"),
    ({"ft_lr": -0.1}, "methods.further_ft.ft_lr: must be >= 0, got -0.1"),
])
def test_bad_options_name_their_key(changes, message):
    problems: list[str] = []
    build_section(FurtherFineTunedRM.Config, changes, "methods.further_ft", problems)
    assert problems == [message]


@pytest.mark.slow
def test_known_truth_on_the_low_rank_world(tmp_path):
    """The calibration world (D = 16, K = 4, Dirichlet(0.05), 4 responses per prompt, 100 seen users x 50 pairs,
    k = 10), every Global RM trained as the quickstart's bt (lr 0.01, 20 epochs). Measured (seed 0): Global RM
    unseen 0.804 (non-personalized oracle 0.807); fine-tuned at ft_lr 0.05 for 1 epoch (1 step at k = 10) 0.840,
    10 epochs 0.908 (seen, 2 and 20 steps on 50 pairs: 0.885, 0.971). ft_lr 0 is bt exactly."""
    ft = "{name: further_ft, lr: 0.01, max_epochs: 20, ft_lr: %s, ft_epochs: %d}"
    result = runner.fit("quickstart", [
        "data.n_users=200", "data.pairs_per_user=50", "data.n_train_prompts=2000", "data.n_test_prompts=300",
        "data.test_prompts_per_user=100", "data.feature_dim=16", "data.n_functions=4", "data.alpha=0.05",
        "data.n_responses=4", "split.k=10", "eval.k_list=[10]", "~methods.lore",
        f"+methods.ft_lr0={ft % (0.0, 1)}", f"+methods.ft_1={ft % (0.05, 1)}", f"+methods.ft_10={ft % (0.05, 10)}",
        "logger.kind=none", f"run.output_dir={tmp_path}", "trainer.progress_bar=false"], show=False)
    res = result.per_seed[0]
    for group in ("seen", "unseen"):
        assert res["ft_lr0"][group] == res["bt"][group]
    seed_dir = result.run_dir / "seed-0"
    global_rm = torch.load(seed_dir / "bt.ckpt", weights_only=True)["state_dict"]["head_linear.weight"]
    assert torch.equal(torch.load(seed_dir / "ft_lr0.ckpt", weights_only=True)["state_dict"]["global_head.weight"],
                       global_rm)
    unseen = {m: res[m]["unseen"]["accuracy"] for m in ("bt", "ft_1", "ft_10")}
    assert unseen["ft_10"] >= unseen["ft_1"] + 0.03 and unseen["ft_1"] >= unseen["bt"] + 0.01, unseen
    assert res["ft_10"]["seen"]["accuracy"] > res["ft_1"]["seen"]["accuracy"] > res["bt"]["seen"]["accuracy"]
    again = runner.test(result.run_dir, show=False).per_seed[0]["ft_10"]
    assert again["seen"] == res["ft_10"]["seen"] and again["unseen"] == res["ft_10"]["unseen"]
