"""The attribute text world, P-SOUPS / Attributes-like: real text whose preferences are known (README "Data").

Prompts are templated requests about everyday topics ("Give me advice on composting."), each a distinct
(topic, request, lead-in) combination. Every prompt has ``n_responses`` responses, and each response is the
prompt's content rendered at one pole of each named attribute, a(y) in {-1, +1}^A:

==========  ================================================  ==================================================
attribute   pole -1                                           pole +1
==========  ================================================  ==================================================
length      short: one sentence                               long: three to five sentences
formality   casual: "hey" / "basically" openers, contractions  formal: no contractions, no apostrophes at all
expertise   plain: simple words and "like ..." analogies       technical: the topic's jargon in every sentence
style       prose: one paragraph                              list: one "- " bullet per sentence
tone        neutral: no exclamation mark                      enthusiastic: an excited opener, "!" endings
==========  ================================================  ==================================================

An attribute left out of ``attributes`` stays at a fixed pole (long, formal, plain, prose, neutral, unless
``fixed_poles`` names the other one: ``[short]`` makes every response one sentence). The
responses of a prompt share everything else (topic, sentences, analogies, jargon, openers, all drawn per
prompt from seeded pools), so they differ only in their attributes; responses of different prompts differ in
wording. Each prompt's attribute vectors are distinct: one random combination, its opposite (so every
attribute varies within every prompt), and ``n_responses - 2`` more distinct random ones.

A user prefers the poles of ``attributes_per_user`` attributes: w_u in R^A is zero elsewhere, with a random
sign and a magnitude ~ U[0.5, 1.5] on each of theirs; their true reward is r_u(y) = w_u . a(y), with no noise.
Signs are drawn per user, so user groups oppose each other and the population-mean weights are close to
zero: the non-personalized oracle is near chance, far below the personal one (When Personalization Meets
Reality, Dong et al., arXiv 2502.19158, §4.2).

Pairs. Each user labels ``pairs_per_user`` pairs on distinct train prompts and ``test_pairs_per_user`` pairs
on distinct test prompts (the 'split' column). A pair is a random pair of the prompt's responses among those
the user does not rate equally: tied pairs (responses that differ only in attributes the user ignores) are
never drawn, so every label is strict. The opposite combinations of each prompt guarantee such a pair. With
``labels: extremes`` the chosen response is the user's truly preferred one; with ``labels: bradley_terry`` the
same pair's order is drawn with P = sigmoid(delta / bt_temperature). ``pair_id`` names the item pair
("<prompt>:<low>-<high>", response indices) across users; ``reference`` is the user's best response to the
row's prompt (ties between responses that differ only in attributes the user ignores go to the lowest index).

Two oracles are scored on every row, as in the low-rank world: 'oracle/personal' (the user's own weights) and
'oracle/non-personalized' (the population-mean weights).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from plrm import capabilities as cap
from plrm.config import opt
from plrm.data.lowrank import label_pairs
from plrm.data.source import DatasetSource, PreferenceData
from plrm.lazy import lazy_module
from plrm.registry import datasets as dataset_registry

pd = lazy_module("pandas")  # imported at first use: `plrm list` imports this module, reads no data

# name -> (pole -1, pole +1)
ATTRIBUTES: dict[str, tuple[str, str]] = {
    "length": ("short", "long"),
    "formality": ("casual", "formal"),
    "expertise": ("plain", "technical"),
    "style": ("prose", "list"),
    "tone": ("neutral", "enthusiastic"),
}
# the pole an attribute keeps when it is not one of the world's attributes
FIXED_POLE = {"length": 1, "formality": 1, "expertise": -1, "style": -1, "tone": -1}
POLE_OF = {pole: name for name, poles in ATTRIBUTES.items() for pole in poles}  # pole name -> attribute
WEIGHT_RANGE = (0.5, 1.5)  # magnitude of a user's weight on each attribute they care about
TIE_TOLERANCE = 1e-9       # reward differences below this are ties (only exact ties occur: rewards are sums of +-w)

# topic -> three jargon terms (noun phrases) that technical responses use
TOPICS: dict[str, tuple[str, str, str]] = {
    "budgeting": ("cash flow", "fixed and variable expenses", "zero-based budgeting"),
    "saving for retirement": ("compound interest", "asset allocation", "employer matching contributions"),
    "investing in index funds": ("expense ratios", "diversification", "dollar-cost averaging"),
    "paying off debt": ("the avalanche method", "annual percentage rates", "the debt-to-income ratio"),
    "building an emergency fund": ("liquidity", "high-yield savings accounts", "the monthly burn rate"),
    "improving a credit score": ("credit utilization", "payment history", "hard inquiries"),
    "baking bread": ("gluten development", "the hydration ratio", "fermentation time"),
    "cooking rice": ("starch gelatinization", "the water-to-rice ratio", "residual steam"),
    "meal prepping": ("batch cooking", "food safety temperatures", "macronutrient balance"),
    "making soup stock": ("collagen extraction", "reduction", "the mirepoix"),
    "roasting vegetables": ("the Maillard reaction", "caramelization", "surface moisture"),
    "sharpening kitchen knives": ("the edge angle", "whetstone grit", "burr formation"),
    "strength training": ("progressive overload", "hypertrophy", "rep ranges"),
    "training for a marathon": ("the aerobic base", "the lactate threshold", "tapering"),
    "stretching": ("dynamic warm-ups", "range of motion", "the stretch reflex"),
    "interval training": ("VO2 max", "work-to-rest ratios", "heart rate zones"),
    "recovering after workouts": ("muscle protein synthesis", "delayed onset muscle soreness", "active recovery"),
    "improving posture": ("spinal alignment", "core stabilization", "thoracic mobility"),
    "using version control": ("the commit history", "branching strategies", "merge conflicts"),
    "writing unit tests": ("test coverage", "mocking", "regression testing"),
    "backing up files": ("incremental backups", "offsite redundancy", "recovery point objectives"),
    "using a password manager": ("end-to-end encryption", "password entropy", "two-factor authentication"),
    "learning to code": ("control flow", "data structures", "debugging workflows"),
    "speeding up a slow website": ("request latency", "caching layers", "asset compression"),
    "composting": ("the carbon-to-nitrogen ratio", "aerobic decomposition", "moisture content"),
    "growing tomatoes": ("soil pH", "indeterminate varieties", "blossom end rot"),
    "caring for houseplants": ("light intensity", "root aeration", "substrate drainage"),
    "starting seeds indoors": ("germination temperature", "damping off", "hardening off"),
    "pruning fruit trees": ("apical dominance", "scaffold branches", "dormant pruning"),
    "learning guitar": ("chord voicings", "fretting technique", "scale patterns"),
    "practicing piano": ("finger independence", "sight reading", "metronome work"),
    "recording music at home": ("gain staging", "room acoustics", "the signal-to-noise ratio"),
    "singing in tune": ("pitch matching", "breath support", "vocal resonance"),
    "sleep hygiene": ("the circadian rhythm", "sleep latency", "REM cycles"),
    "managing stress": ("cortisol levels", "cognitive reappraisal", "the relaxation response"),
    "time management": ("time blocking", "task prioritization", "context switching costs"),
    "public speaking": ("vocal projection", "audience analysis", "rhetorical structure"),
    "learning a new language": ("spaced repetition", "comprehensible input", "phonetic awareness"),
    "writing a resume": ("applicant tracking systems", "quantified achievements", "keyword alignment"),
    "negotiating a salary": ("anchoring", "market benchmarks", "total compensation"),
    "planning a budget trip": ("shoulder season pricing", "fare alerts", "the total trip cost"),
    "taking better photos": ("the exposure triangle", "depth of field", "compositional balance"),
}

# request template -> lead sentences (plain, technical) that answer it; the first sentence of every response
REQUESTS: dict[str, tuple[tuple[str, str], ...]] = {
    "Explain how {topic} works.": (
        ("{topic} is simple at heart: it works {analogy}, with one small step feeding into the next.",
         "{topic} comes down to {j1}, which shapes {j2} and ultimately the result you get."),
        ("the idea behind {topic} is that small, regular efforts build on each other, {analogy}.",
         "at a technical level, {topic} is governed by {j1} and {j2}, and it is their interaction that matters."),
    ),
    "Give me advice on {topic}.": (
        ("my advice for {topic} is to treat it {analogy}: keep it simple and do not try to do everything at once.",
         "for {topic}, the most effective strategy is to control {j1} deliberately and to review {j2} regularly."),
        ("with {topic}, it is best to go slowly and steadily, {analogy}.",
         "with {topic}, you will get the most out of it by measuring {j1} before you change {j2}."),
    ),
    "What should a beginner know about {topic}?": (
        ("if you are new to {topic}, you will mostly need patience, because it works {analogy}.",
         "someone new to {topic} should first understand {j1}, since it is the foundation for {j2}."),
        ("the first thing to know about {topic} is that nobody gets it right on the first try, {analogy}.",
         "when it comes to {topic}, the first concept to master is {j1}, because {j2} and {j3} depend on it."),
    ),
    "Why is {topic} worth the effort?": (
        ("{topic} is worth it because it makes everyday life easier, {analogy}.",
         "{topic} is worth the effort because {j1} has measurable effects on {j2} over time."),
        ("the payoff from {topic} is that a little effort now saves a lot of trouble later, {analogy}.",
         "the return on {topic} comes from {j1}, whose benefits accumulate through {j2}."),
    ),
    "What are common mistakes people make with {topic}?": (
        ("the most common mistake with {topic} is rushing, when it goes much better slowly, {analogy}.",
         "the most common mistake with {topic} is neglecting {j1}, which quietly degrades {j2}."),
        ("people often give up on {topic} too early, but it works {analogy}, so the small wins take time to show.",
         "a frequent error with {topic} is misjudging {j1}, which then distorts {j2}."),
    ),
    "How do I get started with {topic}?": (
        ("to get started with {topic}, pick one small thing you can do today and build from there, {analogy}.",
         "to get started with {topic}, establish a baseline for {j1} and then change {j2} incrementally."),
        ("start with {topic} the easy way: it is {analogy}, so begin with the simplest version.",
         "begin {topic} by learning the basics of {j1}, then add {j2} once they are stable."),
    ),
    "Can you summarize the main ideas behind {topic}?": (
        ("in short, {topic} is about doing a few simple things well and repeating them, {analogy}.",
         "in summary, {topic} rests on three concepts: {j1}, {j2} and {j3}."),
        ("the main idea of {topic} is that steady habits matter more than big one-off efforts, {analogy}.",
         "the core principles of {topic} are {j1} and {j2}, with {j3} as the main refinement."),
    ),
    "What is the best way to get better at {topic}?": (
        ("the best way to get better at {topic} is to practice a little every day, {analogy}.",
         "the best way to improve at {topic} is deliberate practice that targets {j1} with feedback on {j2}."),
        ("you get better at {topic} the same way you get better at anything: it is {analogy}.",
         "improvement in {topic} comes from isolating {j1} and measuring its effect on {j2}."),
    ),
}
LEAD_INS = ("", "Quick question. ", "I am curious about something. ", "Hi there. ")

# supporting sentences (plain, technical) that a long response adds after its lead
SUPPORT: tuple[tuple[str, str], ...] = (
    ("it is {analogy}: small steps add up, and you will see progress sooner than you expect.",
     "it is worth tracking {j1} explicitly, because small changes in it compound over time."),
    ("the main thing is to start small and repeat the basics until they feel natural.",
     "the critical variable is {j2}, so adjust it one step at a time and record the effect."),
    ("you do not need fancy equipment, just a bit of patience and a regular routine.",
     "standard tools are sufficient, provided that {j1} is monitored with a consistent method."),
    ("if something feels confusing, try a smaller version of it first and build up from there.",
     "when results deviate from expectations, isolate {j3} and test it before changing anything else."),
    ("it is a good idea to ask a friend who has done it before to look at what you are doing.",
     "expert feedback on {j2} will shorten the learning curve considerably."),
    ("keep a few notes on what worked, so that you can repeat it next time.",
     "logging each attempt makes the relationship between {j3} and the outcome explicit."),
    ("do not worry about getting it perfect, because most people improve just by showing up.",
     "do not optimize {j3} prematurely, since a stable baseline has to come first."),
    ("after a few weeks, you will notice the difference without much extra effort.",
     "after several iterations, the marginal gains from tuning {j1} diminish, which means the baseline is stable."),
)
ANALOGIES = ("a bit like learning to ride a bike", "much like tending a small garden",
             "a lot like filling a jar one coin at a time", "rather like building a wall brick by brick",
             "like following a favorite family recipe", "a bit like training a puppy")
# openers by (casual, enthusiastic); every casual one has "hey" or "basically" and a contraction
OPENERS: dict[tuple[bool, bool], tuple[str, ...]] = {
    (False, False): ("",),
    (False, True): ("what a wonderful question: ", "this is a truly fascinating subject: ",
                    "I am delighted you asked: "),
    (True, False): ("hey, so here's the deal: ", "okay, so basically, here's what matters: ",
                    "so basically, here's how it goes: "),
    (True, True): ("oh hey, great question, here's the deal: ", "ooh, I love this one, it's basically this: ",
                   "hey, awesome question, here's the thing: "),
}
# casual wording: contractions and plain connectives, applied to the formal text
CASUAL_WORDS = {
    "it is": "it's", "you will": "you'll", "do not": "don't", "does not": "doesn't", "you are": "you're",
    "that is": "that's", "is not": "isn't", "there is": "there's", "they are": "they're", "cannot": "can't",
    "sufficient": "enough", "considerably": "a lot", "provided that": "as long as", "deliberately": "on purpose",
}
_CASUAL = re.compile(r"\b(" + "|".join(re.escape(k) for k in CASUAL_WORDS) + r")\b", re.IGNORECASE)
MAX_SENTENCES = 5  # a long response has 3 to MAX_SENTENCES sentences


@dataclass(frozen=True)
class PromptPlan:
    """What all responses of one prompt share; :func:`render_response` adds the attribute poles."""

    topic: str
    jargon: tuple[str, str, str]         # j1, j2, j3 in this prompt's order
    lead: tuple[str, str]                # (plain, technical) first sentence
    support: tuple[tuple[str, str], ...]  # (plain, technical) further sentences of a long response
    analogies: tuple[str, ...]           # one per sentence position
    opener: int                          # which opener of each (casual, enthusiastic) pool


def _casual(sentence: str) -> str:
    def swap(match: re.Match) -> str:
        word = CASUAL_WORDS[match.group(0).lower()]
        return word[0].upper() + word[1:] if match.group(0)[0].isupper() else word
    return _CASUAL.sub(swap, sentence)


def render_response(plan: PromptPlan, poles: Mapping[str, int]) -> str:
    """The response of ``plan``'s prompt at the given poles (attribute name -> -1 or +1; FIXED_POLE for others)."""
    pole = {name: poles.get(name, FIXED_POLE[name]) for name in ATTRIBUTES}
    technical, casual, enthusiastic = pole["expertise"] > 0, pole["formality"] < 0, pole["tone"] > 0
    parts = [plan.lead, *plan.support] if pole["length"] > 0 else [plan.lead]
    j1, j2, j3 = plan.jargon
    sentences = [pair[technical].format(topic=plan.topic, j1=j1, j2=j2, j3=j3, analogy=plan.analogies[i])
                 for i, pair in enumerate(parts)]
    if casual:
        sentences = [_casual(s) for s in sentences]
    openers = OPENERS[casual, enthusiastic]
    sentences[0] = openers[plan.opener % len(openers)] + sentences[0]
    sentences = [s[0].upper() + s[1:] for s in sentences]
    if enthusiastic:
        sentences = [s[:-1] + "!" for s in sentences]
    if pole["style"] > 0:
        return "\n".join("- " + s for s in sentences)
    return " ".join(sentences)


