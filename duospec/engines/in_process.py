"""Rounds drafted in this process: a Drafter (drafting/) and the policy that budgets it.

sd, pld, suffix, multiseq, specexec and auto are this source with their drafter and policy; ar is it
without a drafter (every round the root alone), which still lets a CostTracker hear each pass.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from duospec.budget.corrections import CostTracker
from duospec.budget.policy import DraftBudget, GammaPolicy
from duospec.config import SamplingConfig
from duospec.drafting import Drafter
from duospec.engines import steps
from duospec.engines.source import Round
from duospec.stats import GenerationStats
from duospec.tree import TokenTree


class InProcessSource:
    """A drafter and its budget policy (GammaPolicy, TreeBudgetPolicy, the suffix or auto policy).

    tracker (budget/corrections.py's CostTracker, the pipeline's `costs.tracker`) hears each round's real pass and draft-step times, so kept cost
    figures that the machine contradicts get replaced (between requests, never during one).
    """

    def __init__(self, drafter: Drafter | None, policy: GammaPolicy | None = None, tracker: CostTracker | None = None) -> None:
        self.drafter = drafter
        self.policy = policy
        self.tracker = tracker
        self.drafts = drafter is not None
        self._proposed = False  # whether the drafter proposed this round (else it hears nothing of it)

    def begin(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator, stats: GenerationStats) -> None:
        """A new sequence for drafter and policy. The draft cache is not dropped here: the drafter keeps
        the prefix it shares with the new context at its first proposal (models/prefix.py)."""
        self.sampling, self.stats = sampling, stats
        self.generator = generator_for_drafter(self.drafter, generator, sampling.seed)
        if self.drafter is not None:
            self.drafter.reset()
        if self.policy is not None:
            self.policy.reset()

    def propose(self, context: list[int], room: int, cells: int) -> TokenTree | None:
        budget = self._budget(room, cells)
        self._proposed = budget is not None and budget.max_tokens > 0
        return self.drafter.propose(context, budget, self.sampling, self.generator) if self._proposed else None

    def _budget(self, room: int, cells: int) -> DraftBudget | None:
        """The policy's budget for this round, capped by the request's and the context's end."""
        if self.drafter is None or self.policy is None:
            return None
        budget = self.policy.next_budget().capped(room)
        if budget.tree:
            # capped() limits a tree's depth; every node also takes a cell of the target's cache, so the
            # context's end limits their number too (llama.cpp refuses a pass past its context).
            budget = replace(budget, max_tokens=min(budget.max_tokens, cells))
        return budget

    def commit(self, tokens: list[int]) -> None:
        """Nothing drafts ahead here: the drafter reads the context at its next proposal."""

    def observe(self, outcome: Round) -> None:
        tree, verdict = outcome.tree, outcome.verdict
        if self.tracker is not None:
            self.tracker.target_pass(tree.n_nodes, outcome.pass_seconds)
            if self._proposed and tree.n_draft and tree.log_probs is None and _drafted_with_model(self.drafter):
                self.tracker.draft_steps(tree.n_draft, outcome.draft_seconds)  # one draft pass per token (the root's included); not so for trees
        if not self._proposed:
            return
        self.drafter.feedback(verdict)
        self.policy.observe_round(tree, verdict)  # re-budgets the next round from this one's outcome
        self.stats.acceptance_estimate = self.policy.alpha

    def end(self) -> None:
        """The draft cache stays as it is: the next request's first proposal reuses its prefix."""


def generator_for_drafter(drafter: Drafter | None, target_generator: torch.Generator, seed: int | None) -> torch.Generator:
    """The generator a drafter samples with: the target's where both share a device (so seeded runs
    repeat as before), else one of the draft's own device seeded from the request (a CPU draft
    beside a CUDA target cannot draw from a CUDA generator)."""
    device = getattr(getattr(drafter, "model", None), "device", None)
    if device is None or torch.device(device).type == target_generator.device.type:
        return target_generator
    return steps.make_generator(steps.derived_seed(seed), torch.device(device))


def _drafted_with_model(drafter: Drafter) -> bool:
    """Whether the last proposal ran draft-model steps (auto's lookup rounds do not)."""
    return getattr(drafter, "last_round_used_model", getattr(drafter, "model", None) is not None)
