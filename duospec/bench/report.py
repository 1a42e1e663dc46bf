"""Turn results.jsonl records into summary.json, report.md and PNG plots.

Everything here is computed from the records alone (no models, no clock), so a test can recompute
any figure from the same file, and a report can be rebuilt after the fact with `write_report`.

Definitions (per method, per task and overall):
- speedup: a ratio of token rates, as Spec-Bench computes it: (the method's new tokens / its seconds)
  divided by (ar's new tokens / ar's seconds), each rate taken as total tokens over total wall-clock
  seconds of the answers both have. Rates, not seconds: two answers to one prompt may differ in length
  (every sampled run; greedy near-ties), and a method that writes 120 tokens at 4x ar's rate where ar
  stopped after 3 is 4x faster, not 0.1x. Each answer's own rate ratio gives the median and the spread
  (10th and 90th percentiles) across answers.
- tokens/s: new tokens / seconds. Accepted tokens per target pass: new tokens / target passes (the
  prompt pass included, so `ar` has exactly 1). Acceptance rate: accepted / drafted tokens.
- time to first token (TTFT): median and spread over answers.
- greedy match: answers whose token ids equal ar's; a differing answer is a near-tie when the target's
  logits of the two competing tokens are within the tolerance recorded with it (see ties.py).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections import Counter
from pathlib import Path

import numpy as np

from duospec.bench.data import TASK_TITLES, TASKS
from duospec.bench.settings import BASELINE_METHOD

SUMMARY_NAME = "summary.json"
REPORT_NAME = "report.md"
PLOT_NAMES = {"speedup": "speedup.png", "accepted": "accepted_tokens.png", "phases": "time_per_round.png"}
OVERALL = "overall"
PHASES = ("draft", "target", "verify", "other")


# -- numbers -----------------------------------------------------------------------------------
def summarize(records: list[dict]) -> dict:
    """Metrics for every method x task (and overall) present in the records."""
    methods = list(dict.fromkeys([BASELINE_METHOD, *(record["method"] for record in records)]))
    present = dict.fromkeys(record["task"] for record in records)
    tasks = [task for task in TASKS if task in present] + [task for task in present if task not in TASKS]
    reference = {(r["question_id"], r["turn"]): r for r in records if r["method"] == BASELINE_METHOD}
    results: dict[str, dict] = {}
    for method in methods:
        mine = [record for record in records if record["method"] == method]
        results[method] = {task: _metrics([r for r in mine if r["task"] == task], reference) for task in tasks}
        results[method][OVERALL] = _metrics(mine, reference)
    return {"baseline": BASELINE_METHOD, "methods": methods, "tasks": tasks, "results": results}


def _metrics(records: list[dict], reference: dict) -> dict:
    seconds = sum(r["seconds"] for r in records)
    new_tokens = sum(r["new_tokens"] for r in records)
    passes = sum(r["target_passes"] for r in records)
    drafted = sum(r["drafted_tokens"] for r in records)
    accepted = sum(r["accepted_tokens"] for r in records)
    pairs = [(reference[(r["question_id"], r["turn"])], r) for r in records if (r["question_id"], r["turn"]) in reference]
    ratios = [ratio for base, record in pairs if (ratio := speedup_of([base], [record])) is not None]
    ttfts = [r["ttft_seconds"] for r in records if r["ttft_seconds"] is not None]
    phase_seconds = _phase_seconds(records)
    return {
        "answers": len(records),
        "questions": len({r["question_id"] for r in records}),
        "new_tokens": new_tokens,
        "seconds": seconds,
        "speedup": speedup_of([base for base, _ in pairs], [record for _, record in pairs]),
        "speedup_median": _percentile(ratios, 50),
        "speedup_p10": _percentile(ratios, 10),
        "speedup_p90": _percentile(ratios, 90),
        "tokens_per_second": new_tokens / seconds if seconds > 0 else None,
        "mean_accepted": new_tokens / passes if passes else None,
        "acceptance_rate": accepted / drafted if drafted else None,
        "ttft_median": _percentile(ttfts, 50),
        "ttft_p10": _percentile(ttfts, 10),
        "ttft_p90": _percentile(ttfts, 90),
        "greedy": _greedy_counts(records),
        # Mean seconds per target pass ("round"); the prompt pass counts as target time.
        "seconds_per_pass": {phase: value / passes for phase, value in phase_seconds.items()} if passes else None,
    }


def speedup_of(base: list[dict], mine: list[dict]) -> float | None:
    """The method's token rate over the baseline's: (sum of mine's new tokens / sum of its seconds) /
    (the same for base). base and mine are the two methods' answers to the same prompts, pair by pair.
    None when a rate is undefined (no seconds, or the baseline wrote nothing).

    speedup_of([ar answer: 3 tokens in 1 s], [sd answer: 120 tokens in 7.5 s]) == 16 / 3 == 5.33
    (the ratio of seconds, 1 / 7.5 = 0.13, would call the faster method slower).
    """
    return rate_ratio(
        sum(r["new_tokens"] for r in base), sum(r["seconds"] for r in base),
        sum(r["new_tokens"] for r in mine), sum(r["seconds"] for r in mine),
    )


def rate_ratio(base_tokens: float, base_seconds: float, tokens: float, seconds: float) -> float | None:
    """(tokens / seconds) / (base_tokens / base_seconds), or None when either rate is undefined or zero."""
    if seconds <= 0 or base_seconds <= 0 or base_tokens <= 0:
        return None
    return (tokens / seconds) / (base_tokens / base_seconds)


def _phase_seconds(records: list[dict]) -> dict[str, float]:
    totals = dict.fromkeys(PHASES, 0.0)
    for record in records:
        times = record["time_breakdown"]
        measured = {"draft": times["draft"], "target": times["prefill"] + times["target"], "verify": times["verify"]}
        for phase, value in measured.items():
            totals[phase] += value
        totals["other"] += max(0.0, record["seconds"] - sum(measured.values()))
    return totals


def _greedy_counts(records: list[dict]) -> dict | None:
    checked = [r["greedy"] for r in records if r.get("greedy")]
    if not checked:
        return None
    counts = Counter(entry["status"] for entry in checked)
    return {
        "answers": len(checked),
        "match": counts["match"],
        "near_tie": counts["near_tie"],
        "mismatch": counts["mismatch"],
        "match_share": counts["match"] / len(checked),
        "tolerance": max(entry["tolerance"] for entry in checked),
    }


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


# -- machine and versions ----------------------------------------------------------------------
def _llama_cpp_version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.__version__


def collect_meta(flags: dict, run: dict, command: str) -> dict:
    """What a reader needs to judge and rerun the numbers: command, machine, versions, models, flags."""
    import torch
    import transformers

    import duospec

    return {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command,
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "llama_cpp_python": _llama_cpp_version(),
            "duospec": duospec.__version__,
        },
        "flags": flags,
        "run": run,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- files -------------------------------------------------------------------------------------
def write_report(out: Path, records: list[dict], meta: dict) -> dict:
    """Write summary.json, report.md and the plots into `out`; return the summary."""
    summary = summarize(records)
    (out / SUMMARY_NAME).write_text(json.dumps({"meta": meta, **summary}, indent=1) + "\n", encoding="utf-8")
    write_plots(out, summary, records)
    (out / REPORT_NAME).write_text(render_markdown(summary, meta), encoding="utf-8")
    return summary


def speedup_table(summary: dict) -> str:
    """The Spec-Bench leaderboard table: speedup per task, mean accepted tokens, overall speedup."""
    tasks = summary["tasks"]
    header = ["Method", *(TASK_TITLES.get(task, task) for task in tasks), "#Mean Accepted Tokens", "Overall"]
    rows = []
    for method in summary["methods"]:
        result = summary["results"][method]
        overall = result[OVERALL]
        rows.append([method, *(_x(result[task]["speedup"]) for task in tasks), _num(overall["mean_accepted"]), _x(overall["speedup"])])
    return _table(header, rows)


def render_markdown(summary: dict, meta: dict) -> str:
    flags, run, machine, versions = meta["flags"], meta["run"], meta["machine"], meta["versions"]
    results = summary["results"]
    detail_header = ["Method", "Speedup", "Per-answer speedup, median [p10, p90]", "Tokens/s", "Accepted tokens per target pass", "Acceptance rate", "TTFT, median [p10, p90]", "Greedy match"]
    detail_rows = [_detail_row(method, results[method][OVERALL]) for method in summary["methods"]]
    task_header = ["Method", "Task", "Answers", "Speedup", "Tokens/s", "Accepted/pass", "Acceptance rate", "TTFT median", "Greedy match"]
    task_rows = [
        [method, task, str(m["answers"]), _x(m["speedup"]), _num(m["tokens_per_second"]), _num(m["mean_accepted"]), _pct(m["acceptance_rate"]), _sec(m["ttft_median"]), _greedy(m["greedy"])]
        for method in summary["methods"]
        for task in summary["tasks"]
        for m in [results[method][task]]
    ]
    answers = sum(results[method][OVERALL]["answers"] for method in summary["methods"])
    tolerance = next((g["tolerance"] for method in summary["methods"] if (g := results[method][OVERALL]["greedy"])), None)
    lines = [
        "# duospec bench report",
        "",
        f"Command: `{meta['command']}`  ",
        f"Created {meta['created']}; {answers} answers from {results[summary['baseline']][OVERALL]['questions']} questions "
        f"({', '.join(summary['tasks'])}), {len(summary['methods'])} methods.",
        "",
        f"## Speedup over {summary['baseline']} (as Spec-Bench reports it)",
        "",
        speedup_table(summary),
        "",
        "## Per method, all tasks",
        "",
        _table(detail_header, detail_rows),
        "",
        "## Per method and task",
        "",
        _table(task_header, task_rows),
        "",
        "## Plots",
        "",
        f"![Speedup per task]({PLOT_NAMES['speedup']})",
        "",
        f"![Accepted tokens per target pass]({PLOT_NAMES['accepted']})",
        "",
        f"![Where a round's time goes]({PLOT_NAMES['phases']})",
        "",
        "## Setup",
        "",
        f"- Machine: {machine['cpu']}, {machine['cpu_count']} logical CPUs, {machine['platform']}" + (f", GPU {machine['gpu']}" if machine["gpu"] else ""),
        f"- Versions: Python {versions['python']}, torch {versions['torch']}, transformers {versions['transformers']}"
        + (f", llama-cpp-python {versions['llama_cpp_python']}" if versions.get("llama_cpp_python") else "")
        + f", duospec {versions['duospec']}",
        f"- Models: target `{flags['target']}`, draft `{flags['draft']}`; dtype {flags['dtype'].removeprefix('torch.')}, device {flags['device']}, threads {flags['threads']}",
        f"- Decoding: max_new_tokens {flags['max_new_tokens']}, temperature {flags['temperature']}, top_p {flags['top_p']}, top_k {flags['top_k']}, seed {flags['seed']}",
        f"- Questions: `{run['questions']}` (sha256 {flags['questions_sha256'][:12]}), {run['limit']} per task; methods {', '.join(run['methods'])}",
        "- Caches: "
        + (
            "warm (`--warm`): a method's later turns keep the prefix its previous turn left cached (each record's reused_prompt_tokens)"
            if flags.get("warm")
            else "cold: every answer starts from empty KV caches, its whole prompt inside the timed call"
        ),
        "",
        "## How to read this",
        "",
        f"- Speedup: the method's token rate divided by {summary['baseline']}'s, as in Spec-Bench; each rate is total new "
        "tokens over total wall-clock seconds of the answers both methods have, measured in the same process with methods "
        "interleaved per question, each method warmed up once before timing. Rates rather than seconds, because two "
        "answers to one prompt may differ in length (sampling, greedy near-ties). The per-answer spread is the median, "
        "10th and 90th percentile of each answer's own rate ratio.",
        "- Accepted tokens per target pass counts every token a pass emits, the prompt pass included, so ar is 1.00.",
        "- Greedy match: answers whose token ids equal ar's. A differing answer counts as a near-tie when the target, "
        "re-scoring the first differing position in the run's dtype (one pass over the prompt and the common prefix), "
        f"gives the two competing tokens logits that differ by at most {tolerance if tolerance is not None else '-'}"
        " (rounding of a multi-token pass in low precision); a mismatch beyond that would be a bug. A later turn after a "
        "differing one has a different prompt and keeps the earlier turn's verdict.",
        "- Time per round: for hf-assisted, draft = the assistant model's forward passes; for both hf baselines the "
        "library's own verification and prompt lookup are inside \"other\".",
        "",
    ]
    return "\n".join(lines)


def _detail_row(method: str, m: dict) -> list[str]:
    spread = f"{_x(m['speedup_median'])} [{_x(m['speedup_p10'])}, {_x(m['speedup_p90'])}]"
    ttft = f"{_sec(m['ttft_median'])} [{_sec(m['ttft_p10'])}, {_sec(m['ttft_p90'])}]"
    return [method, _x(m["speedup"]), spread, _num(m["tokens_per_second"]), _num(m["mean_accepted"]), _pct(m["acceptance_rate"]), ttft, _greedy(m["greedy"])]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _sec(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _greedy(greedy: dict | None) -> str:
    if greedy is None:
        return "-"
    return f"{greedy['match']}/{greedy['answers']} ({greedy['match_share']:.0%}); near-ties {greedy['near_tie']}, mismatches {greedy['mismatch']}"


# -- plots -------------------------------------------------------------------------------------
def write_plots(out: Path, summary: dict, records: list[dict]) -> list[Path]:
    """speedup.png, accepted_tokens.png, time_per_round.png (matplotlib's object API: no global state)."""
    colors = {method: f"C{index}" for index, method in enumerate(summary["methods"])}
    paths = [
        _plot_speedup(out / PLOT_NAMES["speedup"], summary, colors),
        _plot_accepted(out / PLOT_NAMES["accepted"], summary, records, colors),
        _plot_phases(out / PLOT_NAMES["phases"], summary),
    ]
    return paths


def _figure(width: float = 9.0, height: float = 4.8):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.add_subplot()


def _plot_speedup(path: Path, summary: dict, colors: dict[str, str]) -> Path:
    figure, axes = _figure()
    groups = [*summary["tasks"], OVERALL]
    methods = [method for method in summary["methods"] if method != summary["baseline"]]
    width = 0.8 / max(len(methods), 1)
    for index, method in enumerate(methods):
        values = [summary["results"][method][group]["speedup"] or 0.0 for group in groups]
        positions = [g + (index - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        bars = axes.bar(positions, values, width, label=method, color=colors[method])
        axes.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    axes.axhline(1.0, color="black", linestyle="--", linewidth=1, label=f"{summary['baseline']} = 1")
    axes.set_xticks(range(len(groups)), [TASK_TITLES.get(g, g.capitalize()).replace(" ", "\n", 1) for g in groups], fontsize=8)
    axes.set_ylabel(f"speedup over {summary['baseline']} (ratio of tokens/s)")
    axes.set_title("Speedup per task")
    figure.legend(fontsize=8, ncols=min(len(methods) + 1, 6), loc="outside lower center")
    axes.set_ylim(0, max([1.2, *(summary["results"][m][g]["speedup"] or 0.0 for m in methods for g in groups)]) * 1.2)
    figure.savefig(path, dpi=130)
    return path


def _plot_accepted(path: Path, summary: dict, records: list[dict], colors: dict[str, str]) -> Path:
    figure, axes = _figure()
    methods = [method for method in summary["methods"] if method != summary["baseline"]]
    counts = {method: Counter(n for r in records if r["method"] == method for n in r["tokens_per_pass"]) for method in methods}
    largest = max([1, *(max(c) for c in counts.values() if c)])
    width = 0.8 / max(len(methods), 1)
    for index, method in enumerate(methods):
        total = sum(counts[method].values()) or 1
        sizes = range(1, largest + 1)
        shares = [counts[method][n] / total for n in sizes]
        mean = summary["results"][method][OVERALL]["mean_accepted"]
        label = f"{method} (mean {_num(mean)})"
        axes.bar([n + (index - (len(methods) - 1) / 2) * width for n in sizes], shares, width, label=label, color=colors[method])
    axes.set_xticks(range(1, largest + 1))
    axes.set_xlabel("tokens emitted by one target pass (accepted drafts + 1)")
    axes.set_ylabel("share of target passes")
    axes.set_title("Accepted tokens per target pass")
    if methods:
        figure.legend(fontsize=8, ncols=min(len(methods), 5), loc="outside lower center")
    figure.savefig(path, dpi=130)
    return path


def _plot_phases(path: Path, summary: dict) -> Path:
    figure, axes = _figure(height=0.6 * len(summary["methods"]) + 1.8)
    methods = summary["methods"]
    phase_colors = {"draft": "tab:orange", "target": "tab:blue", "verify": "tab:green", "other": "tab:gray"}
    left = [0.0] * len(methods)
    for phase in PHASES:
        values = [(summary["results"][m][OVERALL]["seconds_per_pass"] or {}).get(phase, 0.0) * 1000 for m in methods]
        axes.barh(range(len(methods)), values, left=left, label=phase, color=phase_colors[phase])
        left = [a + b for a, b in zip(left, values)]
    axes.set_yticks(range(len(methods)), methods)
    axes.invert_yaxis()
    axes.set_xlabel("milliseconds per target pass (mean over all answers)")
    axes.set_title("Where a round's time goes")
    figure.legend(fontsize=8, ncols=4, loc="outside lower center")
    figure.savefig(path, dpi=130)
    return path

