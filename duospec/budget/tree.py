"""SpecExec's node budget, from the measured cost curve and the measured acceptance by budget.

A round with budget b costs the draft's passes (the root's, then `passes` passes over `width` nodes:
`TreeSearch.for_budget`) plus one target pass over b + 1 tokens, and emits the accepted tokens plus
one. Both costs are measured on this machine: the target's curve t(n) is extended past the sizes the
chain methods use, up to the first size whose pass costs more than `depth + 2` one-token passes (no
tree of depth `depth` can emit more than depth + 1 tokens per pass, so larger trees never pay); the
draft's curve by width likewise. Both are kept on disk like the other measured costs.

Acceptance by budget is measured, not modelled: a tree of budget B holds, for every b <= B, the tree
of budget b as its b best-ranked nodes (children never outrank their parents), so one verified round
tells how many tokens the budget-b tree would have accepted: the accepted path's nodes ranked below
b. (A search with budget b alone runs fewer, narrower passes, so this is an estimate for b < B.)
Budgets never tried start from a prior (a chain at acceptance 0.8) that the rounds then replace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duospec.budget.model import DRAFT_MARGIN, CostProfile
from duospec.budget.policy import PROBE_EVERY, DraftBudget
from duospec.config import MAX_TREE_BUDGET
from duospec.drafting.specexec import DEFAULT_DEPTH, TreeSearch
from duospec.tree import TokenTree
from duospec.verify import Verdict

LARGE_SIZES = (48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
DRAFT_WIDTHS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CANDIDATE_BUDGETS = tuple(2**k for k in range(13))  # 1 .. 4096


@dataclass(frozen=True)
class BudgetChoice:
    """One budget's predicted round: what the policy compared."""

    budget: int
    accepted: float  # expected accepted draft tokens per round
    draft_seconds: float
    target_seconds: float

    @property
    def rate(self) -> float:
        return (self.accepted + 1.0) / (self.draft_seconds + self.target_seconds)

    def describe(self) -> str:
        return (
            f"budget {self.budget}: {self.accepted:.2f} accepted + 1 per round in {self.draft_seconds:.3f} s draft "
            f"+ {self.target_seconds:.3f} s target pass over {self.budget + 1} tokens = {self.rate:.1f} tok/s"
        )


