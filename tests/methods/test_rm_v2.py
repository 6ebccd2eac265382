"""Global RM-v2 (Selection Crisis, Rezk et al., arXiv 2512.23067, §6): the sequence reward is the masked mean of
per-token rewards, and as a decoding guide its prefix reward is the running mean, cached step by step."""

import json
import random

import pytest
import torch

from plrm import runner
from plrm.backbones.text import pad
from plrm.backbones.transformer import TransformerBackbone
from plrm.data.datamodule import PreparedData
from plrm.data.files import PreferenceFiles
from plrm.decoding.args import args_decode
from plrm.decoding.guides import MeanTokenGuide, guide_for
from plrm.decoding.policy import Policy, PolicyConfig
from plrm.errors import RecipeError
from plrm.methods.rm_v2 import GlobalRMv2
from tests.conftest import WORDS, write_length_pairs

PROMPTS = ["Tell me about the river.", "Hi", "Write one long sentence about the sea and the mountains, please."]


def test_running_means_by_hand():
    """A linear token head reading the first coordinate: r_t = h_t[0] = (1, 2, 3, 4) on a row of 4 positions whose
    prompt is 2 tokens long (and a padded row). pool_over response: prefix means (0, 0, 3, 3.5), reward 3.5;
    all: (1, 1.5, 2, 2.5)."""
    hidden = torch.zeros(2, 4, 3)
    hidden[:, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    prompts = torch.tensor([2, 1])
    for pool_over, row0, row1 in (("response", [0, 0, 3, 3.5], [0, 2, 2.5, 2.5]), ("all", [1, 1.5, 2, 2.5],
                                                                                  [1, 1.5, 2, 2])):
        model = GlobalRMv2(GlobalRMv2.Config(hidden=0, pool_over=pool_over), n_users=1, feature_dim=3)
        with torch.no_grad():
            model.token_head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
            model.token_head.bias.zero_()
        means = model.running_means(hidden, mask, prompts)
        torch.testing.assert_close(means[0], torch.tensor(row0))
        torch.testing.assert_close(means[1, :3], torch.tensor(row1[:3]))
        reward = model._mean_reward(hidden, mask, {"prompt_lengths": prompts})[:, 0]
        torch.testing.assert_close(reward, torch.tensor([row0[-1], row1[2]]))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    path = write_length_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", n_users=4, pairs_per_user=2)
    return PreparedData(PreferenceFiles(PreferenceFiles.Config(path=str(path))).load(),
                        TransformerBackbone(TransformerBackbone.Config(model="tiny-random:qwen2", dtype="float32",
                                                                       lora_dropout=0.0)))


def _model(prepared, pool_over="response", seed=0):
    torch.manual_seed(seed)
    model = GlobalRMv2(GlobalRMv2.Config(hidden=8, pool_over=pool_over), n_users=4,
                       feature_dim=prepared.backbone.feature_dim, encoder=prepared.backbone.encoder())
    return model.eval()


@pytest.mark.parametrize("pool_over", ["response", "all"])
def test_reward_is_the_masked_mean_of_token_rewards(prepared, pool_over):
    """Through the backbone: the encoder's every-token states, the token MLP, the mean over S; chunked
    (inference batches of 2 rows) and whole give the same numbers."""
    model = _model(prepared, pool_over)
    items = prepared.backbone.inputs(torch.arange(5))
    with torch.no_grad():
        ids, mask = pad(items, model.encoder.pad_id)
        r = model.token_head(model.encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state).squeeze(-1)
        col = torch.arange(ids.shape[1])
        counted = mask.bool() & ((col[None] >= items["prompt_lengths"][:, None]) if pool_over == "response"
                                 else torch.ones_like(mask.bool()))
        expected = (r * counted).sum(1) / counted.sum(1)
        torch.testing.assert_close(model.reward(items, torch.zeros(5, dtype=torch.long)), expected)
        model.encoder.inference_batch_size = 2
        torch.testing.assert_close(model.reward(items, torch.zeros(5, dtype=torch.long)), expected)


def test_frozen_features_are_refused_and_feature_worlds_skip_it_by_capability():
    from plrm import capabilities as cap
    from plrm.backbones.precomputed import PrecomputedFeatures
    from plrm.data.lowrank import LowRankWorld

    problems = cap.cell_problems("rm_v2", GlobalRMv2.needs, "lowrank_world", LowRankWorld.provides, "precomputed",
                                 PrecomputedFeatures.needs, PrecomputedFeatures.provides)
    assert problems and "token_states" in problems[0]
    assert not cap.cell_problems("rm_v2", GlobalRMv2.needs, "files", {cap.TEXT, cap.USERS}, "transformer",
                                 TransformerBackbone.needs, TransformerBackbone.provides)
    with pytest.raises(RecipeError, match="needs every token's hidden state"):
        GlobalRMv2(GlobalRMv2.Config(), n_users=2, feature_dim=4, encoder=torch.nn.Linear(4, 4))
    with pytest.raises(RecipeError, match="pool_over must be"):
        GlobalRMv2(GlobalRMv2.Config(pool_over="first"), n_users=2, feature_dim=4)


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return Policy.load(PolicyConfig(model="tiny-random:qwen2", dtype="float32"))


@pytest.mark.parametrize("pool_over", ["response", "all"])
def test_mean_guide_cached_args_equals_naive_and_scores_prefixes_like_one_forward(policy, prepared, pool_over):
    """The running mean carried in the cache equals re-running every prefix (naive ARGS, token for token), and the
    rewards ARGS added at each step are the prefix means that one forward over the finished response gives."""
    guide = guide_for(_model(prepared, pool_over, seed=3), prepared.backbone)
    assert isinstance(guide, MeanTokenGuide)
    p, g = policy.tokenize(PROMPTS), guide.tokenize(PROMPTS)
    users = torch.tensor([0, 1, 2])
    kwargs = dict(k=5, weight=30.0, max_new_tokens=10)
    cached = args_decode(policy, guide, p, g, users, **kwargs)
    naive = args_decode(policy, guide, p, g, users, cached=False, **kwargs)
    assert cached.tokens == naive.tokens
    torch.testing.assert_close(cached.scores, naive.scores, atol=1e-4, rtol=1e-4)
    assert cached.tokens != args_decode(policy, None, p, g, users, max_new_tokens=10).tokens
    stops = set(policy.stop_ids.tolist())
    for row in range(3):
        body = [t for t in cached.tokens[row] if t not in stops]
        start = int(g["lengths"][:row].sum())
        prompt = g["ids"][start:start + int(g["lengths"][row])].tolist()
        items = {"ids": torch.tensor(prompt + body), "lengths": torch.tensor([len(prompt) + len(body)]),
                 "prompt_lengths": torch.tensor([len(prompt)])}
        rewards, valid = guide.response_rewards(items, users[row:row + 1])
        torch.testing.assert_close(cached.rewards[row, :len(body)], rewards[0, :len(body)], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(guide.sequence_reward(items, users[row:row + 1]),
                                   guide.method.reward(items, users[row:row + 1]), atol=1e-5, rtol=1e-5)


def test_a_bidirectional_encoder_cannot_guide(tmp_path):
    path = write_length_pairs(tmp_path / "pairs.jsonl", n_users=2, pairs_per_user=2)
    bert = PreparedData(PreferenceFiles(PreferenceFiles.Config(path=str(path))).load(),
                        TransformerBackbone(TransformerBackbone.Config(model="tiny-random:bert", dtype="float32")))
    model = GlobalRMv2(GlobalRMv2.Config(hidden=4), n_users=2, feature_dim=bert.backbone.feature_dim,
                       encoder=bert.backbone.encoder())
    with pytest.raises(RecipeError, match="needs a causal transformer backbone"):
        guide_for(model, bert.backbone)


@pytest.mark.slow
def test_learns_a_word_preference(tmp_path, text_recipe):
    """Users prefer responses made of one half of the vocabulary: the mean of per-token rewards learns it on
    held-out pairs (a tiny random Qwen2 with LoRA)."""
    r = random.Random(0)
    liked, disliked = WORDS[:9], WORDS[9:]
    path = tmp_path / "words.jsonl"
    with open(path, "w") as f:
        for u in range(8):
            for _ in range(16):
                f.write(json.dumps({"user_id": f"u{u}", "prompt": f"Say {r.choice(WORDS)}.",
                                    "chosen": " ".join(r.choices(liked, k=r.randint(2, 6))),
                                    "rejected": " ".join(r.choices(disliked, k=r.randint(2, 6)))}) + "\n")
    backbone = {"name": "transformer", "model": "tiny-random:qwen2", "lr": 1e-3, "lora_dropout": 0.0}
    result = runner.fit(text_recipe(tmp_path, path, backbone, {"rm_v2": {"lr": 0.01, "hidden": 16,
                                                                        "batch_size": 16, "max_epochs": 3}}),
                        show=False)
    rm = result.per_seed[0]["rm_v2"]
    assert rm["seen"]["accuracy"] > 0.9 and rm["unseen"]["accuracy"] > 0.9, rm
