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
kept, and the real pass times correct the figures between requests: see costs.py); the rates are
estimated online from each request's own verification outcomes.

Determinism: the policy depends only on the cost profile and on the request's own outcomes, never on
wall-clock readings taken during the request, so with the same (cached) profile a seeded sampled run
repeats token for token. A different profile may change the draft lengths and with them the random
draws; a fixed gamma removes that dependence.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from duospec.costs import LoadProbe, spot_check_agrees, under_load
from duospec.costs import synchronize as _synchronize
from duospec.models.base import Model

DEFAULT_TARGET_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 33)
DRAFT_MARGIN = 0.05  # drafting must promise this much more than plain decoding to be chosen
PROBE_EVERY = 16  # while drafting does not pay, draft one token every this many rounds to re-learn alpha
PROBE_ALPHA = 0.9  # ... but only where drafting would pay at this acceptance rate


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


@dataclass(frozen=True)
class DraftBudget:
    """How much one round may draft.

    max_tokens: at most this many draft tokens.
    confidence_floors: empty, or one floor per draft position: a drafter that knows its own
        confidence drafts token j + 1 only while its cumulative confidence in tokens 1..j (the product
        of their draft probabilities, its estimate that all j are accepted) is at least floors[j].
        Drafters without a confidence (prompt lookup) draft up to max_tokens.
    """

    max_tokens: int
    confidence_floors: tuple[float, ...] = ()
    # A tree's budget (SpecExec): max_tokens counts nodes, and what the request's end limits is the
    # tree's depth (a round emits at most depth + 1 tokens), not its node count; the context's end
    # limits both (every node takes a cache cell: the sequential engine caps the count to the cells left).
    tree: bool = False
    max_depth: int | None = None

    def allows(self, drafted: int, confidence: float) -> bool:
        """Whether to draft one more token after `drafted` tokens of cumulative confidence `confidence`."""
        if drafted >= self.max_tokens:
            return False
        return not self.confidence_floors or confidence >= self.confidence_floors[drafted]

    def capped(self, limit: int) -> "DraftBudget":
        """The same budget with at most `limit` tokens in a round's path (the request's or the
        context's end): a chain's length, a tree's depth."""
        if self.tree:
            depth = limit if self.max_depth is None else min(self.max_depth, limit)
            return DraftBudget(self.max_tokens if depth > 0 else 0, self.confidence_floors, tree=True, max_depth=depth)
        return DraftBudget(min(self.max_tokens, limit), self.confidence_floors)


