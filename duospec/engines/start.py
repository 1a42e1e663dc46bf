"""How each method starts a generation: which round source it runs, sized by which budget.

The method registry (drafting/__init__.py) names each method's kind; `START` maps a kind to its
start function here. Each returns the rounds (engines/rounds.py) and the stats they fill, built from
what the pipeline holds: its models, its cost book (budget/book.py), its suffix history and its duo
runtime. A new method is one registry entry, plus one start function only if it is a new kind.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from duospec.budget.model import DRAFT_MARGIN, CostProfile, best_gamma, expected_tokens
from duospec.budget.policy import PROBE_ALPHA, GammaPolicy
from duospec.budget.tree import TreeBudgetPolicy
from duospec.config import DuospecError, GenerationRequest
from duospec.drafting import MethodSpec, method_spec
from duospec.drafting.auto import AutoDrafter
from duospec.drafting.chain import ChainDrafter
from duospec.drafting.specexec import DEFAULT_DEPTH
from duospec.drafting.suffix import SuffixDrafter, SuffixPolicy
from duospec.engines.in_process import InProcessSource
from duospec.engines.rounds import generate_tokens
from duospec.models.base import usable_cores
from duospec.stats import GenerationStats

if TYPE_CHECKING:
    from duospec.api import Pipeline
    from duospec.engines.duo_runtime import DuoDraft

Started = tuple[Iterator[list[int]], GenerationStats]

# With fewer CPU cores, a draft process and the target split too few between them: duo ran at 0.50x
# (AMD EPYC) and 0.59x (Intel AMX Xeon) of plain decoding on 2 cores, so auto does not even measure it.
DUO_MIN_CPU_CORES = 4


def start(pipe: Pipeline, spec: MethodSpec, prompt_ids: list[int], request: GenerationRequest) -> Started:
    """The rounds of one request with method `spec`."""
    return START[spec.engine](pipe, spec, prompt_ids, request)


def start_in_process(pipe: Pipeline, spec: MethodSpec, prompt_ids: list[int], request: GenerationRequest) -> Started:
    """A drafter in this process (none for ar) and its budget: a chain's gamma, SpecExec's tree, or
    the suffix tree's node count."""
    draft = pipe.draft if spec.needs_draft_model else None
    drafter, policy = spec.make_drafter(draft, pipe.target, request), None
    if spec.engine == "suffix":
        drafter = suffix_drafter(pipe, request)
        policy = drafter.policy
    elif spec.engine == "tree":
        policy = tree_policy(pipe, request)
    elif drafter is not None:
        policy = chain_policy(pipe, request, draft)
    if pipe.verbose and policy is not None:
        rule = policy.describe()
        print(f"duospec: {rule if rule.startswith(spec.name + ':') else spec.name + ': ' + rule}", file=sys.stderr)
    stats = GenerationStats(method=spec.name, prompt_tokens=len(prompt_ids), gamma_auto=request.gamma is None)
    if isinstance(policy, GammaPolicy) and policy.profile is not None and not policy.could_pay:
        stats.choice_note = cannot_pay_note(policy.profile, policy.draft_step_seconds)
    chunks = generate_tokens(pipe.target, InProcessSource(drafter, policy, pipe.costs.tracker), prompt_ids, request, pipe.eos_ids, stats)
    return chunks, stats


def chain_policy(pipe: Pipeline, request: GenerationRequest, draft) -> GammaPolicy:
    """A chain's draft length: fixed by the request, else from the measured costs (model-free drafts
    cost no model step)."""
    if request.gamma is not None:
        return GammaPolicy(None, fixed_gamma=request.gamma)  # a fixed gamma needs no measurement
    draft_cost = pipe.costs.draft_step_seconds() if draft is not None else 0.0
    return GammaPolicy(pipe.costs.target_profile(), draft_cost)


def tree_policy(pipe: Pipeline, request: GenerationRequest) -> TreeBudgetPolicy:
    """SpecExec's node budget: fixed by the request, else autotuned from measured costs."""
    if request.tree_budget is not None:
        return TreeBudgetPolicy(None, None, depth=request.tree_depth, fixed_budget=request.tree_budget)
    target_costs, draft_costs = pipe.costs.tree_costs(DEFAULT_DEPTH)
    return TreeBudgetPolicy(target_costs, draft_costs, depth=request.tree_depth, prior_alpha=pipe.auto_alpha)


