"""Draft budgets that know the batch: a lane's drafts priced by what they add to the joint pass.

Under continuous batching (models/joint.py) one target pass scores every active request's tokens. A
lane whose others put b tokens into the pass and emit about E tokens from it lifts the batch's rate
(E + E_lane(g)) / t(b + 1 + g) by drafting g tokens. Maximising that ratio is the same as maximising
the lane's own E_lane(g) / c(1 + g) with the lane's cost

    c(n) = t(b + 1) / (E + 1)  +  t(b + n) - t(b + 1)

(its fair share of the pass it would cost anyway, plus what its drafts add to the pass): the rate
without drafts, (E + 1) / t(b + 1), is the one the Dinkelbach step of the ratio compares with. So every
existing policy (GammaPolicy, SuffixPolicy, SpecExec's tree budget) budgets a lane unchanged, handed
this profile instead of the curve. Alone (b = 0) c is the measured curve itself; where the batch
already fills the cheap part of the curve, t(b + n) - t(b + 1) grows and speculation narrows and stops
(what vLLM does at high load), and where passes stay flat (a GPU, an AMX CPU up to 16 tokens), drafts
stay nearly free. E is taken as one token per other lane (each emits at least its next token).

One rule keeps the batch fair to the requests beside a lane: the pass it joins, with everything it
adds, may cost at most FAIR_SLOWDOWN times the pass of the other lanes' next tokens alone:
t(b + n) <= FAIR_SLOWDOWN * t(L) for L other lanes holding b tokens (drafts, prompt chunks included).
Measured against speculation-free passes, the rule holds for all drafting lanes together (the first
to draft takes the room; a lane whose neighbours already fill it drafts nothing), so a request
drafting wide (a SpecExec tree) cannot make a short request's tokens arrive more than about twice
as slowly as beside plain decoding. Sizes past it are priced UNFAIR, so every policy passes them
over, and the round loop caps even a client's fixed budget to it (`pass_limit`); a lane alone is
never capped. Prompt chunks follow the same rule (prefill_chunk), except a prompt's last piece of at
most one lone chunk (models/joint.py).

The batch beside a lane is read from its last joint pass (`last_batch`), so under batching a
request's budgets, and with them its sampled draws, depend on what else runs; its tokens never do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from duospec.budget.model import CostProfile

FAIR_SLOWDOWN = 2.0  # one request's tokens (drafts, a prompt's chunk) may make the others' pass cost at most this many times more
UNFAIR = 1e6  # seconds: the price of a pass size the fairness rule forbids (every budget passes it over)
MAX_PREFILL_CHUNK = 4096
NEAR_BEST = 0.9  # the efficient width: the smallest pass size within this share of the best tokens/s


@dataclass(frozen=True)
class BatchPricedProfile(CostProfile):
    """The measured curve, priced for a lane by the batch of its last joint pass (see the module)."""

    lane: object = field(default=None, compare=False, repr=False)  # anything with `last_batch`: (tokens, lanes) beside it

    def target_pass(self, n: int) -> float:
        beside, lanes = getattr(self.lane, "last_batch", (0, 0))
        whole = super().target_pass
        if beside <= 0:
            return whole(n)
        if n > 1 and not _fair(whole, beside, lanes, n):
            return UNFAIR
        return whole(beside + 1) / (lanes + 1) + whole(beside + n) - whole(beside + 1)


def _fair(pass_seconds: Callable[[int], float], beside: int, lanes: int, n: int) -> bool:
    """Whether n tokens of a lane beside `lanes` others holding `beside` tokens keep the pass within
    FAIR_SLOWDOWN times the others' speculation-free pass (the module's fairness rule)."""
    return pass_seconds(beside + n) <= FAIR_SLOWDOWN * pass_seconds(max(1, lanes))


def pass_limit(model) -> int | None:
    """The most tokens `model` (a lane's target) may put in its next joint pass under the fairness
    rule, at least 1; None for a model that is no lane or runs alone (nothing to be fair to). The
    others are the requests generating now (its joiner's members), holding at least one token each,
    or what they held in its last pass where that was the same batch."""
    beside, lanes = getattr(model, "last_batch", (0, 0))
    profile = getattr(model, "fair_profile", None)
    joiner = getattr(model, "joiner", None)
    if joiner is not None:  # the batch it is about to join: every other member adds at least its next token
        others = max(0, joiner.members - 1)
        beside, lanes = (max(beside, others) if lanes == others else others), others
    if beside <= 0 or profile is None:
        return None
    return _fair_width(tuple(sorted(profile.target_pass_seconds.items())), beside, lanes)


@lru_cache(maxsize=1024)
def _fair_width(curve: tuple[tuple[int, float], ...], beside: int, lanes: int) -> int:
    """The largest n >= 1 that `_fair` allows on this curve (cached: pass_limit asks every round)."""
    pass_seconds = CostProfile(dict(curve)).target_pass
    n = 1
    while n < MAX_PREFILL_CHUNK and _fair(pass_seconds, beside, lanes, n + 1):
        n += 1
    return n


def efficient_width(profile: CostProfile, cap: int) -> int:
    """The smallest measured pass size n <= cap whose tokens per second n / t(n) come within
    NEAR_BEST of the best any measured size up to cap reaches: past it, wider passes gain little."""
    sizes = sorted(n for n in profile.target_pass_seconds if n <= cap) or [1]
    rates = {n: n / profile.target_pass(n) for n in sizes}
    best = max(rates.values())
    return min(n for n in sizes if rates[n] >= NEAR_BEST * best)


def prefill_chunk(profile: CostProfile) -> Callable[[int], int]:
    """For n requests decoding beside a prompt (about one token each), the most prompt tokens one
    pass may take so that it costs at most FAIR_SLOWDOWN times their own: the largest c with
    t(n + c) <= FAIR_SLOWDOWN * t(n) on the measured curve (at least 1). With none decoding, the
    efficient width (what prefills at nearly full speed: 16 tokens on a 2-core EPYC), so a request
    arriving meanwhile waits for one chunk, not for the whole prompt (models/joint.py)."""
    alone = efficient_width(profile, MAX_PREFILL_CHUNK)
    curve = tuple(sorted(profile.target_pass_seconds.items()))

    def chunk(others: int) -> int:
        # the fairness rule with `others` requests beside, one token each
        return alone if others <= 0 else _fair_width(curve, others, others)

    return chunk


class LaneCosts:
    """A lane's view of its pipeline's CostBook: the same measured figures (measured before the lanes
    opened), the target's curve priced for the batch, and no corrections: a joint pass's time prices
    the whole batch, not this request's tokens, so it must not correct the curve."""

    tracker = None  # the rounds report no pass times

    def __init__(self, book, lane) -> None:
        self._book = book
        self._lane = lane

    def target_profile(self, remeasure: bool = False) -> BatchPricedProfile:
        return BatchPricedProfile(self._book.target_profile().target_pass_seconds, lane=self._lane)

    def tree_costs(self, depth: int) -> tuple[BatchPricedProfile, CostProfile]:
        target, draft = self._book.tree_costs(depth)
        return BatchPricedProfile(target.target_pass_seconds, lane=self._lane), draft

    def reconcile(self, reading=None) -> None:
        """Nothing to correct (see the class)."""

    def __getattr__(self, name: str):
        return getattr(self._book, name)  # draft_step_seconds, probe, notes, ...