class TreeBudgetPolicy:
    """Chooses each round's node budget; learns acceptance by budget from the current request."""

    def __init__(
        self,
        target_costs: CostProfile | None,
        draft_costs: CostProfile | None,
        depth: int | None = None,
        fixed_budget: int | None = None,
        max_budget: int = MAX_TREE_BUDGET,
        prior_alpha: float = 0.8,
        prior_weight: float = 2.0,
        discount: float = 0.9,
    ) -> None:
        if fixed_budget is None and (target_costs is None or draft_costs is None):
            raise ValueError("a TreeBudgetPolicy needs measured target and draft costs unless the budget is fixed")
        self.target_costs = target_costs
        self.draft_costs = draft_costs
        self.depth = depth or DEFAULT_DEPTH
        self.fixed_budget = fixed_budget
        self.prior_alpha = prior_alpha
        self.prior_weight = prior_weight
        self.discount = discount
        self.candidates = self._candidates(max_budget)
        self.last_choice: BudgetChoice | None = None
        self.reset()

    def _candidates(self, max_budget: int) -> tuple[int, ...]:
        """Budgets whose target pass lies within the measured curve (past it, trees never pay)."""
        if self.target_costs is None:
            return ()
        largest = max(self.target_costs.target_pass_seconds)
        return tuple(b for b in CANDIDATE_BUDGETS if b <= max_budget and b + 1 <= largest) or (1,)

    def reset(self) -> None:
        self._sums = {b: 0.0 for b in CANDIDATE_BUDGETS}  # discounted accepted tokens at budget b
        self._counts = {b: 0.0 for b in CANDIDATE_BUDGETS}
        self._idle_rounds = 0
        self._asked = 0  # the budget of the last round

    # -- what a budget is predicted to do ----------------------------------------------------------
    def expected_accepted(self, budget: int) -> float:
        """Mean accepted draft tokens at `budget`: the rounds' measurements blended with the prior."""
        a = self.prior_alpha
        depth = TreeSearch.for_budget(budget, self.depth).passes
        prior = a * (1 - a**depth) / (1 - a)
        return (self._sums[budget] + self.prior_weight * prior) / (self._counts[budget] + self.prior_weight)

    def predict(self, budget: int) -> BudgetChoice:
        search = TreeSearch.for_budget(budget, self.depth)
        draft = self.draft_costs.target_pass(1) + (search.passes - 1) * self.draft_costs.target_pass(search.width)
        return BudgetChoice(budget, self.expected_accepted(budget), draft, self.target_costs.target_pass(budget + 1))

    @property
    def plain_rate(self) -> float:
        """Tokens per second of autoregressive decoding (one token per one-token pass)."""
        return 1.0 / self.target_costs.target_pass(1)

    @property
    def alpha(self) -> float | None:
        """The share of the last chosen budget's draft nodes expected to be accepted (as every policy's
        `alpha`: an acceptance estimate, reported as stats.acceptance_estimate)."""
        if self.last_choice is None or self.last_choice.budget == 0:
            return None
        return self.expected_accepted(self.last_choice.budget) / self.last_choice.budget

    def next_budget(self) -> DraftBudget:
        budget = self._choose()
        self._asked = budget.max_tokens
        return budget

    def _choose(self) -> DraftBudget:
        if self.fixed_budget is not None:
            return DraftBudget(self.fixed_budget, tree=True)
        choices = [self.predict(b) for b in self.candidates]
        best = max(choices, key=lambda choice: choice.rate)
        self.last_choice = best
        if best.rate <= (1.0 + DRAFT_MARGIN) * self.plain_rate:
            # No tree pays on this machine at the acceptance seen so far: decode plainly, and now and
            # then draft the best candidate to learn whether the text has become predictable, but
            # only where some tree could pay at all (a probe costs the draft's catch-up on every
            # token since it last ran).
            self._idle_rounds += 1
            probe = self._idle_rounds % PROBE_EVERY == 0 and self.could_pay
            return DraftBudget(best.budget if probe else 0, tree=True)
        return DraftBudget(best.budget, tree=True)

    @property
    def could_pay(self) -> bool:
        """Whether any candidate beats autoregressive decoding even if every draft token on its
        deepest path were accepted (min(budget, depth) tokens per round): else probing is waste."""
        for budget in self.candidates:
            best_case = BudgetChoice(budget, float(TreeSearch.for_budget(budget, self.depth).passes), self.predict(budget).draft_seconds, self.predict(budget).target_seconds)
            if best_case.rate > (1.0 + DRAFT_MARGIN) * self.plain_rate:
                return True
        return False

    def describe(self) -> str:
        """The last choice and its rivals, for --verbose."""
        if self.fixed_budget is not None:
            return f"specexec: fixed budget {self.fixed_budget} (depth cap {self.depth})"
        lines = [f"specexec: autoregressive = {self.plain_rate:.1f} tok/s (t(1) = {self.target_costs.target_pass(1):.3f} s); candidates:"]
        lines += ["  " + self.predict(b).describe() for b in self.candidates]
        best = self.last_choice or max((self.predict(b) for b in self.candidates), key=lambda c: c.rate)
        pays = best.rate > (1.0 + DRAFT_MARGIN) * self.plain_rate
        if pays:
            lines.append(f"  chose budget {best.budget}")
        elif self.could_pay:
            lines.append(f"  chose budget 0 (no tree beats autoregressive by {DRAFT_MARGIN:.0%} at this acceptance; budget {best.budget} is probed every {PROBE_EVERY} rounds)")
        else:
            lines.append(f"  chose budget 0: no tree beats autoregressive by {DRAFT_MARGIN:.0%} here even if every draft token were accepted (target passes cost too much more per token), so none is drafted")
        return "\n".join(lines)

    # -- learning ------------------------------------------------------------------------------------
    def observe(self, drafted: int, accepted: int) -> None:
        """The chain policies' hook; trees report through `observe_round`."""

    def observe_round(self, tree: TokenTree, verdict: Verdict) -> None:
        """Record, for every candidate b up to this tree's budget, what the b best nodes accepted."""
        if tree.n_draft == 0 or tree.log_probs is None:
            return
        accepted_ranks = accepted_node_ranks(tree, verdict)
        # A search may end below its budget; then every budget up to the one asked for gave this tree.
        asked = max(self._asked, tree.n_draft)
        for b in CANDIDATE_BUDGETS:
            if b > asked and b >= tree.n_draft:
                break
            self._sums[b] = self._sums[b] * self.discount + sum(1 for rank in accepted_ranks if rank < b)
            self._counts[b] = self._counts[b] * self.discount + 1


def accepted_node_ranks(tree: TokenTree, verdict: Verdict) -> list[int]:
    """Ranks (0 = best draft node, by cumulative log-probability, ties by index) of the accepted nodes.

    Example: nodes 1, 2, 3 with log-probabilities -0.1, -2.0, -0.5 rank 0, 2, 1; an accepted path
    [0, 1, 3] gives [0, 1] (not [0, 2]: node 3 is the second best although it is the third node), so
    a budget of 2 nodes would have held the whole accepted path.
    """
    scores = tree.log_probs[1:].float().cpu()
    order = torch.sort(scores, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0])
    return [int(rank[node - 1]) for node in verdict.path[1:]]
