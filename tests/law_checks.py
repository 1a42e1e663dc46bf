"""Shared helpers of the distribution tests."""

from __future__ import annotations

import torch
from scipy.stats import chisquare


def goodness_of_fit(counts: torch.Tensor, law: torch.Tensor, require_support: bool = True) -> float:
    """Chi-square p-value, pooling cells expected below 5 counts into one (the test's validity rule).

    require_support: tokens outside the law's support must never appear (asserted, not pooled away);
    a negative control whose broken sampler may emit them turns it off and reads the p-value only."""
    expected = (law * counts.sum()).flatten()
    observed = counts.double().flatten()
    small = expected < 5
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    observed = torch.cat([observed[~small], observed[small].sum().view(1)])
    if expected[-1] == 0:
        assert not require_support or observed[-1] == 0, "tokens outside the warped target's support were emitted"
        expected, observed = expected[:-1], observed[:-1]
    return float(chisquare(observed.numpy(), expected.numpy()).pvalue)


# Ulps that exp, the normalising sum and the division inside a softmax may add on top of the rounding of
# its inputs (at most 7 measured on torch 2.13, AVX2 and the scalar path, 200 seeds x 7 temperatures).
SOFTMAX_ULPS = 16


def softmax_rounding_bound(scaled: torch.Tensor, divided_first: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Elementwise bound on |p - exact| for a softmax of `scaled` computed in `dtype`.

    scaled: [..., V] float64 logits / T, -inf where a filter removed a token. Returns [..., V] float64.
    Why this shape and not a fixed atol: rounding a scaled logit z_i moves it by up to eps * m_i, so p_i
    moves by that much relative and the normaliser by the p-weighted mean of it; exp, the sum and the
    division add SOFTMAX_ULPS. m_i = |z_i - max z| when the max is subtracted before dividing by T
    (warp_probs), plus |z_i| when x / T is rounded first (softmax(x / T), transformers' warpers). CPUs
    with other SIMD paths (AVX2, AVX-512, AMX) round differently inside this bound; a fixed atol of
    1e-7 is one ulp at p ~ 1 and failed on an AMX Xeon (issue 21). Underflow below the smallest
    normal number is allowed for too.
    """
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    exact = torch.softmax(scaled, dim=-1)
    kept = torch.isfinite(scaled)
    z = torch.where(kept, scaled, 0.0)
    magnitude = (z - scaled.amax(-1, keepdim=True)).abs() + (z.abs() if divided_first else 0.0)
    magnitude = torch.where(kept, magnitude, 0.0)
    return eps * exact * (magnitude + (exact * magnitude).sum(-1, keepdim=True) + SOFTMAX_ULPS) + tiny


def assert_softmax_close(probs: torch.Tensor, scaled: torch.Tensor, divided_first: bool = False) -> None:
    """probs [..., V] (float32) is softmax(scaled) (float64, see softmax_rounding_bound) up to its rounding."""
    exact = torch.softmax(scaled, dim=-1)
    excess = (probs.double() - exact).abs() - softmax_rounding_bound(scaled, divided_first, probs.dtype)
    worst = int(excess.flatten().argmax())
    assert excess.max() <= 0, (
        f"p = {probs.flatten()[worst].item():.9g} where the exact law has {exact.flatten()[worst].item():.9g} "
        f"(beyond the rounding bound by {excess.max().item():.3g}, at flat index {worst})"
    )


def law_sum_tolerance(vocab: int, dtype: torch.dtype = torch.float32) -> float:
    """How far a rounded law's row sum may be from 1: each of `vocab` terms carries half an ulp from the
    division by the normaliser, and the normaliser and the check each sum `vocab` terms, adding up to
    (vocab - 1) / 2 ulps relative. Measured at most 0.12 * vocab ulps (softmax, vocab 33-50)."""
    return 2 * vocab * torch.finfo(dtype).eps


def first_tokens(chunks, k: int) -> list[int]:
    """The first k tokens of a generation's chunks; the rounds after them never run."""
    tokens: list[int] = []
    try:
        for chunk in chunks:
            tokens += chunk
            if len(tokens) >= k:
                break
    finally:
        chunks.close()
    assert len(tokens) >= k
    return tokens[:k]
