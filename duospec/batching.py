"""Continuous batching over one loaded pipeline: one Pipeline per lane, their passes joined.

`open_lanes(pipe, count)` splits the target's (and the draft's) KV cache into `count` lanes (llama.cpp:
sequence ids of one context, models/llamacpp.py's split_lanes; transformers: cell lists of one shared
cache, models/hf_lanes.py) and returns a Pipeline for each: the same tokenizer, suffix history and measured
costs, its own caches, and budgets priced for the batch (budget/batch.py). Each lane's requests run in
their own thread, inside `joint.member()`, through the ordinary round loop; models/joint.py's
JointPasses runs the pending passes of all of them together. A lane's answers are its own: its tokens
attend to its cells only, and the one verifier accepts its tree alone.

What batching leaves out: `duo` (its draft process wants the cores a batch keeps busy: a lane refuses
it, and `auto` never picks it), deterministic mode, and models that are not plain transformers or
llama.cpp models (offloaded weights): serve those with --max-batch 1.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from duospec.api import Pipeline
from duospec.budget.batch import LaneCosts, efficient_width, prefill_chunk
from duospec.budget.model import CostProfile
from duospec.config import DuospecError
from duospec.models.joint import JointPasses, PassRecord

MAX_LANES = 128  # llama.cpp's 256 sequence ids, two per lane at least (home and one leaf)
DEFAULT_BATCH_CAP = 16  # the default --max-batch never exceeds this (memory: a context of cells per lane)


def default_max_batch(profile: CostProfile, cap: int = DEFAULT_BATCH_CAP) -> int:
    """The batch the measured curve pays for: the efficient width up to cap (budget/batch.py), the
    smallest measured pass size within NEAR_BEST of the best tokens per second. A flat curve (GPU,
    AMX) gives the cap; a curve as steep as a 1-token step's (no gain from width) gives 1."""
    return efficient_width(profile, cap)


def batch_choice_note(profile: CostProfile, chosen: int) -> str:
    """Why the default batch is what it is, in measured terms (the server's start-up line)."""
    one = 1 / profile.target_pass(1)
    rate = chosen / profile.target_pass(chosen)
    return (
        f"batch up to {chosen} requests (--max-batch): a pass over {chosen} tokens costs {profile.target_pass(chosen) / profile.target_pass(1):.2f}x "
        f"a 1-token pass here, {rate:.1f} tokens/s for the batch against {one:.1f} for one request alone"
    )


def check_batchable(pipe: Pipeline, count: int) -> None:
    """Refuse a batch this pipeline cannot run, saying what would."""
    if not 1 <= count <= MAX_LANES:
        raise DuospecError(f"--max-batch must be in 1..{MAX_LANES}, got {count}")
    if count == 1:
        return
    if pipe.deterministic:
        raise DuospecError(f"deterministic mode serves one request at a time: serve it with --max-batch 1, or drop --deterministic to batch {count}")
    if _splitter(pipe.target) is None:
        raise DuospecError(
            f"continuous batching (--max-batch {count}) runs plain transformers or llama.cpp targets; this one is "
            f"{type(pipe.target).__name__} (offloaded weights, say): serve it with --max-batch 1"
        )


def _splitter(model) -> Callable | None:
    """The split_lanes of the model's backend, or None for a model that cannot be split."""
    from duospec.models import hf_lanes, llamacpp
    from duospec.models.hf import HFModel

    if isinstance(model, llamacpp.LlamaCppModel):
        return llamacpp.split_lanes
    if type(model) is HFModel and not model.deterministic:
        return hf_lanes.split_lanes
    return None


def open_lanes(pipe: Pipeline, count: int, on_pass: Callable[[PassRecord], None] | None = None) -> tuple[list[Pipeline], JointPasses]:
    """`count` lane pipelines over `pipe`'s models and the JointPasses their threads meet in. Each
    model's KV cache holds `count` lanes (llama.cpp: `count` times its context); `pipe` itself runs nothing afterwards.
    on_pass hears every joint target pass (the server's metrics). Call after every cost the methods need is measured (server/run.py's warm-up):
    a lane never measures."""
    check_batchable(pipe, count)

    def target_passes_only(record: PassRecord) -> None:
        if on_pass is not None and record.key == target_key:
            on_pass(record)

    # The prompt chunks need the measured curve; a pipeline that never measured it (tests) is not made to.
    curve = pipe.costs.target_costs
    joint = JointPasses(target_passes_only, prefill_chunk(CostProfile(curve)) if curve else None)
    # Lanes share prefixes only where the pipeline keeps them at all (--no-prefix-cache: every request cold).
    targets = _splitter(pipe.target)(pipe.target, count, share_prefixes=pipe.prefix_cache)
    target_key = joint.target_key = targets[0].joint_key  # the key of the target's passes (a draft's are neither reported nor stopped)
    drafts: list = [None] * count
    split_draft = _splitter(pipe.draft) if pipe.has_draft else None
    if split_draft is not None:
        drafts = split_draft(pipe.draft, count, share_prefixes=pipe.prefix_cache)
    lanes = []
    for target, draft in zip(targets, drafts):
        for model in (target, draft):
            if model is not None:
                model.joiner = joint
        target.fair_profile = CostProfile(curve) if curve else None  # what budget/batch.py's pass_limit caps drafts by
        lanes.append(_lane_pipeline(pipe, target, draft, joint))
    return lanes, joint


def _lane_pipeline(pipe: Pipeline, target, draft, joint: JointPasses) -> Pipeline:
    """A shallow copy of `pipe` with the lane's models and costs (shared: tokenizer, suffix history)."""
    lane = copy.copy(pipe)
    lane.target = target
    lane._draft = draft
    if draft is None:  # a draft no backend can split serves no lane: methods without one remain
        lane.draft_source = None
    lane.costs = LaneCosts(pipe.costs, target)
    lane._duo = None
    lane._active_stream = None
    lane.joint = joint
    return lane
