"""Conditional RM ("When Personalization Meets Reality", Dong et al., arXiv 2502.19158, §3.2): the user id written
at the start of the prompt, one LoRA transformer for everyone.

The splice by hand and against tokenizing the prefixed text, the reward against one forward of that text, the chat
template's user-message position (and its refusal where it cannot be found), capabilities and options, unseen users
reported n/a, and a world only the user id can explain.

Measured once (torch 1 thread, 2-core machine under load average 6-7), thresholds frozen below with a margin: two
users with opposite length preferences (tests/conftest.py write_length_pairs, 48 pairs each, half of them test),
tiny random Qwen2 with LoRA (lr 1e-2 for adapters and head, batch 16), 10 epochs: Conditional RM 1.0 on both users
for each of 4 data seeds (6 epochs: 1.0 / 0.83); the Global RM on the same backbone 0.40-0.50 (mean over the two
users). Fit of both methods: 15-30 s.
"""

import copy

import pytest
import torch
from rich.console import Console

from plrm import capabilities as cap
from plrm import runner
from plrm.backbones.transformer import TransformerBackbone
from plrm.data.datamodule import PreparedData
from plrm.data.files import PreferenceFiles
from plrm.errors import RecipeError
from plrm.eval import report
from plrm.methods.base import CONDITIONED
from plrm.methods.conditional import ConditionalRM, UserPrefix, chat_opening, plain_opening
from tests.conftest import write_length_pairs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PREFIX = "User ID: {user_index}\n"


def _prepared(path, model="tiny-random:qwen2", **config) -> PreparedData:
    backbone = TransformerBackbone(TransformerBackbone.Config(model=model, dtype="float32", lora_dropout=0.0, **config))
    return PreparedData(PreferenceFiles(PreferenceFiles.Config(path=str(path))).load(), backbone)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_length_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", n_users=4, pairs_per_user=2)


@pytest.fixture(scope="module")
def worlds(pairs):
    """The same pairs read by a tiny Qwen2 with its chat template (auto), without it (never), and a tiny BERT."""
    return {"chat": _prepared(pairs), "plain": _prepared(pairs, chat_template="never"),
            "bert": _prepared(pairs, "tiny-random:bert")}


@pytest.fixture(scope="module")
def models(worlds):
    """A Conditional RM (seeded, eval mode) on each world."""
    out = {}
    for name, prepared in worlds.items():
        torch.manual_seed(0)
        out[name] = ConditionalRM(ConditionalRM.Config(), n_users=4, feature_dim=prepared.backbone.feature_dim,
                                  encoder=prepared.backbone.encoder()).eval()
    return out


def _rows(batch: dict) -> list[list[int]]:
    starts = (torch.cumsum(batch["lengths"], 0) - batch["lengths"]).tolist()
    return [batch["ids"][s:s + n].tolist() for s, n in zip(starts, batch["lengths"].tolist())]


def _texts(prepared, item_ids):
    """(prompt, response) texts of the backbone's items, as the dataset holds them."""
    table = prepared.data.pairs.data.table
    prompts, responses = {}, {}
    for column, item_of in (("chosen", prepared.chosen_item), ("rejected", prepared.rejected_item)):
        for item, prompt, response in zip(item_of.tolist(), table["prompt"].to_pylist(), table[column].to_pylist()):
            prompts[item], responses[item] = prompt, response
    return [prompts[i] for i in item_ids], [responses[i] for i in item_ids]


@pytest.mark.parametrize("world", ["plain", "chat"])
def test_golden_spliced_text(worlds, models, world):
    """Decoded back, the spliced row of user 3 is the prompt with "User ID: 3\\n" written in front of its text:
    at the very start without a chat template, at the start of the user message with one; the prompt length grows by
    the prefix's tokens and still ends where the response starts."""
    prepared = worlds[world]
    model, tok = models[world], prepared.backbone.tokenizer()
    (prompt,), (response,) = _texts(prepared, [0])
    spliced = model.prefix.splice(prepared.backbone.inputs(torch.tensor([0])), torch.tensor([3]))
    (row,) = _rows(spliced)
    head = {"plain": "User ID: 3\n" + prompt + "\n",
            "chat": "<|user|>\nUser ID: 3\n" + prompt + "\n<|assistant|>\n"}[world]
    assert tok.decode(row) == head + response
    assert tok.decode(row[:int(spliced["prompt_lengths"][0])]) == head
    added = len(tok("User ID: 3\n", add_special_tokens=False)["input_ids"])
    assert int(spliced["prompt_lengths"][0]) == int(prepared.backbone.inputs(torch.tensor([0]))["prompt_lengths"][0]) \
        + added


