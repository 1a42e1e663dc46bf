"""The round loop: every method's generation runs through `generate_tokens`.

A generation is the prompt's pass (step 0), then rounds until EOS, the requested length or the
context's end. Each round:

  1 draft    the source proposes a TokenTree rooted at the last emitted token (engines/source.py:
             in this process, from a draft process, or None: the root alone, an autoregressive step)
  2 score    all the tree's nodes in one target pass                         (engines/steps.py)
  3 accept   the verifier picks the path the target keeps: greedy, rejection sampling or
             target-sample matching, exact for every tree                   (verify.py)
  4 keep     exactly that path stays in the target's cache
  5 observe  the source hears the emitted tokens and the round's outcome: drafter feedback, the
             budget's evidence, measured costs; it re-budgets the next round from them
  6 emit     the round's tokens, cut at the first EOS or the request's length

Every emitted token is the target's own choice (step 3), so what a source drafts, or whether it is
lost midway, changes the speed and never the tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from duospec.budget.batch import pass_limit
from duospec.config import GenerationRequest
from duospec.engines import steps
from duospec.engines.in_process import InProcessSource
from duospec.engines.source import Round, RoundSource
from duospec.models.base import Model
from duospec.models.joint import PassPreempted
from duospec.stats import GenerationStats
from duospec.tree import TokenTree
from duospec.verify import Verdict


def generate_tokens(
    target: Model,
    source: RoundSource | None,
    prompt_ids: list[int],
    request: GenerationRequest,
    eos_ids: frozenset[int],
    stats: GenerationStats,
    timeline: list | None = None,
) -> Iterator[list[int]]:
    """Yield the new tokens of each round until EOS, max_new_tokens or the context's end.

    source None decodes autoregressively. Sets stats.finish_reason when it ends; an interrupted
    consumer leaves it empty (the source still ends). timeline, when a list, receives
    ("prefill" | "wait" | "target", start, end) perf_counter intervals (bench/timeline.py's plots).
    """
    source = source if source is not None else InProcessSource(None)
    sampling = request.sampling
    generator = steps.make_generator(sampling.seed, target.device)
    # The cache keeps what this prompt shares with the last request's context (models/prefix.py).
    reused = steps.reuse_prefix(target, prompt_ids, stats)
    try:
        source.begin(prompt_ids, sampling, generator, stats)
        # 0. the prompt in one pass gives the first token
        start = time.perf_counter()
        first_token = steps.prefill(target, prompt_ids, sampling, generator, stats, reused)
        _mark(timeline, "prefill", start)
        progress = steps.Progress([*prompt_ids, first_token], 1, target.max_context or (len(prompt_ids) + request.max_new_tokens + 1))
        steps.hold(target, progress)
        source.commit([first_token])
        yield [first_token]
        if first_token in eos_ids:
            stats.finish("eos")
            return

        while True:
            room, ended = progress.room(request)
            if ended:
                stats.finish(ended)
                return
            # 1. draft (the source caps a tree's nodes by the cells the context has left: every node takes one;
            # under batching, also by what the pass may hold to stay fair to the other requests)
            start = time.perf_counter()
            cells = progress.max_context - len(progress.context) - 1
            fair = pass_limit(target)
            if fair is not None:
                room, cells = min(room, fair - 1), min(cells, fair - 1)
            tree = source.propose(progress.context, room, cells)
            tree = steps.root_only(progress.context, target.device) if tree is None else tree.to(target.device)
            draft_seconds = time.perf_counter() - start
            stats.draft_seconds += draft_seconds
            _mark(timeline, "wait", start)

            # 2-3. score, accept
            start, pass_start = time.perf_counter(), stats.target_seconds
            tree, verdict = _score_and_accept(target, tree, request, generator, stats)
            pass_seconds = stats.target_seconds - pass_start

            # 4. keep
            steps.keep(target, verdict, progress)
            target_wall_seconds = time.perf_counter() - start
            _mark(timeline, "target", start)

            # 5. observe (and so re-budget the next round)
            source.commit(verdict.tokens)
            source.observe(Round(tree, verdict, draft_seconds, pass_seconds, target_wall_seconds))

            # 6. emit
            kept, reason = steps.emit(tree, verdict, progress, request, eos_ids, stats, drafted=source.drafts)
            yield kept
            if reason:
                stats.finish(reason)
                return
    finally:
        source.end()


def _score_and_accept(target: Model, tree: TokenTree, request: GenerationRequest, generator: torch.Generator, stats: GenerationStats) -> tuple[TokenTree, Verdict]:
    """Score the tree in one target pass and accept a path: the tree scored and its verdict. Under
    batching a request that joins may stop a wide pass (models/joint.py): the tree is then narrowed
    to its first nodes, as many as the fairness rule allows beside the newcomer (budget/batch.py's
    pass_limit), and scored again; the first nodes of a tree are a tree, verified as exactly."""
    while True:
        try:
            if tree.log_probs is not None:  # a best-first tree (specexec): reduced scoring, no [n, V] logits
                return tree, steps.accept_choices(tree, steps.score_choices(target, tree, request.sampling, generator, stats), stats)
            return tree, steps.accept(tree, steps.score(target, tree, stats), request, generator, stats)
        except PassPreempted:
            if tree.n_nodes == 1:
                raise  # never so: a lone root is no wide pass
            tree = tree.first(max(1, min(pass_limit(target) or tree.n_nodes, tree.n_nodes - 1)))


def _mark(timeline: list | None, kind: str, start: float) -> None:
    if timeline is not None:
        timeline.append((kind, start, time.perf_counter()))
