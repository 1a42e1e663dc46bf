"""Where a round's tree comes from: the one interface the round loop (`engines/rounds.py`) drafts through.

Every method is a `RoundSource`: `InProcessSource` (engines/in_process.py) drafts in this process with a
Drafter and the policy that budgets it (sd, pld, suffix, multiseq, specexec, auto; ar is the same source
without a drafter), `DuoSource` (engines/duo.py) takes the chain a draft process drafted meanwhile.
The loop owns everything the target does; a source owns drafting and what drafting learns, so a new
way to draft is one class, and no method has a loop of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from duospec.config import SamplingConfig
from duospec.stats import GenerationStats
from duospec.tree import TokenTree
from duospec.verify import Verdict


@dataclass(frozen=True)
class Round:
    """What one round did, for its source to learn from (feedback, budget, cost tracking)."""

    tree: TokenTree  # what was verified (the root alone when nothing was drafted)
    verdict: Verdict
    draft_seconds: float  # step 1: drafting, or waiting for the draft process
    pass_seconds: float  # step 2's target pass alone (what measured pass costs are compared with)
    target_wall_seconds: float  # steps 2-4 in wall time: pass, acceptance, keep (what a duo round overlaps)


class RoundSource(Protocol):
    """Drafts each round's tree (step 1 of the loop) and learns from each round's outcome (step 5).

    Call order per generation: begin, commit (the first token), then per round propose, commit,
    observe; end always, also when the consumer stops early.
    """

    drafts: bool  # whether its rounds count as drafted (stats.gammas), even those that draft nothing

    def begin(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator, stats: GenerationStats) -> None:
        """A new generation, before the prompt's pass (a draft process prefills meanwhile).
        generator: the target's, for sources that draw where the target draws; stats: this
        generation's, for what a source reports (acceptance_estimate, fallback)."""
        ...

    def propose(self, context: list[int], room: int, cells: int) -> TokenTree | None:
        """This round's tree rooted at context[-1] (prompt + emitted tokens), or None to draft nothing.
        room: draft tokens one path may hold (the request's or the context's end); cells: draft nodes
        the target's cache has room for (a tree's node count, which the context's end also limits)."""
        ...

    def commit(self, tokens: list[int]) -> None:
        """The target emitted `tokens` (the first token, then each round's accepted drafts and its own
        token, before any cut at EOS or length), told as soon as they are known."""
        ...

    def observe(self, outcome: Round) -> None:
        """What the round proposed did: drafter feedback, the budget's evidence, measured costs."""
        ...

    def end(self) -> None:
        """The generation is over or abandoned: stop drafting ahead, keep what serves the next one."""
        ...
