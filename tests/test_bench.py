"""`duospec bench` end to end on tiny in-memory models: files, report figures, resume, refusals, CLI.

Every figure the report shows is recomputed here from results.jsonl with the definitions written out
again (no hard-coded numbers), so a change in the report's arithmetic must be deliberate.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import duospec
from bench_fixtures import TASK_CATEGORIES, one_thread, tiny_pipeline, write_small_questions
from duospec.bench.data import load_questions
from duospec.bench.methods import bench_methods, resolve_methods
from duospec.bench.report import PLOT_NAMES, collect_meta, write_report
from duospec.bench.runner import CONFIG_NAME, RESULTS_NAME, BenchSettings, method_order, pipeline_flags, run_bench
from duospec.cli import main
from duospec.config import DuospecError
from duospec.drafting import METHODS, MethodSpec

ALL_METHODS = ("ar", "sd", "pld", "suffix", "specexec", "multiseq", "duo", "auto", "hf-ar", "hf-assisted", "hf-pld")
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def pipe():
    with one_thread():
        pipeline = tiny_pipeline()
        yield pipeline
        pipeline.close()  # the duo method's draft process


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    return write_small_questions(tmp_path_factory.mktemp("questions") / "questions.jsonl", per_task=2)


@pytest.fixture(scope="module")
def full_run(pipe, questions, tmp_path_factory) -> Path:
    """Every method over 2 questions per task, with its report."""
    out = tmp_path_factory.mktemp("bench") / "run"
    settings = BenchSettings(limit=2, max_new_tokens=MAX_NEW_TOKENS, questions=questions)
    records = run_bench(pipe, settings, out, progress=False)
    run = {"methods": list(ALL_METHODS), "tasks": list(TASK_CATEGORIES), "limit": 2, "questions": str(questions)}
    write_report(out, records, collect_meta(pipeline_flags(pipe, settings), run, "duospec bench (test)"))
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RESULTS_NAME).read_text().splitlines()]


def _key(record: dict) -> tuple:
    return (record["question_id"], record["turn"], record["method"])


# -- a full run ----------------------------------------------------------------------------------
def test_a_run_writes_every_file_and_every_answer(full_run):
    for name in [RESULTS_NAME, CONFIG_NAME, "summary.json", "report.md", *PLOT_NAMES.values()]:
        assert (full_run / name).stat().st_size > 0, name
    for plot in PLOT_NAMES.values():
        assert (full_run / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = _records(full_run)
    # 12 questions; the two multi-turn ones have two turns: 14 answers per method.
    assert sorted({r["method"] for r in records}) == sorted(ALL_METHODS)
    assert len(records) == len({_key(r) for r in records}) == 14 * len(ALL_METHODS)
    assert {r["task"] for r in records} == set(TASK_CATEGORIES)
    assert all(0 < r["new_tokens"] <= MAX_NEW_TOKENS and r["seconds"] > 0 for r in records)


def test_greedy_answers_of_every_method_equal_ar_in_float32(full_run):
    # The tiny models' logits are well separated (initializer_range 0.2), so a float32 near-tie is
    # not a plausible excuse here: every method, ours and the library's, must match exactly.
    checked = [r for r in _records(full_run) if r["method"] != "ar"]
    assert checked and all(r["greedy"]["status"] == "match" for r in checked)


def test_a_warm_run_reuses_turn_one_in_turn_two_and_a_cold_run_reuses_nothing(pipe, questions, tmp_path):
    """Issue 21 item 6: cold answers start from empty caches (as always); with --warm a method's
    second turn keeps what its first turn cached, and answers the same tokens."""
    runs = {}
    for warm in (False, True):
        settings = BenchSettings(methods=("ar", "sd", "pld"), tasks=("mt_bench",), limit=1, max_new_tokens=MAX_NEW_TOKENS, questions=questions, warm=warm)
        runs[warm] = {_key(r): r for r in run_bench(pipe, settings, tmp_path / f"warm-{warm}", progress=False)}
    assert all(r["warm"] is False and r["reused_prompt_tokens"] == 0 for r in runs[False].values())
    for key, record in runs[True].items():
        _, turn, _ = key
        assert record["warm"] is (turn > 1)
        if turn > 1:  # the first turn's prompt and answer were cached: most of this prompt
            first = runs[True][(key[0], 1, key[2])]
            assert record["reused_prompt_tokens"] > first["prompt_tokens"] // 2, record["reused_prompt_tokens"]
        else:
            assert record["reused_prompt_tokens"] == 0
        assert record["token_ids"] == runs[False][key]["token_ids"]  # warm or cold, the same answer
        assert record["greedy"] is None or record["greedy"]["status"] == "match"
    assert {turn for _, turn, _ in runs[True]} == {1, 2}
    assert json.loads((tmp_path / "warm-True" / CONFIG_NAME).read_text())["flags"]["warm"] is True
    assert "warm" not in json.loads((tmp_path / "warm-False" / CONFIG_NAME).read_text())["flags"]  # cold runs keep their config key


def test_second_turn_prompt_quotes_the_methods_own_first_answer(full_run, pipe, questions):
    question = next(q for q in load_questions(questions) if len(q.turns) == 2)
    records = {_key(r): r for r in _records(full_run)}
    for method in ALL_METHODS:
        first = records[(question.question_id, 1, method)]
        conversation = [
            {"role": "user", "content": question.turns[0]},
            {"role": "assistant", "content": first["text"].strip()},
            {"role": "user", "content": question.turns[1]},
        ]
        assert records[(question.question_id, 2, method)]["prompt_tokens"] == len(pipe.encode(conversation))


def test_report_figures_are_recomputed_from_results(full_run):
    records = _records(full_run)
    summary = json.loads((full_run / "summary.json").read_text())
    report = (full_run / "report.md").read_text()
    reference = {(r["question_id"], r["turn"]): r for r in records if r["method"] == "ar"}
    tasks = list(TASK_CATEGORIES)
    for method in ALL_METHODS:
        mine = [r for r in records if r["method"] == method]
        row = [method]
        for task in [*tasks, "overall"]:
            group = [r for r in mine if task == "overall" or r["task"] == task]
            got = summary["results"][method][task]
            bases = [reference[(r["question_id"], r["turn"])] for r in group]
            base_rate = sum(b["new_tokens"] for b in bases) / sum(b["seconds"] for b in bases)
            speedup = (sum(r["new_tokens"] for r in group) / sum(r["seconds"] for r in group)) / base_rate
            assert got["speedup"] == pytest.approx(speedup)
            assert got["tokens_per_second"] == pytest.approx(sum(r["new_tokens"] for r in group) / sum(r["seconds"] for r in group))
            assert got["mean_accepted"] == pytest.approx(sum(r["new_tokens"] for r in group) / sum(r["target_passes"] for r in group))
            drafted = sum(r["drafted_tokens"] for r in group)
            assert got["acceptance_rate"] == (pytest.approx(sum(r["accepted_tokens"] for r in group) / drafted) if drafted else None)
            assert got["ttft_median"] == pytest.approx(statistics.median(r["ttft_seconds"] for r in group))
            ratios = [(r["new_tokens"] / r["seconds"]) / (b["new_tokens"] / b["seconds"]) for r, b in zip(group, bases)]
            assert got["speedup_median"] == pytest.approx(statistics.median(ratios))
            assert got["speedup_p10"] == pytest.approx(float(np.percentile(ratios, 10)))
            assert got["speedup_p90"] == pytest.approx(float(np.percentile(ratios, 90)))
            if method != "ar":
                statuses = [r["greedy"]["status"] for r in group]
                assert got["greedy"]["match"] == statuses.count("match")
                assert got["greedy"]["answers"] == len(group)
            if task != "overall":
                row.append(f"{speedup:.2f}x")
        overall = summary["results"][method]["overall"]
        row += [f"{overall['mean_accepted']:.2f}", f"{overall['speedup']:.2f}x"]
        assert "| " + " | ".join(row) + " |" in report  # the Spec-Bench table row, as recomputed


def test_report_names_machine_versions_models_and_flags(full_run):
    report = (full_run / "report.md").read_text()
    for needle in ["Multi-turn Conversation", "Retrieval-aug. Generation", "#Mean Accepted Tokens", "torch ", "transformers ", "max_new_tokens 12", "Machine:", "![Speedup per task](speedup.png)"]:
        assert needle in report, needle


# -- resume --------------------------------------------------------------------------------------
class _Stop(KeyboardInterrupt):
    """Ctrl-C, raised from the record callback after a given number of answers."""


def test_an_interrupted_run_resumes_without_recomputing_or_losing_anything(pipe, questions, tmp_path):
    out = tmp_path / "run"
    settings = BenchSettings(methods=("ar", "pld", "hf-pld"), limit=1, max_new_tokens=8, questions=questions)
    written: list[dict] = []

    def stop_after_five(record: dict) -> None:
        written.append(record)
        if len(written) == 5:
            raise _Stop

    with pytest.raises(_Stop):
        run_bench(pipe, settings, out, progress=False, on_record=stop_after_five)
    before = (out / RESULTS_NAME).read_text()
    assert len(before.splitlines()) == 5

    recomputed: list[dict] = []
    records = run_bench(pipe, settings, out, progress=False, on_record=recomputed.append)
    after = (out / RESULTS_NAME).read_text()
    assert after.startswith(before)  # nothing lost or rewritten
    assert not {_key(r) for r in written} & {_key(r) for r in recomputed}  # nothing recomputed
    assert len(records) == len(after.splitlines()) == 7 * 3  # 6 questions, one of them two-turn, 3 methods
    assert len({_key(r) for r in records}) == len(records)

    assert run_bench(pipe, settings, out, progress=False, on_record=recomputed.append) == records  # all done: no work
    assert len(recomputed) == 7 * 3 - 5


KILLED_RUN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from bench_fixtures import one_thread, tiny_pipeline
    from duospec.bench.runner import BenchSettings, run_bench
    with one_thread():
        pipe = tiny_pipeline()
        settings = BenchSettings(methods=("ar", "pld", "hf-pld"), limit=2, max_new_tokens=8, questions=Path({questions!r}))
        run_bench(pipe, settings, Path({out!r}), progress=False, on_record=lambda record: time.sleep(0.2))
    """
)