class GammaPolicy:
    """Chooses each round's draft budget; learns the acceptance rates from the current request.

    Both rates are discounted Beta-Bernoulli estimates. The first draft token of a round is one trial
    of alpha_first; each later draft token whose predecessor was accepted is one trial of alpha_next
    (tokens after a rejection were never tested).

    For a model draft the budget also stops drafting where it stops paying: one more draft token costs
    t_draft plus the growth of the verification pass, and is worth P(all drafted so far accepted) *
    alpha_next expected tokens. Drafting continues while that expected gain, at the rate the best fixed
    gamma would reach, covers the cost: cumulative confidence >= rate * (t_draft + dt_verify) / alpha_next.
    On 22 Spec-Bench answers this rule gave 1.47x over autoregressive in simulation where the best
    fixed gamma gave 1.37x, and it matched the best hand-tuned threshold.
    """

    def __init__(
        self,
        profile: CostProfile | None,
        draft_step_seconds: float = 0.0,
        max_gamma: int = 32,
        fixed_gamma: int | None = None,
        prior_alpha: float = 0.8,
        prior_weight: float = 4.0,
        discount: float = 0.95,
    ) -> None:
        self.profile = profile
        self.draft_step_seconds = draft_step_seconds
        self.max_gamma = max_gamma
        self.fixed_gamma = fixed_gamma
        self.prior_alpha = prior_alpha
        self.prior_weight = prior_weight
        self.discount = discount
        if profile is None and fixed_gamma is None:
            raise ValueError("a GammaPolicy needs a cost profile unless gamma is fixed")
        self.reset()

    def reset(self) -> None:
        self._idle_rounds = 0  # rounds in which drafting did not pay and nothing was drafted
        self._first = [0.0, 0.0]  # discounted successes, trials of alpha_first
        self._next = [0.0, 0.0]  # the same for alpha_next

    def _estimate(self, counts: list[float]) -> float:
        successes, trials = counts
        return min((successes + self.prior_alpha * self.prior_weight) / (trials + self.prior_weight), 0.99)

    @property
    def alpha_first(self) -> float:
        return self._estimate(self._first)

    @property
    def alpha_next(self) -> float:
        return self._estimate(self._next)

    @property
    def alpha(self) -> float:
        """Accepted share of all trials so far (prior included): one number for reports."""
        return self._estimate([self._first[0] + self._next[0], self._first[1] + self._next[1]])

    def next_budget(self) -> DraftBudget:
        if self.fixed_gamma is not None or self.profile is None:
            return DraftBudget(self.fixed_gamma)
        first, later = self.alpha_first, self.alpha_next
        gamma = best_gamma(first, self.profile, self.draft_step_seconds, self.max_gamma, later)
        if not self._pays(gamma, first, later):
            # Drafting loses to plain decoding here (on CPUs where a pass over 2 tokens costs far more
            # than over 1, it does even at full acceptance). Draft nothing, so `sd` never runs slower
            # than `ar`; where drafting would pay at a higher acceptance, probe now and then to learn
            # whether the text has become predictable.
            self._idle_rounds += 1
            if self.could_pay and self._idle_rounds % PROBE_EVERY == 0:
                return DraftBudget(1)
            return DraftBudget(0)
        if self.draft_step_seconds == 0:
            return DraftBudget(gamma)  # a free draft has no confidence to stop on: draft the best gamma
        cost = gamma * self.draft_step_seconds + self.profile.target_pass(gamma + 1)
        rate = expected_tokens(first, gamma, later) / cost
        floors = tuple(
            0.0 if drafted == 0 else rate * (self.draft_step_seconds + self._verify_growth(drafted)) / later
            for drafted in range(self.max_gamma)
        )
        return DraftBudget(self.max_gamma, floors)

    def _pays(self, gamma: int, alpha_first: float, alpha_next: float) -> bool:
        """Whether `gamma` draft tokens per round beat plain decoding (one token per 1-token pass) by
        DRAFT_MARGIN: a drafting round also pays what the profile does not hold (the draft's catch-up,
        copying more logits, verifying), and a measured cost is only good to a few percent."""
        cost = gamma * self.draft_step_seconds + self.profile.target_pass(gamma + 1)
        return expected_tokens(alpha_first, gamma, alpha_next) / cost > (1.0 + DRAFT_MARGIN) / self.profile.target_pass(1)

    @property
    def could_pay(self) -> bool:
        """Whether drafting would pay at a good acceptance rate (PROBE_ALPHA). Only then are probes
        worth their cost, which for a draft model includes catching its cache up on everything
        decoded since it last ran (the whole prompt, the first time: seconds for a long one)."""
        best = best_gamma(PROBE_ALPHA, self.profile, self.draft_step_seconds, self.max_gamma, PROBE_ALPHA)
        return self._pays(best, PROBE_ALPHA, PROBE_ALPHA)

    def describe(self) -> str:
        """The rule this policy drafts by and, from the measured costs, what it implies (for --verbose)."""
        if self.profile is None:
            return f"a fixed {self.fixed_gamma} draft tokens per round (--gamma), verified in one target pass"
        t1, t_draft = self.profile.target_pass(1), self.draft_step_seconds
        gamma = best_gamma(self.alpha_first, self.profile, t_draft, self.max_gamma, self.alpha_next)
        draft = f"a draft step {t_draft:.3f} s ({t_draft / t1:.2f}x)" if t_draft > 0 else "drafts that cost no model step"
        if not self._pays(gamma, self.alpha_first, self.alpha_next):
            verdict = (
                f"at the prior acceptance {self.alpha_first:.0%} no draft length beats plain decoding by {DRAFT_MARGIN:.0%}: "
                + (f"drafts nothing, probing 1 token every {PROBE_EVERY} rounds to learn the text's acceptance" if self.could_pay else "drafts nothing (not even at 90% acceptance would it pay)")
            )
        else:
            verdict = f"at the prior acceptance {self.alpha_first:.0%} the best draft length is {gamma}; each round re-chooses it from this request's acceptance"
        return (
            f"target pass {t1:.3f} s (1 token), {self.profile.target_pass(2) / t1:.2f}x (2), {self.profile.target_pass(4) / t1:.2f}x (4), "
            f"{self.profile.target_pass(8) / t1:.2f}x (8); {draft}; {verdict}"
        )

    def _verify_growth(self, drafted: int) -> float:
        """Extra verification seconds for draft token drafted + 1 (the pass grows from drafted + 1 tokens)."""
        return max(0.0, self.profile.target_pass(drafted + 2) - self.profile.target_pass(drafted + 1))

    def observe_round(self, tree, verdict) -> None:
        """What the engine reports after each drafted round (tree policies read the whole tree)."""
        self.observe(tree.n_draft, verdict.n_accepted)

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return  # nothing was tested (e.g. prompt lookup found no match)
        rejected_later = 1.0 if 0 < accepted < drafted else 0.0
        self._first = [self._first[0] * self.discount + (accepted > 0), self._first[1] * self.discount + 1]
        later_trials = max(0, accepted - 1) + rejected_later
        self._next = [self._next[0] * self.discount + max(0, accepted - 1), self._next[1] * self.discount + later_trials]


