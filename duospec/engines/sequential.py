"""Draft, then verify, in one process.

Each round: 1 draft a TokenTree rooted at the last emitted token, then the shared steps
(`engines/steps.py`): 2 score all its nodes in one target pass, 3 accept a path, 4 keep exactly that
path in the target cache, 5 re-budget and emit. Autoregressive decoding is the same loop with no
drafter (a tree of just the root).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import torch

from duospec.budget.policy import GammaPolicy
from duospec.config import GenerationRequest
from duospec.drafting import Drafter
from duospec.engines import steps
from duospec.engines.steps import make_generator  # noqa: F401  (kept importable from here)
from duospec.models.base import Model
from duospec.stats import GenerationStats


def generator_for_drafter(drafter: Drafter | None, target_generator: torch.Generator, seed: int | None) -> torch.Generator:
    """The generator a drafter samples with: the target's where both share a device (so seeded runs
    repeat as before), else one of the draft's own device seeded from the request (a CPU draft
    beside a CUDA target cannot draw from a CUDA generator)."""
    device = getattr(getattr(drafter, "model", None), "device", None)
    if device is None or torch.device(device).type == target_generator.device.type:
        return target_generator
    return steps.make_generator(steps.derived_seed(seed), torch.device(device))


def generate_tokens(
    target: Model,
    drafter: Drafter | None,
    prompt_ids: list[int],
    request: GenerationRequest,
    policy: GammaPolicy | None,
    eos_ids: frozenset[int],
    stats: GenerationStats,
    tracker=None,
) -> Iterator[list[int]]:
    """Yield the new tokens of each round until EOS, max_new_tokens or the context's end.

    Sets stats.finish_reason when it ends; an interrupted consumer leaves it empty. tracker (a
    costs.CostTracker) hears each round's real pass and draft-step times, so kept cost figures that
    the machine contradicts get replaced (between requests, never during one).
    """
    sampling = request.sampling
    generator = steps.make_generator(sampling.seed, target.device)
    draft_generator = generator_for_drafter(drafter, generator, sampling.seed)
    # The cache keeps what this prompt shares with the last request's context (models/prefix.py);
    # a drafter keeps its draft cache's shared prefix the same way at its first proposal.
    reused = steps.reuse_prefix(target, prompt_ids, stats)
    if drafter is not None:
        drafter.reset()
    if policy is not None:
        policy.reset()

    first_token = steps.prefill(target, prompt_ids, sampling, generator, stats, reused)
    progress = steps.Progress([*prompt_ids, first_token], 1, target.max_context or (len(prompt_ids) + request.max_new_tokens + 1))
    steps.hold(target, progress)
    yield [first_token]
    if first_token in eos_ids:
        stats.finish("eos")
        return

    while True:
        room, ended = progress.room(request)
        if ended:
            stats.finish(ended)
            return
        budget = policy.next_budget().capped(room) if (drafter and policy) else None
        if budget is not None and budget.tree:
            # capped() limits a tree's depth; every node also takes a cell of the target's cache, so the
            # context's end limits their number too (llama.cpp refuses a pass past its context).
            budget = replace(budget, max_tokens=min(budget.max_tokens, progress.max_context - len(progress.context) - 1))

        # 1. draft
        start = time.perf_counter()
        proposed = drafter is not None and budget is not None and budget.max_tokens > 0
        if proposed:
            tree = drafter.propose(progress.context, budget, sampling, draft_generator).to(target.device)
        else:
            tree = steps.root_only(progress.context, target.device)
        draft_seconds = time.perf_counter() - start
        stats.draft_seconds += draft_seconds

        # 2-4. score, accept, keep
        pass_start = stats.target_seconds
        if tree.log_probs is not None:  # a best-first tree (specexec): reduced scoring, no [n, V] logits
            verdict = steps.accept_choices(tree, steps.score_choices(target, tree, sampling, generator, stats), stats)
        else:
            verdict = steps.accept(tree, steps.score(target, tree, stats), request, generator, stats)
        if tracker is not None:
            tracker.target_pass(tree.n_nodes, stats.target_seconds - pass_start)
            if proposed and tree.n_draft and tree.log_probs is None and _drafted_with_model(drafter):
                tracker.draft_steps(tree.n_draft, draft_seconds)  # one draft pass per token (the root's included); not so for trees
        steps.keep(target, verdict, progress)
        if proposed:
            drafter.feedback(verdict)

        # 5. re-budget from this round's outcome, emit
        if policy is not None and proposed:
            policy.observe_round(tree, verdict)
            stats.alpha_estimate = policy.alpha
        kept, reason = steps.emit(tree, verdict, progress, request, eos_ids, stats, drafted=drafter is not None)
        yield kept
        if reason:
            stats.finish(reason)
            return


def _drafted_with_model(drafter: Drafter) -> bool:
    """Whether the last proposal ran draft-model steps (auto's lookup rounds do not)."""
    return getattr(drafter, "last_round_used_model", getattr(drafter, "model", None) is not None)