def test_a_killed_run_resumes_and_a_half_written_line_is_dropped(pipe, questions, tmp_path):
    out = tmp_path / "run"
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), questions=str(questions), out=str(out))
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    results = out / RESULTS_NAME
    deadline = time.monotonic() + 60
    while (not results.exists() or len(results.read_bytes().splitlines()) < 4) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # no clean-up of any kind, as a crash or power cut
    process.wait()
    process.stderr.close()
    *survived, tail = results.read_text().split("\n")  # tail: "" unless the kill cut a write short
    if not tail:
        with results.open("a") as handle:
            handle.write(survived[0][:40])  # what a kill in the middle of a write leaves behind

    recomputed: list[dict] = []
    settings = BenchSettings(methods=("ar", "pld", "hf-pld"), limit=2, max_new_tokens=8, questions=questions)
    records = run_bench(pipe, settings, out, progress=False, on_record=recomputed.append)
    kept = [json.loads(line) for line in survived]
    assert not {_key(r) for r in kept} & {_key(r) for r in recomputed}
    assert _records(out) == records
    assert records[: len(kept)] == kept
    assert len(records) == len({_key(r) for r in records}) == 14 * 3


# -- refusals ------------------------------------------------------------------------------------
def test_an_out_with_results_of_other_flags_is_refused_naming_them(pipe, questions, tmp_path):
    out = tmp_path / "run"
    first = BenchSettings(methods=("ar",), tasks=("translation",), limit=1, max_new_tokens=4, questions=questions)
    run_bench(pipe, first, out, progress=False)
    other = BenchSettings(methods=("ar",), tasks=("translation",), limit=1, max_new_tokens=5, questions=questions, seed=3)
    with pytest.raises(DuospecError, match=r"different flags \(max_new_tokens: 4 there, 5 now; seed: 0 there, 3 now\)"):
        run_bench(pipe, other, out, progress=False)
    # More methods, tasks or questions with the same flags extend the run instead.
    more = BenchSettings(methods=("ar", "pld"), tasks=("translation", "qa"), limit=2, max_new_tokens=4, questions=questions)
    assert len(run_bench(pipe, more, out, progress=False)) == 2 * 2 * 2


