"""Benchmark questions: a packaged set (Spec-Bench's question.jsonl, or duospec's own editing.jsonl) or a
user's file in the same format.

Format: one JSON object per line with `question_id` (int or string, unique), `category` (string) and
`turns` (non-empty list of non-empty strings; multi-turn conversations have several). Spec-Bench
groups its 13 categories into 6 tasks; the eight MT-bench categories form the multi-turn task
`mt_bench`, the other five categories are tasks of their own. A category of a user's file that is not
a Spec-Bench category becomes a task named after itself, so own prompts need no extra mapping.

The packaged `question.jsonl` is Spec-Bench (Xia et al. 2024, https://github.com/hemingkx/Spec-Bench),
Apache-2.0; its license is `data/LICENSE` beside the file. `editing.jsonl` is duospec's own (12 two-turn
questions whose second turn edits the first answer: the case where drafts taken from the conversation
pay most); see `data/README.md`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from duospec.config import DuospecError

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
# CLI task name -> question categories, in Spec-Bench's column order.
TASKS: dict[str, tuple[str, ...]] = {
    "mt_bench": MT_BENCH_CATEGORIES,
    "translation": ("translation",),
    "summarization": ("summarization",),
    "qa": ("qa",),
    "math_reasoning": ("math_reasoning",),
    "rag": ("rag",),
}
# Column titles of Spec-Bench's leaderboard table.
TASK_TITLES = {
    "mt_bench": "Multi-turn Conversation",
    "translation": "Translation",
    "summarization": "Summarization",
    "qa": "Question Answering",
    "math_reasoning": "Mathematical Reasoning",
    "rag": "Retrieval-aug. Generation",
}
_TASK_OF_CATEGORY = {category: task for task, categories in TASKS.items() for category in categories}


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]

    @property
    def task(self) -> str:
        return task_of(self.category)


def task_of(category: str) -> str:
    """The task a category belongs to (an unknown category is its own task)."""
    return _TASK_OF_CATEGORY.get(category, category)


# `--questions NAME`: the question sets shipped inside the package, by name; the first is the default.
PACKAGED_SETS = {"spec_bench": "question.jsonl", "editing": "editing.jsonl"}


def packaged_questions_path(name: str = "spec_bench") -> Path:
    """A packaged question set's file (default: Spec-Bench's 480 questions)."""
    return Path(str(resources.files("duospec.bench") / "data" / PACKAGED_SETS[name]))


def questions_file(value: str | Path | None) -> Path | None:
    """What `--questions` names: a packaged set (`spec_bench`, `editing`) or a JSONL file; None stays None
    (the default set).

    A packaged name wins over a file of that name in the working directory (write `./editing` for the
    file). A bare word that is neither a name nor an existing file is refused here, naming the choices,
    because it is far more likely a misspelt name than a file without an extension; anything else is a
    path, which load_questions reads and reports on.
    """
    if value is None:
        return None
    text = str(value)
    if text in PACKAGED_SETS:
        return packaged_questions_path(text)
    path = Path(text)
    if path.suffix or len(path.parts) > 1 or path.exists():
        return path
    raise DuospecError(
        f"--questions {text!r} is neither a packaged question set ({', '.join(PACKAGED_SETS)}) nor an existing file; "
        "pass one of those names or the path of a JSONL file"
    )


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_questions(path: Path) -> list[Question]:
    """Read and check a question file; errors name the file and line and say what to fix."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise DuospecError(f"cannot read questions file {path}: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise DuospecError(f"questions file {path} is not UTF-8 text ({error.reason})") from error
    questions: list[Question] = []
    first_line_of: dict[int | str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        question = _parse_line(line, f"{path}:{number}")
        if question.question_id in first_line_of:
            raise DuospecError(
                f"{path}:{number}: question_id {question.question_id!r} already used on line "
                f"{first_line_of[question.question_id]}; ids must be unique"
            )
        first_line_of[question.question_id] = number
        questions.append(question)
    if not questions:
        raise DuospecError(f"{path} holds no questions (expected JSON lines with question_id, category, turns)")
    return questions


def _parse_line(line: str, where: str) -> Question:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DuospecError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from error
    if not isinstance(record, dict):
        raise DuospecError(f"{where}: expected a JSON object with question_id, category and turns")
    question_id = record.get("question_id")
    if isinstance(question_id, bool) or not isinstance(question_id, (int, str)) or question_id == "":
        raise DuospecError(f"{where}: 'question_id' must be an integer or a non-empty string, got {question_id!r}")
    category = record.get("category")
    if not isinstance(category, str) or not category.strip():
        raise DuospecError(f"{where}: 'category' must be a non-empty string, got {category!r}")
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(turn, str) and turn.strip() for turn in turns):
        raise DuospecError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
    return Question(question_id, category, tuple(turns))


def available_tasks(questions: list[Question]) -> list[str]:
    """Tasks present in the questions: Spec-Bench's in its order, then others in order of appearance."""
    present = dict.fromkeys(question.task for question in questions)
    return [task for task in TASKS if task in present] + [task for task in present if task not in TASKS]


def select_questions(questions: list[Question], tasks: list[str], limit: int) -> list[Question]:
    """The first `limit` questions of each task (file order), tasks in the order given."""
    unknown = [task for task in tasks if task not in available_tasks(questions)]
    if unknown:
        raise DuospecError(
            f"unknown task {', '.join(map(repr, unknown))}; this questions file has: {', '.join(available_tasks(questions))}"
        )
    if limit < 1:
        raise DuospecError(f"--limit must be at least 1 question per task, got {limit}")
    selected: list[Question] = []
    for task in tasks:
        selected.extend([question for question in questions if question.task == task][:limit])
    return selected
