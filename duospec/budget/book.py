"""A pipeline's cost book: the measured figures its budgets are built from, kept honest between requests.

The engines and the duo runtime are handed this book instead of reading a Pipeline's insides. It holds
the target's pass-cost curve, the draft's step, and SpecExec's extended curves; each is measured on
first use (or read from disk, spot-checked: kept.py), and corrected after each request from the real
pass times its `tracker` heard (corrections.py). The draft is reached through `draft_model`, a
callable, so a method that never drafts never loads one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from duospec.budget.corrections import CostTracker, corrected_draft_step, corrected_target_costs, may_keep_correction
from duospec.budget.kept import draft_step_for, draft_step_key, growing_costs_for, keep_measurement, read_measurement, target_cost_key, target_costs_for
from duospec.budget.load import LoadProbe, LoadReading, under_load
from duospec.budget.model import CostProfile
from duospec.budget.tree import DRAFT_WIDTHS, LARGE_SIZES
from duospec.models.base import Model


@dataclass
class Notes:
    """Where the book's diagnostics go: stderr when both are on (`--verbose` with progress output)."""

    progress: bool = True
    verbose: bool = False

    def __call__(self, message: str) -> None:
        if self.progress and self.verbose:
            print(f"duospec: {message}", file=sys.stderr)


