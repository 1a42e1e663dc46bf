"""What the Duo engine needs around it: the draft process, the thread split and the costs measured
with both sides running together.

The split is chosen from measurement, not assumed: for every candidate placement (engines/duo.py's
`candidate_splits`) the target's pass costs are measured while the draft process drafts without end
beside it, and the draft's step time while the target works; the placement whose predicted Duo rate is
highest at a typical acceptance wins. The figures are kept on disk like the other costs (budget/kept.py).
The chosen process stays alive between requests; a lost one is restarted at the next request.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from duospec.budget.book import CostBook
from duospec.budget.corrections import CostTracker, corrected_draft_step, corrected_target_costs
from duospec.budget.duo import DuoPlanner
from duospec.budget.kept import Measured, cached_measurement, keep_measurement
from duospec.budget.load import under_load
from duospec.budget.model import CostProfile, expected_tokens
from duospec.budget.timing import measure_target_costs
from duospec.config import GenerationRequest
from duospec.engines.draft_process import DraftProcess, DraftProcessLost
from duospec.engines.duo import DuoSource, ThreadSplit, candidate_splits, target_placement, warn_lost
from duospec.engines.rounds import generate_tokens
from duospec.models.base import Model
from duospec.stats import GenerationStats

DUO_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)
TYPICAL_ALPHA = 0.8  # the acceptance at which placements are compared (this model pair's usual range)


@dataclass(frozen=True)
class SplitCosts:
    """Costs measured with target and draft running together in one placement."""

    target_pass_seconds: dict[int, float]
    draft_step_seconds: float

    def predicted_rate(self, alpha: float = TYPICAL_ALPHA, max_gamma: int = 16) -> tuple[float, int]:
        """Tokens per second of the best steady Duo round at acceptance alpha, and its gamma: a round
        lasts as long as the slower side (the target's pass or the draft's gamma steps)."""
        profile = CostProfile(self.target_pass_seconds)
        best = (1.0 / profile.target_pass(1), 0)
        for gamma in range(1, max_gamma + 1):
            seconds = max(profile.target_pass(gamma + 1), gamma * self.draft_step_seconds)
            best = max(best, (expected_tokens(alpha, gamma) / seconds, gamma))
        return best


@dataclass(frozen=True)
class DuoDraft:
    """How the draft process gets its draft: `factory(threads)` gives what the child builds it from
    (engines/draft_process.py: DraftFromSource or DraftObject), and `label` names it in the key its
    measured costs are kept under (None: a draft attached in memory, measured every run, never kept)."""

    factory: Callable[[int], object]
    label: str | None


class DuoRuntime:
    """Owns the draft process of a pipeline's `duo` requests: the target it runs beside, the pipeline's
    cost book (for the load probe, the notes and the target's identity) and how to build the draft."""

    def __init__(self, target: Model, eos_ids: frozenset[int], book: CostBook, draft: DuoDraft) -> None:
        self.target = target
        self.eos_ids = eos_ids
        self.book = book  # the pipeline's measured costs: its load probe, its notes, the target's identity
        self.cold = False  # the next sequence may not reuse the draft process's prefix (Pipeline.forget_prefixes)
        self.draft = draft
        self.process: DraftProcess | None = None
        self.split: ThreadSplit | None = None
        self.costs: SplitCosts | None = None
        self.report: list[str] = []  # how the split was chosen (for --verbose and the bench)
        self.timeline: list | None = None  # set to a list to record the next generation's intervals
        self.tracker = CostTracker()  # real pass and step times of duo requests, for the split's costs
        self.measured: dict[ThreadSplit, SplitCosts] = {}  # every placement's costs, to re-decide with
        self._keys: dict[ThreadSplit, list[str] | None] = {}

    # -- setup ------------------------------------------------------------------------------------
    def _start(self, split: ThreadSplit) -> DraftProcess:
        return DraftProcess(self.draft.factory(split.draft_threads), self.target.vocab_size, split.draft_cores, split.draft_threads)

    def _measure(self, split: ThreadSplit, process: DraftProcess) -> tuple[SplitCosts, bool]:
        """Target pass costs with the draft drafting beside it, and the draft's step meanwhile; and
        whether the machine was visibly busy with something else meanwhile (then it is not kept)."""
        target_model = self.target
        process.busy()
        _wait_for_steady_drafting(process)
        with target_placement(target_model, split):
            target, reading = self.book.probe.watch(lambda: measure_target_costs(target_model, DUO_SIZES, repeats=3), target_model)
        steps = sorted(process.step_times())
        process.park()
        if not steps:
            raise DraftProcessLost("the draft process took no steps while the target was measured")
        if split.target_cores is None:
            # Sharing cores with the draft is this placement's own contention, not outside load: only
            # the load average may say the machine was busy.
            reading = replace(reading, cpu_bound=False)
        return SplitCosts(target, steps[len(steps) // 2]), under_load(reading)

    def _cached_costs(self, split: ThreadSplit, process_holder: list) -> SplitCosts:
        identity = self.book.target_identity
        key = None if identity is None or self.draft.label is None else [*identity, "duo", self.draft.label, split.key(), *map(str, DUO_SIZES)]

        def measure() -> Measured:
            process = self._start(split)
            process_holder.append(process)
            costs, loaded = self._measure(split, process)
            return Measured(_as_json(costs), loaded)

        self._keys[split] = key
        value = cached_measurement(key, measure, notify=self.book.notes)
        return SplitCosts({int(n): float(s) for n, s in value["target"].items()}, float(value["draft_step"]))

    def prepare(self) -> tuple[DraftProcess | None, ThreadSplit, SplitCosts]:
        """The draft process, its placement and its costs (measuring placements the first time)."""
        if self.split is None:
            self._choose_split()
        if self.process is None or not self.process.alive:
            try:
                self.process = self._start(self.split)
            except DraftProcessLost as error:
                warn_lost(error)
                self.process = None
        if self.process is not None and self.costs is not None:
            self.process.step_seconds = self.costs.draft_step_seconds  # what a take's deadline allows per token
        return self.process, self.split, self.costs

    def _choose_split(self) -> None:
        candidates = candidate_splits(self.target.device)
        results: list[tuple[float, int, ThreadSplit, SplitCosts]] = []
        started: list[DraftProcess] = []
        try:
            for split in candidates:
                holder: list[DraftProcess] = []
                try:
                    costs = self._cached_costs(split, holder)
                except DraftProcessLost as error:
                    self.report.append(f"{split.label}: not measured ({error})")
                    continue
                finally:
                    started.extend(holder)
                rate, gamma = costs.predicted_rate()
                results.append((rate, gamma, split, costs))
        finally:
            for process in started:
                process.close()
        if not results:
            raise DraftProcessLost("no thread split could be measured: " + "; ".join(self.report))
        self.measured = {split: costs for _, _, split, costs in results}
        rate, gamma, self.split, self.costs = max(results, key=lambda item: item[0])
        self.report += [
            f"{split.label}: target pass {costs.target_pass_seconds[1]:.3f} s (1 token) / {costs.target_pass_seconds[4]:.3f} s (4), "
            f"draft step {costs.draft_step_seconds:.3f} s; predicted {rate_:.1f} tok/s at alpha {TYPICAL_ALPHA} (gamma {gamma_})"
            for rate_, gamma_, split, costs in results
        ]
        self.report.append(f"chosen: {self.split.label}")

    def predicted_rate(self, alpha: float) -> float:
        """Tokens per second the best measured placement promises at acceptance `alpha` (measuring
        the placements first if need be): what `auto` compares with the in-process methods."""
        if self.costs is None:
            self._choose_split()
        return self.costs.predicted_rate(alpha)[0]

    # -- generation -------------------------------------------------------------------------------
    def take_reuse(self) -> bool:
        """Whether the next sequence may keep the prefix it shares with the draft process's last one."""
        reuse, self.cold = not self.cold, False
        return reuse

    def planner(self, gamma: int | None) -> DuoPlanner:
        assert self.costs is not None
        return DuoPlanner(CostProfile(self.costs.target_pass_seconds), self.costs.draft_step_seconds, fixed_gamma=gamma)

    def generate(
        self, prompt_ids: list[int], request: GenerationRequest, planner: DuoPlanner, stats: GenerationStats, reuse_draft: bool = True
    ) -> Iterator[list[int]]:
        """Duo's rounds with the target on its share of the machine; restores it afterwards.
        reuse_draft: the draft process keeps the prefix shared with its last sequence."""
        process, split, _ = self.prepare()
        try:
            with target_placement(self.target, split):
                source = DuoSource(process, planner, reuse=reuse_draft, on_lost=self._lost)
                yield from generate_tokens(self.target, source, prompt_ids, request, self.eos_ids, stats, self.timeline)
        finally:
            self._track(planner)

    def _track(self, planner: DuoPlanner) -> None:
        """Feed the request's real pass and step times to the tracker; replace the split's kept costs
        where they disagree (from the next request on: this one's planner keeps its profile)."""
        for tokens, seconds in planner.pass_seconds:
            self.tracker.target_pass(tokens, seconds)
        if self.process is not None and self.timeline is None:
            try:
                for seconds in self.process.step_times():
                    self.tracker.draft_steps(1, seconds)
            except DraftProcessLost:
                pass
        if self.costs is None:
            return
        target = corrected_target_costs(CostProfile(self.costs.target_pass_seconds), self.tracker)
        step = corrected_draft_step(self.costs.draft_step_seconds, self.tracker)
        if target is None and step is None:
            return
        old = self.costs
        self.costs = SplitCosts(target or old.target_pass_seconds, step if step is not None else old.draft_step_seconds)
        kept = keep_measurement(self._keys.get(self.split), _as_json(self.costs))
        self.measured[self.split] = self.costs
        self.book.notes(
            f"duo costs corrected from real rounds: target t(1) {old.target_pass_seconds[min(old.target_pass_seconds)]:.3f} -> "
            f"{self.costs.target_pass_seconds[min(self.costs.target_pass_seconds)]:.3f} s, draft step {old.draft_step_seconds:.3f} -> "
            f"{self.costs.draft_step_seconds:.3f} s{', kept on disk' if kept else ''}"
        )
        self.tracker = CostTracker()
        self._redecide()

    def _redecide(self) -> None:
        """After a correction, move to another placement if it now promises more (next request)."""
        if len(self.measured) < 2 or self.split is None:
            return
        best = max(self.measured, key=lambda split: self.measured[split].predicted_rate()[0])
        if best != self.split:
            self.book.notes(f"duo moves to {best.label}: the real rounds of {self.split.label} were slower than measured")
            self.close()
            self.split, self.costs = best, self.measured[best]

    def _lost(self, error: DraftProcessLost) -> None:
        """A generation lost the process (its DuoSource warned): the next request starts a new one."""
        if self.process is not None:
            self.process.close()
            self.process = None

    def close(self) -> None:
        if self.process is not None:
            self.process.close()
            self.process = None


def _wait_for_steady_drafting(process: DraftProcess, steps: int = 3, timeout_s: float = 60.0) -> None:
    """Until the draft takes single-token steps: its filler prefill is a large batch that would make
    the target's first measured passes look slower than they are beside a drafting draft."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while seen < steps and time.monotonic() < deadline:
        time.sleep(0.2)
        seen += len(process.step_times())


def _as_json(costs: SplitCosts) -> dict:
    return {"target": {str(n): s for n, s in costs.target_pass_seconds.items()}, "draft_step": costs.draft_step_seconds}


def describe_choice(runtime: DuoRuntime, planner: DuoPlanner) -> str:
    lines = ["duospec: duo thread split (measured with both sides running):", *(f"  {line}" for line in runtime.report)]
    lines.append(f"duospec: duo budget: {planner.describe()}")
    return "\n".join(lines)


def print_choice(runtime: DuoRuntime, planner: DuoPlanner) -> None:
    print(describe_choice(runtime, planner), file=sys.stderr)
