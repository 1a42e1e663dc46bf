"""`duospec bench --sweep-budget`: SpecExec's accepted tokens per target pass and speed against budget.

SpecExec's main figure. Each question's first turn is answered by `ar` once and by `specexec` at every
budget, interleaved per question (so a drift of the machine's speed touches every budget alike), with
the same decoding flags. Per budget: accepted tokens per verification pass (tokens after the first,
over passes after the prefill), tokens per second (all tokens over all seconds), the speedup over
`ar` (median over answers) and whether greedy output matched `ar`. The curve's bend is where one
more doubling of the budget adds less than a tenth of a token per pass.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from duospec.bench.ties import divergence, near_tie_tolerance

if TYPE_CHECKING:
    from duospec.api import Pipeline
    from duospec.bench.data import Question
    from duospec.bench.settings import DecodeSettings

DEFAULT_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
BEND_GAIN = 0.1  # accepted tokens per pass a doubling must add to still be on the steep part


def run_sweep(pipe: "Pipeline", questions: list["Question"], budgets: tuple[int, ...], decode: "DecodeSettings", depth: int | None, out: Path) -> dict:
    """Answer every question with ar and with specexec at each budget; write sweep.json/.md/.png."""
    out.mkdir(parents=True, exist_ok=True)
    options = dict(max_new_tokens=decode.max_new_tokens, temperature=decode.temperature, top_p=decode.top_p, top_k=decode.top_k, seed=decode.seed)
    warm = pipe.encode(questions[0].turns[0])
    pipe.generate(warm, method="specexec", tree_budget=min(budgets), tree_depth=depth, **{**options, "max_new_tokens": 4})  # loads and warms both models
    rows: list[dict] = []
    for index, question in enumerate(questions):
        prompt_ids = pipe.encode(question.turns[0])
        pipe.forget_prefixes()  # every answer cold: the same prompt must not ride on the last answer's cache
        reference = pipe.generate(prompt_ids, method="ar", **options)
        rows.append(_row(question, "ar", None, reference, reference))
        for budget in budgets:
            pipe.forget_prefixes()
            result = pipe.generate(prompt_ids, method="specexec", tree_budget=budget, tree_depth=depth, **options)
            rows.append(_row(question, "specexec", budget, result, reference))
            if decode.temperature == 0 and not rows[-1]["greedy_match"]:
                # As the bench does: a difference at a near-tie of ar's own top two logits is rounding.
                found = divergence(pipe, prompt_ids, reference.token_ids, result.token_ids, near_tie_tolerance(pipe.dtype, pipe.backend))
                rows[-1]["near_tie"] = found.is_near_tie
            print(f"duospec: sweep {index + 1}/{len(questions)} budget {budget}: {rows[-1]['accepted_per_pass']:.2f} per pass, {rows[-1]['tokens_per_second']:.2f} tok/s", flush=True)
    summary = summarize_sweep(rows, budgets)
    (out / "sweep_results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    (out / "sweep.md").write_text(render_sweep(summary))
    plot_sweep(out / "sweep.png", summary)
    return summary


def _row(question: "Question", method: str, budget: int | None, result, reference) -> dict:
    stats = result.stats
    verify_passes = max(1, stats.target_passes - 1)
    return {
        "question_id": question.question_id,
        "task": question.task,
        "method": method,
        "budget": budget,
        "new_tokens": stats.new_tokens,
        "target_passes": stats.target_passes,
        "seconds": stats.seconds,
        "tokens_per_second": stats.tokens_per_second,
        "accepted_per_pass": (stats.new_tokens - 1) / verify_passes,
        "tree_nodes": stats.gammas,
        "greedy_match": result.token_ids == reference.token_ids,
        "peak_rss_mb": stats.peak_rss_mb,
    }


def summarize_sweep(rows: list[dict], budgets: tuple[int, ...]) -> dict:
    """Per budget: pooled accepted per pass and tokens/s, median speedup over ar, greedy matches."""
    ar = {row["question_id"]: row for row in rows if row["method"] == "ar"}
    ar_rate = sum(r["new_tokens"] for r in ar.values()) / max(1e-9, sum(r["seconds"] for r in ar.values()))
    per_budget = []
    for budget in budgets:
        mine = [row for row in rows if row["budget"] == budget]
        if not mine:
            continue
        passes = sum(max(1, r["target_passes"] - 1) for r in mine)
        ratios = [r["tokens_per_second"] / ar[r["question_id"]]["tokens_per_second"] for r in mine if ar[r["question_id"]]["tokens_per_second"] > 0]
        per_budget.append({
            "budget": budget,
            "accepted_per_pass": sum(r["new_tokens"] - 1 for r in mine) / passes,
            "tokens_per_second": sum(r["new_tokens"] for r in mine) / max(1e-9, sum(r["seconds"] for r in mine)),
            "speedup": statistics.median(ratios) if ratios else None,
            "greedy_matches": sum(r["greedy_match"] for r in mine),
            "near_ties": sum(bool(r.get("near_tie")) for r in mine),
            "answers": len(mine),
            "mean_tree_nodes": statistics.fmean(n for r in mine for n in r["tree_nodes"]) if any(r["tree_nodes"] for r in mine) else 0.0,
            "peak_rss_mb": max((r["peak_rss_mb"] or 0) for r in mine),
        })
    best = max(per_budget, key=lambda b: b["tokens_per_second"]) if per_budget else None
    return {"ar_tokens_per_second": ar_rate, "budgets": per_budget, "fastest_budget": best and best["budget"], "bend_budget": bend_of(per_budget)}


def bend_of(per_budget: list[dict]) -> int | None:
    """The first budget after which doubling adds less than BEND_GAIN accepted tokens per pass."""
    for low, high in zip(per_budget, per_budget[1:]):
        if high["accepted_per_pass"] - low["accepted_per_pass"] < BEND_GAIN:
            return low["budget"]
    return per_budget[-1]["budget"] if per_budget else None


def render_sweep(summary: dict) -> str:
    lines = [
        "| budget | mean tree nodes | accepted tokens / target pass | tokens/s | speedup over ar (median) | greedy = ar (+ near-ties) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in summary["budgets"]:
        speedup = "-" if b["speedup"] is None else f"{b['speedup']:.2f}x"
        lines.append(
            f"| {b['budget']} | {b['mean_tree_nodes']:.0f} | {b['accepted_per_pass']:.2f} | {b['tokens_per_second']:.2f} | {speedup} | {b['greedy_matches']}/{b['answers']}"
            + (f" (+{b.get('near_ties', 0)})" if b.get("near_ties") else "") + f" | {b['peak_rss_mb']:.0f} |"
        )
    lines.append("")
    lines.append(f"ar: {summary['ar_tokens_per_second']:.2f} tokens/s. Fastest budget: {summary['fastest_budget']}; the acceptance curve bends after budget {summary['bend_budget']} (a doubling adds < {BEND_GAIN} tokens per pass).")
    return "\n".join(lines) + "\n"


def plot_sweep(path: Path, summary: dict) -> Path:
    """Two panels against budget (log scale): accepted tokens per target pass, and tokens/s with ar's line."""
    from matplotlib.figure import Figure

    budgets = [b["budget"] for b in summary["budgets"]]
    figure = Figure(figsize=(10, 4.2), layout="constrained")
    accepted_axes, speed_axes = figure.subplots(1, 2)
    accepted_axes.plot(budgets, [b["accepted_per_pass"] for b in summary["budgets"]], marker="o")
    accepted_axes.set(xscale="log", xlabel="tree budget (draft nodes)", ylabel="accepted tokens per target pass", title="Acceptance")
    accepted_axes.set_xscale("log", base=2)
    speed_axes.plot(budgets, [b["tokens_per_second"] for b in summary["budgets"]], marker="o", label="specexec")
    speed_axes.axhline(summary["ar_tokens_per_second"], color="grey", linestyle="--", label="ar")
    speed_axes.set(xlabel="tree budget (draft nodes)", ylabel="tokens per second", title="Speed")
    speed_axes.set_xscale("log", base=2)
    speed_axes.legend()
    for axes in (accepted_axes, speed_axes):
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=130)
    return path