@pytest.mark.parametrize("world", ["plain", "chat", "bert"])
def test_splice_and_reward_equal_the_text_with_the_prefix_written_in(worlds, models, world):
    """Every item under every user: the spliced ids are the backbone's tokenization of "User ID: {u}\\n" + prompt
    (chat-rendered or plain, decoder or encoder), and the reward is the linear head on the encoder's pooled state of
    that tokenization; chunked scoring (2 rows per forward) gives the same rewards."""
    prepared, model = worlds[world], models[world]
    n_items = len(prepared.backbone.tokens.lengths)
    items = torch.arange(n_items).repeat(4)
    users = torch.arange(4).repeat_interleave(n_items)
    prompts, responses = _texts(prepared, items.tolist())
    written = prepared.backbone.tokenize([f"User ID: {u}\n{p}" for u, p in zip(users.tolist(), prompts)], responses)
    batch = prepared.backbone.inputs(items)
    spliced = model.prefix.splice(batch, users)
    assert _rows(spliced) == _rows(written)
    assert torch.equal(spliced["prompt_lengths"], written["prompt_lengths"])
    with torch.no_grad():
        expected = model.head_linear(model.encoder(written))[:, 0]
        torch.testing.assert_close(model.reward(batch, users), expected)
        chunk, model.encoder.inference_batch_size = model.encoder.inference_batch_size, 2
        try:
            torch.testing.assert_close(model.reward(batch, users), expected)
        finally:
            model.encoder.inference_batch_size = chunk
    assert model.reward_shape == CONDITIONED
    assert not [k for k in model.checkpoint_state() if k.startswith("prefix.")]  # rebuilt from the tokenizer


def test_positions_by_hand(worlds):
    """A tokenizer that puts a BOS (id 256) before plain text and a chat template opening with ids (258, 198): each row
    gets its user's prefix after the opening it starts with, at 0 when it starts with neither (a left-truncated
    prompt), and its other entries are kept."""
    tok = worlds["plain"].backbone.tokenizer()
    prefix = UserPrefix(tok, PREFIX, n_users=12)
    prefix.plain, prefix.chat = torch.tensor([256]), torch.tensor([258, 198])
    pre = {u: tok(f"User ID: {u}\n", add_special_tokens=False)["input_ids"] for u in (3, 11)}
    rows = [[256, 65, 66], [65, 66], [258, 198, 67, 68], [258, 69], [256]]
    users = [11, 3, 3, 11, 3]
    batch = {"ids": torch.tensor([t for r in rows for t in r]), "lengths": torch.tensor([len(r) for r in rows]),
             "prompt_lengths": torch.tensor([2, 1, 3, 1, 1]), "item": torch.arange(5)}
    out = prefix.splice(batch, torch.tensor(users))
    assert _rows(out) == [[256, *pre[11], 65, 66], [*pre[3], 65, 66], [258, 198, *pre[3], 67, 68],
                          [*pre[11], 258, 69], [256, *pre[3]]]
    assert out["prompt_lengths"].tolist() == [2 + len(pre[11]), 1 + len(pre[3]), 3 + len(pre[3]),
                                              1 + len(pre[11]), 1 + len(pre[3])]
    assert torch.equal(out["item"], batch["item"])
    assert pre[11] != pre[3] and len(pre[11]) == len(pre[3]) + 1


def test_openings_of_the_test_tokenizers(worlds):
    """The byte-level test tokenizer puts nothing before plain text; its chat template opens a user turn with
    <|user|> and a newline, and the message starts right after."""
    tok = worlds["plain"].backbone.tokenizer()
    assert plain_opening(tok) == []
    opening, located = chat_opening(tok)
    assert located and tok.decode(opening) == "<|user|>\n"


