"""`duospec bench --sweep-budget`'s arithmetic and plot, on hand-made answer rows (the runs themselves
need the real models; the README's sweep was made with them)."""

from __future__ import annotations

import json

import pytest

from duospec.bench.sweep import bend_of, plot_sweep, render_sweep, summarize_sweep
from duospec.cli import build_parser


def row(question: str, method: str, budget: int | None, new: int, passes: int, seconds: float, match: bool = True) -> dict:
    return {
        "question_id": question, "task": "code", "method": method, "budget": budget, "new_tokens": new,
        "target_passes": passes, "seconds": seconds, "tokens_per_second": new / seconds,
        "accepted_per_pass": (new - 1) / max(1, passes - 1), "tree_nodes": [budget] * (passes - 1) if budget else [],
        "greedy_match": match, "peak_rss_mb": 100.0,
    }


ROWS = [
    row("q1", "ar", None, 33, 33, 4.0), row("q2", "ar", None, 17, 17, 2.0),
    # budget 2: 33 tokens in 17 passes (1 prefill + 16 rounds of 2), twice ar's speed on q1
    row("q1", "specexec", 2, 33, 17, 2.0), row("q2", "specexec", 2, 17, 9, 1.0),
    row("q1", "specexec", 4, 33, 9, 2.5), row("q2", "specexec", 4, 17, 5, 1.25, match=False),
    row("q1", "specexec", 8, 33, 9, 5.0), row("q2", "specexec", 8, 17, 5, 2.5),
]


def test_the_summary_pools_tokens_and_passes_per_budget():
    summary = summarize_sweep(ROWS, (2, 4, 8))
    by_budget = {b["budget"]: b for b in summary["budgets"]}
    assert by_budget[2]["accepted_per_pass"] == pytest.approx((32 + 16) / (16 + 8))  # 2.0, not the mean of per-answer ratios
    assert by_budget[4]["accepted_per_pass"] == pytest.approx(48 / 12)
    assert by_budget[2]["speedup"] == pytest.approx(2.0)  # median of 2.0 and 2.0
    assert by_budget[8]["speedup"] == pytest.approx(0.8)
    assert by_budget[4]["greedy_matches"] == 1 and by_budget[4]["answers"] == 2
    assert summary["ar_tokens_per_second"] == pytest.approx(50 / 6.0)
    assert summary["fastest_budget"] == 2
    # 2 -> 4 adds 2 tokens per pass, 4 -> 8 adds none: the curve bends after 4.
    assert summary["bend_budget"] == 4


def test_bend_is_the_last_budget_when_the_curve_never_flattens():
    steep = [{"budget": b, "accepted_per_pass": float(i)} for i, b in enumerate((1, 2, 4))]
    assert bend_of(steep) == 4
    assert bend_of([]) is None


def test_the_report_and_plot_are_written(tmp_path):
    summary = summarize_sweep(ROWS, (2, 4, 8))
    text = render_sweep(summary)
    assert "| 4 |" in text and "1/2" in text and "bends after budget 4" in text
    path = plot_sweep(tmp_path / "sweep.png", summary)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(summary)  # what sweep.json holds must serialise


def test_the_flag_parses_a_list_or_takes_the_default():
    parser = build_parser()
    assert parser.parse_args(["bench", "--sweep-budget", "1,4,16"]).sweep_budget == (1, 4, 16)
    assert parser.parse_args(["bench", "--sweep-budget"]).sweep_budget is None  # the default list
    assert parser.parse_args(["bench"]).sweep_budget is False  # no sweep
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--sweep-budget", "0,4"])
