"""Keeping the measured costs honest: load detection, spot checks of kept figures, online correction.

The draft budget (budget.py) decides from two measured costs, one target pass over n tokens and one
draft step, measured once per machine and kept on disk. One bad measurement used to poison every later
run: a first run on a busy machine measured a 0.047 s draft step as 1.46 s, kept it, and every later run
decoded at gamma 1 (0.73 tokens/s instead of about 9). Three guards:

1. Load detection (`under_load`): a measurement taken while other work competed for the CPU serves the
   run that took it but is never kept on disk.
2. Spot check (`spot_check_agrees`): a kept figure is re-timed cheaply when it is read; one that is off
   by more than AGREEMENT_FACTOR is measured again in full and replaced.
3. Online correction (`CostTracker`, `corrected_draft_step`, `corrected_target_costs`): engines report
   the real pass and step times; after each request the pipeline compares their medians with the
   figures in use and corrects those that disagree.

Determinism (budget.py's module docstring): a request's budget decisions depend only on the profile it
started with, so corrections take effect from the next request on, never in the middle of one.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from duospec.models.base import Model

if TYPE_CHECKING:
    from duospec.budget import CostProfile

T = TypeVar("T")

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
SPOT_CONTEXT = 4  # prefill tokens before a spot check (a pass over 4 costs about one over 1 on CPUs)
SPOT_SAMPLES = 3  # timed one-token passes per spot check; their median tolerates one outlier
CPU_SHARE_FLOOR = 0.75  # see under_load
LOAD_PER_CORE = 1.5  # see under_load


@dataclass(frozen=True)
class LoadReading:
    """What the machine looked like around one measurement (or one request).

    cpu_seconds: CPU time this process used meanwhile, all its threads (time.process_time).
    wall_seconds: wall time meanwhile.
    threads: threads the measured model computes with, capped at the cores this process may use.
    load_average: the 1-minute load average just before.
    cores: cores that load average is shared by (os.cpu_count(); see under_load).
    cpu_bound: whether the model computes on the CPU (False on an accelerator, where the CPU waits).
    """

    cpu_seconds: float
    wall_seconds: float
    threads: int
    load_average: float
    cores: int
    cpu_bound: bool = True

    @property
    def cpu_share(self) -> float:
        """Share of the CPU time our threads could have had that they got (1.0: never waited)."""
        return self.cpu_seconds / max(self.wall_seconds * self.threads, 1e-9)


def under_load(reading: LoadReading) -> bool:
    """Whether a measurement ran under visible load, so that it must not be kept. Either rule suffices.

    - CPU share (CPU-bound models only): our threads got less than CPU_SHARE_FLOOR (0.75) of the CPU
      time they could have had. A compute-bound pass keeps every thread busy (llama.cpp's and OpenMP's
      workers spin between kernels): on this project's quiet 2-core machine a decode step of a small
      Qwen2 reached a share of 0.89 (2 threads) to 1.0 (1 thread), and 0.3-0.5 with one other busy
      process. This catches contention during the measurement itself, which is what slows it. It means
      nothing on an accelerator, where the CPU mostly waits for the device, so it is skipped there.
    - Load average: more than LOAD_PER_CORE (1.5) runnable threads per core over the last minute means
      work was queueing for the CPU before we started (and it also catches what the share cannot see:
      neighbours on other cores taking memory bandwidth, an accelerator's launch thread starved). It is
      compared with os.cpu_count(), not with our affinity: the kernel's load average counts the whole
      machine (the host, in most containers), so a container pinned to 2 of 64 cores would otherwise
      call every measurement loaded. It lags by up to a minute and counts our own threads (we may have
      just loaded a model with all of them), hence the margin over 1.0.

    A false alarm only costs a measurement that is not kept (it is taken again next run); a missed load
    is caught by the next run's spot check or by the online correction.
    """
    if reading.cpu_bound and reading.cpu_share < CPU_SHARE_FLOOR:
        return True
    return reading.load_average > LOAD_PER_CORE * reading.cores


def model_threads(model: Model) -> int:
    """Threads a model computes with (llama.cpp models say so; transformers uses torch's pool), capped
    at the cores this process may run on: more threads than cores cannot all run at once."""
    threads = getattr(model, "threads", None) or torch.get_num_threads()
    return max(1, min(int(threads), _affinity_cores()))


@dataclass(frozen=True)
class LoadWatch:
    """The readings a LoadProbe took when a measurement started."""

    cpu_start: float
    wall_start: float
    load_average: float


class LoadProbe:
    """Takes LoadReadings around a measurement.

    The clocks and the load average are injectable so tests can script a quiet or a busy machine;
    `wall_clock` also times the spot checks, for the same reason.
    """

    def __init__(
        self,
        cpu_clock: Callable[[], float] = time.process_time,
        wall_clock: Callable[[], float] = time.perf_counter,
        load_average: Callable[[], float] | None = None,
        cores: int | None = None,
    ) -> None:
        self.cpu_clock = cpu_clock
        self.wall_clock = wall_clock
        self.load_average = load_average or _load_average
        self.cores = cores or os.cpu_count() or 1

    def start(self) -> LoadWatch:
        return LoadWatch(self.cpu_clock(), self.wall_clock(), self.load_average())

    def stop(self, watch: LoadWatch, model: Model) -> LoadReading:
        """The reading since `watch`, for a measurement of `model` (its threads and device)."""
        return LoadReading(
            cpu_seconds=self.cpu_clock() - watch.cpu_start,
            wall_seconds=self.wall_clock() - watch.wall_start,
            threads=model_threads(model),
            load_average=watch.load_average,
            cores=self.cores,
            cpu_bound=torch.device(model.device).type == "cpu",
        )

    def watch(self, measure: Callable[[], T], model: Model) -> tuple[T, LoadReading]:
        """Run `measure` (of `model`) and say what the machine looked like meanwhile."""
        started = self.start()
        value = measure()
        return value, self.stop(started, model)


def agrees(kept: float, observed: float, factor: float = AGREEMENT_FACTOR) -> bool:
    """Whether two timings agree within `factor` either way."""
    return kept / factor <= observed <= kept * factor


@torch.inference_mode()
def sample_step_seconds(
    model: Model,
    clock: Callable[[], float] = time.perf_counter,
    context_tokens: int = SPOT_CONTEXT,
    samples: int = SPOT_SAMPLES,
) -> float:
    """Median seconds of a one-token pass after a short prefill: a spot check of a kept figure.

    Costs one prefill of `context_tokens` plus `samples` one-token passes, about 4-5 one-token passes in
    all (the prefill also pages in the weights, so no separate warm-up): from the figures in README's
    Backends section about 0.15 s for the llama.cpp draft, 0.25 s for the int8 transformers draft, 0.4 s
    for the llama.cpp target and 1 s for the bf16 transformers target on a 2-core CPU, against 20-40 s
    for a full measurement. The cache is dropped afterwards.
    """
    filler = torch.arange(context_tokens, device=model.device) % max(model.vocab_size - 1, 1)
    model.reset()
    model.forward(filler, last_only=True)
    times = []
    for _ in range(samples):
        synchronize(model.device)
        start = clock()
        model.forward(filler[:1], last_only=True)
        synchronize(model.device)
        times.append(clock() - start)
    model.reset()
    return statistics.median(times)


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
    (`Pipeline.reconcile_costs`); budget decisions within a request stay a function of the profile the
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


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a timing covers it (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _load_average() -> float:
    """The 1-minute load average, or 0.0 where the platform has none (then only the CPU share counts)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _affinity_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1
