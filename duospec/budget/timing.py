"""The one timing harness: seconds of a model pass over n new tokens after a filled context.

Every cost the budgets use is measured here, by the same three steps: fill the cache with
`context_tokens` filler tokens, time passes (the device synchronised around each, so a timing covers
queued GPU work), crop back to the filler after each. The measurements differ only in what they pass
and how they pick the figure (a median; interleaved sizes; stop at a ceiling).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from duospec.models.base import Model

SPOT_CONTEXT = 4  # prefill tokens before a spot check (a pass over 4 costs about one over 1 on CPUs)
SPOT_SAMPLES = 3  # timed one-token passes per spot check; their median tolerates one outlier


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a timing covers it (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def filler(model: Model, n: int) -> torch.Tensor:
    """n token ids that are valid for the model (their values do not change a pass's cost)."""
    return torch.arange(n, device=model.device) % max(model.vocab_size - 1, 1)


@contextmanager
def filled_context(model: Model, context_tokens: int) -> Iterator[torch.Tensor]:
    """The model's cache holding `context_tokens` filler tokens (yielded), emptied afterwards."""
    tokens = filler(model, context_tokens)
    model.reset()
    model.forward(tokens, last_only=True)
    try:
        yield tokens
    finally:
        model.reset()


def timed_pass(model: Model, tokens: torch.Tensor, clock: Callable[[], float] = time.perf_counter, **forward_options) -> float:
    """Seconds of one forward over `tokens` (device work included)."""
    synchronize(model.device)
    start = clock()
    model.forward(tokens, **forward_options)
    synchronize(model.device)
    return clock() - start


def median(samples: list[float]) -> float:
    """The middle sample (the upper one of two for an even count): robust to one slow outlier."""
    return sorted(samples)[len(samples) // 2]


@torch.inference_mode()
def measure_target_costs(model: Model, sizes: tuple[int, ...], context_tokens: int = 256, repeats: int = 3) -> dict[int, float]:
    """Median seconds of one pass over n new tokens after `context_tokens` cached ones, for each n.

    Sizes are measured in interleaved rounds (every size once per round), so a drift of the machine's
    speed during the measurement (a clock ramping up, a thread pool waking) touches every size alike
    instead of biasing the first one measured. The same measurement serves `duospec profile` and the
    budget. The cache is emptied afterwards.
    """
    if model.max_context is not None:  # never run past the model's positions
        context_tokens = max(1, min(context_tokens, model.max_context - max(sizes) - 1))
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    with filled_context(model, context_tokens) as cached:
        for n in (1, 1, 1, max(sizes)):  # warm-up of the decode paths (pages in memory-mapped weights)
            model.forward(cached[:n])
            model.crop(context_tokens)
        for _ in range(repeats):
            for n in sizes:
                samples[n].append(timed_pass(model, filler(model, n)))
                model.crop(context_tokens)
    return {n: median(times) for n, times in samples.items()}


@torch.inference_mode()
def measure_draft_step(model: Model, context_tokens: int = 256, repeats: int = 5) -> float:
    """Median seconds of one single-token draft step (last-position logits only)."""
    if model.max_context is not None:  # the filler plus warm-up and measured steps must fit
        context_tokens = max(1, min(context_tokens, model.max_context - repeats - 4))
    with filled_context(model, context_tokens) as cached:
        for _ in range(3):  # warm-up: freshly loaded (memory-mapped) weights are paged in by the first steps
            model.forward(cached[:1], last_only=True)
        return median([timed_pass(model, cached[:1], last_only=True) for _ in range(repeats)])


@torch.inference_mode()
def measure_growing_costs(model: Model, sizes: tuple[int, ...], ceiling: float, context_tokens: int = 256, repeats: int = 3) -> dict[int, float]:
    """Median seconds of one pass over n tokens after `context_tokens` cached ones, for growing n,
    up to and including the first n whose pass costs more than `ceiling` seconds (or the context's end)."""
    limit = model.max_context or (context_tokens + max(sizes) + 1)
    # A short context (a small llama.cpp --ctx-size, tiny models) may not hold the filler plus even the
    # smallest pass; measure after half the context then, so that the curve is never empty.
    context_tokens = min(context_tokens, limit // 2)
    costs: dict[int, float] = {}
    with filled_context(model, context_tokens):
        for n in sizes:
            if context_tokens + n >= limit:
                break
            samples = []
            for _ in range(repeats):
                # Only the cost is measured: keep one logit column instead of the [n, V] block.
                samples.append(timed_pass(model, filler(model, n), reduce=lambda block: block[:, :1]))
                model.crop(context_tokens)
            costs[n] = median(samples)
            if costs[n] > ceiling:
                break
    return costs


@torch.inference_mode()
def sample_step_seconds(
    model: Model,
    clock: Callable[[], float] = time.perf_counter,
    context_tokens: int = SPOT_CONTEXT,
    samples: int = SPOT_SAMPLES,
) -> float:
    """Median seconds of a one-token pass after a short prefill: a spot check of a kept figure.

    Costs one prefill of `context_tokens` plus `samples` one-token passes, about 4-5 one-token passes in
    all (the prefill also pages in the weights, so no separate warm-up): about 0.15 s for the llama.cpp
    draft, 0.25 s for the int8 transformers draft, 0.4 s for the llama.cpp target and 1 s for the bf16
    transformers target on a 2-core CPU (docs/backends.md), against 20-40 s for a full measurement.
    """
    with filled_context(model, context_tokens) as cached:
        return median([timed_pass(model, cached[:1], clock, last_only=True) for _ in range(samples)])
