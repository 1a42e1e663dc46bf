"""DuoDecoding's round planner: how long to wait for the draft process and how much of its chain to verify."""

from __future__ import annotations

from duospec.budget.model import DRAFT_MARGIN, CostProfile, best_gamma
from duospec.budget.policy import GammaPolicy


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
