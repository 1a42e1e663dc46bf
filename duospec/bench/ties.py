"""Explain why two greedy answers to the same prompt differ: a near-tie of the target, or a real bug.

Every method is exact, so greedy answers must equal autoregressive ones token for token in float32. In
bf16 a pass over several tokens rounds differently from a one-token pass (DESIGN.md section 3), so a
method may legitimately pick the other of two tokens whose logits are nearly equal. We re-score the
first differing position with one target pass over the common prefix and compare the logits of the
two tokens the answers chose: within the tolerance, the divergence is a near-tie; beyond it, a bug.

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

# bf16 keeps 8 significant bits: logits of magnitude 16..32 are spaced 0.125 apart, so two passes that
# round differently can swap tokens up to about two steps apart. float32 rounding is ~1e-6 here.
NEAR_TIE_LOGITS_LOW_PRECISION = 0.25
NEAR_TIE_LOGITS_FLOAT32 = 1e-3


@dataclass(frozen=True)
class Divergence:
    position: int | None  # index of the first differing new token; None when the answers are identical
    margin: float | None  # |logit(token of a) - logit(token of b)| there; None if one answer just stops early
    is_near_tie: bool

    def to_dict(self) -> dict:
        return asdict(self)


def near_tie_tolerance(dtype: torch.dtype) -> float:
    """Largest logit gap still explained by rounding in this dtype."""
    return NEAR_TIE_LOGITS_FLOAT32 if dtype == torch.float32 else NEAR_TIE_LOGITS_LOW_PRECISION


def divergence(
    pipe: "Pipeline",
    prompt_ids: list[int],
    ids_a: list[int],
    ids_b: list[int],
    tolerance: float | None = None,
) -> Divergence:
    """Where answers a and b (new token ids after `prompt_ids`) first differ, and whether that is a near-tie.

    Runs one target pass over prompt + common prefix when they differ (the target's cache is reset
    before and after). tolerance defaults to `near_tie_tolerance(pipe.dtype)`.

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
    target.reset()
    try:
        logits = target.forward(torch.tensor([*prompt_ids, *ids_a[:position]], device=target.device), last_only=True)[-1]
    finally:
        target.reset()
    margin = abs(float(logits[ids_a[position]]) - float(logits[ids_b[position]]))
    limit = near_tie_tolerance(pipe.dtype) if tolerance is None else tolerance
    return Divergence(position, margin, margin <= limit)
