"""What the benchmark can run: every method of `duospec.drafting.METHODS` plus the library baselines.

Our methods are read from the method registry each time, so a method added there (duo, specexec,
auto) is benchmarked without touching the harness. Every entry answers a prompt given as token ids
with the same `GenerationResult` shape, so the runner and the report treat them all alike.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from duospec.bench.baselines import BASELINES
from duospec.bench.llama_baselines import LLAMA_BASELINES
from duospec.bench.settings import BASELINE_METHOD, DEFAULT_MODE_SUFFIX, BenchMethod, DecodeSettings
from duospec.config import DuospecError

if TYPE_CHECKING:
    from duospec.api import GenerationResult, Pipeline


def bench_methods(deterministic: bool = False) -> dict[str, BenchMethod]:
    """Our registered methods, then the transformers baselines (names are unique across both); with
    `deterministic`, also each of our methods in the default mode (DEFAULT_MODE_SUFFIX)."""
    from duospec.drafting import METHODS

    ours = {
        name: BenchMethod(name, spec.summary, spec.needs_draft_model, partial(_generate_ours, name))
        for name, spec in METHODS.items()
    }
    variants = {}
    if deterministic:
        variants = {
            name + DEFAULT_MODE_SUFFIX: BenchMethod(name + DEFAULT_MODE_SUFFIX, f"{spec.summary}, default mode", spec.needs_draft_model, partial(_generate_default_mode, name))
            for name, spec in METHODS.items()
        }
    return {**ours, **BASELINES, **LLAMA_BASELINES, **variants}


def with_default_mode(methods: list[str]) -> list[str]:
    """`methods` plus the default-mode variant of each of ours (a --deterministic run)."""
    from duospec.drafting import METHODS

    return [*methods, *(name + DEFAULT_MODE_SUFFIX for name in methods if name in METHODS)]


def is_deterministic_answer(method: str, deterministic_run: bool) -> bool:
    """Whether this method's answers in this run came from deterministic mode (and so must equal ar's exactly)."""
    from duospec.drafting import METHODS

    return deterministic_run and method in METHODS


def resolve_methods(names: list[str] | None, has_draft: bool, has_gguf: bool = False) -> list[str]:
    """The methods to run, `ar` first (the speedup baseline is always measured).

    names=None means all of them, leaving out those that need a draft model when none is given and
    the llama.cpp baselines unless the target is a GGUF model and llama-cpp-python is installed.
    """
    from duospec.models.llamacpp import llama_cpp_available

    available = bench_methods()
    if names is None:
        chosen = [
            name
            for name, method in available.items()
            if (has_draft or not method.needs_draft_model) and (name not in LLAMA_BASELINES or (has_gguf and llama_cpp_available()))
        ]
    else:
        unknown = [name for name in names if name not in available]
        if unknown:
            raise DuospecError(
                f"unknown method {', '.join(map(repr, unknown))}; choose from: {', '.join(available)}"
            )
        chosen = list(dict.fromkeys(names))
        needing = [name for name in chosen if available[name].needs_draft_model]
        if needing and not has_draft:
            raise DuospecError(
                f"method {', '.join(needing)} needs a draft model; pass --draft, or leave it out of --methods"
            )
        llama = [name for name in chosen if name in LLAMA_BASELINES]
        if llama and not has_gguf:
            raise DuospecError(f"{', '.join(llama)} need the target as a GGUF model (an embedded name or a .gguf file)")
    return [BASELINE_METHOD, *(name for name in chosen if name != BASELINE_METHOD)]


def _generate_ours(method: str, pipe: "Pipeline", prompt_ids: list[int], settings: DecodeSettings) -> "GenerationResult":
    if not settings.warm:
        pipe.forget_prefixes()  # a cold answer: the whole prompt runs inside the timed call
    return pipe.generate(
        prompt_ids,
        method=method,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        seed=settings.seed,
        **settings.method_options(method),
    )


def _generate_default_mode(method: str, pipe: "Pipeline", prompt_ids: list[int], settings: DecodeSettings) -> "GenerationResult":
    """One of our methods with deterministic mode switched off for this answer only (and the default
    mode's own measured costs: Pipeline.default_mode)."""
    with pipe.default_mode():
        return _generate_ours(method, pipe, prompt_ids, settings)
