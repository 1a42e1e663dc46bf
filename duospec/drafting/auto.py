"""`--method auto`: each round, the method that promises the most tokens per second.

Candidates in this process: `pld` (a copy of what followed the context's last n-gram, free to draft),
`sd` (a chain from the draft model) and `ar` (nothing drafted). Each has its own GammaPolicy, so each
learns its own acceptance online and prices its own draft cost against the measured target curve;
a round uses prompt lookup when it finds a match and its policy says drafting pays, else the draft
model when its policy says that pays, else plain decoding. The evidence moves as the text does
(code that repeats the prompt, then free prose), and the choice moves with it. Whether a separate
draft process (`duo`) beats all of them is decided per request from its measured costs (api.py).

Exact: every round is one of the exact methods, and which one runs depends only on the context
and on earlier rounds, never on the tokens a round drafts.
"""

from __future__ import annotations

from collections import Counter

import torch

from duospec.budget import DraftBudget, GammaPolicy
from duospec.config import SamplingConfig
from duospec.drafting.chain import ChainDrafter
from duospec.drafting.lookup import LookupDrafter, find_continuation
from duospec.tree import TokenTree
from duospec.verify import Verdict


class AutoDrafter:
    """Chooses pld, sd or ar each round; `policy` is the facade the engine re-budgets through."""

    def __init__(self, model_drafter: ChainDrafter | None, sd_policy: GammaPolicy | None, pld_policy: GammaPolicy) -> None:
        self.model_drafter = model_drafter
        self.sd_policy = sd_policy
        self.pld_policy = pld_policy
        self.lookup = LookupDrafter()
        self.policy = _AutoPolicy(self)
        self.rounds: Counter[str] = Counter()  # rounds per chosen method (reported)
        self._last: str = "ar"
        self._cap = 0

    @property
    def model(self):  # the engine picks the draft generator's device from here
        return None if self.model_drafter is None else self.model_drafter.model

    @property
    def last_round_used_model(self) -> bool:
        return self._last == "sd"

    def reset(self) -> None:
        self.rounds.clear()
        self._last = "ar"
        if self.model_drafter is not None:
            self.model_drafter.reset()
        for policy in (self.sd_policy, self.pld_policy):
            if policy is not None:
                policy.reset()

    def propose(self, context: list[int], budget: DraftBudget, sampling: SamplingConfig, generator: torch.Generator | None) -> TokenTree:
        cap = budget.max_tokens
        pld_budget = self.pld_policy.next_budget().capped(cap)
        copied = find_continuation(context, pld_budget.max_tokens) if pld_budget.max_tokens > 0 else []
        if copied:
            self._last = "pld"
            self.rounds["pld"] += 1
            return TokenTree.chain(torch.tensor([context[-1], *copied], dtype=torch.long))
        if self.model_drafter is not None and self.sd_policy is not None:
            sd_budget = self.sd_policy.next_budget().capped(cap)
            if sd_budget.max_tokens > 0:
                self._last = "sd"
                self.rounds["sd"] += 1
                return self.model_drafter.propose(context, sd_budget, sampling, generator)
        self._last = "ar"
        self.rounds["ar"] += 1
        return TokenTree.chain(torch.tensor([context[-1]], dtype=torch.long))

    def feedback(self, verdict: Verdict) -> None:
        if self._last == "sd" and self.model_drafter is not None:
            self.model_drafter.feedback(verdict)

    def observe(self, drafted: int, accepted: int) -> None:
        policy = {"sd": self.sd_policy, "pld": self.pld_policy}.get(self._last)
        if policy is not None:
            policy.observe(drafted, accepted)

    def summary(self) -> str:
        return ", ".join(f"{method} {count}" for method, count in self.rounds.most_common())


class _AutoPolicy:
    """What the engine sees as the policy: no cap of its own (each candidate's policy decides), and
    each round's outcome routed to the policy of the method that drafted it."""

    fixed_gamma = None

    def __init__(self, drafter: AutoDrafter) -> None:
        self.drafter = drafter

    def reset(self) -> None:
        pass  # the drafter resets its candidates' policies

    def next_budget(self) -> DraftBudget:
        return DraftBudget(64)

    def observe_round(self, tree, verdict) -> None:
        self.observe(tree.n_draft, verdict.n_accepted)

    def observe(self, drafted: int, accepted: int) -> None:
        self.drafter.observe(drafted, accepted)

    @property
    def alpha(self) -> float:
        policy = {"sd": self.drafter.sd_policy, "pld": self.drafter.pld_policy}.get(self.drafter._last) or self.drafter.pld_policy
        return policy.alpha
