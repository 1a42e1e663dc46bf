"""DuoDecoding: the draft drafts in its own process while the target verifies (DESIGN.md 1.3).

Each round the target takes the chain the draft process has ready (waiting only for as many tokens as
sequential drafting would pay for), optionally widened into a tree by alternative first tokens
(dynamic multi-sequence drafting, `drafting/multiseq.py`), and runs the shared steps on it:
score, accept, keep, emit (`engines/steps.py`). While it scores, the draft process keeps drafting as
if the whole chain were accepted, its guess of the target's next token included; `commit` tells it what
was emitted, and it either goes on or rolls back.

If the draft process dies, hangs or breaks, the generation continues without it (plain target
steps, the same tokens: every emitted token is the target's choice in both cases) and one warning says
so. Thread placement (which cores the target and the draft use) is a `ThreadSplit`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from duospec.budget.duo import DuoPlanner
from duospec.config import GenerationRequest
from duospec.engines import steps
from duospec.engines.draft_process import ChainReply, DraftProcess, DraftProcessLost
from duospec.models.base import Model
from duospec.stats import GenerationStats
from duospec.tree import TokenTree


@dataclass(frozen=True)
class ThreadSplit:
    """Where target and draft run. cores None = no pinning (the OS schedules across all cores)."""

    target_threads: int
    draft_threads: int
    target_cores: frozenset[int] | None
    draft_cores: frozenset[int] | None

    @property
    def label(self) -> str:
        def side(name: str, threads: int, cores: frozenset[int] | None) -> str:
            where = "all cores, shared" if cores is None else f"cores {','.join(map(str, sorted(cores)))}"
            return f"{name} {threads} thread{'s' if threads > 1 else ''} ({where})"

        return f"{side('target', self.target_threads, self.target_cores)} + {side('draft', self.draft_threads, self.draft_cores)}"

    def key(self) -> str:
        return f"t{self.target_threads}:{sorted(self.target_cores or [])}+d{self.draft_threads}:{sorted(self.draft_cores or [])}"


def candidate_splits(device: torch.device, cores: list[int] | None = None) -> list[ThreadSplit]:
    """The placements worth measuring on this machine.

    A GPU target needs one core to launch its kernels; the draft gets the rest. On a CPU the cores are
    divided (draft 1..n-1 cores, pinned, the target the remaining ones), and one shared placement
    lets the target keep every core with a 1-thread draft beside it (the OS interleaves them).
    """
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    n = len(cores)
    if device.type != "cpu":
        draft = frozenset(cores[1:]) if n > 1 else None
        return [ThreadSplit(1, max(1, n - 1), frozenset(cores[:1]) if n > 1 else None, draft)]
    if n == 1:
        return [ThreadSplit(1, 1, None, None)]
    splits = [ThreadSplit(n - d, d, frozenset(cores[: n - d]), frozenset(cores[n - d :])) for d in range(1, min(n - 1, 4) + 1)]
    splits.append(ThreadSplit(n, 1, None, None))
    return splits


@contextmanager
def target_placement(target: Model, split: ThreadSplit) -> Iterator[None]:
    """Run the target on the split's threads and cores for a while, then put both back.

    Affinity is per thread on Linux, and the target's thread pool already exists, so every thread of
    this process is moved (and threads created later inherit the calling thread's mask).
    """
    set_threads = getattr(target, "set_threads", None)
    old_threads = getattr(target, "threads", None)
    old_masks = _thread_affinities()
    if set_threads is not None and target.device.type == "cpu":
        set_threads(split.target_threads)
    if split.target_cores is not None:
        _set_thread_affinities({tid: set(split.target_cores) for tid in old_masks})
    try:
        yield
    finally:
        if set_threads is not None and old_threads is not None and target.device.type == "cpu":
            set_threads(old_threads)
        if split.target_cores is not None:
            _set_thread_affinities(old_masks)


def _thread_affinities() -> dict[int, set[int]]:
    masks = {}
    for name in os.listdir("/proc/self/task"):
        try:
            masks[int(name)] = os.sched_getaffinity(int(name))
        except OSError:  # the thread ended meanwhile
            pass
    return masks


def _set_thread_affinities(masks: dict[int, set[int]]) -> None:
    for tid, mask in masks.items():
        try:
            os.sched_setaffinity(tid, mask)
        except OSError:
            pass


def generate_duo(
    target: Model,
    draft: DraftProcess | None,
    prompt_ids: list[int],
    request: GenerationRequest,
    planner: DuoPlanner,
    eos_ids: frozenset[int],
    stats: GenerationStats,
    on_lost=None,
    max_sequences: int = 8,
    timeline: list | None = None,
    reuse_draft: bool = True,
) -> Iterator[list[int]]:
    """Yield each round's new tokens, the draft drafting in its own process meanwhile.

    on_lost(error) is called once if the draft process is lost; the generation then goes on alone.
    timeline, when a list, receives ("wait" | "target", start, end) perf_counter intervals (plots).
    reuse_draft: the draft process keeps the prefix it shares with its last sequence (else it resets;
    the target's own reuse follows its record, models/prefix.py).
    """
    sampling = request.sampling
    generator = steps.make_generator(sampling.seed, target.device)
    reused = steps.reuse_prefix(target, prompt_ids, stats)  # the prefix shared with the last request stays cached
    planner.reset()

    def lose(error: DraftProcessLost) -> None:
        nonlocal draft
        draft = None
        stats.fallback = str(error)
        if on_lost is not None:
            on_lost(error)

    try:
        if draft is not None:
            try:
                draft.begin(prompt_ids, sampling, steps.derived_seed(sampling.seed, 2), reuse=reuse_draft)
            except DraftProcessLost as error:
                lose(error)
        prefill_start = time.perf_counter()
        first_token = steps.prefill(target, prompt_ids, sampling, generator, stats, reused)
        if timeline is not None:
            timeline.append(("prefill", prefill_start, time.perf_counter()))
        progress = steps.Progress([*prompt_ids, first_token], 1, target.max_context or (len(prompt_ids) + request.max_new_tokens + 1))
        steps.hold(target, progress)
        if draft is not None:
            try:
                draft.commit([first_token])
            except DraftProcessLost as error:
                lose(error)
        yield [first_token]
        if first_token in eos_ids:
            stats.finish("eos")
            return

        first_round = True
        while True:
            room, ended = progress.room(request)
            if ended:
                stats.finish(ended)
                return
            # 1. the draft's ready chain (waiting only for what sequential drafting would pay for)
            start = time.perf_counter()
            tree, predicted = steps.root_only(progress.context, target.device), 0.0
            if draft is not None and room > 0:
                try:
                    reply = draft.take(
                        planner.wait_for(first_round),
                        min(room, planner.max_gamma),
                        sampled=not sampling.is_greedy,
                        max_sequences=max_sequences if sampling.is_greedy else 1,
                    )
                    tree, predicted = _plan_tree(progress.context[-1], reply, planner, room, sampling.is_greedy, max_sequences, target.device)
                except DraftProcessLost as error:
                    lose(error)
            stats.draft_seconds += time.perf_counter() - start  # the target's wait for the draft
            if timeline is not None:
                timeline.append(("wait", start, time.perf_counter()))
            first_round = False

            # 2-4. score, accept, keep (the draft drafts on meanwhile)
            pass_start = time.perf_counter()
            logits = steps.score(target, tree, stats)
            verdict = steps.accept(tree, logits, request, generator, stats)
            steps.keep(target, verdict, progress)
            planner.observe_pass(tree.n_nodes, time.perf_counter() - pass_start)
            if timeline is not None:
                timeline.append(("target", pass_start, time.perf_counter()))
            if draft is not None:
                try:
                    draft.commit(verdict.tokens)
                except DraftProcessLost as error:
                    lose(error)

            # 5. learn, emit
            if tree.n_draft:
                planner.observe(predicted, tree.n_draft, verdict.n_accepted)
                stats.alpha_estimate = planner.calibration
            kept, reason = steps.emit(tree, verdict, progress, request, eos_ids, stats, drafted=True)
            yield kept
            if reason:
                stats.finish(reason)
                return
    finally:
        if draft is not None:
            try:
                draft.park()
            except DraftProcessLost:
                pass


def _plan_tree(
    root: int, reply: ChainReply, planner: DuoPlanner, room: int, greedy: bool, max_sequences: int, device: torch.device
) -> tuple[TokenTree, float]:
    """The tree this round verifies: the chain prefix the planner finds worth its pass, plus the
    alternative first tokens that pay for their place; and the accepted tokens it predicts."""
    gamma, predicted = planner.choose_chain(reply.confidences[:room])
    if gamma == 0:
        return TokenTree.chain(torch.tensor([root], device=device)), 0.0
    chain = reply.tokens[:gamma]
    alternatives = planner.choose_alternatives(list(reply.alternatives), list(reply.alternative_probs), gamma, max_sequences - 1)
    if alternatives:
        from duospec.drafting.multiseq import tree_from_sequences

        tree = tree_from_sequences(root, [chain, *([token] for token in alternatives)]).to(device)
        return tree, predicted + sum(reply.alternative_probs[: len(alternatives)])
    probs = None if greedy or reply.draft_probs is None else reply.draft_probs[:gamma].to(device)
    return TokenTree.chain(torch.tensor([root, *chain], device=device), probs), predicted


def warn_lost(error: DraftProcessLost) -> None:
    print(f"duospec: warning: the draft process was lost ({error}); going on without it, the output stays the same", file=sys.stderr)
