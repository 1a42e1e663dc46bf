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
