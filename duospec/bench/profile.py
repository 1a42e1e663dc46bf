"""`duospec profile`: what one target pass over n new tokens costs on this machine, and one draft step.

These are the two numbers every draft budget rests on (DESIGN.md 1.1): while t(n) stays flat,
verifying more draft tokens is free; where it rises, each extra token must be accepted often enough
to pay for itself. The budget code (duospec/budget/) takes its figures from the same functions,
`measure_target_costs` and `measure_draft_step`, so this table shows why it picks the gamma it does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from duospec.budget.timing import measure_draft_step, measure_target_costs

if TYPE_CHECKING:
    from duospec.api import Pipeline

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PROFILE_JSON = "profile.json"
PROFILE_PNG = "profile.png"


def run_profile(pipe: "Pipeline", sizes: tuple[int, ...], context_tokens: int = 256, repeats: int = 3, with_draft: bool = True) -> dict:
    """Median seconds of a target pass per n (after `context_tokens` cached tokens) and of a draft step."""
    sizes = tuple(sorted(set(sizes)))
    target = measure_target_costs(pipe.target, sizes, context_tokens=context_tokens, repeats=repeats)
    draft = measure_draft_step(pipe.draft, context_tokens=context_tokens) if with_draft else None
    return {
        "target": pipe.target.name,
        "draft": pipe.draft.name if with_draft else None,
        "context_tokens": context_tokens,
        "repeats": repeats,
        "target_pass_seconds": {str(n): seconds for n, seconds in target.items()},
        "draft_step_seconds": draft,
    }


def format_table(profile: dict) -> str:
    """One row per n: seconds, cost relative to one token, seconds per token; then the draft step."""
    costs = {int(n): s for n, s in profile["target_pass_seconds"].items()}
    single = costs[min(costs)]
    lines = [
        f"target {profile['target']}: one pass over n new tokens after {profile['context_tokens']} cached ones",
        f"{'n':>5}  {'seconds':>9}  {'x t(' + str(min(costs)) + ')':>8}  {'ms/token':>9}",
    ]
    lines += [f"{n:>5}  {s:>9.4f}  {s / single:>8.2f}  {1000 * s / n:>9.2f}" for n, s in sorted(costs.items())]
    draft = profile["draft_step_seconds"]
    if draft is not None:
        lines.append(
            f"draft {profile['draft']}: {draft:.4f} s per token; cost ratio c = draft step / target pass "
            f"over {min(costs)} = {draft / single:.2f}"
        )
    return "\n".join(lines)


def write_profile(out: Path, profile: dict, meta: dict) -> list[Path]:
    """profile.json (numbers and machine) and profile.png (target t(n) against drafting n tokens)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / PROFILE_JSON
    json_path.write_text(json.dumps({"meta": meta, **profile}, indent=1) + "\n", encoding="utf-8")
    return [json_path, _plot(out / PROFILE_PNG, profile)]


def _plot(path: Path, profile: dict) -> Path:
    from matplotlib.figure import Figure

    costs = {int(n): s for n, s in profile["target_pass_seconds"].items()}
    sizes = sorted(costs)
    figure = Figure(figsize=(8, 4.8), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(sizes, [costs[n] for n in sizes], marker="o", label="target: one pass over n tokens")
    axes.plot(sizes, [costs[sizes[0]] * n / sizes[0] for n in sizes], linestyle=":", color="gray", label="n passes over one token")
    draft = profile["draft_step_seconds"]
    if draft is not None:
        axes.plot(sizes, [draft * n for n in sizes], linestyle="--", marker=".", label="draft: n single-token steps")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(sizes, [str(n) for n in sizes])
    axes.set_xlabel(f"new tokens n (after {profile['context_tokens']} cached)")
    axes.set_ylabel("seconds (median)")
    axes.set_title(f"Cost of one pass on this machine: {profile['target']}")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=130)
    return path
