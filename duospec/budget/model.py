"""Draft budgets from measured costs (DESIGN.md 1.1), not guesses.

A round that drafts gamma tokens costs gamma * t_draft + t_target(gamma + 1), where t_target(n) is one
target pass over n new tokens, and emits on average E(gamma) tokens. With one per-token acceptance rate
alpha, E(gamma) = (1 - alpha^(gamma + 1)) / (1 - alpha) (Leviathan et al.). Drafts are not that
uniform: a prompt-lookup draft's first token is a gamble but the rest is a copy, and a model draft is
least sure right after a correction. So we keep two rates, alpha_first for the first draft token and
alpha_next for each later one given the one before was accepted:
E(gamma) = 1 + alpha_first * (1 - alpha_next^gamma) / (1 - alpha_next), which is Leviathan's formula
when the two are equal. We pick the gamma with the most tokens per second. On a CPU t_target(n) is
flat only up to a few tokens, so the best gamma is small unless the draft is reliably right; on a GPU
the flat part is long and the best gamma grows. Both costs are measured on this machine at load (and
cached on disk; a kept figure is spot-checked when read, a figure measured under visible load is not
kept, and the real pass times correct the figures between requests: see corrections.py); the rates are
estimated online from each request's own verification outcomes.

Determinism: the policy depends only on the cost profile and on the request's own outcomes, never on
wall-clock readings taken during the request, so with the same (cached) profile a seeded sampled run
repeats token for token. A different profile may change the draft lengths and with them the random
draws; a fixed gamma removes that dependence.
"""

from __future__ import annotations

from dataclasses import dataclass

DRAFT_MARGIN = 0.05  # drafting must promise this much more than plain decoding to be chosen


@dataclass(frozen=True)
class CostProfile:
    """Seconds of one target pass over n new tokens on this machine (after a few hundred cached ones)."""

    target_pass_seconds: dict[int, float]  # n new tokens -> seconds of one pass

    def target_pass(self, n: int) -> float:
        """Piecewise-linear in n between measured sizes; linear extrapolation past the largest."""
        costs = self.target_pass_seconds
        sizes = sorted(costs)
        if n in costs:
            return costs[n]
        if n <= sizes[0] or len(sizes) == 1:
            return costs[sizes[0]] if n <= sizes[0] else costs[sizes[-1]]
        for low, high in zip(sizes, sizes[1:]):
            if low < n < high:
                weight = (n - low) / (high - low)
                return (1 - weight) * costs[low] + weight * costs[high]
        low, high = sizes[-2], sizes[-1]
        return costs[high] + (costs[high] - costs[low]) / (high - low) * (n - high)


def expected_tokens(alpha_first: float, gamma: int, alpha_next: float | None = None) -> float:
    """Mean tokens emitted by a round of gamma draft tokens (accepted ones plus the recovered/bonus one).

    alpha_next defaults to alpha_first: the geometric model, E = (1 - a^(gamma+1)) / (1 - a).
    """
    alpha_next = alpha_first if alpha_next is None else alpha_next
    if gamma == 0:
        return 1.0
    run = gamma if alpha_next >= 1.0 else (1.0 - alpha_next**gamma) / (1.0 - alpha_next)
    return 1.0 + alpha_first * run


def best_gamma(
    alpha_first: float,
    profile: CostProfile,
    draft_step_seconds: float,
    max_gamma: int,
    alpha_next: float | None = None,
) -> int:
    """The gamma in 1..max_gamma with the most expected tokens per second."""
    def rate(gamma: int) -> float:
        cost = gamma * draft_step_seconds + profile.target_pass(gamma + 1)
        return expected_tokens(alpha_first, gamma, alpha_next) / cost

    return max(range(1, max_gamma + 1), key=rate)
