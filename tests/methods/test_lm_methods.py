"""P-DPO and GenARM on a tiny random causal LM: losses against hand-computed values, what each term trains, the
reference, adaptation, and training through the runner."""

import math

import pytest
import torch

from plrm.backbones.causal_lm import CausalLMBackbone
from plrm.data.datamodule import PreparedData
from plrm.data.files import PreferenceFiles
from plrm.methods.base import concat_inputs
from plrm.methods.genarm import GenARM, PersonalizedGenARM
from plrm.methods.losses import dpo_logits, dpo_loss
from plrm.methods.pdpo import PDPO
from plrm.methods.user_tokens import SoftUserTokens, vocabulary_rows


# ---- losses by hand ---------------------------------------------------------------------------------------------
def test_dpo_and_genarm_losses_by_hand():
    c, r, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0])
    logits = dpo_logits(c, r, rc, rr, beta=0.5)                      # 0.5 ((-3 + 4) - (-5 + 4)) = 1
    assert logits.item() == pytest.approx(1.0)
    assert dpo_loss(logits).item() == pytest.approx(math.log1p(math.exp(-1.0)))
    smoothed = 0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.exp(1.0))
    assert dpo_loss(logits, label_smoothing=0.1).item() == pytest.approx(smoothed)
    genarm = dpo_logits(c, r, beta=0.05)                              # no reference: 0.05 (-3 + 5) = 0.1
    assert genarm.item() == pytest.approx(0.1)
    assert dpo_loss(genarm, margin=0.5).item() == pytest.approx(math.log1p(math.exp(0.4)))
    weighted = dpo_loss(torch.tensor([1.0, -1.0]), pair_weight=torch.tensor([2.0, 0.0]))
    assert weighted.item() == pytest.approx(math.log1p(math.exp(-1.0)))  # (2 l(1) + 0) / 2


# ---- the user model ---------------------------------------------------------------------------------------------
def test_individual_user_tokens_are_generic_plus_offset():
    emb = torch.randn(50, 6)
    tokens = SoftUserTokens(n_users=3, n_tokens=2, dim=6, embeddings=emb)
    e = tokens(torch.tensor([2, 0]))
    assert e.shape == (2, 2, 6)
    torch.testing.assert_close(e[0], tokens.generic_tokens + tokens.offsets[2])
    torch.testing.assert_close(tokens.generic(2)[1], tokens.generic_tokens)
    rows = torch.cat([tokens.generic_tokens.detach(), tokens.offsets.detach().flatten(0, 1)])  # (U + 1) T_u rows
    matches = [int(torch.nonzero((emb == row).all(1)).squeeze()) for row in rows]
    assert len(set(matches)) == len(matches) == 8                      # distinct vocabulary rows
    assert torch.equal(vocabulary_rows(emb, 8), rows)                  # seeded: the same rows every time
    cluster = SoftUserTokens(n_users=3, n_tokens=2, dim=6, model="cluster", n_clusters=4, embeddings=emb)
    torch.testing.assert_close(cluster(torch.tensor([1]))[0], cluster.cluster_tokens.mean(0))  # uniform logits


# ---- the methods on a tiny LM ------------------------------------------------------------------------------------
@pytest.fixture
def prepared(length_pairs):
    data = PreferenceFiles(PreferenceFiles.Config(path=str(length_pairs))).load()
    return PreparedData(data, CausalLMBackbone(CausalLMBackbone.Config(model="tiny-random:qwen2", dtype="float32",
                                                                       lora_dropout=0.0)))


def _batch(prepared, rows, users):
    b = prepared.backbone
    return {"user_idx": torch.tensor(users), "pair_weight": torch.ones(len(rows)),
            "chosen": b.inputs(torch.tensor([2 * r for r in rows])),
            "rejected": b.inputs(torch.tensor([2 * r + 1 for r in rows]))}


