"""Explain why two greedy answers to the same prompt differ: a near-tie of the target, or a real bug.

Every method is exact, so greedy answers must equal autoregressive ones token for token in float32. In
bf16 or float16 a pass over several tokens rounds differently from a one-token pass (DESIGN.md section
3), so a method may legitimately pick the other of two tokens whose logits are nearly equal. We re-score
the first differing position with one pass of the pipeline's own target over the prompt and the common
prefix, so in the run's dtype (and backend), not in float32, and compare the logits of the two tokens
the answers chose: within the tolerance, the divergence is a near-tie; beyond it, a bug.

The gap between the two *chosen* tokens is used rather than the target's top-2 margin: it equals that
margin when the answers picked the top two, and it exposes a method that picked a far-off token even
where the top two happen to be close.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from duospec.api import Pipeline

# The tolerance for a floating dtype is two rounding steps of a logit of magnitude 16..32 (where the
# default models' top logits lie): there floats are spaced 16 * eps apart (eps = torch.finfo(dtype).eps,
# the spacing at 1), and two passes that round differently can swap tokens up to about two steps apart:
#     tolerance = 2 * 16 * eps
#     bfloat16: 8 significant bits, eps = 2**-7,  spacing 0.125,    tolerance 0.25
#     float16: 11 significant bits, eps = 2**-10, spacing 0.015625, tolerance 0.03125
# float32 (eps = 2**-23) would give 3.8e-6; it never goes below NEAR_TIE_LOGITS_FLOAT32, a floor that
# allows for kernels summing in a different order and stays far below any real bug.
NEAR_TIE_ROUNDING_STEPS = 2
NEAR_TIE_LOGIT_MAGNITUDE = 16  # lower end of the binade 16..32, whose spacing is 16 * eps
NEAR_TIE_LOGITS_FLOAT32 = 1e-3
# llama.cpp computes in mixed precision on quantised weights, and its multi-token passes use other matmul
# kernels than its one-token passes, so its two kinds of pass differ by more than the rounding of a
# storage dtype; its tolerance is fixed at bf16's 0.25, whatever the dtype reported.
NEAR_TIE_LOGITS_LLAMA_CPP = 0.25
BACKENDS = ("transformers", "llama.cpp")


@dataclass(frozen=True)
class Divergence:
    position: int | None  # index of the first differing new token; None when the answers are identical
    margin: float | None  # |logit(token of a) - logit(token of b)| there; None if one answer just stops early
    is_near_tie: bool

    def to_dict(self) -> dict:
        return asdict(self)


def near_tie_tolerance(dtype: torch.dtype, backend: str = "transformers") -> float:
    """Largest logit gap still explained by rounding in this dtype (and backend).

    near_tie_tolerance(torch.bfloat16) == 0.25; torch.float16 -> 0.03125; torch.float32 -> 0.001;
    near_tie_tolerance(anything, "llama.cpp") == 0.25 (see NEAR_TIE_LOGITS_LLAMA_CPP).
    """
    if backend == "llama.cpp":
        return NEAR_TIE_LOGITS_LLAMA_CPP
    if backend != "transformers":
        raise ValueError(f"no near-tie tolerance for backend {backend!r}; known: {', '.join(BACKENDS)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"no near-tie tolerance for dtype {dtype!r}: logits must be computed in a floating dtype")
    rounding = NEAR_TIE_ROUNDING_STEPS * NEAR_TIE_LOGIT_MAGNITUDE * torch.finfo(dtype).eps
    return max(NEAR_TIE_LOGITS_FLOAT32, rounding)


def divergence(
    pipe: "Pipeline",
    prompt_ids: list[int],
    ids_a: list[int],
    ids_b: list[int],
    tolerance: float | None = None,
) -> Divergence:
    """Where answers a and b (new token ids after `prompt_ids`) first differ, and whether that is a near-tie.

    Runs one target pass over prompt + common prefix when they differ (the target's cache is reset
    before and after), so the logits are the run's own: its dtype, its backend. On llama.cpp the prefix
    is fed one token per pass instead, as `ar` decodes it (see the comment below). tolerance defaults to
    `near_tie_tolerance(pipe.dtype, pipe.backend)` (backend "transformers" for a pipeline without one).

    Example (the same cases are tests in tests/test_bench_ties.py):
        divergence(pipe, [1, 2], [5, 6, 7], [5, 6, 7])  -> Divergence(position=None, margin=None, is_near_tie=False)
        divergence(pipe, [1, 2], [5, 6, 7], [5, 9, 7])  -> position 1 (not 2: new tokens count from 0),
            margin = |logit(6) - logit(9)| of the target after [1, 2, 5]
    """
    position = next((i for i, (a, b) in enumerate(zip(ids_a, ids_b)) if a != b), None)
    if position is None:
        if len(ids_a) == len(ids_b):
            return Divergence(None, None, False)
        # One answer is a prefix of the other: no pair of competing tokens to compare.
        return Divergence(min(len(ids_a), len(ids_b)), None, False)
    target = pipe.target
    backend = getattr(pipe, "backend", "transformers")
    target.reset()
    try:
        if backend == "llama.cpp":
            # llama.cpp's logits depend on how the cache was filled (a prompt pass vs one-token steps,
            # float16 cells): measured up to 0.45 apart for one position. So re-score exactly as `ar`
            # decodes answer a (prompt in one pass, then one token per pass): the gap is ar's own.
            logits = target.forward(torch.tensor(prompt_ids), last_only=True)[-1]
            for token in ids_a[:position]:
                logits = target.forward(torch.tensor([token]), last_only=True)[-1]
        else:
            logits = target.forward(torch.tensor([*prompt_ids, *ids_a[:position]], device=target.device), last_only=True)[-1]
    finally:
        target.reset()
    margin = abs(float(logits[ids_a[position]]) - float(logits[ids_b[position]]))
    limit = near_tie_tolerance(pipe.dtype, backend) if tolerance is None else tolerance
    return Divergence(position, margin, margin <= limit)
