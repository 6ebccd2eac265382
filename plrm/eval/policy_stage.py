"""The policy stage: a trained reward model judged by the LLM it guides (The Reward Model Selection Crisis in
Personalized Alignment, Rezk et al., arXiv 2512.23067, §3-5).

For one method at one split seed, after training and after its unseen users were adapted on their k support
pairs (the protocol leaves the model in that state):

1. **Policy accuracy** (eq. 3-7). Each test pair's chosen and rejected responses are scored once by the base
   policy (log-likelihood, summed and length-normalised) and once by the method's guide (the sum of its per-token
   rewards; plrm.decoding.scoring). lambda is chosen exactly on the *seen* users' test pairs (``weight: auto``,
   App. F.2), then the *unseen* users' pairs are scored: RM accuracy 1[dRM > 0], the base policy's 1[dLLn > 0]
   (eq. 4) and reward-guided decoding's 1[dLL + lambda dR > 0] (eq. 5-6), each a mean over users of the user's
   mean. P-DPO is its own policy: its score is the personalized log-likelihood (eq. 6 with the implicit reward
   and lambda = 1 / beta), its RM accuracy the implicit reward's.
2. **Generation.** For each unseen user, their first ``prompts_per_user`` distinct test prompts are decoded by
   the base policy alone (zero-shot, greedy) and under the method's reward (ARGS at the chosen lambda; GenARM's
   own decoding with ``decoder: genarm``; P-DPO from its personalized policy). Generations are scored with
   ROUGE-1 / ROUGE-L F1 (and BERTScore-F1 when a model is set) against the row's ``reference`` column -- the
   user's own completion -- and by the circular win rate: the method's own reward of its guided output against
   that of the zero-shot output (Table 5; ties reported).

The zero-shot generations depend only on the base policy and the prompts, so a run computes them once per seed
and shares them between methods (``ZeroShot``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from plrm.backbones.sentence import embed_texts
from plrm.data.datamodule import PreferenceDataModule
from plrm.data.splits import TEST
from plrm.decoding.args import Decoded, args_decode
from plrm.decoding.genarm import genarm_decode
from plrm.decoding.guides import Guide, TextGuide, TokenGuide, check_same_tokenizer, guide_for
from plrm.decoding.policy import Policy, PolicyConfig
from plrm.decoding.scoring import pair_differences, response_scores
from plrm.errors import RecipeError
from plrm.eval.correlation import bootstrap_ci, metric_correlations
from plrm.eval.generation import bertscore_f1, clean_generation, rouge, win_outcomes, win_rate
from plrm.eval.icl import render_icl_prompt, select_demos
from plrm.eval.policy import LambdaChoice, best_lambda, per_user_accuracy, policy_accuracies
from plrm.methods.base import PersonalizedRewardModel


def load_policy(section) -> Policy:
    """The recipe's base policy (``policy:`` section), frozen, in eval mode."""
    return Policy.load(PolicyConfig(model=section.model, dtype=section.dtype, chat_template=section.chat_template,
                                    max_length=section.max_length, inference_batch_size=section.batch_size))


_SHARED: dict[tuple, ZeroShot] = {}  # the last policy of this process and its zero-shot generations


def shared_zero_shot(section) -> ZeroShot:
    """The base policy and its zero-shot generations, kept for this process: every cell of a benchmark (and every
    seed and method of a run) with the same policy settings loads the policy once and decodes each prompt once
    zero-shot (greedy decoding of a frozen model is a function of the prompt). One policy is kept at a time."""
    key = (section.model, section.dtype, section.chat_template, section.max_length, section.max_new_tokens)
    if key not in _SHARED:
        _SHARED.clear()
        _SHARED[key] = ZeroShot(load_policy(section), section.max_new_tokens, section.batch_size)
    return _SHARED[key]