def _method(cls, prepared, **options):
    torch.manual_seed(0)
    config = cls.Config(**options)
    return cls(config, n_users=4, feature_dim=prepared.backbone.feature_dim, encoder=prepared.backbone.encoder())


def test_pdpo_with_alpha_one_is_dpo_on_the_personal_rows(prepared):
    model = _method(PDPO, prepared, alpha=1.0, beta=0.5, balance_users=False)
    batch = _batch(prepared, [0, 1, 2], [1, 1, 1])
    lm = model.encoder
    prefix = model.user_tokens(batch["user_idx"])
    with torch.no_grad():
        pc, pr = lm.sequence_logprob(batch["chosen"], prefix), lm.sequence_logprob(batch["rejected"], prefix)
        with lm.reference():
            rc, rr = lm.sequence_logprob(batch["chosen"]), lm.sequence_logprob(batch["rejected"])
        expected = -torch.nn.functional.logsigmoid(0.5 * ((pc - rc) - (pr - rr))).mean()
        torch.testing.assert_close(model.loss(batch), expected, atol=1e-5, rtol=1e-5)


def test_pdpo_alpha_zero_trains_only_the_generic_user_and_one_half_trains_both(prepared):
    for alpha, offsets_move in ((0.0, False), (0.5, True)):
        model = _method(PDPO, prepared, alpha=alpha)
        model.loss(_batch(prepared, [0, 1], [1, 2])).backward()
        t = model.user_tokens
        assert t.generic_tokens.grad.abs().sum() > 0
        moved = t.offsets.grad is not None and bool(t.offsets.grad.abs().sum() > 0)
        assert moved == offsets_move
        if offsets_move:  # only the batch's users' rows
            assert t.offsets.grad[[0, 3]].abs().sum() == 0 and t.offsets.grad[[1, 2]].abs().sum() > 0


def test_reference_logprobs_are_computed_once_per_item(prepared):
    model = _method(PDPO, prepared)
    batch = _batch(prepared, [0, 1], [0, 1])
    items = concat_inputs(batch["chosen"], batch["rejected"])
    with torch.no_grad(), model.encoder.reference():
        expected = model.encoder.sequence_logprob(items)
    calls = []
    hook = model.encoder.model.register_forward_hook(lambda *a: calls.append(1))
    first = model.item_statistics(items)
    second = model.item_statistics(items)
    hook.remove()
    torch.testing.assert_close(first[:, 0], expected)
    assert torch.equal(first, second) and len(calls) == 1  # the second call reads the cache


def test_genarm_loss_is_one_forward_without_reference(prepared):
    model = _method(GenARM, prepared, beta=0.05, margin=0.2, balance_users=False)
    batch = _batch(prepared, [0, 1, 2], [0, 1, 2])
    calls, refs = [], []
    hook = model.encoder.model.register_forward_hook(lambda *a: calls.append(1))
    original = model.encoder.reference
    model.encoder.reference = lambda: refs.append(1) or original()
    loss = model.loss(batch)
    hook.remove()
    assert len(calls) == 1 and refs == []
    with torch.no_grad():
        c, r = model.encoder.sequence_logprob(batch["chosen"]), model.encoder.sequence_logprob(batch["rejected"])
    expected = -torch.nn.functional.logsigmoid(0.05 * (c - r) - 0.2).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.reward(batch["chosen"], batch["user_idx"]).detach(), 0.05 * c)


def test_personalized_genarm_is_the_soft_token_model_without_reference(prepared):
    model = _method(GenARM, prepared, personalized=True)
    assert isinstance(model, PersonalizedGenARM) and model.item_statistics(_batch(prepared, [0], [0])["chosen"]) is None