def test_a_damaged_results_line_in_the_middle_is_refused(pipe, questions, tmp_path):
    out = tmp_path / "run"
    settings = BenchSettings(methods=("ar",), tasks=("translation",), limit=2, max_new_tokens=4, questions=questions)
    run_bench(pipe, settings, out, progress=False)
    lines = (out / RESULTS_NAME).read_text().splitlines()
    (out / RESULTS_NAME).write_text("\n".join([lines[0][:20], lines[1]]) + "\n")
    with pytest.raises(DuospecError, match=r"results.jsonl:1: not a valid result record"):
        run_bench(pipe, settings, out, progress=False)


def test_a_whole_last_record_without_its_newline_is_kept_and_terminated(pipe, questions, tmp_path):
    out = tmp_path / "run"
    settings = BenchSettings(methods=("ar",), tasks=("translation",), limit=1, max_new_tokens=4, questions=questions)
    run_bench(pipe, settings, out, progress=False)
    text = (out / RESULTS_NAME).read_text()
    (out / RESULTS_NAME).write_text(text.rstrip("\n"))  # killed between the record and its newline
    more = BenchSettings(methods=("ar",), tasks=("translation",), limit=2, max_new_tokens=4, questions=questions)
    records = run_bench(pipe, more, out, progress=False)
    assert _records(out) == records and len(records) == 2
    assert (out / RESULTS_NAME).read_text().startswith(text)