@dataclass
class ZeroShot:
    """The base policy's greedy generations, by prompt text: shared by every method of a seed."""

    policy: Policy
    max_new_tokens: int
    batch_size: int
    texts: dict[str, str] = field(default_factory=dict)

    def generate(self, prompts: list[str], desc: str = "zero-shot") -> list[str]:
        """Greedy continuations of ``prompts`` (any text: the plain prompts, or ICL prompts), each decoded once."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self.texts]
        rate = TokenRate(len(todo), desc)
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start:start + self.batch_size]
            out = args_decode(self.policy, None, self.policy.tokenize(batch), None,
                              torch.zeros(len(batch), dtype=torch.long, device=self.policy.device), k=1,
                              weight=0.0, max_new_tokens=self.max_new_tokens)
            self.texts.update(zip(batch, decode_texts(self.policy, out)))
            rate.update(len(batch), out)
        rate.close()
        return [self.texts[p] for p in prompts]


class TokenRate:
    """A progress bar over prompts with the generated tokens/s on a terminal; one log line in batch jobs."""

    def __init__(self, total: int, desc: str) -> None:
        self.bar, self.total, self.desc = None, total, desc
        if sys.stderr.isatty() and total:
            from tqdm import tqdm  # installed with transformers

            self.bar = tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, dynamic_ncols=True, leave=False)
        self.tokens, self.seconds = 0, 0.0

    def update(self, prompts: int, out: Decoded) -> None:
        self.tokens += out.n_tokens
        self.seconds += out.seconds
        if self.bar is not None:
            self.bar.update(prompts)
            self.bar.set_postfix_str(f"{self.tokens / max(self.seconds, 1e-9):.1f} tokens/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.total:  # a batch job: one plain line
            print(f"[{self.desc}] {self.total} prompts, {self.tokens} tokens, "
                  f"{self.tokens / max(self.seconds, 1e-9):.1f} tokens/s", file=sys.stderr, flush=True)


def decode_texts(policy: Policy, out: Decoded) -> list[str]:
    """Generated ids -> text: the stop token dropped, special tokens skipped, the whole row decoded at once."""
    stops = set(policy.stop_ids.tolist())
    tok = policy.backbone.tokenizer()
    return [tok.decode([t for t in row if t not in stops], skip_special_tokens=True) for row in out.tokens]


def first_rows_per_user(rows: np.ndarray, users: np.ndarray, keep: int | None, key: np.ndarray | None = None
                        ) -> np.ndarray:
    """The first ``keep`` rows of each user in row order (all with None); with ``key``, rows whose key repeats
    an earlier kept row of the same user are skipped (distinct prompts)."""
    order = np.lexsort((rows, users))
    rows, users = rows[order], users[order]
    if key is not None:
        _, first = np.unique(np.stack([users.astype(str), key[rows].astype(str)]), axis=1, return_index=True)
        mask = np.zeros(len(rows), bool)
        mask[first] = True
        rows, users = rows[mask], users[mask]
        order = np.lexsort((rows, users))
        rows, users = rows[order], users[order]
    if keep is None:
        return rows
    start = np.searchsorted(users, users, side="left")
    return rows[np.arange(len(rows)) - start < keep]


def _macro(values: np.ndarray, users: np.ndarray) -> float:
    """The mean over users of each user's mean of a per-example score (ROUGE, BERTScore): the headline of the
    generation metrics, as per_user_accuracy's macro is for accuracies."""
    if not len(values):
        return float("nan")
    uniq, inverse = np.unique(users, return_inverse=True)
    return float((np.bincount(inverse, weights=values) / np.bincount(inverse)).mean())