@pytest.mark.parametrize("cls, options", [(GenARM, {}), (GenARM, {"personalized": True}), (PDPO, {})])
def test_next_token_rewards_step_by_step_equal_the_token_rewards_of_whole_responses(prepared, cls, options):
    """The decoding API (prefill, then one cached step per token) scores every vocabulary item; at the tokens
    a response actually has, it gives what one forward over the whole response gives, reference included."""
    model = _method(cls, prepared, **options).eval()
    with torch.no_grad():  # a trained adapter (LoRA starts as the identity) and trained user offsets
        for name, p in model.named_parameters():
            if "lora_B" in name or "offsets" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    items, users = prepared.backbone.inputs(torch.arange(5)), torch.tensor([0, 1, 2, 3, 1])
    starts = items["lengths"].cumsum(0) - items["lengths"]
    responses = items["lengths"] - items["prompt_lengths"]
    with torch.no_grad():
        expected = model.token_rewards(items, users)                            # (5, R)
        state = model.prefill(model.encoder.prompts(items), users)
        got = torch.zeros_like(expected)
        for t in range(int(responses.max())):
            at = (starts + items["prompt_lengths"] + t).clamp_max(len(items["ids"]) - 1)
            tokens = torch.where(t < responses, items["ids"][at], 0)               # rows already done: any token
            rewards = model.next_token_rewards(state)
            assert rewards.shape == (5, prepared.backbone.tokenizer().vocab_size)
            got[:, t] = rewards.gather(1, tokens[:, None])[:, 0] * (t < responses)
            state = model.advance(state, tokens)
    assert (responses > 1).all() and len(set(responses.tolist())) > 1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls, options", [(PDPO, {}), (GenARM, {"personalized": True}),
                                          (PDPO, {"user_model": "cluster"})])
def test_adapt_fit_changes_only_the_new_users_tokens(prepared, cls, options):
    model = _method(cls, prepared, adapt_steps=5, adapt_lr=0.05, **options).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    support = _batch(prepared, [0, 1, 2, 3], [2, 2, 3, 3])
    with torch.no_grad():
        model.adapt(support, torch.tensor([2, 3]))
    after = model.state_dict()
    (name,) = model.user_state
    for key, value in after.items():
        if key == name:
            assert torch.equal(value[[0, 1]], before[key][[0, 1]]) and not torch.equal(value[[2, 3]],
                                                                                       before[key][[2, 3]])
        else:
            assert torch.equal(value, before[key]), key
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n or "user_tokens" in n)


def test_lm_methods_refuse_an_encoder_without_log_probabilities():
    from plrm.errors import RecipeError

    for cls, options, name in ((PDPO, {}, "PDPO"), (GenARM, {}, "GenARM"), (GenARM, {"personalized": True},
                                                                          "PersonalizedGenARM")):
        with pytest.raises(RecipeError, match=rf"{name} needs backbone causal_lm \(a causal LM's log-probabilities\); "
                                              r"got Identity"):
            cls(cls.Config(**options), n_users=2, feature_dim=4)


def test_causal_lm_options_refuse_an_encoder_architecture_and_a_missing_model():
    from plrm.recipe import build_section

    problems: list[str] = []
    build_section(CausalLMBackbone.Config, {"model": "m", "architecture": "encoder"}, "backbone", problems,
                  extra_valid=("name",))
    build_section(CausalLMBackbone.Config, {}, "backbone", problems)
    assert problems == [
        "backbone.architecture: encoder has no next-token head; causal_lm needs a decoder (Qwen2, LLaMA, SmolLM2, ...)",
        "backbone.model: is required: a Hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct), a local directory, or an offline "
        "alias (offline:minilm, offline:smollm2, tiny-random:qwen2, tiny-random:llama, tiny-random:bert)"]