def test_unknown_method_and_a_draft_method_without_a_draft_are_refused():
    with pytest.raises(DuospecError, match=r"unknown method 'nope'; choose from: ar, sd, pld"):
        resolve_methods(["sd", "nope"], has_draft=True)
    with pytest.raises(DuospecError, match=r"method sd, hf-assisted needs a draft model"):
        resolve_methods(["sd", "hf-assisted"], has_draft=False)
    assert resolve_methods(None, has_draft=False) == ["ar", "pld", "suffix", "auto", "hf-ar", "hf-pld"]  # not an error: left out
    assert "llama-ar" not in resolve_methods(None, has_draft=True)  # no GGUF target: left out, not an error
    with pytest.raises(DuospecError, match="GGUF"):
        resolve_methods(["llama-pld"], has_draft=True, has_gguf=False)
    assert resolve_methods(["pld"], has_draft=False) == ["ar", "pld"]  # the baseline is always measured


def test_methods_registered_later_are_benchmarked_without_touching_the_harness(monkeypatch):
    monkeypatch.setitem(METHODS, "future", MethodSpec("future", "a method added later", False, METHODS["pld"].make_drafter))
    assert "future" in bench_methods()
    assert "future" in resolve_methods(None, has_draft=False)


def test_methods_are_interleaved_ar_first_then_rotated():
    methods = ["ar", "sd", "pld", "hf-pld"]
    assert method_order(methods, 0) == ["ar", "sd", "pld", "hf-pld"]
    assert method_order(methods, 1) == ["ar", "pld", "hf-pld", "sd"]  # not sd first again
    assert method_order(["ar"], 5) == ["ar"]


