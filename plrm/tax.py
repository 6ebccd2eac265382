"""The personalization tax ("When Personalization Meets Reality", Dong et al., arXiv 2502.19158, §4.3,
Figure 4): what personalizing a reward model costs on general-purpose preferences, measured on RewardBench's
sections (Chat, Chat Hard, Safety, Reasoning).

For one trained method of a finished run (one split seed), every RewardBench row is scored

- by the method's **non-personalized reward**: the mean of the seen users' rewards
  (:meth:`~plrm.methods.base.PersonalizedRewardModel.population_reward`; a global model's own reward), and
- by **each seen user's personalized reward** (the users whose state the checkpoint holds),

through the run's own backbone (RewardBench is text: the run needs a text backbone, ``frozen_encoder`` or
``transformer``). A row is correct when chosen scores above rejected (a tie is wrong, as in RewardBench).
Section scores follow RewardBench exactly (plrm.data.sources.reward_bench.section_scores: subset accuracies
weighted by its example counts). The tax of a user on a section is their score minus the non-personalized
score; the report gives it per section (mean, spread, the users who lose most) and per user.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from plrm import registry
from plrm.data.datamodule import PreparedData
from plrm.data.sources.reward_bench import EXAMPLE_COUNTS, SECTION_SUBSETS, section_scores
from plrm.errors import TaxError  # noqa: F401  (re-exported: plrm.errors defines every error class)
from plrm.eval import report as run_report
from plrm.eval.protocol import embed_items
from plrm.methods.base import FACTORED
from plrm.recipe import build_dataset


def section_matrix(subset_names: list[str], weights: dict[str, int] = EXAMPLE_COUNTS) -> tuple[list[str], np.ndarray]:
    """(sections present, (S_subsets, n_sections) matrix) turning per-subset accuracies into section scores:
    column j holds the normalized RewardBench weights of section j's subsets (the same arithmetic as
    ``section_scores``, for many users at once)."""
    sections = [s for s, members in SECTION_SUBSETS.items() if any(m in subset_names for m in members)]
    mat = np.zeros((len(subset_names), len(sections)))
    for j, section in enumerate(sections):
        for i, name in enumerate(subset_names):
            if name in SECTION_SUBSETS[section]:
                mat[i, j] = weights[name]
        mat[:, j] /= mat[:, j].sum()
    return sections, mat


def personalization_tax(run_dir: str | Path, method: str | None = None, seed: int | None = None,
                        overrides: list[str] | None = None, out: str | Path | None = None, worst: int = 5,
                        user_chunk: int = 256, show: bool = True) -> dict:
    """Measure the tax of ``method`` (default: the run's only method) at split ``seed`` (default: the first) on
    RewardBench loaded with ``overrides`` (its options, e.g. ``path=/data/reward-bench``); write
    ``tax-<method>-seed<seed>.json`` / ``.md`` into the run directory (or ``out``) and return the payload."""
    from plrm.runner import Run

    run = Run.open(run_dir)
    recipe = run.recipe
    labels = run.methods
    if method is None:
        if len(labels) != 1:
            raise TaxError(f"{run.dir} trained {labels}; choose one with --method")
        method = labels[0]
    if method not in recipe.methods:
        raise TaxError(f"{run.dir} has no method '{method}'; it trained {labels}")
    seed = run.seeds[0] if seed is None else seed
    if not (run.seed_dir(seed) / f"{method}.ckpt").is_file():
        raise TaxError(f"no checkpoint {run.seed_dir(seed) / f'{method}.ckpt'} (split seeds of the run: {run.seeds})")
    backbone = registry.backbones.get(recipe.backbone.name)(recipe.backbone.config)
    if "text" not in backbone.needs:
        raise TaxError(f"the run's backbone '{recipe.backbone.name}' reads precomputed features, so it cannot score "
                       "RewardBench's text; measure the tax on a run with a text backbone (frozen_encoder or "
                       "transformer)")
    bench = build_dataset("reward_bench", list(overrides or [])).load()
    prepared = PreparedData(bench, backbone)
    user_ids, unseen = run.users(seed)  # the run's user vocabulary: the rows of the checkpoint's per-user state
    seen = np.flatnonzero(~unseen)
    model = run.build_method(method, seed, prepared)  # the run's method, scoring RewardBench's items
    if model.reward_shape != FACTORED:
        raise TaxError(f"method '{method}' ({type(model).__name__}) conditions its encoder on the user: it has no "
                       "user-independent item embedding whose users' rewards could be averaged into the "
                       "non-personalized reward the tax compares against")
    model.load_checkpoint_state(run.checkpoint(method, seed)["state_dict"])
    model.eval()

    z = embed_items(model, prepared, torch.arange(prepared.items.n_items))               # each unique item once
    z_chosen, z_rejected = z[prepared.chosen_item], z[prepared.rejected_item]        # (R, Z) each
    users = torch.from_numpy(seen)
    with torch.no_grad():
        population = (model.population_reward(z_chosen, users) - model.population_reward(z_rejected, users)) > 0
        per_user = []
        for start in range(0, len(users), user_chunk):                                 # chunks, never one by one
            chunk = users[start:start + user_chunk]
            logit = model.pair_logit(z_chosen.repeat(len(chunk), 1), z_rejected.repeat(len(chunk), 1),
                                     chunk.repeat_interleave(len(z_chosen)))
            per_user.append((logit > 0).view(len(chunk), -1))
        correct = torch.cat(per_user).cpu().numpy().astype(np.float64)                 # (U_seen, R)
    subsets = bench.pairs.data.table["group_id"].to_numpy(zero_copy_only=False)
    base = section_scores(population.cpu().numpy(), subsets)
    codes, names = pd.factorize(pd.Series(subsets, dtype=object), sort=True)
    onehot = np.zeros((len(subsets), len(names)))
    onehot[np.arange(len(subsets)), codes] = 1.0
    subset_acc = correct @ onehot / onehot.sum(0)                                       # (U, S)
    sections, weights = section_matrix(list(names))
    user_scores = subset_acc @ weights                                                   # (U, n_sections)
    base_vec = np.array([base["sections"][s] for s in sections])
    change = user_scores - base_vec
    payload = {
        "run": str(run.dir), "method": method, "seed": seed, "n_users": len(seen), "n_rows": len(subsets),
        "non_personalized": base,
        "personalized": {s: {"mean": float(user_scores[:, j].mean()), "std": float(user_scores[:, j].std()),
                             "min": float(user_scores[:, j].min()), "max": float(user_scores[:, j].max())}
                         for j, s in enumerate(sections)},
        "change": {s: {"mean": float(change[:, j].mean()), "worst": float(change[:, j].min()),
                       "users_worse": int((change[:, j] < 0).sum()), "users_better": int((change[:, j] > 0).sum())}
                   for j, s in enumerate(sections)},
        "worst_users": {s: [{"user_id": str(user_ids[seen[i]]), "score": float(user_scores[i, j]),
                             "change": float(change[i, j])} for i in np.argsort(change[:, j], kind="stable")[:worst]]
                        for j, s in enumerate(sections)},
        "per_user": [{"user_id": str(user_ids[u]), **{s: float(user_scores[i, j]) for j, s in enumerate(sections)}}
                     for i, u in enumerate(seen)],
        "load": bench.load_report.to_dict() if bench.load_report is not None else {},
    }
    target = Path(out).expanduser() if out else run.dir
    target.mkdir(parents=True, exist_ok=True)
    stem = f"tax-{method}-seed{seed}"
    run_report.write_json(target / f"{stem}.json", payload)
    text = markdown(payload)
    tmp = target / f"{stem}.md.tmp"
    tmp.write_text(text)
    tmp.replace(target / f"{stem}.md")
    if show:
        print(text)
        print(f"wrote {target / stem}.json and .md")
    return payload


def markdown(p: dict) -> str:
    sections = list(p["personalized"])
    lines = [f"# Personalization tax of `{p['method']}` (split seed {p['seed']}) on RewardBench", "",
             f"{p['n_rows']:,} RewardBench rows scored by the non-personalized reward (the mean of the seen users' "
             f"rewards) and by each of {p['n_users']:,} seen users' personalized rewards (Dong et al., arXiv "
             "2502.19158, §4.3). Scores "
             "in %, RewardBench's section weighting.", "",
             "| section | non-personalized | personalized: mean ± std over users (min, max) | change: mean | "
             "change: worst user | users worse / better |", "|---|---|---|---|---|---|"]
    for s in sections:
        b, q, c = p["non_personalized"]["sections"][s], p["personalized"][s], p["change"][s]
        lines.append(f"| {s} | {100 * b:.1f} | {100 * q['mean']:.1f} ± {100 * q['std']:.1f} ({100 * q['min']:.1f}, "
                     f"{100 * q['max']:.1f}) | {100 * c['mean']:+.1f} | {100 * c['worst']:+.1f} | "
                     f"{c['users_worse']} / {c['users_better']} |")
    lines += ["", "Users who lose most, per section (score, change in points):", ""]
    for s in sections:
        shown = ", ".join(f"{w['user_id']} {100 * w['score']:.1f} ({100 * w['change']:+.1f})"
                          for w in p["worst_users"][s])
        lines.append(f"- {s}: {shown}")
    return "\n".join(lines) + "\n"