class CostBook:
    """Measured costs of one target (and its draft), with the identity each is kept on disk under.

    target_identity / draft_identity: what a figure depends on (model, dtype, device, threads,
    versions); None for models built in memory, whose figures are measured every run and never kept.
    """

    def __init__(
        self,
        target: Model,
        target_identity: list[str] | None,
        draft_model: Callable[[], tuple[Model, list[str] | None]],
        notes: Notes,
        labels: tuple[str, str] = ("target", "draft"),
    ) -> None:
        self.target = target
        self.target_identity = target_identity
        self._draft_model = draft_model
        self.notes = notes
        self.labels = labels  # how the diagnostics name the two models, e.g. "target (llama.cpp)"
        self.tracker = CostTracker()  # real pass/step times the engines report (see reconcile)
        self.probe = LoadProbe()  # tells measurements and requests taken under visible load
        self.target_costs: dict[int, float] | None = None  # n new tokens -> seconds of one pass
        self.draft_step: float | None = None
        self._tree_costs: tuple[CostProfile, CostProfile] | None = None
        self._draft: Model | None = None
        self.draft_identity: list[str] | None = None

    @property
    def draft(self) -> Model:
        """The draft model (loaded on first use by whoever the book was given)."""
        if self._draft is None:
            self._draft, self.draft_identity = self._draft_model()
        return self._draft

    def forget_draft(self) -> None:
        """Another draft model was attached: its figures start afresh."""
        self._draft, self.draft_identity, self.draft_step, self._tree_costs = None, None, None, None
        self.tracker.clear_draft()

    def identity(self, model: Model) -> list[str] | None:
        """The key a figure of `model` is kept under; None for models built in memory."""
        if model is self.target:
            return self.target_identity
        if model is self._draft:
            return self.draft_identity
        return None

    def target_profile(self, remeasure: bool = False) -> CostProfile:
        """Seconds per target pass over n tokens, measured once per machine and kept on disk."""
        if self.target_costs is None or remeasure:
            self.target_costs = target_costs_for(self.target, self.target_identity, remeasure, self.probe, self.notes)
            curve = ", ".join(f"{n}: {s:.3f}" for n, s in sorted(self.target_costs.items()))
            self.notes(f"{self.labels[0]} pass seconds by tokens per pass: {curve}")
        return CostProfile(self.target_costs)

    def draft_step_seconds(self, remeasure: bool = False) -> float:
        """Seconds per draft step, measured once per machine and kept on disk."""
        if self.draft_step is None or remeasure:
            draft = self.draft
            self.draft_step = draft_step_for(draft, self.draft_identity, remeasure, self.probe, self.notes)
            self.notes(f"{self.labels[1]} step {self.draft_step:.3f} s")
        return self.draft_step

    def tree_costs(self, depth: int) -> tuple[CostProfile, CostProfile]:
        """The target's pass cost extended to SpecExec's tree sizes, and the draft's pass cost by width.

        Measured once per machine (kept on disk), each up to the first size whose pass costs more than
        the deepest tree could repay: (depth + 2) one-token target passes.
        """
        if self._tree_costs is None:
            base = self.target_profile()
            ceiling = (depth + 2) * base.target_pass(1)
            large = growing_costs_for(self.target, self.target_identity, LARGE_SIZES, ceiling, "tree-target", probe=self.probe, notify=self.notes)
            draft = self.draft
            widths = growing_costs_for(draft, self.draft_identity, DRAFT_WIDTHS, ceiling, "tree-draft", probe=self.probe, notify=self.notes)
            self._tree_costs = (CostProfile({**base.target_pass_seconds, **large}), CostProfile(widths))
            curve = ", ".join(f"{n}: {s:.3f}" for n, s in sorted(self._tree_costs[0].target_pass_seconds.items()))
            self.notes(f"target pass seconds by tokens (trees): {curve}; draft pass by width: " + ", ".join(f"{n}: {s:.3f}" for n, s in sorted(widths.items())))
        return self._tree_costs

    def reconcile(self, reading: LoadReading | None = None) -> None:
        """Correct the figures in use from the real times in `tracker`; called after each request.

        A figure whose tracked median (MIN_SAMPLES or more) disagrees by more than AGREEMENT_FACTOR is
        replaced in memory; the target curve is scaled as a whole (corrected_target_costs). It is also
        written to disk unless `reading` shows the request ran under visible load and the new figure is
        slower (may_keep_correction). Call it between requests only: a request's budget must stay a
        function of the profile it started with, so that seeded runs repeat.
        """
        loaded = reading is not None and under_load(reading)
        if self.target_costs is not None:
            corrected = corrected_target_costs(CostProfile(self.target_costs), self.tracker)
            if corrected is not None:
                old, self.target_costs = self.target_costs, corrected  # a new dict: running policies keep theirs
                scale = corrected[min(corrected)] / old[min(old)]
                key = target_cost_key(self.target_identity)
                kept = read_measurement(key)
                kept_one = float(kept["1"]) if isinstance(kept, dict) and isinstance(kept.get("1"), (int, float)) else None
                may_keep = may_keep_correction(corrected[min(corrected)], kept_one, loaded)
                self._keep(key, {str(n): s for n, s in corrected.items()}, may_keep, f"target pass curve scaled by {scale:.2f} from real passes")
        if self.draft_step is not None:  # a draft step in use: the draft was loaded to measure it
            step = corrected_draft_step(self.draft_step, self.tracker)
            if step is not None:
                old_step, self.draft_step = self.draft_step, step
                key = draft_step_key(self.identity(self.draft))
                kept = read_measurement(key)
                may_keep = may_keep_correction(step, kept if isinstance(kept, (int, float)) else None, loaded)
                self._keep(key, step, may_keep, f"draft step {old_step:.3f} s -> {step:.3f} s from real steps")

    def _keep(self, key: list[str] | None, value: object, may_keep: bool, what: str) -> None:
        """Write a corrected figure where it may be kept, and say what happened."""
        if key is None:
            self.notes(f"{what} (in memory)")
        elif may_keep:
            kept = keep_measurement(key, value)
            self.notes(f"{what}{', kept on disk' if kept else ''}")
        else:
            self.notes(f"{what}; not kept on disk: this request ran under visible load")

    def without_mode(self, part: str) -> CostBook:
        """A book for the same models with `part` left out of the target's identity and figures of its
        own (the default mode's costs beside --deterministic's: a row-wise pass costs more, so the
        budgets must not mix them). The draft is shared."""
        identity = None if self.target_identity is None else [p for p in self.target_identity if p != part]
        book = CostBook(self.target, identity, self._draft_model, self.notes, self.labels)
        book._draft, book.draft_identity, book.draft_step = self._draft, self.draft_identity, self.draft_step
        return book