# -- command line --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "ar,nope"], "unknown method 'nope'"),
        (["--tasks", "poetry"], "unknown task 'poetry'"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--temperature", "-1"], "temperature must be >= 0"),
    ],
)
def test_cli_refuses_bad_flags_before_loading_models(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(duospec, "load", lambda *a, **k: pytest.fail("models loaded before the flags were checked"))
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_names_the_bad_line_of_a_questions_file(monkeypatch, capsys, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question_id": 1, "category": "qa", "turns": ["Why?"]}\n{"question_id": 2, "turns": ["x"]}\n')
    monkeypatch.setattr(duospec, "load", lambda *a, **k: pytest.fail("models loaded before the flags were checked"))
    assert main(["bench", "--questions", str(path)]) == 2
    assert "mine.jsonl:2: 'category' must be a non-empty string" in capsys.readouterr().err


def test_cli_bench_prints_the_table_and_the_full_run_command(pipe, questions, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(duospec, "load", lambda *a, **k: pipe)
    out = tmp_path / "cli"
    argv = ["bench", "--methods", "pld", "--tasks", "qa,translation", "--max-new-tokens", "6", "--questions", str(questions), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| Method | Translation | Question Answering | #Mean Accepted Tokens | Overall |" in printed  # Spec-Bench order
    assert f"--limit 2 --max-new-tokens 6 --temperature 0.0 --seed 0 --questions {questions}" in printed  # the full run
    assert (out / "report.md").exists() and len(_records(out)) == 2 * 2


def test_cli_ctrl_c_keeps_the_answers_and_says_how_to_resume(pipe, questions, monkeypatch, capsys, tmp_path):
    import duospec.bench.runner as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(duospec, "load", lambda *a, **k: pipe)
    monkeypatch.setattr(runner, "run_bench", interrupted)
    out = tmp_path / "cli"
    assert main(["bench", "--methods", "ar", "--questions", str(questions), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and f"--out {out}" in err


def test_the_printed_resume_command_repeats_every_flag_that_decides_the_results(questions, tmp_path):
    """A resume command that dropped a flag would measure something else, or be refused by its own --out."""
    import shlex

    from duospec.bench.cli_commands import bench_command
    from duospec.cli import build_parser

    argv = ["bench", "--methods", "ar,sd", "--limit", "3", "--max-new-tokens", "9", "--temperature", "0", "--top-k", "5",
            "--top-p", "0.9", "--seed", "4", "--questions", str(questions), "--draft-quant", "none", "--dtype", "float32",
            "--threads", "1", "--out", str(tmp_path / "run"), "--target", str(tmp_path / "t"), "--draft", str(tmp_path / "d"),
            "--device", "cpu", "--backend", "transformers", "--draft-backend", "transformers", "--draft-threads", "1", "--ctx-size", "512",
            "--warm", "--no-prefix-cache"]
    args = build_parser().parse_args(argv)
    command = bench_command(args, ["ar", "sd"], ["qa"], 3, tmp_path / "run")
    again = build_parser().parse_args(shlex.split(command)[1:])
    for flag in ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "questions", "draft_quant", "dtype", "threads", "target", "draft",
                 "device", "backend", "draft_backend", "draft_threads", "ctx_size", "warm", "no_prefix_cache"):
        assert getattr(args, flag) is not None, flag  # a None == None check would prove nothing
        assert getattr(again, flag) == getattr(args, flag), flag


def test_cli_refuses_an_out_of_other_flags_before_loading_models(pipe, questions, monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    run_bench(pipe, BenchSettings(methods=("ar",), tasks=("qa",), limit=1, max_new_tokens=4, questions=questions), out, progress=False)

    def no_loading(*args, **kwargs):
        raise AssertionError("models must not be loaded for a run that will be refused")

    monkeypatch.setattr(duospec, "load", no_loading)
    argv = ["bench", "--methods", "ar", "--tasks", "qa", "--limit", "1", "--max-new-tokens", "4", "--questions", str(questions), "--draft-quant", "none", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds results made with different flags" in err and "draft: " in err and "pass another --out" in err


def test_greedy_verdicts_match_near_tie_mismatch_and_a_later_turn_inherits(pipe, monkeypatch):
    """The bench's greedy check on a real target: a copy of ar's answer matches; an answer that takes the
    target's least likely token is a mismatch; with a tolerance wider than that margin it is a near-tie;
    the second turn after a differing first one inherits the first's verdict."""
    import duospec.bench.runner as runner

    prompt = [1, 2, 3]
    reference = pipe.generate(prompt, method="ar", max_new_tokens=6).token_ids
    assert runner._greedy_check(pipe, prompt, reference, list(reference), [])["status"] == "match"
    pipe.target.reset()
    logits = pipe.target.forward(torch.tensor([*prompt, *reference[:2]]), last_only=True)[-1]
    pipe.target.reset()
    wrong = [*reference[:2], int(logits.argmin()), *reference[3:]]
    verdict = runner._greedy_check(pipe, prompt, reference, wrong, [])
    assert verdict["status"] == "mismatch" and verdict["position"] == 2
    assert verdict["margin"] == pytest.approx(float(logits.max() - logits.min()), rel=1e-4)
    monkeypatch.setattr(runner, "near_tie_tolerance", lambda dtype, backend="transformers": verdict["margin"] + 1.0)
    assert runner._greedy_check(pipe, prompt, reference, wrong, [])["status"] == "near_tie"
    first_turn = {"turn": 1, "greedy": verdict}
    inherited = runner._greedy_check(pipe, [9, 9], [5], [5], [first_turn])
    assert inherited["status"] == "mismatch" and inherited["after_turn"] == 1


def test_report_counts_near_ties_and_mismatches_from_the_records(full_run, tmp_path):
    from duospec.bench.report import summarize

    records = _records(full_run)
    sd = [r for r in records if r["method"] == "sd"]
    sd[0]["greedy"] = {**sd[0]["greedy"], "status": "near_tie"}
    sd[1]["greedy"] = {**sd[1]["greedy"], "status": "mismatch"}
    overall = summarize(records)["results"]["sd"]["overall"]["greedy"]
    assert (overall["match"], overall["near_tie"], overall["mismatch"]) == (len(sd) - 2, 1, 1)


# -- speedup is a ratio of token rates -----------------------------------------------------------
def _answer_record(question_id, method: str, new_tokens: int, seconds: float, turn: int = 1, task: str = "qa") -> dict:
    """A results.jsonl record as runner._answer writes it (the fields are checked against a real one
    below), for figures that a tiny-model run cannot produce on demand: answers of chosen lengths and times."""
    return {
        "config_key": "synthetic",
        "question_id": question_id,
        "turn": turn,
        "category": TASK_CATEGORIES[task],
        "task": task,
        "method": method,
        "prompt_tokens": 10,
        "warm": False,
        "reused_prompt_tokens": 0,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "ttft_seconds": seconds / new_tokens,
        "target_passes": new_tokens,
        "drafted_tokens": 0,
        "accepted_tokens": 0,
        "tokens_per_pass": [1] * new_tokens,
        "time_breakdown": {"prefill": 0.0, "draft": 0.0, "target": seconds, "verify": 0.0},
        "finish_reason": "eos",
        "greedy": None,
        "token_ids": list(range(new_tokens)),
        "text": "x" * new_tokens,
    }


def test_synthetic_records_have_the_fields_of_real_ones(full_run):
    real = _records(full_run)[0]
    assert set(_answer_record(1, "ar", 3, 1.0)) == set(real)
    assert set(_answer_record(1, "ar", 3, 1.0)["time_breakdown"]) == set(real["time_breakdown"])


def test_speedup_divides_token_rates_when_answers_differ_in_length():
    """ar stops after 3 tokens in 1 s; sd writes 120 tokens in 7.5 s: sd runs at 16 tokens/s against ar's
    3, a speedup of 5.33x. The ratio of seconds (1 / 7.5 = 0.13x) would call the faster method slower."""
    from duospec.bench.report import speedup_table, summarize
    from duospec.bench.runner import _RunningSpeedup

    records = [_answer_record(1, "ar", 3, 1.0), _answer_record(1, "sd", 120, 7.5)]
    summary = summarize(records)
    for group in ("qa", "overall"):
        got = summary["results"]["sd"][group]
        assert got["speedup"] == pytest.approx(16 / 3)
        assert got["speedup_median"] == got["speedup_p10"] == got["speedup_p90"] == pytest.approx(16 / 3)
        assert summary["results"]["ar"][group]["speedup"] == pytest.approx(1.0)
    assert "| sd | 5.33x | 1.00 | 5.33x |" in speedup_table(summary)
    assert _RunningSpeedup(records).text() == "sd 5.33x"  # the progress bar's figure


def test_aggregate_speedup_is_total_tokens_over_total_seconds_on_the_paired_answers_only():
    from duospec.bench.report import summarize
    from duospec.bench.runner import _RunningSpeedup

    records = [
        _answer_record(1, "ar", 3, 1.0),
        _answer_record(1, "sd", 120, 7.5),  # 5.33x on its own
        _answer_record(2, "ar", 100, 10.0),
        _answer_record(2, "sd", 100, 5.0),  # 2x on its own
        _answer_record(3, "sd", 50, 100.0),  # ar has no answer to pair it with: left out of every speedup
    ]
    got = summarize(records)["results"]["sd"]["overall"]
    rate, base_rate = (120 + 100) / (7.5 + 5.0), (3 + 100) / (1.0 + 10.0)
    assert got["speedup"] == pytest.approx(rate / base_rate)  # 1.88x: tokens and seconds summed, then divided
    assert got["speedup_median"] == pytest.approx((16 / 3 + 2) / 2)  # per-answer ratios 5.33 and 2
    assert got["speedup_p10"] == pytest.approx(float(np.percentile([16 / 3, 2.0], 10)))
    assert got["speedup_p90"] == pytest.approx(float(np.percentile([16 / 3, 2.0], 90)))
    assert got["tokens_per_second"] == pytest.approx(270 / 112.5)  # every answer of the method, paired or not
    assert _RunningSpeedup(records).text() == f"sd {rate / base_rate:.2f}x"
