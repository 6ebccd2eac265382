"""Global RM (Bradley-Terry): one reward for everyone, new users served by the same model."""

import torch

from plrm import runner
from plrm.methods.bt import GlobalBT


def test_reward_is_linear_and_ignores_the_user():
    """v = (1, -2), e = (3, 1): r = 3 - 2 = 1 for every user."""
    model = GlobalBT(GlobalBT.Config(), n_users=3, feature_dim=2)
    with torch.no_grad():
        model.head_linear.weight.copy_(torch.tensor([[1.0, -2.0]]))
    e = torch.tensor([[3.0, 1.0]] * 3)
    torch.testing.assert_close(model.reward(e, torch.tensor([0, 1, 2])), torch.tensor([1.0, 1.0, 1.0]))


def test_loss_is_bradley_terry_nll():
    """r+ - r- = 1.5 - 0.5 = 1 -> loss = -log sigmoid(1) = log(1 + e^-1) = 0.31326."""
    model = GlobalBT(GlobalBT.Config(balance_users=False), n_users=1, feature_dim=1)
    with torch.no_grad():
        model.head_linear.weight.fill_(1.0)
    batch = {"user_idx": torch.tensor([0]), "chosen": torch.tensor([[1.5]]), "rejected": torch.tensor([[0.5]])}
    torch.testing.assert_close(model.loss(batch), torch.tensor(0.31326), atol=1e-5, rtol=0)


def test_adapt_is_a_no_op_and_unseen_accuracy_nears_the_non_personalized_oracle(tmp_path, tiny_overrides):
    result = runner.fit("quickstart", tiny_overrides + ["~methods.lore", "methods.bt.max_epochs=150", "methods.bt.batch_size=256",
                                                        "methods.bt.lr=0.02"], show=False)
    res = result.per_seed[0]
    assert res["bt"]["adapts_new_users"] == "generic"
    # the few-shot curve of a global model is flat: adapt changes nothing
    assert len({row["accuracy"] for row in res["bt"]["fewshot"]}) == 1
    oracle = res["oracle/non-personalized"]["unseen"]["accuracy"]
    assert abs(res["bt"]["unseen"]["accuracy"] - oracle) < 0.06


def test_difference_path_equals_item_path():
    """Scoring e+ - e- in one GEMM (linear_in_features) gives the same logits as scoring each item."""
    from plrm.methods.lore import LoRe

    torch.manual_seed(0)
    batch = {"user_idx": torch.tensor([0, 1, 1]), "chosen": torch.randn(3, 5), "rejected": torch.randn(3, 5)}
    lore = LoRe(LoRe.Config(rank=3), 2, 5)
    torch.nn.init.normal_(lore.user_logits)  # users with different weights
    for model in (GlobalBT(GlobalBT.Config(), 2, 5), lore):
        z_c, z_r = model.embed_pairs(batch)
        torch.testing.assert_close(model.preference_logit(batch), model.pair_logit(z_c, z_r, batch["user_idx"]))