def suffix_drafter(pipe: Pipeline, request: GenerationRequest) -> SuffixDrafter:
    """A suffix drafter over the shared history (if any), sized by the measured cost curve, or
    verifying up to `gamma` nodes when the request fixes it."""
    policy = SuffixPolicy(None, max_nodes=request.gamma) if request.gamma is not None else SuffixPolicy(pipe.costs.target_profile())
    history = pipe.suffix_history if pipe.suffix_scope == "shared" else None
    return SuffixDrafter(history, policy, max_leaves=pipe.target.max_tree_leaves)


def start_duo(pipe: Pipeline, spec: MethodSpec, prompt_ids: list[int], request: GenerationRequest) -> Started:
    """The draft in its own process, drafting while the target verifies (engines/duo_runtime.py)."""
    from duospec.engines.duo_runtime import print_choice

    runtime = pipe.duo_runtime()
    runtime.prepare()
    planner = runtime.planner(request.gamma)
    if pipe.verbose:
        print_choice(runtime, planner)
    stats = GenerationStats(method=spec.name, prompt_tokens=len(prompt_ids), gamma_auto=request.gamma is None)
    return runtime.generate(prompt_ids, request, planner, stats, reuse_draft=runtime.take_reuse()), stats


def duo_draft(pipe: Pipeline) -> DuoDraft:
    """How duo's draft process builds the pipeline's draft: the attached model itself (transformers
    only: it is pickled into the child), or the draft's source loaded in the child with its threads."""
    from duospec.engines.draft_process import DraftFromSource, DraftObject, vocabulary_digest
    from duospec.engines.duo_runtime import DuoDraft

    if pipe.attached_draft is not None:
        if pipe.draft_backend != "transformers":
            raise DuospecError("duo needs a draft it can load in its own process; pass the draft as a source (--draft)")
        return DuoDraft(lambda threads: DraftObject(pipe.attached_draft), None)
    if pipe.draft_source is None:
        raise DuospecError("duo needs a draft model; pass --draft (or draft=...) with a model that shares the target's tokenizer")
    options, digest = pipe.draft_load_options(), vocabulary_digest(pipe.tokenizer)

    def factory(threads: int) -> DraftFromSource:
        return DraftFromSource(pipe.draft_source, replace(options, threads=threads), name=pipe.draft_label, target_vocabulary=digest, target_name=pipe.target_source)

    return DuoDraft(factory, str(pipe.draft_label))


def start_auto(pipe: Pipeline, spec: MethodSpec, prompt_ids: list[int], request: GenerationRequest) -> Started:
    """`auto`: duo for the whole request where its measured costs promise more than the best
    in-process method, else the in-process methods chosen round by round (drafting/auto.py)."""
    profile = pipe.costs.target_profile()
    sd_policy, sequential_rate = _sd_candidate(pipe, profile)
    if sd_policy is not None and duo_is_a_candidate(pipe.target.device) and _duo_pays(pipe, sequential_rate):
        chunks, stats = start_duo(pipe, spec, prompt_ids, request)
        stats.method = "auto:duo"
        return learn_acceptance(pipe, chunks, lambda: stats.acceptance_estimate), stats
    has_draft = sd_policy is not None
    drafter = AutoDrafter(suffix_drafter(pipe, replace(request, gamma=None)), ChainDrafter(pipe.draft, pipe.target.vocab_size) if has_draft else None, sd_policy)
    stats = GenerationStats(method=spec.name, prompt_tokens=len(prompt_ids), gamma_auto=request.gamma is None)
    stats.auto_rounds = drafter.rounds
    stats.choice_note = auto_choice_note(profile, pipe.costs.draft_step_seconds() if has_draft else None)
    if pipe.verbose:
        print(f"duospec: auto: {drafter.policy.describe()} ({stats.choice_note})", file=sys.stderr)
    chunks = generate_tokens(pipe.target, InProcessSource(drafter, drafter.policy, pipe.costs.tracker), prompt_ids, request, pipe.eos_ids, stats)
    # Only the draft model's rounds say what auto expects of it (a suffix round's acceptance is the copy's).
    return learn_acceptance(pipe, chunks, lambda: sd_policy.alpha if drafter.rounds.get("sd") else None), stats


def learn_acceptance(pipe: Pipeline, chunks: Iterator[list[int]], estimate: Callable[[], float | None]) -> Iterator[list[int]]:
    """Pass auto's chunks through; afterwards remember the draft model's acceptance (`estimate()`, None
    when the request never drafted with it) in the pipeline, for its next auto choice."""
    yield from chunks
    alpha = estimate()
    if alpha is not None:
        pipe.auto_alpha = 0.5 * pipe.auto_alpha + 0.5 * alpha