@dataclass
class Guided:
    """A trained method ready for the policy stage: the policy that generates (the base policy, or P-DPO's own),
    the method's guide, and ``kind``: 'guided' (a reward model steering the base policy) or 'own_policy'."""

    policy: Policy
    guide: Guide | None
    kind: str

    @classmethod
    def of(cls, model: PersonalizedRewardModel, backbone, policy: Policy) -> Guided:
        if getattr(model, "uses_reference", False):  # P-DPO: a personalized policy, scored by its implicit reward
            return cls(Policy.of_method(model, backbone), TokenGuide(model, backbone), "own_policy")
        guide = guide_for(model, backbone, policy.backbone.tokenizer())
        if not isinstance(guide, TextGuide):  # token ids go from the policy to the guide: one vocabulary
            check_same_tokenizer(policy.backbone.tokenizer(), backbone.tokenizer(), policy.name,
                                 backbone.config.model)
        return cls(policy, guide, "guided")

    def decoder(self, section) -> str:
        if self.kind == "own_policy":
            return "own_policy"
        return "genarm" if section.decoder == "genarm" and isinstance(self.guide, TokenGuide) else "args"

    def pair_differences(self, dm: PreferenceDataModule, rows: np.ndarray, batch_size: int) -> dict:
        table = dm.prepared.data.pairs.data.table
        text = {c: [str(v) for v in table[c].to_numpy(zero_copy_only=False)[rows]]
                for c in ("prompt", "chosen", "rejected")}
        users = torch.from_numpy(dm.split.row_user[rows])  # each model takes them to its device
        return pair_differences(self.policy, self.guide, text["prompt"], text["chosen"], text["rejected"], users,
                                batch_size)

    def choose_lambda(self, dm: PreferenceDataModule, section) -> LambdaChoice | None:
        """``policy.weight: auto``: the lambda maximizing policy accuracy on the *seen* users' test pairs (found
        exactly, Selection Crisis App. F.2); None for P-DPO (no reward term) or a fixed weight."""
        if self.kind == "own_policy" or section.weight != "auto":
            return None
        test = dm.test_rows(unseen=False)
        rows = first_rows_per_user(test, dm.split.row_user[test], section.pairs_per_user)
        if not len(rows):
            raise RecipeError("policy.weight: auto chooses lambda on the seen users' test pairs, and there are none")
        d = self.pair_differences(dm, rows, section.batch_size)
        # lambda in [0, lambda_max]: by default 100 / std(dR), so a degenerate sweep (a reward that barely moves)
        # cannot return a weight that drowns the policy
        spread = float(np.std(d["dr"]))
        lambda_max = section.lambda_max if section.lambda_max is not None else 100.0 / spread if spread > 0 else None
        return best_lambda(d["dll"], d["dr"], dm.split.row_user[rows], lambda_max=lambda_max)

    def weight(self, choice: LambdaChoice | None, section) -> float:
        if self.kind == "own_policy":
            return 0.0
        return float(choice.lam) if choice is not None else float(section.weight)

    def generate(self, prompts: list[str], users: torch.Tensor, lam: float, section,
                 generator: torch.Generator | None = None) -> tuple[list[str], float, int]:
        """Decode ``prompts`` for ``users`` under this method at weight ``lam``: (texts, seconds, tokens)."""
        texts, seconds, n_tokens = [], 0.0, 0
        decoder = self.decoder(section)
        rate = TokenRate(len(prompts), decoder)
        for start in range(0, len(prompts), section.batch_size):
            batch, u = prompts[start:start + section.batch_size], users[start:start + section.batch_size]
            p_ids = self.policy.tokenize(batch)
            if decoder == "own_policy":
                out = args_decode(self.policy, None, p_ids, None, u, k=1, weight=0.0,
                                  max_new_tokens=section.max_new_tokens)
            elif decoder == "genarm":
                out = genarm_decode(self.policy, self.guide, p_ids, self.guide.tokenize(batch), u,
                                    alpha=lam * self.guide.beta, max_new_tokens=section.max_new_tokens,
                                    mode=section.mode, temperature=section.temperature, generator=generator)
            else:
                out = args_decode(self.policy, self.guide, p_ids, self.guide.tokenize(batch), u, k=section.k,
                                  weight=lam, max_new_tokens=section.max_new_tokens, mode=section.mode,
                                  temperature=section.temperature, generator=generator)
            texts += decode_texts(self.policy, out)
            seconds += out.seconds
            n_tokens += out.n_tokens
            rate.update(len(batch), out)
        rate.close()
        return texts, seconds, n_tokens

    @torch.no_grad()
    def judge(self, prompts: list[str], responses: list[str], users: torch.Tensor, batch_size: int) -> np.ndarray:
        """The method's own reward of whole responses (the circular win rate's judge)."""
        out = np.zeros(len(prompts))
        for start in range(0, len(prompts), batch_size):
            s = slice(start, start + batch_size)
            out[s] = self.guide.sequence_reward(self.guide.tokenize(prompts[s], responses[s]),
                                                users[s].to(self.guide.device)).double().cpu().numpy()
        return out


