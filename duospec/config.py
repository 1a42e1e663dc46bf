"""User-facing settings as validated dataclasses.

Every check that guards user input lives here, so a bad value fails at once with a message naming the
knob and the fix, never as a traceback from deep inside torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DRAFT_QUANTIZATIONS = ("auto", "int8", "none")  # how the draft's weights are stored (--draft-quant)
# The smallest positive temperature: float32's smallest normal number. Logits are warped in float32, and a
# smaller temperature would round to 0 there (or be flushed to 0 as a subnormal). Every temperature from
# here up is numerically safe in `sampling.warp_probs`; 0 itself means greedy.
MIN_TEMPERATURE = 1.1754943508222875e-38

class DuospecError(Exception):
    """An error caused by input or environment, with a message that says what to change.

    The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
    """


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen, applied identically to target and draft.

    temperature == 0 means greedy decoding (argmax); top_k == 0 and top_p == 1 switch those filters off.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature) or self.temperature < 0:
            raise DuospecError(
                f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}; pass e.g. --temperature 0.7"
            )
        if math.isinf(self.temperature):
            raise DuospecError("temperature must be finite; pass e.g. --temperature 0.7")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise DuospecError(
                f"temperature {self.temperature!r} is too small to compute with (the smallest positive temperature "
                f"is {MIN_TEMPERATURE:.4g}); use 0 for greedy decoding, which is what such a temperature amounts to"
            )
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not (0 <= self.top_k < 2**31):
            raise DuospecError(f"top_k must be an integer >= 0 and < 2**31 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise DuospecError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}; pass e.g. --top-p 0.9")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or not (-(2**63) <= self.seed < 2**63)):
            raise DuospecError(f"seed must be an integer that fits 64 bits (-2**63 .. 2**63-1), got {self.seed!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


MAX_TREE_BUDGET = 4096
MAX_TREE_DEPTH = 64


@dataclass(frozen=True)
class GenerationRequest:
    """One generation call: the method, its budget and its sampling settings."""

    method: str = "sd"
    max_new_tokens: int = 128
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    gamma: int | None = None  # None = chosen from measured costs (budget/policy.py)
    lenience: float = 1.0  # 1 = exact; < 1 accepts more drafts and is lossy (opt-in)
    tree_budget: int | None = None  # specexec: draft nodes per tree; None = autotuned from measured costs
    tree_depth: int | None = None  # specexec: the tree's depth cap (= its draft passes); None = 16

    def __post_init__(self) -> None:
        # The method's name is checked against the registry by drafting.method_spec, where the
        # registry lives (config sits below drafting, so it cannot import it).
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens <= 0:
            raise DuospecError(
                f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}; pass e.g. --max-new-tokens 128"
            )
        if self.gamma is not None and (
            not isinstance(self.gamma, int) or isinstance(self.gamma, bool) or not (1 <= self.gamma <= 64)
        ):
            raise DuospecError(
                f"gamma (draft tokens per round) must be an integer in 1..64, got {self.gamma!r}; "
                "omit it to let duospec choose from measured costs"
            )
        if not isinstance(self.lenience, (int, float)) or math.isnan(self.lenience) or not (0.0 < self.lenience <= 1.0):
            raise DuospecError(
                f"lenience must be in (0, 1] (1 = exact, lower = faster but lossy), got {self.lenience!r}"
            )
        for label, value, top in (("tree_budget", self.tree_budget, MAX_TREE_BUDGET), ("tree_depth", self.tree_depth, MAX_TREE_DEPTH)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not (1 <= value <= top)):
                raise DuospecError(f"{label} must be an integer in 1..{top}, got {value!r}; omit it to let duospec choose")
        if self.lenience < 1.0 and self.method in ("specexec", "suffix"):
            raise DuospecError(f"lenience applies to chains (sd, pld); {self.method} verifies its trees exactly, so pass no --lenience with it")
        if self.lenience < 1.0 and self.method == "ar":
            raise DuospecError("lenience only applies to speculative methods (sd, pld); method 'ar' drafts nothing")
