"""Drafters propose a TokenTree; the method registry says which drafter each method uses.

One protocol serves model drafts and model-free drafts (as transformers' CandidateGenerator does):
`propose` returns a tree rooted at the last emitted token; `feedback` hears what was accepted.
Engines pick drafters from `METHODS` only, never by isinstance checks, so a new method is one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from duospec.budget.policy import DraftBudget
from duospec.config import DuospecError, SamplingConfig
from duospec.tree import TokenTree
from duospec.verify import Verdict


class Drafter(Protocol):
    """Proposes draft tokens after `context` (prompt + emitted tokens; context[-1] is the root)."""

    def reset(self) -> None:
        """Forget any state from an earlier sequence."""
        ...

    def propose(
        self,
        context: list[int],
        budget: DraftBudget,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> TokenTree:
        """A tree of at most `budget.max_tokens` draft tokens rooted at context[-1] (fewer, or none, is fine)."""
        ...

    def feedback(self, verdict: Verdict) -> None:
        """What the target kept of the last proposal."""
        ...


@dataclass(frozen=True)
class MethodSpec:
    """A generation method: how to build its drafter from the loaded models."""

    name: str
    summary: str
    needs_draft_model: bool
    # make_drafter(draft_model_or_None, target_model, request) -> Drafter or None (plain autoregressive)
    make_drafter: Callable[[object | None, object, object], Drafter | None]
    # How the method starts (engines/start.py's START): "sequential" (a drafter and its chain budget, in this process),
    # "tree" (SpecExec's node budget), "suffix" (a tree sized by the suffix policy), "duo" (the draft
    # process, engines/duo.py) or "auto"; every one runs through engines/rounds.py
    engine: str = "sequential"


def _no_drafter(draft_model, target, request) -> None:
    return None


def _chain_drafter(draft_model, target, request) -> Drafter:
    from duospec.drafting.chain import ChainDrafter

    return ChainDrafter(draft_model, target_vocab_size=target.vocab_size)


def _lookup_drafter(draft_model, target, request) -> Drafter:
    from duospec.drafting.lookup import LookupDrafter

    return LookupDrafter()


def _multiseq_drafter(draft_model, target, request) -> Drafter:
    from duospec.drafting.multiseq import MultiSequenceDrafter

    return MultiSequenceDrafter(draft_model, target_vocab_size=target.vocab_size)


def _specexec_drafter(draft_model, target, request) -> Drafter:
    from duospec.drafting.specexec import SpecExecDrafter

    return SpecExecDrafter(draft_model, target.vocab_size, max_leaves=target.max_tree_leaves, depth=request.tree_depth)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("ar", "autoregressive: one target pass per token (the baseline)", False, _no_drafter),
        MethodSpec("sd", "speculative decoding: a draft model proposes a chain of gamma tokens", True, _chain_drafter),
        MethodSpec("pld", "prompt lookup: copy what followed the last n-gram earlier in the context", False, _lookup_drafter),
        MethodSpec("suffix", "suffix decoding: a tree of what followed the context's longest repeated suffix, in this request and earlier ones (no model)", False, _no_drafter, engine="suffix"),
        MethodSpec("multiseq", "speculative decoding with DuoDecoding's multi-sequence drafts, verified as one tree", True, _multiseq_drafter),
        MethodSpec("specexec", "SpecExec: a best-first tree of the draft's likeliest continuations (hundreds of nodes), verified in one pass", True, _specexec_drafter, engine="tree"),
        MethodSpec("duo", "DuoDecoding: the draft drafts in its own process while the target verifies", True, _no_drafter, engine="duo"),
        MethodSpec("auto", "the fastest of ar, suffix, sd and duo here, from measured costs and online acceptance", False, _no_drafter, engine="auto"),
    )
}


def method_spec(name: str) -> MethodSpec:
    """The registered method called `name`, or an error that lists the choices."""
    spec = METHODS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise DuospecError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return spec