@torch.inference_mode()
def measure_target_costs(model: Model, sizes: tuple[int, ...], context_tokens: int = 256, repeats: int = 3) -> dict[int, float]:
    """Median seconds of one pass over n new tokens after `context_tokens` cached ones, for each n.

    Sizes are measured in interleaved rounds (every size once per round), so a drift of the machine's
    speed during the measurement (a clock ramping up, a thread pool waking) touches every size alike
    instead of biasing the first one measured. The same measurement serves `duospec profile` and the
    budget. The cache is restored afterwards.
    """
    if model.max_context is not None:  # never run past the model's positions
        context_tokens = max(1, min(context_tokens, model.max_context - max(sizes) - 1))
    filler = torch.arange(context_tokens, device=model.device) % max(model.vocab_size - 1, 1)
    model.reset()
    model.forward(filler, last_only=True)
    for n in (1, 1, 1, max(sizes)):  # warm-up of the decode paths (pages in memory-mapped weights)
        model.forward(filler[:n])
        model.crop(context_tokens)
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n in sizes:
            tokens = torch.arange(n, device=model.device) % max(model.vocab_size - 1, 1)
            _synchronize(model.device)
            start = time.perf_counter()
            model.forward(tokens)
            _synchronize(model.device)
            samples[n].append(time.perf_counter() - start)
            model.crop(context_tokens)
    model.reset()
    return {n: sorted(times)[len(times) // 2] for n, times in samples.items()}


def measure_draft_step(model: Model, context_tokens: int = 256, repeats: int = 5) -> float:
    """Median seconds of one single-token draft step (last-position logits only)."""
    if model.max_context is not None:  # the filler plus warm-up and measured steps must fit
        context_tokens = max(1, min(context_tokens, model.max_context - repeats - 4))
    filler = torch.arange(context_tokens, device=model.device) % max(model.vocab_size - 1, 1)
    model.reset()
    model.forward(filler, last_only=True)
    for _ in range(3):  # warm-up: freshly loaded (memory-mapped) weights are paged in by the first steps
        model.forward(filler[:1], last_only=True)
    samples = []
    for _ in range(repeats):
        _synchronize(model.device)
        start = time.perf_counter()
        model.forward(filler[:1], last_only=True)
        _synchronize(model.device)
        samples.append(time.perf_counter() - start)
    model.reset()
    return sorted(samples)[len(samples) // 2]


def profiles_dir() -> Path:
    """Where measured costs are kept between runs (`duospec profile` refreshes them)."""
    from duospec.models.registry import cache_root

    return cache_root() / "profiles"


@dataclass(frozen=True)
class Measured:
    """A fresh measurement and whether it ran under visible load (then it serves this run, unkept)."""

    value: object
    under_load: bool = False


def cached_measurement(
    key_parts: list[str] | None,
    measure: Callable[[], object],
    remeasure: bool = False,
    spot_check: Callable[[object], bool] | None = None,
    notify: Callable[[str], None] | None = None,
) -> object:
    """A JSON-able measurement from the disk cache when its key matches, else measured and stored.

    key_parts identify model, dtype, device, threads and versions; None (in-memory test models)
    skips the disk cache. A damaged or unwritable cache only costs a re-measurement.
    measure: returns the value, or a `Measured` whose `under_load` keeps it off the disk (it is still
    returned for this run; `notify` says so). spot_check: given a kept value, False means it is wrong
    here and is measured again (and replaced unless that measurement is under load).
    """
    path = _cache_path(key_parts)
    kept = _read_kept(path) if path is not None and not remeasure else None
    if kept is not None and (spot_check is None or spot_check(kept)):
        return kept
    measured = measure()
    value, loaded = (measured.value, measured.under_load) if isinstance(measured, Measured) else (measured, False)
    if path is not None and loaded:
        if notify is not None:
            notify("measured under visible load (CPU busy): the figure serves this run but is not kept on disk")
    elif path is not None:
        keep_measurement(key_parts, value)
    return value


def keep_measurement(key_parts: list[str] | None, value: object) -> bool:
    """Write a measurement where `cached_measurement` reads it; False when there is no key or the
    cache is unwritable (that only costs a re-measurement next run)."""
    path = _cache_path(key_parts)
    if path is None:
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key_parts, "value": value}, indent=1))
    except OSError:
        return False
    return True


