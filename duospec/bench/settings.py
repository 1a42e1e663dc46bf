"""The settings every benchmarked method answers with, and the shape of a method entry.

Kept apart from `methods.py` (the registry of what can be benchmarked) because the baselines define
entries of this shape and the registry collects them: both import from here, neither from the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from duospec.api import GenerationResult, Pipeline

BASELINE_METHOD = "ar"  # every speedup is measured against this method, in the same run
# Under --deterministic, each of our methods also runs with the mode switched off for that answer, named
# "<method>@default": the mode's cost is then measured in the same run, on the same questions.
DEFAULT_MODE_SUFFIX = "@default"


@dataclass(frozen=True)
class DecodeSettings:
    """The decoding flags every method gets for one answer (temperature 0 = greedy)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    gamma: int | None = None  # chain methods' draft tokens per round; None = chosen from measured costs
    tree_budget: int | None = None  # specexec's draft nodes per tree; None = chosen from measured costs
    # Keep what the caches hold from the method's previous answer (a `--warm` run's later turns reuse
    # the earlier turn's prefix); False: every cache starts empty inside the timed call.
    warm: bool = False

    def method_options(self, method: str) -> dict:
        """The fixed budget that applies to `method` (gamma to chains, the tree budget to specexec)."""
        if method == "specexec":
            return {} if self.tree_budget is None else {"tree_budget": self.tree_budget}
        if method in ("sd", "pld", "multiseq", "duo"):
            return {} if self.gamma is None else {"gamma": self.gamma}
        return {}


@dataclass(frozen=True)
class BenchMethod:
    name: str
    summary: str
    needs_draft_model: bool
    # generate(pipe, prompt_ids, settings) -> GenerationResult
    generate: Callable[["Pipeline", list[int], DecodeSettings], "GenerationResult"]
