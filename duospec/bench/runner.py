"""Run the benchmark: every selected question through every method, one JSON line per answer.

Fairness: methods are interleaved per question (ar, then the others in an order that rotates from
question to question), so slow drifts of a shared machine (other jobs, heat) spread over all methods
instead of landing on whichever ran last; each method answers once untimed before timing starts
(lazy draft loading, cost measurement, first-call kernel set-up). Every method gets the same prompt
token ids, and the second turn of a conversation quotes the method's own first answer, as in
Spec-Bench.

Cold and warm: every answer starts from empty caches (the models' KV caches keep the last request's
prefix otherwise, models/prefix.py), so its time includes the whole prompt, as it always did. With
`--warm`, a method's later turns keep what its previous turn left cached: turn 2 prefills only what
turn 1 did not already compute (llama-ar and llama-pld keep their own prefix the same way). Each
record says `warm` and how many `reused_prompt_tokens` it skipped. A turn whose greedy check had to
search a divergence (ties.py runs the target) leaves the next turn only the draft's prefix to reuse.

Durability: each answer is appended to `results.jsonl` and fsync'ed the moment it finishes, so a
crash or Ctrl-C loses at most the answer in progress. Rerunning with the same `--out` resumes: it
skips every (question, turn, method) already there. Results made with different flags (`config.json`
records them) are never mixed in; the run refuses and names the differing flags.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from duospec.bench.baseline_models import baseline_models
from duospec.bench.data import Question, available_tasks, file_sha256, load_questions, packaged_questions_path, select_questions
from duospec.bench.methods import bench_methods, is_deterministic_answer, resolve_methods, with_default_mode
from duospec.bench.report import rate_ratio
from duospec.bench.settings import BASELINE_METHOD, DecodeSettings
from duospec.bench.ties import divergence, near_tie_tolerance
from duospec.config import DuospecError, GenerationRequest, SamplingConfig
from duospec.drafting.suffix import SuffixHistory

if TYPE_CHECKING:
    from duospec.api import Pipeline

RESULTS_NAME = "results.jsonl"
CONFIG_NAME = "config.json"
WARMUP_TOKENS = 16  # enough to run every code path of a method (draft, verify, cache keep) once

AnswerKey = tuple[object, int, str]  # (question_id, turn (1-based), method)


@dataclass(frozen=True)
class BenchSettings:
    """What to run. None for methods/tasks means everything available."""

    methods: tuple[str, ...] | None = None
    tasks: tuple[str, ...] | None = None
    limit: int = 1  # questions per task
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    questions: Path | None = None  # None = the packaged Spec-Bench file
    gamma: int | None = None  # fixed draft tokens per round for the chain methods (None = from measured costs)
    tree_budget: int | None = None  # fixed specexec tree budget (None = from measured costs)
    warm: bool = False  # later turns keep the caches of the method's earlier turn (see the module docstring)

    def decode(self, max_new_tokens: int | None = None, turn: int = 1) -> DecodeSettings:
        """The decoding settings of one answer (a warm-up passes its own, shorter length); warm for a
        --warm run's later turns, cold otherwise."""
        length = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        warm = self.warm and turn > 1
        return DecodeSettings(length, self.temperature, self.top_p, self.top_k, self.seed, self.gamma, self.tree_budget, warm)

    @property
    def questions_path(self) -> Path:
        return self.questions if self.questions is not None else packaged_questions_path()

    def validate(self) -> None:
        """Check decoding flags before any model is loaded."""
        SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)
        GenerationRequest(method="sd", gamma=self.gamma, tree_budget=self.tree_budget)  # range checks of --gamma and --tree-budget
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise DuospecError(f"--max-new-tokens must be a positive integer, got {self.max_new_tokens!r}")


def result_flags(target: str, draft: str | None, dtype: str, device: str, threads: int, settings: BenchSettings) -> dict:
    """Every flag that changes an answer or its timing; runs with equal flags may share an --out.

    Methods, tasks and --limit are not among them: adding a method or questions to a finished run is
    exactly what resuming is for.
    """
    return {
        "target": target,
        "draft": draft,
        "dtype": dtype,
        "device": device,
        "threads": threads,
        "max_new_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": settings.top_k,
        "seed": settings.seed,
        "questions_sha256": file_sha256(settings.questions_path),
    } | {name: value for name, value in (("gamma", settings.gamma), ("tree_budget", settings.tree_budget)) if value is not None} | (
        {"warm": True} if settings.warm else {}  # only a warm run records it: cold runs keep their config key
    )