def generation_rows(dm: PreferenceDataModule, users: np.ndarray, prompts_per_user: int) -> np.ndarray:
    """The test rows whose prompts the policy stage generates for: each of ``users``' first ``prompts_per_user``
    distinct test prompts."""
    table = dm.prepared.data.pairs.data.table
    test = np.flatnonzero(np.isin(dm.split.row_user, users) & (dm.split.role == TEST))
    return first_rows_per_user(test, dm.split.row_user[test], prompts_per_user,
                               key=table["prompt"].to_numpy(zero_copy_only=False))


def evaluate_policy(model: PersonalizedRewardModel, dm: PreferenceDataModule, section, policy: Policy,
                    zero_shot: ZeroShot) -> tuple[dict, dict, pd.DataFrame, pd.DataFrame]:
    """(metrics, settings, generations, pair scores) of one trained method whose unseen users hold their adapted
    state. Metrics are numbers (aggregated over seeds), settings say what produced them (models, decoder); a
    method that cannot guide decoding raises RecipeError."""
    if not len(dm.split.unseen_users):
        raise RecipeError("the policy stage evaluates unseen users, and this split has none "
                          "(split.unseen_fraction: 0)")
    table = dm.prepared.data.pairs.data.table
    references = table["reference"].to_numpy(zero_copy_only=False) if "reference" in table.column_names else None
    row_user = dm.split.row_user
    guided = Guided.of(model, dm.prepared.backbone, policy)
    settings = {"policy": guided.policy.name, "kind": guided.kind,
                "guide": guided.guide.name if guided.kind == "guided" else None, "decoder": guided.decoder(section),
                "k": section.k, "mode": section.mode, "max_new_tokens": section.max_new_tokens,
                "length_includes_eos": True}
    metrics: dict = {}
    choice = guided.choose_lambda(dm, section)
    lam = guided.weight(choice, section)
    if choice is not None:
        metrics["lambda_seen_policy_accuracy"] = float(choice.accuracy)
        settings["lambda_curve"] = {"lambda": [float(x) for x in choice.curve[0]],
                                    "seen_policy_accuracy": [float(x) for x in choice.curve[1]]}
    test = dm.test_rows(unseen=True)
    rows = first_rows_per_user(test, row_user[test], section.pairs_per_user)
    d = guided.pair_differences(dm, rows, section.batch_size)
    users = row_user[rows]
    acc = policy_accuracies(d["dll"], d["dlln"], d["dr"], d["drm"], users, lam)
    # P-DPO's own log-likelihood is not the base policy's: its length-normalised ranking is reported apart
    base = "own_policy_mean_ll_accuracy" if guided.kind == "own_policy" else "base_policy_accuracy"
    metrics.update({"lambda": lam, "rm_accuracy": acc["rm_accuracy"], base: acc["base_accuracy"],
                    "policy_accuracy": acc["rgd_accuracy"], "policy_accuracy_pooled": acc["rgd_accuracy_pooled"],
                    "policy_pairs": len(rows), "policy_ties": acc["rgd_ties"]})
    pairs = pd.DataFrame({"row": rows, "user_id": dm.split.user_ids[users].astype(str), **d})

    # ---- generation on the unseen users' test prompts ----
    gen_rows = generation_rows(dm, dm.split.unseen_users, section.prompts_per_user)
    prompts = [str(p) for p in table["prompt"].to_numpy(zero_copy_only=False)[gen_rows]]
    gen_user_np = row_user[gen_rows]
    gen_users = torch.from_numpy(gen_user_np).to(model.device)
    zs = zero_shot.generate(prompts)
    texts, seconds, n_tokens = guided.generate(prompts, gen_users, lam, section,
                                               torch.Generator().manual_seed(section.seed))
    cleaned, zs_cleaned = [clean_generation(t) for t in texts], [clean_generation(t) for t in zs]
    frame = {"row": gen_rows, "user_id": dm.split.user_ids[gen_user_np].astype(str), "prompt": prompts,
             "generation": texts, "zero_shot": zs, "decoder": settings["decoder"], "lambda": lam}
    metrics.update({"generations": len(prompts), "tokens_per_second": n_tokens / seconds if seconds else None})
    if references is not None:
        refs = [str(r) for r in references[gen_rows]]
        frame["reference"] = refs
        for name, values in rouge(cleaned, refs).items():
            frame[name] = values
            metrics[name] = _macro(values, gen_user_np)
        for name, values in rouge(zs_cleaned, refs).items():
            metrics[f"zero_shot_{name}"] = _macro(values, gen_user_np)
        if section.bertscore_model:
            f1, info = bertscore_f1(cleaned, refs, section.bertscore_model, section.bertscore_layers)
            frame["bertscore_f1"] = f1
            metrics["bertscore_f1"] = _macro(f1, gen_user_np)
            zs_f1, _ = bertscore_f1(zs_cleaned, refs, section.bertscore_model, section.bertscore_layers)
            metrics["zero_shot_bertscore_f1"] = _macro(zs_f1, gen_user_np)
            settings["bertscore"] = info
    if guided.kind == "guided":  # the circular win rate: the method's own reward judges its guided output
        r_guided = guided.judge(prompts, texts, gen_users, section.batch_size)
        r_zero = guided.judge(prompts, zs, gen_users, section.batch_size)
        same = np.array([a == b for a, b in zip(texts, zs)])
        frame["win"] = win_outcomes(r_guided, r_zero, same)
        rate = win_rate(r_guided, r_zero, same)
        metrics.update({"win_rate": rate["win_rate"], "tie_rate": rate["tie_rate"], "loss_rate": rate["loss_rate"]})
    return metrics, settings, pd.DataFrame(frame), pairs


