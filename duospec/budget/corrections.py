"""Keeping the measured costs honest: load detection, spot checks of kept figures, online correction.

The draft budget (policy.py) decides from two measured costs, one target pass over n tokens and one
draft step, measured once per machine and kept on disk. One bad measurement used to poison every later
run: a first run on a busy machine measured a 0.047 s draft step as 1.46 s, kept it, and every later run
decoded at gamma 1 (0.73 tokens/s instead of about 9). Three guards:

1. Load detection (load.py's `under_load`): a measurement taken while other work competed for the CPU serves the
   run that took it but is never kept on disk.
2. Spot check (`spot_check_agrees`): a kept figure is re-timed cheaply when it is read; one that is off
   by more than AGREEMENT_FACTOR is measured again in full and replaced.
3. Online correction (`CostTracker`, `corrected_draft_step`, `corrected_target_costs`): engines report
   the real pass and step times; after each request the pipeline compares their medians with the
   figures in use and corrects those that disagree.

Determinism (model.py's module docstring): a request's budget decisions depend only on the profile it
started with, so corrections take effect from the next request on, never in the middle of one.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable

from duospec.budget.load import LoadProbe, under_load
from duospec.budget.model import CostProfile
from duospec.budget.timing import sample_step_seconds
from duospec.models.base import Model

# A kept figure and a new reading agree within this factor either way. Quiet-machine repeats of our
# measurements differ by 5-15% (clock ramp, cache state, a median of 3), and a spot check after a short
# prefill runs a few percent faster than the kept figure taken after 256 cached tokens; the expected
# tokens per second is flat near the best gamma, so an error under 1.5x moves gamma by about one step.
# A tighter factor would re-measure in full (tens of seconds) on ordinary noise; a looser one would let
# a machine that became 2x slower or faster keep a budget that drafts far too much or too little. The
# failure this guards against was 31x.
AGREEMENT_FACTOR = 1.5
# Samples a size (or the draft step) needs before its median may correct a figure: the median of 8
# pass times lies within about 10% of the true one for the spread we see, far inside 1.5x, and fewer
# would let a burst of slow passes (weights paged in after load, a garbage collection) decide. The
# budget's common sizes (one-token passes, gamma + 1) reach 8 within one request.
MIN_SAMPLES = 8
TRACK_WINDOW = 32  # newest samples kept per size: the median follows a machine whose speed changed


def agrees(kept: float, observed: float, factor: float = AGREEMENT_FACTOR) -> bool:
    """Whether two timings agree within `factor` either way."""
    return kept / factor <= observed <= kept * factor


def spot_check_agrees(
    model: Model, kept_seconds: float, probe: LoadProbe, notify: Callable[[str], None], label: str
) -> bool:
    """Whether a kept one-token figure of `model` may be used as it is (False: measure it again in full).

    A spot check that itself ran under visible load and came out slower says only that the machine is
    busy now: the kept figure stays (a full measurement now could not be kept either, and the online
    correction adapts this process's figures if the load persists). Load never makes a pass faster, so
    a spot check faster than the kept figure beyond the factor is believed whatever the load.
    """
    observed, reading = probe.watch(lambda: sample_step_seconds(model, probe.wall_clock), model)
    if agrees(kept_seconds, observed):
        return True
    if observed > kept_seconds and under_load(reading):
        notify(f"kept {label} {kept_seconds:.3f} s, spot check {observed:.3f} s under visible load: keeping the kept figure")
        return True
    notify(f"kept {label} {kept_seconds:.3f} s disagrees with a spot check ({observed:.3f} s): measuring again")
    return False


class CostTracker:
    """Real target pass and draft step times, recorded while engines generate.

    Engines call `target_pass(n_tokens, seconds)` after each verification pass over n_tokens new tokens
    (not the prefill: its sizes lie far outside the measured curve), and `draft_steps(n_steps, seconds)`
    after each round's drafting: n_steps one-token draft passes that took `seconds` in all (leave out a
    pass that feeds the draft several accepted tokens at once, it is no draft step). The newest
    TRACK_WINDOW samples per size are kept, across requests.

    The pipeline owns one tracker and compares it with its figures between requests
    (`CostBook.reconcile`); budget decisions within a request stay a function of the profile the
    request started with, so a seeded run is repeatable given that profile.
    """

    def __init__(self, window: int = TRACK_WINDOW) -> None:
        self.window = window
        self._target: dict[int, deque[float]] = {}
        self._draft: deque[float] = deque(maxlen=window)

    def target_pass(self, n_tokens: int, seconds: float) -> None:
        """One target pass over `n_tokens` new tokens took `seconds`."""
        if n_tokens >= 1 and seconds > 0:
            self._target.setdefault(n_tokens, deque(maxlen=self.window)).append(seconds)

    def draft_steps(self, n_steps: int, seconds: float) -> None:
        """`n_steps` one-token draft steps took `seconds` in all (one sample: their mean)."""
        if n_steps >= 1 and seconds > 0:
            self._draft.append(seconds / n_steps)

    def target_medians(self, min_samples: int = MIN_SAMPLES) -> dict[int, float]:
        """Median seconds per pass for each size with at least `min_samples` samples."""
        return {n: statistics.median(times) for n, times in sorted(self._target.items()) if len(times) >= min_samples}

    def draft_step_median(self, min_samples: int = MIN_SAMPLES) -> float | None:
        """Median seconds per draft step, or None with fewer than `min_samples` samples."""
        return statistics.median(self._draft) if len(self._draft) >= min_samples else None

    def clear_draft(self) -> None:
        """Forget the draft samples (another draft model was attached)."""
        self._draft.clear()


def corrected_draft_step(kept: float, tracker: CostTracker) -> float | None:
    """The tracked median draft step where it disagrees with the kept figure by more than the factor."""
    observed = tracker.draft_step_median()
    if observed is None or agrees(kept, observed):
        return None
    return observed


def corrected_target_costs(profile: CostProfile, tracker: CostTracker) -> dict[int, float] | None:
    """The kept curve scaled by the median ratio tracked/kept over the observed sizes, where that ratio
    is beyond the factor; None where the curve stands.

    Why scale the whole curve: a machine that got slower or faster (load, clock, a neighbour) changes
    every size alike, while one request observes only a few sizes (one-token passes, gamma + 1).
    Replacing only those would leave a curve that is half old, half new, with kinks that pull the
    budget towards or away from the replaced sizes; scaling keeps the measured shape (how much more a
    pass over n tokens costs than one over 1, a property of the model and hardware) and fixes its level.
    The median ratio, not any one size, decides, so one odd size cannot rescale the curve. Only sizes
    within the measured range count (past it the curve is an extrapolation).
    """
    sizes = profile.target_pass_seconds
    low, high = min(sizes), max(sizes)
    ratios = [seconds / profile.target_pass(n) for n, seconds in tracker.target_medians().items() if low <= n <= high]
    if not ratios:
        return None
    scale = statistics.median(ratios)
    if agrees(1.0, scale):
        return None
    return {n: seconds * scale for n, seconds in sizes.items()}


def may_keep_correction(new: float, kept: float | None, loaded: bool) -> bool:
    """Whether a corrected figure may be written to disk, judged against the figure *on disk*.

    A request without visible load measured real passes: its figure may be kept. A request under
    visible load may only replace a kept figure with a faster one (load only ever slows a pass down,
    so a faster figure cannot be its artefact; this fixes a kept 1.46 s draft step even on a server
    whose streams look loaded because their clients read slowly). Judging against the figure in
    memory instead let a busy machine poison the disk: an in-memory figure inflated 38x under load
    (rightly not kept), then "corrected" to 0.64 of it, was faster than memory but 24x the truth.
    With nothing on disk, a loaded request keeps nothing.
    """
    if not loaded:
        return True
    return kept is not None and new < kept
