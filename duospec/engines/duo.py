"""DuoDecoding: the draft drafts in its own process while the target verifies (DESIGN.md 1.3).

`DuoSource` is the round loop's source (engines/rounds.py) for `duo`: each round the target takes the
chain the draft process has ready (waiting only for as many tokens as sequential drafting would pay
for), optionally widened into a tree by alternative first tokens (dynamic multi-sequence drafting,
`drafting/multiseq.py`), and the loop scores, accepts, keeps and emits it like any other method's.
While the target scores, the draft process keeps drafting as if the whole chain were accepted, its
guess of the target's next token included; `commit` tells it what was emitted, and it either goes on
or rolls back.

If the draft process dies, hangs or breaks, the generation continues without it (plain target
steps, the same tokens: every emitted token is the target's choice in both cases) and one warning says
so. Thread placement (which cores the target and the draft use) is a `ThreadSplit`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

from duospec.budget.duo import DuoPlanner
from duospec.config import SamplingConfig
from duospec.drafting.multiseq import tree_from_sequences
from duospec.engines import steps
from duospec.engines.draft_process import MAX_SEQUENCES, DraftProcess, DraftProcessLost
from duospec.engines.source import Round
from duospec.models.base import Model
from duospec.stats import GenerationStats
from duospec.tree import TokenTree

T = TypeVar("T")


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


class DuoSource:
    """The rounds' trees from a draft process (DraftProcess, or a stand-in with its begin, commit,
    take and park) sized by a DuoPlanner.

    It owns the draft process's loss: whichever request finds the process lost, the source warns
    once, records stats.fallback, calls on_lost (the runtime closes the process) and from then on
    proposes nothing, so the loop goes on with the target alone and the same tokens. A process that
    is None from the start (it failed to start) drafts nothing either, without a fallback to report.

    max_sequences: sequences per greedy round, the chain included (alternative first tokens widen it
    into a tree; sampled rounds are single chains). reuse: the draft process keeps the prefix it shares
    with its last sequence (else it resets; the target's own reuse follows its record, models/prefix.py).
    """

    drafts = True

    def __init__(
        self,
        process: DraftProcess | None,
        planner: DuoPlanner,
        max_sequences: int = MAX_SEQUENCES,
        reuse: bool = True,
        on_lost: Callable[[DraftProcessLost], None] | None = None,
    ) -> None:
        self.process = process
        self.planner = planner
        self.max_sequences = max_sequences
        self.reuse = reuse
        self.on_lost = on_lost
        self._first_round = True
        self._predicted = 0.0  # accepted draft tokens the planner predicted for this round's tree

    def begin(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator, stats: GenerationStats) -> None:
        """The draft process prefills the prompt while the target does (its own seed stream)."""
        self.sampling, self.stats = sampling, stats
        self._first_round = True
        self.planner.reset()
        self._ask(lambda process: process.begin(prompt_ids, sampling, steps.derived_seed(sampling.seed, 2), reuse=self.reuse))

    def propose(self, context: list[int], room: int, cells: int) -> TokenTree | None:
        """The chain the draft has ready, waiting only for as many tokens as sequential drafting would
        pay for, cut where the planner finds it stops paying, plus the alternative first tokens that
        pay for their place."""
        first_round, self._first_round = self._first_round, False
        self._predicted = 0.0
        if room <= 0:
            return None
        greedy = self.sampling.is_greedy
        reply = self._ask(
            lambda process: process.take(
                self.planner.wait_for(first_round), min(room, self.planner.max_gamma), sampled=not greedy, max_sequences=self.max_sequences if greedy else 1
            )
        )
        if reply is None:
            return None
        gamma, predicted = self.planner.choose_chain(reply.confidences[:room])
        if gamma == 0:
            return None
        root, chain = context[-1], reply.tokens[:gamma]
        alternatives = self.planner.choose_alternatives(list(reply.alternatives), list(reply.alternative_probs), gamma, self.max_sequences - 1)
        alternatives = alternatives[: max(0, cells - gamma)]  # every node takes a cache cell: near the context's end they run out
        if alternatives:
            self._predicted = predicted + sum(reply.alternative_probs[: len(alternatives)])
            return tree_from_sequences(root, [chain, *([token] for token in alternatives)])
        self._predicted = predicted
        probs = None if greedy or reply.draft_probs is None else reply.draft_probs[:gamma]
        return TokenTree.chain(torch.tensor([root, *chain]), probs)

    def commit(self, tokens: list[int]) -> None:
        """The draft process keeps its chain where it guessed `tokens`, else rolls back (it drafts on
        meanwhile as if the whole chain were accepted)."""
        self._ask(lambda process: process.commit(tokens))

    def observe(self, outcome: Round) -> None:
        """The planner learns the pass's real time, the acceptance rates and its confidences' calibration."""
        tree = outcome.tree
        self.planner.observe_pass(tree.n_nodes, outcome.target_wall_seconds)
        if tree.n_draft:
            self.planner.observe(self._predicted, tree.n_draft, outcome.verdict.n_accepted)
            self.stats.acceptance_estimate = self.planner.policy.alpha

    def end(self) -> None:
        """The draft process stops drafting ahead and stays loaded for the next generation."""
        if self.process is not None:
            try:
                self.process.park()
            except DraftProcessLost:
                pass  # the generation is over: nothing went on without the draft

    def _ask(self, request: Callable[[DraftProcess], T]) -> T | None:
        """One request to the draft process; None once it is lost (the one place a loss is handled)."""
        if self.process is None:
            return None
        try:
            return request(self.process)
        except DraftProcessLost as error:
            self.process = None
            self.stats.fallback = str(error)
            warn_lost(error)
            if self.on_lost is not None:
                self.on_lost(error)
            return None


def warn_lost(error: DraftProcessLost) -> None:
    print(f"duospec: warning: the draft process was lost ({error}); going on without it, the output stays the same", file=sys.stderr)