CORRELATED = ("rm_accuracy", "policy_accuracy", "win_rate", "rouge1")


def policy_correlations(per_seed: dict[int, dict], unit: str = "method") -> list[dict]:
    """Kendall tau-b / Spearman / Pearson between the method rankings of RM accuracy, policy accuracy, win rate and
    ROUGE-1 (Selection Crisis Tables 2 and 6), one point per method (mean over seeds) unless ``unit`` says
    otherwise; with a bootstrap interval of tau over seeds. Empty with fewer than 3 methods."""
    table = [{"method": label, "seed": seed, **{k: v for k, v in (m.get("policy") or {}).items() if k in CORRELATED}}
             for seed, results in per_seed.items() for label, m in results.items() if m.get("policy")]
    metrics = [k for k in CORRELATED if any(k in row for row in table)]
    if len({row["method"] for row in table}) < 3 or len(metrics) < 2:
        return []
    rows = metric_correlations(table, metrics, unit)
    if unit == "method" and len({row["seed"] for row in table}) > 1:
        for row in rows:
            row["kendall_tau_b_ci95"] = list(bootstrap_ci(table, row["x"], row["y"], n_boot=1000, seed=0))
    return rows


BASELINES = ("zero_shot", "icl", "icl_rag")


_BASELINES: dict[tuple, dict] = {}  # evaluate_baselines' results in this process, by data, split and settings


