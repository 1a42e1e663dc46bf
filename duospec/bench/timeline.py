"""A timeline of one `duo` answer: when the draft process drafted, when the target verified, and
when the target waited for the draft. It shows whether the two sides really overlap."""

from __future__ import annotations

import json
from pathlib import Path

from duospec.bench.settings import DecodeSettings


def record_duo_timeline(pipe, prompt_ids: list[int], settings: DecodeSettings) -> dict:
    """Generate one answer with `duo`, recording both processes' busy intervals (seconds from the start)."""
    runtime = pipe.duo_runtime()
    runtime.prepare()
    runtime.timeline = []
    if runtime.process is not None:
        runtime.process.step_times()  # forget draft steps from before this answer
    pipe.forget_prefixes()  # a cold answer, its prefill on the timeline as in the bench
    try:
        result = pipe.generate(
            prompt_ids, method="duo", max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
            top_p=settings.top_p, top_k=settings.top_k, seed=settings.seed,
        )
        draft = []
        if runtime.process is not None:
            runtime.process.step_times()
            draft = runtime.process.last_intervals
    finally:
        events, runtime.timeline = runtime.timeline, None
    origin = min([start for _, start, _ in events] + [start for start, _ in draft] or [0.0])
    last = max(end for _, _, end in events) if events else origin
    return {
        "split": runtime.split.label if runtime.split else None,
        "new_tokens": result.stats.new_tokens,
        "prefill": [(s - origin, e - origin) for kind, s, e in events if kind == "prefill"],
        "target": [(s - origin, e - origin) for kind, s, e in events if kind == "target"],
        "wait": [(s - origin, e - origin) for kind, s, e in events if kind == "wait" and e - s > 1e-4],
        "draft": [(s - origin, e - origin) for s, e in draft if s <= last],
    }


def plot_timeline(path: Path, timeline: dict, seconds: float = 3.0) -> Path:
    """Horizontal bars per side: the prompt's prefill, then `seconds` of decoding rounds."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 2.8))
    axes = figure.add_subplot()
    rows = [
        ("draft process: drafting", timeline["draft"], "tab:orange"),
        ("target: prefill, verifying", timeline.get("prefill", []) + timeline["target"], "tab:blue"),
        ("target: waiting for the draft", timeline["wait"], "tab:red"),
    ]
    end = (timeline["target"][0][0] if timeline["target"] else 0.0) + seconds
    for row, (label, spans, color) in enumerate(rows):
        shown = [(s, min(e, end) - s) for s, e in spans if s < end]
        axes.broken_barh(shown, (row - 0.35, 0.7), color=color, edgecolor="white", linewidth=0.3)
    axes.set_yticks(range(len(rows)), [label for label, _, _ in rows])
    axes.set_xlim(0, end)
    axes.set_xlabel("seconds since the prompt was sent")
    axes.set_title(f"duo, one answer ({timeline['new_tokens']} tokens); {timeline['split']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def write_timeline(out: Path, pipe, prompt_ids: list[int], settings: DecodeSettings) -> Path:
    timeline = record_duo_timeline(pipe, prompt_ids, settings)
    (out / "timeline.json").write_text(json.dumps(timeline))
    return plot_timeline(out / "timeline.png", timeline)
