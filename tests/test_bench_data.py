"""Benchmark questions: the packaged Spec-Bench and editing files, task mapping, selection and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from duospec.bench.data import PACKAGED_SETS, TASKS, available_tasks, load_questions, packaged_questions_path, questions_file, select_questions, task_of
from duospec.config import DuospecError


def test_packaged_spec_bench_has_480_questions_in_6_tasks_of_80():
    questions = load_questions(packaged_questions_path())
    assert len(questions) == 480
    assert available_tasks(questions) == list(TASKS)
    for task in TASKS:
        assert sum(q.task == task for q in questions) == 80
    # Multi-turn conversation is MT-bench: two turns each; every other task is single-turn.
    assert all(len(q.turns) == (2 if q.task == "mt_bench" else 1) for q in questions)


def test_packaged_license_ships_beside_the_questions():
    license_text = (packaged_questions_path().parent / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text


def test_mt_bench_categories_map_to_one_task_and_unknown_categories_to_themselves():
    assert task_of("writing") == task_of("humanities") == "mt_bench"
    assert task_of("translation") == "translation"
    assert task_of("poetry") == "poetry"  # a user's own category is its own task


def test_select_takes_the_first_questions_of_each_task_in_file_order():
    questions = load_questions(packaged_questions_path())
    chosen = select_questions(questions, ["rag", "mt_bench"], limit=2)
    assert [q.question_id for q in chosen] == [481, 482, 81, 82]  # tasks in the order asked, not file order


def test_unknown_task_is_refused_with_the_available_ones():
    questions = load_questions(packaged_questions_path())
    with pytest.raises(DuospecError, match=r"unknown task 'poetry'.*mt_bench, translation"):
        select_questions(questions, ["poetry"], limit=1)


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"question_id": 1, "category": "qa", "turns": ["Why is the sky blue?"]})


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"question_id": 2, "category": "qa"}), "'turns' must be a non-empty list"),
        (json.dumps({"question_id": 2, "category": "qa", "turns": ["ok", ""]}), "'turns' must be a non-empty list"),
        (json.dumps({"question_id": 2, "category": "", "turns": ["x"]}), "'category' must be a non-empty string"),
        (json.dumps({"question_id": True, "category": "qa", "turns": ["x"]}), "'question_id' must be"),
        (json.dumps([1, 2]), "expected a JSON object"),
        (GOOD, "question_id 1 already used on line 1"),
    ],
)
def test_a_bad_line_is_named_by_file_and_line_number(tmp_path, bad_line, message):
    path = _write(tmp_path, [GOOD, "", bad_line])  # blank lines are skipped but still counted
    with pytest.raises(DuospecError, match=rf"questions.jsonl:3: .*{message}"):
        load_questions(path)


def test_own_questions_in_the_same_format_are_accepted(tmp_path):
    path = _write(tmp_path, [GOOD, json.dumps({"question_id": "p1", "category": "poetry", "turns": ["A haiku.", "Another."]})])
    questions = load_questions(path)
    assert available_tasks(questions) == ["qa", "poetry"]
    assert questions[1].turns == ("A haiku.", "Another.")


def test_an_empty_or_missing_file_is_refused(tmp_path):
    with pytest.raises(DuospecError, match="holds no questions"):
        load_questions(_write(tmp_path, [""]))
    with pytest.raises(DuospecError, match="cannot read questions file"):
        load_questions(tmp_path / "missing.jsonl")


def test_packaged_editing_set_has_12_two_turn_questions_in_one_task():
    """Turn 2 edits the turn-1 answer (issue 21's multi-turn editing set beside Spec-Bench)."""
    questions = load_questions(packaged_questions_path("editing"))
    assert len(questions) == 12 and available_tasks(questions) == ["editing"]
    assert all(len(q.turns) == 2 and q.category == q.task == "editing" for q in questions)
    assert not set(q.question_id for q in questions) & set(q.question_id for q in load_questions(packaged_questions_path()))


def test_questions_names_a_packaged_set_or_a_file(tmp_path):
    assert questions_file(None) is None  # BenchSettings' default: Spec-Bench
    assert questions_file("spec_bench") == packaged_questions_path()
    assert questions_file("editing") == packaged_questions_path("editing") and questions_file("editing").name == "editing.jsonl"
    assert questions_file("mine.jsonl") == Path("mine.jsonl")  # a path, read (and reported on) by load_questions
    assert questions_file(str(tmp_path / "editing")) == tmp_path / "editing"  # a path, not the packaged name


def test_an_unknown_questions_name_is_refused_with_the_choices():
    with pytest.raises(DuospecError, match=r"--questions 'edting' is neither a packaged question set \(spec_bench, editing\)"):
        questions_file("edting")
    assert list(PACKAGED_SETS) == ["spec_bench", "editing"]


def test_bench_cli_resolves_questions_editing_before_loading_models(capsys):
    """`duospec bench --questions editing` reads the packaged editing set: asking it for a Spec-Bench task
    is refused, before any model loads, with the tasks that set has (only `editing`)."""
    from duospec.cli import main

    assert main(["bench", "--questions", "editing", "--tasks", "qa"]) == 2
    assert "unknown task 'qa'; this questions file has: editing" in capsys.readouterr().err
    assert main(["bench", "--questions", "edting"]) == 2
    assert "spec_bench, editing" in capsys.readouterr().err