# ---- through the runner ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pdpo_and_genarm_train_checkpoint_only_what_trained_and_reproduce(tmp_path, length_pairs, text_recipe):
    """Opposite length preferences: P-DPO's user tokens separate the two groups (a global GenARM cannot); the
    checkpoints hold the LoRA adapters and the user table, never the base LM; `plrm test` gives the same numbers."""
    from plrm import runner
    from plrm.checkpoint import load_checkpoint

    backbone = {"name": "causal_lm", "model": "tiny-random:qwen2", "lr": 3e-3, "lora_dropout": 0.0, "dtype": "float32"}
    methods = {"pdpo": {"lr": 0.01, "batch_size": 16, "max_epochs": 2, "adapt_steps": 20, "adapt_lr": 0.01},
               "genarm": {"batch_size": 16, "max_epochs": 1}}
    result = runner.fit(text_recipe(tmp_path, length_pairs, backbone, methods), show=False)
    seed = result.per_seed[0]
    assert seed["pdpo"]["seen"]["accuracy"] >= 0.9 and seed["pdpo"]["unseen"]["accuracy"] >= 0.9
    state = load_checkpoint(result.run_dir / "seed-0" / "pdpo.ckpt")["state_dict"]
    encoder = [k for k in state if k.startswith("encoder.")]
    assert encoder and all("lora_" in k for k in encoder)
    assert {"user_tokens.generic_tokens", "user_tokens.offsets"} <= set(state)
    assert all(k.startswith(("encoder.", "user_tokens.")) for k in state)
    genarm = load_checkpoint(result.run_dir / "seed-0" / "genarm.ckpt")["state_dict"]
    assert genarm and all("lora_" in k for k in genarm)
    tested = runner.test(result.run_dir, show=False).per_seed[0]
    for label in methods:
        for group in ("seen", "unseen"):
            assert tested[label][group] == seed[label][group], (label, group)

    # plrm export: the adapter, the user tokens and the recipe; the loader (no training code) gives the same rewards
    # and the same greedy generations as the training code
    from plrm.export import ExportedLMRewardModel, export, load_exported

    run = runner.Run.open(result.run_dir)
    user_ids, unseen = run.users(0)
    seen = {str(u) for u, new in zip(user_ids, unseen) if not new}
    whole = run.prepared.data.pairs.data.table.to_pydict()
    picked = [i for i, u in enumerate(whole["user_id"]) if u in seen][:6]  # seen users: trained user tokens
    table = {k: [v[i] for i in picked] for k, v in whole.items()}
    users = table["user_id"]
    rows = torch.tensor(picked)
    from plrm.errors import ExportError

    with pytest.raises(ExportError, match="--merge refused for a causal_lm method: its reward needs the base model "
                                          "without the adapter"):
        export(result.run_dir, tmp_path / "merged", method="pdpo", merge=True, show=False)
    assert not (tmp_path / "merged").exists()
    for label in methods:
        out = export(result.run_dir, tmp_path / f"export-{label}", method=label, show=False)
        assert (out / "adapter" / "adapter_config.json").is_file() and (out / "recipe.yaml").is_file()
        assert (out / "user_tokens.safetensors").is_file() == (label == "pdpo")
        loaded = load_exported(out)
        assert isinstance(loaded, ExportedLMRewardModel)
        with pytest.raises(ExportError, match="is a causal-LM export: it has no merged model"):
            load_exported(out, merged=True)
        model = run.load_method(label, 0)
        index = {u: i for i, u in enumerate(run.users(0)[0])}
        user_idx = torch.tensor([index[u] for u in users])
        items = run.prepared.backbone.inputs(run.prepared.chosen_item[rows])
        with torch.no_grad():
            expected = model.reward(items, user_idx)
        got = loaded.reward(table["prompt"], table["chosen"], users)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        if label == "pdpo":
            prefix = model.user_tokens(user_idx[:2])
            tok = run.prepared.backbone.tokenizer()
            want = [tok.decode(r, skip_special_tokens=True)
                    for r in model.encoder.generate(_prompts_of(model, items, 2), prefix, 8)]
            assert loaded.generate(table["prompt"][:2], users[:2], max_new_tokens=8) == want


def _prompts_of(model, items: dict, n: int) -> dict:
    from plrm.backbones.causal_lm import select_rows

    return model.encoder.prompts(select_rows(items, torch.arange(n)))