def test_a_template_that_rewrites_the_message_is_refused_with_the_key_to_change(worlds):
    """A chat template that upper-cases the message: where the message starts cannot be told from the ids, so rows
    rendered with it are refused (naming backbone.chat_template), while plain rows still get their prefix."""
    tok = copy.deepcopy(worlds["plain"].backbone.tokenizer())
    tok.chat_template = "<|user|>\n{{ messages[0]['content'] | upper }}\n<|assistant|>\n"
    assert chat_opening(tok) == (tok("<|user|>\n", add_special_tokens=False)["input_ids"], False)
    prefix = UserPrefix(tok, PREFIX, n_users=2)
    chat_row = tok(tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"]
    batch = {"ids": torch.tensor(chat_row), "lengths": torch.tensor([len(chat_row)])}
    with pytest.raises(RecipeError, match="backbone.chat_template: never"):
        prefix.splice(batch, torch.tensor([1]))
    plain = {"ids": torch.tensor([65, 66]), "lengths": torch.tensor([2])}
    assert _rows(prefix.splice(plain, torch.tensor([1])))[0][-2:] == [65, 66]


def test_feature_worlds_skip_it_by_capability_and_bad_options_name_their_key(worlds):
    from plrm.backbones.causal_lm import CausalLMBackbone
    from plrm.backbones.frozen import FrozenEncoder
    from plrm.backbones.precomputed import PrecomputedFeatures
    from plrm.data.lowrank import LowRankWorld

    for name, backbone in (("precomputed", PrecomputedFeatures), ("frozen_encoder", FrozenEncoder),
                           ("causal_lm", CausalLMBackbone)):
        data = LowRankWorld.provides if name == "precomputed" else {cap.TEXT, cap.USERS}
        problems = cap.cell_problems("conditional", ConditionalRM.needs, "data", data, name, backbone.needs,
                                     backbone.provides)
        assert problems and "token_states" in problems[0], name
    assert not cap.cell_problems("conditional", ConditionalRM.needs, "files", {cap.TEXT, cap.USERS}, "transformer",
                                 TransformerBackbone.needs, TransformerBackbone.provides)
    assert ConditionalRM.adapts_new_users == "no"
    with pytest.raises(RecipeError, match="use backbone 'transformer'"):
        ConditionalRM(ConditionalRM.Config(), n_users=2, feature_dim=4, encoder=torch.nn.Linear(4, 4))
    encoder = worlds["plain"].backbone.encoder()
    for template in ("User ID\n", "User {name}: {user_index}\n"):
        with pytest.raises(RecipeError, match="prefix_template must contain"):
            ConditionalRM(ConditionalRM.Config(prefix_template=template), n_users=2, feature_dim=64, encoder=encoder)
    frozen = TransformerBackbone(TransformerBackbone.Config(model="tiny-random:qwen2", finetune="frozen"))
    frozen.prepare(worlds["plain"].data, worlds["plain"].items)
    with pytest.warns(UserWarning, match="frozen transformer"):
        ConditionalRM(ConditionalRM.Config(), n_users=2, feature_dim=64, encoder=frozen.encoder())


def test_unseen_users_are_reported_na(tmp_path, text_recipe):
    """Half the users held out: the protocol gives them no number (None, no few-shot curve, no overall), and the
    printed table says n/a."""
    path = write_length_pairs(tmp_path / "pairs.jsonl", n_users=4, pairs_per_user=8)
    backbone = {"name": "transformer", "model": "tiny-random:qwen2", "lora_dropout": 0.0}
    result = runner.fit(text_recipe(tmp_path, path, backbone, {"conditional": {"max_steps": 1, "batch_size": 8}},
                                    split={"unseen_fraction": 0.5}), show=False)
    metrics = result.per_seed[0]["conditional"]
    assert metrics["seen"]["accuracy"] is not None
    assert metrics["unseen"] is None and metrics["overall"] is None and metrics["fewshot"] == []
    assert metrics["adapts_new_users"] == "no"
    assert set(result.per_user.loc[result.per_user["method"] == "conditional", "group"]) == {"seen"}
    summary = result.summary["conditional"]
    assert summary["unseen"] is None and summary["fewshot"] == {}
    console = Console(record=True, width=200)
    report.render(result.summary, k=3, console=console)
    row = next(line for line in console.export_text().splitlines() if "conditional" in line)
    assert row.count("n/a") == 4  # unseen, overall, worst 10%, AUROC


@pytest.mark.slow
def test_only_the_user_id_explains_opposite_users(tmp_path, text_recipe):
    """User 0 prefers the long response, user 1 the short one: the Conditional RM orders both users' seen test pairs
    (>= 0.9 each; measured 1.0), the Global RM on the same LoRA transformer cannot (0.5 +- 0.15 over the two
    users; measured 0.40-0.50)."""
    path = write_length_pairs(tmp_path / "pairs.jsonl", n_users=2, pairs_per_user=48)
    backbone = {"name": "transformer", "model": "tiny-random:qwen2", "lr": 1e-2, "lora_dropout": 0.0}
    settings = {"lr": 1e-2, "batch_size": 16, "max_epochs": 10}
    result = runner.fit(text_recipe(tmp_path, path, backbone, {"conditional": settings, "bt": settings},
                                    split={"unseen_fraction": 0.0}), show=False)
    per_user = result.per_user.set_index(["method", "user_id"])["accuracy"]
    assert per_user["conditional", "u00"] >= 0.9 and per_user["conditional", "u01"] >= 0.9, per_user
    assert abs(result.per_seed[0]["bt"]["seen"]["accuracy"] - 0.5) <= 0.15, per_user