def evaluate_baselines(dm: PreferenceDataModule, section, zero_shot: ZeroShot, k: int) -> dict[str, dict]:
    """Cached :func:`compute_baselines`: the cells of a benchmark that share a dataset and a split seed share
    these rows (they depend on no method), so they are computed once per process."""
    key = (id(dm.prepared.data), dm.prepared.data.name, dm.split.seed, hash(dm.split.role.tobytes()), k, repr(section))
    if key not in _BASELINES:
        _BASELINES[key] = compute_baselines(dm, section, zero_shot, k)
    return {name: dict(metrics) for name, metrics in _BASELINES[key].items()}


def compute_baselines(dm: PreferenceDataModule, section, zero_shot: ZeroShot, k: int) -> dict[str, dict]:
    """The policy-level rows that need no reward model, on the same unseen users, prompts and pairs as the
    methods' policy stage: the base policy zero-shot (its policy accuracy is eq. 4, the length-normalised
    likelihood) and, for each of ``section.baselines``, ICL / ICL-RAG (eq. 7: the same with the user's
    demonstrations in the prompt; plrm.eval.icl). Generation is greedy decoding of the base policy, cached by
    prompt text."""
    split, table = dm.split, dm.prepared.data.pairs.data.table
    column = {c: table[c].to_numpy(zero_copy_only=False).astype(str) for c in ("prompt", "chosen", "rejected")}
    references = table["reference"].to_numpy(zero_copy_only=False) if "reference" in table.column_names else None
    gen_rows = generation_rows(dm, split.unseen_users, section.prompts_per_user)
    test = dm.test_rows(unseen=True)
    pair_rows = first_rows_per_user(test, split.row_user[test], section.pairs_per_user)
    pool = dm.support_rows(k)                                   # the pairs the reward models adapted on
    policy = zero_shot.policy
    out: dict[str, dict] = {}
    for name in ("zero_shot", *section.baselines):
        if name == "zero_shot":
            gen_prompts, pair_prompts, shots = list(column["prompt"][gen_rows]), list(column["prompt"][pair_rows]), []
        else:
            queries = np.concatenate([gen_rows, pair_rows])
            embeddings = None
            if name == "icl_rag":
                vectors = embed_texts(list(column["prompt"][queries]) + list(column["prompt"][pool]))
                embeddings = (vectors[:len(queries)], vectors[len(queries):])
            demos = select_demos(column["prompt"][queries], split.row_user[queries], column["prompt"][pool],
                                 split.row_user[pool], section.icl_shots, name, section.seed, embeddings)
            prompts = [render_icl_prompt(column["prompt"][q], [(column["prompt"][pool[d]], column["chosen"][pool[d]],
                                                               column["rejected"][pool[d]]) for d in ds])
                       for q, ds in zip(queries, demos)]
            gen_prompts, pair_prompts = prompts[:len(gen_rows)], prompts[len(gen_rows):]
            shots = [len(d) for d in demos]
        users = torch.from_numpy(split.row_user[pair_rows])
        scores = response_scores(policy, None, pair_prompts * 2, list(column["chosen"][pair_rows])
                                 + list(column["rejected"][pair_rows]), torch.cat([users, users]), section.batch_size)
        n = len(pair_rows)
        correct = scores["lln"][:n] - scores["lln"][n:] > 0
        metrics = {"policy_accuracy": per_user_accuracy(correct, split.row_user[pair_rows])[0],
                   "policy_pairs": n, "generations": len(gen_rows)}
        if shots:
            metrics["demonstrations"] = float(np.mean(shots))
        texts = zero_shot.generate(gen_prompts, desc=name)
        if references is not None:
            refs, cleaned = [str(r) for r in references[gen_rows]], [clean_generation(t) for t in texts]
            for metric, values in rouge(cleaned, refs).items():
                metrics[metric] = _macro(values, split.row_user[gen_rows])
            if section.bertscore_model:
                f1, _ = bertscore_f1(cleaned, refs, section.bertscore_model, section.bertscore_layers)
                metrics["bertscore_f1"] = _macro(f1, split.row_user[gen_rows])
        out[name] = metrics
    return out
