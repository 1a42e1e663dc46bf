"""`--method auto`: each round, the method that promises the most tokens per second.

Candidates in this process: `suffix` (a tree of what followed the context's longest repeated suffix,
in this request or an earlier one; free to draft, so it covers prompt lookup too), `sd` (a chain from
the draft model) and `ar` (nothing drafted). Each prices its draft against the measured target curve
with its own policy: the suffix policy verifies the part of its tree that pays (none when nothing
matches or nothing pays), the draft model's GammaPolicy learns its acceptance online. A round uses
the suffix tree when one pays, else the draft model when its policy says that pays, else plain
decoding. The evidence moves as the text does (code that repeats the prompt, then free prose), and
the choice moves with it. Whether a separate draft process (`duo`) beats all of them is decided per
request from its measured costs (engines/start.py: start_auto).

Exact: every round is one of the exact methods, and which one runs depends only on the context
and on earlier rounds, never on the tokens a round drafts.
"""

from __future__ import annotations

from collections import Counter

import torch

from duospec.budget.policy import DraftBudget, GammaPolicy
from duospec.config import SamplingConfig
from duospec.drafting.chain import ChainDrafter
from duospec.drafting.suffix import SuffixDrafter
from duospec.tree import TokenTree
from duospec.verify import Verdict


class AutoDrafter:
    """Chooses suffix, sd or ar each round; `policy` is the facade the engine re-budgets through."""

    def __init__(self, suffix: SuffixDrafter, model_drafter: ChainDrafter | None, sd_policy: GammaPolicy | None) -> None:
        self.suffix = suffix
        self.model_drafter = model_drafter
        self.sd_policy = sd_policy
        self.policy = _AutoPolicy(self)
        self.rounds: Counter[str] = Counter()  # rounds per chosen method (reported)
        self._last: str = "ar"

    @property
    def model(self):  # the engine picks the draft generator's device from here
        return None if self.model_drafter is None else self.model_drafter.model

    @property
    def last_round_used_model(self) -> bool:
        return self._last == "sd"

    def reset(self) -> None:
        self.rounds.clear()
        self._last = "ar"
        self.suffix.reset()
        self.suffix.policy.reset()
        if self.model_drafter is not None:
            self.model_drafter.reset()
        if self.sd_policy is not None:
            self.sd_policy.reset()

    def propose(self, context: list[int], budget: DraftBudget, sampling: SamplingConfig, generator: torch.Generator | None) -> TokenTree:
        cap = budget.max_tokens
        tree = self.suffix.propose(context, DraftBudget(min(cap, self.suffix.policy.max_nodes)), sampling, generator)
        if tree.n_draft:
            return self._chose("suffix", tree)
        if self.model_drafter is not None and self.sd_policy is not None:
            sd_budget = self.sd_policy.next_budget().capped(cap)
            if sd_budget.max_tokens > 0:
                return self._chose("sd", self.model_drafter.propose(context, sd_budget, sampling, generator))
        return self._chose("ar", TokenTree.chain(torch.tensor([context[-1]], dtype=torch.long)))

    def _chose(self, method: str, tree: TokenTree) -> TokenTree:
        self._last = method
        self.rounds[method] += 1
        return tree

    def feedback(self, verdict: Verdict) -> None:
        if self._last == "sd" and self.model_drafter is not None:
            self.model_drafter.feedback(verdict)

    def observe_round(self, tree: TokenTree, verdict: Verdict) -> None:
        if self._last == "suffix":
            self.suffix.policy.observe_round(tree, verdict)
        elif self._last == "sd" and self.sd_policy is not None:
            self.sd_policy.observe(tree.n_draft, verdict.n_accepted)

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

    def observe_round(self, tree: TokenTree, verdict: Verdict) -> None:
        self.drafter.observe_round(tree, verdict)

    @property
    def alpha(self) -> float:
        if self.drafter._last == "sd" and self.drafter.sd_policy is not None:
            return self.drafter.sd_policy.alpha
        return self.drafter.suffix.policy.alpha

    def describe(self) -> str:
        parts = [f"suffix rounds: {self.drafter.suffix.policy.describe()}"]
        if self.drafter.sd_policy is not None:
            parts.append(f"draft-model rounds: {self.drafter.sd_policy.describe()}")
        return "each round drafts from the suffix tree where a repeat pays, else from the draft model where it pays, else runs as ar; " + "; ".join(parts)