def prompt_capacity() -> int:
    """How many distinct prompts the templates can make: topics x requests x lead-ins."""
    return len(TOPICS) * len(REQUESTS) * len(LEAD_INS)


def _distinct_choices(rng: np.random.Generator, n_users: int, n_choices: int, k: int) -> np.ndarray:
    """(n_users, k) distinct random integers in [0, n_choices) per row."""
    if k == 0:
        return np.empty((n_users, 0), dtype=np.int64)
    return rng.random((n_users, n_choices)).argpartition(k - 1, axis=1)[:, :k]


@dataset_registry.register("attribute_world")
class AttributeWorld(DatasetSource):
    """Synthetic text world: responses vary along named attributes, users prefer poles of a few of them."""

    provides = frozenset({cap.TEXT, cap.ORACLE, cap.SHARED_PAIRS, cap.REFERENCE})

    @dataclass
    class Config:
        n_users: int = opt(200, "Users generated (split.unseen_fraction of them become unseen users).", min=1)
        pairs_per_user: int = opt(20, "Train pairs per user, on distinct train prompts.", min=1)
        n_train_prompts: int = opt(200, "Prompts that train pairs are drawn from.", min=1)
        n_test_prompts: int = opt(50, "Test prompts (their text never occurs among the train prompts).", min=0)
        test_pairs_per_user: int = opt(10, "Test pairs per user, on distinct test prompts.", min=0)
        n_responses: int = opt(8, "Responses per prompt, each with a distinct attribute combination "
                                  "(at most 2 ** len(attributes)).", min=2)
        attributes: list[str] = opt(["length", "formality", "expertise", "style"], "Attributes that responses "
                                    f"vary along, from: {', '.join(ATTRIBUTES)}. The others keep a fixed pole.",
                                    nonempty=True, choices=ATTRIBUTES)
        fixed_poles: list[str] = opt([], "Poles that attributes left out of `attributes` keep instead of long, "
                                         "formal, plain, prose and neutral, by pole name (e.g. [short]: one-sentence "
                                         "responses, far cheaper for an LM).",
                                     choices=tuple(POLE_OF))
        attributes_per_user: int = opt(2, "How many attributes each user cares about (a random pole of each).", min=1)
        labels: str = opt("extremes", "'extremes': the user's truly preferred response of the pair (never a tie); "
                                      "'bradley_terry': that pair's order drawn with P = sigmoid(delta / "
                                      "bt_temperature).", choices=("extremes", "bradley_terry"))
        bt_temperature: float = opt(1.0, "Temperature of Bradley-Terry labels (true reward units; a user's weights "
                                         "are 0.5 to 1.5 per attribute, a pair's delta up to 6).", gt=0)
        seed: int = opt(0, "Seed of the world (prompts, response wording, attribute combinations, users, pairs).",
                        min=0)

        def __post_init__(self) -> None:
            unknown = [a for a in self.attributes if a not in ATTRIBUTES]
            if unknown:
                raise ValueError(f"attributes: unknown attribute(s) {unknown}; valid attributes: "
                                 f"{', '.join(ATTRIBUTES)}")
            if not self.attributes:
                raise ValueError(f"attributes must name at least one attribute of: {', '.join(ATTRIBUTES)}")
            if len(set(self.attributes)) != len(self.attributes):
                raise ValueError(f"attributes must not repeat a name, got {self.attributes}")
            if self.labels not in ("extremes", "bradley_terry"):
                raise ValueError(f"labels must be 'extremes' or 'bradley_terry', got {self.labels!r}")
            if self.bt_temperature <= 0:
                raise ValueError(f"bt_temperature must be > 0, got {self.bt_temperature}")
            if self.n_users < 1:
                raise ValueError(f"n_users must be >= 1, got {self.n_users}")
            if self.pairs_per_user < 1:
                raise ValueError(f"pairs_per_user must be >= 1, got {self.pairs_per_user}")
            if self.test_pairs_per_user < 0:
                raise ValueError(f"test_pairs_per_user must be >= 0, got {self.test_pairs_per_user}")
            if self.pairs_per_user > self.n_train_prompts:
                raise ValueError(f"pairs_per_user={self.pairs_per_user} exceeds n_train_prompts={self.n_train_prompts}")
            if self.test_pairs_per_user > self.n_test_prompts:
                raise ValueError(f"test_pairs_per_user={self.test_pairs_per_user} exceeds "
                                 f"n_test_prompts={self.n_test_prompts}")
            if self.n_train_prompts + self.n_test_prompts > prompt_capacity():
                raise ValueError(f"n_train_prompts + n_test_prompts = {self.n_train_prompts + self.n_test_prompts} "
                                 f"exceeds the {prompt_capacity()} distinct prompts the templates can make "
                                 f"({len(TOPICS)} topics x {len(REQUESTS)} requests x {len(LEAD_INS)} lead-ins)")
            if not 2 <= self.n_responses <= 2 ** len(self.attributes):
                raise ValueError(f"n_responses must be between 2 and 2 ** len(attributes) = "
                                 f"{2 ** len(self.attributes)} (distinct attribute combinations), "
                                 f"got {self.n_responses}")
            for pole in self.fixed_poles:
                name = POLE_OF.get(pole)
                if name is None:
                    raise ValueError(f"fixed_poles: unknown pole {pole!r}; poles: {', '.join(POLE_OF)}")
                if name in self.attributes:
                    raise ValueError(f"fixed_poles: {pole!r} is a pole of {name!r}, which is one of `attributes` "
                                     "(it varies); fix only attributes left out")
            fixed = [POLE_OF[p] for p in self.fixed_poles]
            if len(set(fixed)) != len(fixed):
                raise ValueError(f"fixed_poles: one pole per attribute, got {self.fixed_poles}")
            if not 1 <= self.attributes_per_user <= len(self.attributes):
                raise ValueError(f"attributes_per_user must be between 1 and len(attributes) = "
                                 f"{len(self.attributes)}, got {self.attributes_per_user}")

    # ---- the items -------------------------------------------------------------------------------------------
    def _prompts(self, rng: np.random.Generator) -> tuple[list[str], list[PromptPlan]]:
        """Each prompt's text and the plan its responses share; distinct prompts, train first then test."""
        c = self.config
        n_prompts = c.n_train_prompts + c.n_test_prompts
        topics, requests = list(TOPICS), list(REQUESTS)
        code = rng.choice(prompt_capacity(), size=n_prompts, replace=False)
        topic, rest = np.divmod(code, len(REQUESTS) * len(LEAD_INS))
        request, lead_in = np.divmod(rest, len(LEAD_INS))
        lead = rng.integers(0, 2, size=n_prompts)
        n_sentences = rng.integers(3, MAX_SENTENCES + 1, size=n_prompts)
        support = rng.random((n_prompts, len(SUPPORT))).argsort(axis=1)
        jargon_order = rng.random((n_prompts, 3)).argsort(axis=1)
        analogy = rng.random((n_prompts, len(ANALOGIES))).argsort(axis=1)[:, :MAX_SENTENCES]
        opener = rng.integers(0, 3, size=n_prompts)
        texts, plans = [], []
        for p in range(n_prompts):
            name, template = topics[topic[p]], requests[request[p]]
            texts.append(LEAD_INS[lead_in[p]] + template.format(topic=name))
            plans.append(PromptPlan(
                topic=name, jargon=tuple(TOPICS[name][j] for j in jargon_order[p]),
                lead=REQUESTS[template][lead[p]],
                support=tuple(SUPPORT[s] for s in support[p, :n_sentences[p] - 1]),
                analogies=tuple(ANALOGIES[a] for a in analogy[p]), opener=int(opener[p])))
        return texts, plans

    def _attribute_combinations(self, rng: np.random.Generator, n_prompts: int) -> np.ndarray:
        """(P, R, A) attribute vectors in {-1, +1}: distinct per prompt, one combination and its opposite among them."""
        n_attributes, n_responses = len(self.config.attributes), self.config.n_responses
        n_codes = 2 ** n_attributes  # code bit i = attribute i at +1
        first = rng.integers(0, n_codes, size=n_prompts)
        priority = rng.random((n_prompts, n_codes))
        rows = np.arange(n_prompts)
        priority[rows, first] = -1.0                   # the pair of opposites comes first, the rest at random
        priority[rows, first ^ (n_codes - 1)] = -1.0
        codes = rng.permuted(priority.argsort(axis=1)[:, :n_responses], axis=1)  # (P, R), in random order
        return np.where((codes[..., None] >> np.arange(n_attributes)) & 1, 1, -1).astype(np.int8)

    def _user_weights(self, rng: np.random.Generator) -> np.ndarray:
        """(U, A) sparse weights: attributes_per_user nonzero entries, random sign, magnitude ~ U[0.5, 1.5]."""
        c = self.config
        cared = _distinct_choices(rng, c.n_users, len(c.attributes), c.attributes_per_user)  # (U, k)
        sign = rng.choice([-1.0, 1.0], size=cared.shape)
        magnitude = rng.uniform(*WEIGHT_RANGE, size=cared.shape)
        weights = np.zeros((c.n_users, len(c.attributes)))
        np.put_along_axis(weights, cared, sign * magnitude, axis=1)
        return weights

    # ---- the pairs -------------------------------------------------------------------------------------------
    def _untied_pairs(self, rng: np.random.Generator, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One random pair (first < second) of responses the user scores differently, per (user, prompt)."""
        first, second = np.triu_indices(self.config.n_responses, 1)      # (M,) all response pairs
        untied = np.abs(scores[..., first] - scores[..., second]) > TIE_TOLERANCE  # (U, n, M)
        # each prompt holds two opposite combinations, so a user with any nonzero weight has an untied pair
        assert untied.any(axis=2).all(), "a (user, prompt) without an untied response pair"
        pick = np.where(untied, rng.random(untied.shape), -1.0).argmax(axis=2)
        return first[pick], second[pick]

    def load(self) -> PreferenceData:
        import datasets  # imported when used: it takes ~1 s, and `plrm list` needs none
        c = self.config
        text_seed, world_seed = np.random.SeedSequence(c.seed).spawn(2)  # wording does not move with user options
        prompt_texts, plans = self._prompts(np.random.default_rng(text_seed))
        rng = np.random.default_rng(world_seed)
        n_prompts = c.n_train_prompts + c.n_test_prompts
        item_attributes = self._attribute_combinations(rng, n_prompts)     # (P, R, A)
        fixed = {POLE_OF[p]: ATTRIBUTES[POLE_OF[p]].index(p) * 2 - 1 for p in c.fixed_poles}  # name -> -1 / +1
        responses = np.array([[render_response(plans[p], {**fixed, **dict(zip(c.attributes,
                                                                                map(int, item_attributes[p, r])))})
                               for r in range(c.n_responses)] for p in range(n_prompts)], dtype=object)  # (P, R)
        user_weights = self._user_weights(rng)                             # (U, A)
        mean_weights = user_weights.mean(axis=0)                           # (A,)

        prompt = np.concatenate([_distinct_choices(rng, c.n_users, c.n_train_prompts, c.pairs_per_user),
                                 _distinct_choices(rng, c.n_users, c.n_test_prompts, c.test_pairs_per_user)
                                 + c.n_train_prompts], axis=1)            # (U, n)
        scores = np.einsum("unra,ua->unr", item_attributes[prompt].astype(np.float64), user_weights)  # (U, n, R)
        first, second = self._untied_pairs(rng, scores)
        rows = np.indices(prompt.shape)
        prefers_first = scores[rows[0], rows[1], first] > scores[rows[0], rows[1], second]
        chosen, rejected = np.where(prefers_first, first, second), np.where(prefers_first, second, first)
        diff_a = (item_attributes[prompt, chosen] - item_attributes[prompt, rejected]).astype(np.float64)  # (U, n, A)
        chosen, rejected, personal, population = label_pairs(rng, chosen, rejected, diff_a, user_weights,
                                                             mean_weights, c.labels, c.bt_temperature)
        reference = scores.argmax(axis=2)                                  # ties: the lowest response index

        is_test = (prompt >= c.n_train_prompts).ravel()
        user = np.broadcast_to(np.arange(c.n_users)[:, None], prompt.shape).ravel()
        prompt, chosen, rejected, reference = prompt.ravel(), chosen.ravel(), rejected.ravel(), reference.ravel()
        width = len(str(c.n_users - 1))
        low, high = np.minimum(chosen, rejected), np.maximum(chosen, rejected)
        table = pa.table({
            "user_id": pa.array(("user" + pd.Series(user).astype(str).str.zfill(width)).to_numpy()),
            "prompt": pa.array(np.asarray(prompt_texts, dtype=object)[prompt]),
            "chosen": pa.array(responses[prompt, chosen]),
            "rejected": pa.array(responses[prompt, rejected]),
            "pair_id": pa.array((pd.Series(prompt).astype(str) + ":" + pd.Series(low).astype(str) + "-"
                                 + pd.Series(high).astype(str)).to_numpy()),
            "reference": pa.array(responses[prompt, reference]),
            "split": pa.array(np.where(is_test, "test", "train")),
        })
        return PreferenceData(
            name="attribute_world",
            pairs=datasets.Dataset(datasets.table.InMemoryTable(table)),
            provides=self.provides,
            oracle_logits={"oracle/personal": personal.ravel().astype(np.float32),
                           "oracle/non-personalized": population.ravel().astype(np.float32)},
            truth={"attributes": list(c.attributes), "poles": {a: ATTRIBUTES[a] for a in c.attributes},
                   "item_attributes": item_attributes, "user_weights": user_weights, "prompts": prompt_texts,
                   "topics": [plan.topic for plan in plans], "responses": responses},
        )