def read_measurement(key_parts: list[str] | None) -> object | None:
    """The figure kept on disk under this key, or None (no key, nothing kept, a damaged file)."""
    path = _cache_path(key_parts)
    return None if path is None else _read_kept(path)


def _cache_path(key_parts: list[str] | None) -> Path | None:
    if not key_parts:
        return None
    digest = hashlib.sha256("|".join(key_parts).encode()).hexdigest()[:16]
    return profiles_dir() / f"{digest}.json"


def _read_kept(path: Path) -> object | None:
    """The kept value, or None when there is none or the file is damaged."""
    try:
        return json.loads(path.read_text())["value"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def target_cost_key(key_parts: list[str] | None) -> list[str] | None:
    """The cache key of a model's target curve (None: not kept)."""
    return key_parts and [*key_parts, "target", *map(str, DEFAULT_TARGET_SIZES)]


def draft_step_key(key_parts: list[str] | None) -> list[str] | None:
    """The cache key of a model's draft step (None: not kept)."""
    return key_parts and [*key_parts, "draft-step"]


def target_costs_for(
    model: Model,
    key_parts: list[str] | None,
    remeasure: bool = False,
    probe: LoadProbe | None = None,
    notify: Callable[[str], None] | None = None,
) -> dict[int, float]:
    """Measured (or cached and spot-checked) target pass costs for the sizes the budget considers.

    The spot check times one-token passes and compares them with the kept curve's t(1).
    """
    probe = probe or LoadProbe()
    notify = notify or _silent

    def measure() -> Measured:
        costs, reading = probe.watch(lambda: measure_target_costs(model, DEFAULT_TARGET_SIZES), model)
        return Measured({str(n): s for n, s in costs.items()}, under_load(reading))

    def spot_check(kept: object) -> bool:
        one_token = CostProfile({int(n): float(s) for n, s in kept.items()}).target_pass(1)
        return spot_check_agrees(model, one_token, probe, notify, "target pass")

    value = cached_measurement(target_cost_key(key_parts), measure, remeasure, spot_check, notify)
    return {int(n): float(s) for n, s in value.items()}


def draft_step_for(
    model: Model,
    key_parts: list[str] | None,
    remeasure: bool = False,
    probe: LoadProbe | None = None,
    notify: Callable[[str], None] | None = None,
) -> float:
    """Measured (or cached and spot-checked) seconds of one draft step."""
    probe = probe or LoadProbe()
    notify = notify or _silent

    def measure() -> Measured:
        step, reading = probe.watch(lambda: measure_draft_step(model), model)
        return Measured(step, under_load(reading))

    def spot_check(kept: object) -> bool:
        return spot_check_agrees(model, float(kept), probe, notify, "draft step")

    return float(cached_measurement(draft_step_key(key_parts), measure, remeasure, spot_check, notify))


def _silent(message: str) -> None:
    """The default `notify`: say nothing."""


class DuoPlanner:
    """The budget of a Duo round, where drafting runs beside the target instead of before it.

    While the target verifies, the draft process drafts about T_target / T_draft_token tokens for free
    (DuoDecoding's hardware-aware budget: the draft finishes about when the target pass does). So a
    round asks two questions:
    - how many tokens to wait for when fewer are ready (after a rejection the draft starts again): the
      sequential rule's gamma, since waiting is sequential drafting; none where drafting would not
      pay even then; one in the first round, so the first tokens come about as fast as `ar`'s;
    - how many of the ready tokens to verify: the chain prefix with the most expected tokens per
      second of target pass, the cost curve being the one measured for this thread split.

    Exactness: whether draft token j joins the round may depend on tokens 1..j-1 (their draft
    confidences), never on token j itself: under sampling a rule that looked at the token it includes
    would bias the rejection test (a chain cut where its tokens look unlikely is no longer drawn from q).
    So token j counts with the online acceptance rate (alpha_first or alpha_next), and the confidences
    of the tokens before it, scaled by an online calibration, give the chance that it is reached.
    """

    def __init__(self, profile: CostProfile, draft_step_seconds: float, max_gamma: int = 16, fixed_gamma: int | None = None) -> None:
        self.profile = profile
        self.draft_step_seconds = draft_step_seconds
        self.policy = GammaPolicy(profile, draft_step_seconds, max_gamma, fixed_gamma)
        self.reset()

    @property
    def max_gamma(self) -> int:
        return self.policy.fixed_gamma or self.policy.max_gamma

    def reset(self) -> None:
        self.policy.reset()
        self._predicted = 4.0  # discounted predicted and accepted draft tokens: calibration's evidence
        self._accepted = 4.0
        self.pass_seconds: list[tuple[int, float]] = []  # (tokens per pass, seconds): real round times

    @property
    def calibration(self) -> float:
        """Accepted / predicted draft tokens so far (1 = the draft's confidences are honest)."""
        return min(3.0, max(0.25, self._accepted / self._predicted))

    def wait_for(self, first_round: bool) -> int:
        """Draft tokens to wait for when the draft has fewer ready."""
        if self.policy.fixed_gamma is not None:
            return self.policy.fixed_gamma
        if first_round:
            return 1
        first, later = self.policy.alpha_first, self.policy.alpha_next
        gamma = best_gamma(first, self.profile, self.draft_step_seconds, self.max_gamma, later)
        return gamma if self.policy._pays(gamma, first, later) else 0

    def choose_chain(self, confidences: list[float]) -> tuple[int, float]:
        """How many ready draft tokens to verify, and the accepted tokens that predicts.

        confidences: the draft's probability of each ready token (in order)."""
        ready = min(len(confidences), self.max_gamma)
        if self.policy.fixed_gamma is not None:
            gamma = min(ready, self.policy.fixed_gamma)
            return gamma, self._predict(confidences[:gamma])
        first, later = self.policy.alpha_first, self.policy.alpha_next
        plain = (1.0 + DRAFT_MARGIN) / self.profile.target_pass(1)
        reach, expected, best, best_rate = 1.0, 1.0, 0, plain
        for j in range(1, ready + 1):
            expected += reach * (first if j == 1 else later)  # token j counts at the online rate only
            rate = expected / self.profile.target_pass(j + 1)
            if rate > best_rate:
                best, best_rate = j, rate
            elif j == 1 and self._longer_chain_pays(first, later, ready, plain):
                best = 1  # one token alone does not pay but a longer chain may: token 1 joins on the online rates alone
            else:
                # The chain stops before token j, decided on tokens 1..j-1 only. (Scanning on past a token
                # that does not pay would let token j's own confidence, through the rate at j + 1, decide
                # whether token j is verified: under sampling that biased the output law.)
                break
            reach *= min(0.99, confidences[j - 1] * self.calibration)  # token j's confidence only reaches token j + 1
        return best, self._predict(confidences[:best])

    def _longer_chain_pays(self, first: float, later: float, ready: int, plain: float) -> bool:
        """Whether some chain of up to `ready` tokens beats plain decoding at the online acceptance rates
        alone (no draft confidences: the decision must not depend on the tokens it includes)."""
        expected, reach = 1.0, 1.0
        for gamma in range(1, ready + 1):
            alpha = first if gamma == 1 else later
            expected += reach * alpha
            if expected / self.profile.target_pass(gamma + 1) > plain:
                return True
            reach *= alpha
        return False

    def choose_alternatives(self, alternatives: list[int], probs: list[float], gamma: int, max_extra: int) -> list[int]:
        """Other first tokens worth a node each (greedy rounds): one pays when the chance the target
        picks it, times the round's rate, covers the growth of the pass."""
        chosen: list[int] = []
        nodes = gamma + 1
        for token, prob in zip(alternatives[:max_extra], probs):
            growth = self.profile.target_pass(nodes + 1) - self.profile.target_pass(nodes)
            rate = 1.0 / self.profile.target_pass(nodes)
            if min(0.99, prob * self.calibration) < rate * growth:
                break
            chosen.append(token)
            nodes += 1
        return chosen

    def _predict(self, confidences: list[float]) -> float:
        predicted, reach = 0.0, 1.0
        for confidence in confidences:
            reach *= min(0.99, confidence * self.calibration)
            predicted += reach
        return predicted

    def observe(self, predicted: float, drafted: int, accepted: int) -> None:
        """A verified round: online acceptance rates and the confidences' calibration learn from it."""
        self.policy.observe(drafted, accepted)
        if predicted > 0:
            self._predicted = self._predicted * self.policy.discount + predicted
            self._accepted = self._accepted * self.policy.discount + accepted

    def observe_pass(self, tokens: int, seconds: float) -> None:
        self.pass_seconds.append((tokens, seconds))

    def describe(self) -> str:
        """The costs behind the budget and the draft length they imply (for --verbose)."""
        t1, t_draft = self.profile.target_pass(1), self.draft_step_seconds
        hidden = next((g for g in range(1, 65) if g * t_draft >= self.profile.target_pass(g + 1)), 64)
        return (
            f"target pass {t1:.3f} s (1 token), {self.profile.target_pass(4):.3f} s (4), {self.profile.target_pass(8):.3f} s (8); "
            f"draft step {t_draft:.3f} s beside it; the draft keeps pace for about {hidden} tokens per pass "
            f"(gamma ~ T_target / T_draft); each round verifies the ready prefix with the most expected tokens per second, "
            f"waiting for {self.wait_for(False)} token(s) when none are ready"
        )