def pipeline_flags(pipe: "Pipeline", settings: BenchSettings) -> dict:
    flags = result_flags(pipe.target.name, draft_name(pipe), str(pipe.dtype), str(pipe.device), pipe.threads, settings)
    backend = getattr(pipe, "backend", "transformers")
    if backend != "transformers":  # runs from before the llama.cpp backend keep their flags (and can resume)
        flags["backend"] = backend
    if getattr(pipe, "deterministic", False):  # likewise: only a deterministic run records the flag
        flags["deterministic"] = True
    return flags


def draft_name(pipe: "Pipeline") -> str | None:
    """The draft's name without loading it; None when the pipeline has no draft."""
    if pipe.draft_source is not None:
        return pipe.draft_label
    try:
        return pipe.draft.name  # an attached draft; raises when there is none
    except DuospecError:
        return None


def config_key(flags: dict) -> str:
    return hashlib.sha256(json.dumps(flags, sort_keys=True).encode()).hexdigest()[:16]


class ResultsStore:
    """results.jsonl and config.json of one output directory; opening it checks the flags match."""

    def __init__(self, out: Path, flags: dict) -> None:
        self.out = out
        self.flags = flags
        self.key = config_key(flags)
        self.path = out / RESULTS_NAME
        check_out_dir(out, flags)
        self.records = _read_records(self.path, self.key)
        self._index = {answer_key(record): record for record in self.records}
        out.mkdir(parents=True, exist_ok=True)
        config_path = out / CONFIG_NAME
        if not config_path.exists():
            config_path.write_text(json.dumps({"config_key": self.key, "flags": flags}, indent=1) + "\n", encoding="utf-8")

    def get(self, key: AnswerKey) -> dict | None:
        return self._index.get(key)

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(record)
        self._index[answer_key(record)] = record


def answer_key(record: dict) -> AnswerKey:
    return (record["question_id"], record["turn"], record["method"])


def check_out_dir(out: Path, flags: dict) -> None:
    """Refuse an --out holding results made with other flags, naming each flag that differs."""
    config_path = out / CONFIG_NAME
    if config_path.exists():
        try:
            stored = json.loads(config_path.read_text(encoding="utf-8"))["flags"]
        except (ValueError, KeyError, TypeError) as error:
            raise DuospecError(f"{config_path} is damaged ({error}); use another --out") from error
        differing = [name for name in sorted(set(stored) | set(flags)) if stored.get(name) != flags.get(name)]
        if differing:
            details = "; ".join(f"{name}: {stored.get(name)!r} there, {flags.get(name)!r} now" for name in differing)
            raise DuospecError(
                f"{out} holds results made with different flags ({details}). Results of different runs are "
                "never mixed: rerun with the same flags to resume, or pass another --out."
            )
    elif (out / RESULTS_NAME).exists():
        raise DuospecError(
            f"{out / RESULTS_NAME} exists but {CONFIG_NAME}, which records the flags that made it, is missing; "
            "pass another --out"
        )


def _read_records(path: Path, key: str) -> list[dict]:
    """The records of results.jsonl, ready for appending.

    A last line without its newline is what a kill in the middle of a write leaves: it is dropped if
    incomplete and terminated if whole. A bad line anywhere else is refused, never silently skipped.
    """
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")  # the last element is b"" when the file ends with a newline
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        is_cut = number == len(lines)
        try:
            record = json.loads(line)
        except ValueError as error:
            if not is_cut:
                raise DuospecError(f"{path}:{number}: not a valid result record ({error}); move the file away or use another --out") from error
            with path.open("r+b") as handle:
                handle.truncate(len(raw) - len(line))
            print(f"duospec: dropped an incomplete last line of {path} (a run was cut off while writing it)", file=sys.stderr)
            break
        if record.get("config_key") != key:
            raise DuospecError(f"{path}:{number}: a result made with different flags; pass another --out")
        if is_cut:
            with path.open("ab") as handle:
                handle.write(b"\n")
        records.append(record)
    return records