def _sd_candidate(pipe: Pipeline, profile: CostProfile) -> tuple[GammaPolicy | None, float]:
    """The draft model's chain policy for auto (None without a draft) and the best in-process rate."""
    rate = 1.0 / profile.target_pass(1)
    if not pipe.has_draft:
        return None, rate
    alpha, draft_step = pipe.auto_alpha, pipe.costs.draft_step_seconds()
    policy = GammaPolicy(profile, draft_step, prior_alpha=alpha)
    gamma = best_gamma(alpha, profile, draft_step, policy.max_gamma)
    return policy, max(rate, expected_tokens(alpha, gamma) / (gamma * draft_step + profile.target_pass(gamma + 1)))


def _duo_pays(pipe: Pipeline, sequential_rate: float) -> bool:
    """Whether duo's measured thread split promises more than the best in-process method."""
    duo_rate = pipe.duo_runtime().predicted_rate(pipe.auto_alpha)
    if pipe.verbose:
        print(f"duospec: auto: duo promises {duo_rate:.1f} tok/s, the best in-process method {sequential_rate:.1f} tok/s (alpha {pipe.auto_alpha:.2f})", file=sys.stderr)
    return duo_rate > sequential_rate * (1 + DRAFT_MARGIN)


def measure_costs(pipe: Pipeline, names: list[str], default: str) -> list[str]:
    """Measure (or read from disk, spot-checked) every cost the budgets of `names` need, so that no
    request pays for a measurement (a server measures before it listens: a first specexec request once
    measured its tree costs for 116 s while every other client waited). Duo's thread split starts draft
    processes, so it is measured only where duo can pay: the default method is duo, or auto on a GPU or
    4+ cores. Returns what was measured, for the start-up line."""
    specs = [method_spec(name) for name in names if not method_spec(name).needs_draft_model or pipe.has_draft]
    measured = ["target pass curve"]
    pipe.costs.target_profile()
    if pipe.has_draft and any(spec.needs_draft_model or spec.engine == "auto" for spec in specs):
        pipe.costs.draft_step_seconds()
        measured.append("draft step")
    if pipe.has_draft and any(spec.engine == "tree" for spec in specs):
        pipe.costs.tree_costs(DEFAULT_DEPTH)
        measured.append("specexec tree costs")
    if pipe.has_draft and (default == "duo" or (default == "auto" and duo_is_a_candidate(pipe.target.device))):
        pipe.duo_runtime().predicted_rate(pipe.auto_alpha)
        measured.append("duo thread split")
    return measured


def duo_is_a_candidate(device: torch.device) -> bool:
    """Whether `auto` measures duo at all: a GPU target (the draft then has the CPU), or enough CPU cores."""
    return device.type == "cuda" or usable_cores() >= DUO_MIN_CPU_CORES


def cannot_pay_note(profile: CostProfile, draft_step: float) -> str:
    """Why a chain method drafts nothing here, in measured terms (its summary line)."""
    two = profile.target_pass(2) / profile.target_pass(1)
    step = f" and a draft step {draft_step / profile.target_pass(1):.2f}x" if draft_step > 0 else ""
    return f"a 2-token pass costs {two:.2f}x a 1-token pass{step}: drafting cannot pay here even at {PROBE_ALPHA:.0%} acceptance; ran as ar"


def auto_choice_note(profile: CostProfile, draft_step: float | None) -> str:
    """Why `auto` may or may not use the draft model here, in measured terms (its summary line)."""
    costs = f"a 2-token pass costs {profile.target_pass(2) / profile.target_pass(1):.2f}x a 1-token pass"
    if draft_step is None:
        return f"suffix trees where a repeat pays ({costs}); no draft model"
    ratio = draft_step / profile.target_pass(1)
    verdict = "can pay where it is often right" if GammaPolicy(profile, draft_step).could_pay else "cannot pay here, at any acceptance"
    return f"suffix trees where a repeat pays; the draft model {verdict} ({costs}, a draft step {ratio:.2f}x a target step)"


START: dict[str, Callable[[Pipeline, MethodSpec, list[int], GenerationRequest], Started]] = {
    "sequential": start_in_process,
    "tree": start_in_process,
    "suffix": start_in_process,
    "duo": start_duo,
    "auto": start_auto,
}