def conversation_ids(pipe: "Pipeline", turns: tuple[str, ...], answers: list[str]) -> list[int]:
    """Prompt ids for turn len(answers) + 1: earlier user turns with the answers given, then the next turn.

    With a chat template this is a message list; a tokenizer without one (a base model) gets the
    conversation as plain text, turns and answers separated by blank lines.
    """
    if getattr(pipe.tokenizer, "chat_template", None):
        messages = []
        for turn, answer in zip(turns, answers):
            messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": turns[len(answers)]})
        return pipe.encode(messages)
    parts = [text for pair in zip(turns, answers) for text in pair]
    return pipe.encode("\n\n".join([*parts, turns[len(answers)]]), chat=False)


def method_order(methods: list[str], question_index: int) -> list[str]:
    """ar first (its answers are the reference), the others rotated by one place per question.

    method_order(["ar", "sd", "pld", "hf-pld"], 1) == ["ar", "pld", "hf-pld", "sd"]   # not sd first again
    """
    others = [method for method in methods if method != BASELINE_METHOD]
    shift = question_index % len(others) if others else 0
    return [BASELINE_METHOD, *others[shift:], *others[:shift]]


def run_bench(
    pipe: "Pipeline",
    settings: BenchSettings,
    out: Path,
    *,
    progress: bool = True,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Answer every pending (question, turn, method) of this run; return all records in `out`.

    on_record is called after each record is safely written (tests use it to interrupt a run).
    """
    settings.validate()
    questions = load_questions(settings.questions_path)
    tasks = list(settings.tasks) if settings.tasks else available_tasks(questions)
    selected = select_questions(questions, tasks, settings.limit)
    methods = resolve_methods(list(settings.methods) if settings.methods else None, draft_name(pipe) is not None, baseline_models(pipe).has_gguf())
    deterministic = getattr(pipe, "deterministic", False)
    if deterministic:
        methods = with_default_mode(methods)
    store = ResultsStore(out, pipeline_flags(pipe, settings))
    registry = bench_methods(deterministic)

    pending = [
        (question, method, turn)
        for index, question in enumerate(selected)
        for method in method_order(methods, index)
        for turn in range(1, len(question.turns) + 1)
        if store.get((question.question_id, turn, method)) is None
    ]
    if not pending:
        return store.records
    # Each method drafts from the suffix history of its own earlier answers only: one shared history
    # would hand `suffix` the answer `ar` just gave to the same question.
    histories = {method: SuffixHistory(pipe.suffix_history.max_tokens) for _, method, _ in pending}
    for method in dict.fromkeys(method for _, method, _ in pending):
        _say(progress, f"warming up {method}")
        warmup = settings.decode(min(WARMUP_TOKENS, settings.max_new_tokens))
        with separate_suffix_history(pipe, histories[method]):
            registry[method].generate(pipe, conversation_ids(pipe, selected[0].turns, []), warmup)
        histories[method].clear()  # the warm-up answered the first question: it must not draft from that

    from tqdm import tqdm

    speedups = _RunningSpeedup(store.records)
    bar = tqdm(total=len(pending), unit="answer", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for question, method, turn in pending:
            bar.set_description(f"{method} | {question.task}")
            with separate_suffix_history(pipe, histories[method]):
                record = _answer(pipe, registry[method].generate, question, method, turn, settings, store)
            store.append(record)
            speedups.add(record, store)
            bar.set_postfix_str(speedups.text(), refresh=False)
            bar.update()
            if on_record is not None:
                on_record(record)
    finally:
        bar.close()
    return store.records


def _answer(pipe: "Pipeline", generate, question: Question, method: str, turn: int, settings: BenchSettings, store: ResultsStore) -> dict:
    """Generate one turn's answer (timed), compare it with ar's, and build its record."""
    earlier = [store.get((question.question_id, t, method)) for t in range(1, turn)]
    prompt_ids = conversation_ids(pipe, question.turns, [record["text"].strip() for record in earlier])
    decode = settings.decode(turn=turn)
    start = time.perf_counter()
    result = generate(pipe, prompt_ids, decode)
    seconds = time.perf_counter() - start
    stats = result.stats
    greedy = None
    reference = store.get((question.question_id, turn, BASELINE_METHOD))
    if settings.temperature == 0 and method != BASELINE_METHOD and reference is not None:
        exact = is_deterministic_answer(method, getattr(pipe, "deterministic", False))
        greedy = _greedy_check(pipe, prompt_ids, reference["token_ids"], result.token_ids, earlier, exact)
    return {
        "config_key": store.key,
        "question_id": question.question_id,
        "turn": turn,
        "category": question.category,
        "task": question.task,
        "method": method,
        "prompt_tokens": len(prompt_ids),
        "warm": decode.warm,
        "reused_prompt_tokens": stats.reused_prompt_tokens,  # prompt tokens the caches already held (no pass)
        "new_tokens": len(result.token_ids),
        "seconds": seconds,  # wall clock of the whole call, measured the same way for every method
        "ttft_seconds": stats.ttft_seconds,
        "target_passes": stats.target_passes,
        "drafted_tokens": stats.drafted_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "tokens_per_pass": stats.tokens_per_pass,
        "time_breakdown": {
            "prefill": stats.prefill_seconds,
            "draft": stats.draft_seconds,
            "target": stats.target_seconds,
            "verify": stats.verify_seconds,
        },
        "finish_reason": stats.finish_reason,
        "greedy": greedy,
        "token_ids": result.token_ids,
        "text": result.text,
    }


def _greedy_check(pipe: "Pipeline", prompt_ids: list[int], reference_ids: list[int], token_ids: list[int], earlier: list[dict], exact: bool = False) -> dict:
    """match / near_tie / mismatch against ar's answer. A later turn after a differing earlier one
    has a different prompt, so it inherits the earlier turn's verdict instead of being compared.

    exact: a deterministic-mode answer, whose logits equal ar's bit for bit, so no difference is a
    near-tie (tolerance 0: any divergence is a mismatch)."""
    tolerance = 0.0 if exact else near_tie_tolerance(pipe.dtype, getattr(pipe, "backend", "transformers"))
    for record in earlier:
        if record["greedy"] and record["greedy"]["status"] != "match":
            return {"status": record["greedy"]["status"], "position": None, "margin": None, "tolerance": tolerance, "after_turn": record["turn"]}
    if token_ids == reference_ids:
        return {"status": "match", "position": None, "margin": None, "tolerance": tolerance}
    found = divergence(pipe, prompt_ids, reference_ids, token_ids, tolerance)
    near_tie = found.is_near_tie and not exact
    return {"status": "near_tie" if near_tie else "mismatch", "position": found.position, "margin": found.margin, "tolerance": tolerance}


class _RunningSpeedup:
    """The progress bar's figure, per method: its token rate over ar's (total new tokens / total seconds),
    over the answers both have so far; the report's overall speedup, computed the same way."""

    def __init__(self, records: list[dict]) -> None:
        self.totals: dict[str, list[float]] = {}  # method -> [ar tokens, ar seconds, its tokens, its seconds]
        by_key = {answer_key(record): record for record in records}
        for record in records:
            self._add_pair(record, by_key.get((record["question_id"], record["turn"], BASELINE_METHOD)))

    def add(self, record: dict, store: ResultsStore) -> None:
        # ar answers each question before the other methods, so its record is already there.
        self._add_pair(record, store.get((record["question_id"], record["turn"], BASELINE_METHOD)))

    def _add_pair(self, record: dict | None, reference: dict | None) -> None:
        if record is None or reference is None or record["method"] == BASELINE_METHOD:
            return
        totals = self.totals.setdefault(record["method"], [0.0, 0.0, 0.0, 0.0])
        totals[0] += reference["new_tokens"]
        totals[1] += reference["seconds"]
        totals[2] += record["new_tokens"]
        totals[3] += record["seconds"]

    def text(self) -> str:
        ratios = {method: rate_ratio(*totals) for method, totals in self.totals.items()}
        return " ".join(f"{method} {ratio:.2f}x" for method, ratio in ratios.items() if ratio is not None)


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(f"duospec: {message}", file=sys.stderr, flush=True)


@contextmanager
def separate_suffix_history(pipe: Pipeline, history: SuffixHistory) -> Iterator[None]:
    """Requests inside draft from (and add to) `history` instead of the pipeline's own. The bench gives
    each method its own, so no method drafts from another method's answer to the same question."""
    saved, pipe.suffix_history = pipe.suffix_history, history
    try:
        yield
    finally:
        pipe.suffix_history = saved
