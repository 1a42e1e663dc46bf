"""Subcommands `duospec bench` (Spec-Bench harness with baselines) and `duospec profile` (cost curve)."""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

# A plain `duospec bench` answers 1 question per task: 6 questions, 7 answers per method (the
# multi-turn one has two turns). At about 4 tokens/s for ar with the default pair on a 2-core CPU, an
# answer of up to 128 tokens takes ~25 s on average (many stop earlier at EOS; the long RAG and
# summarisation prompts add prefill time): about 3 minutes per method, plus loading and warm-up.
DEFAULT_LIMIT = 1
DEFAULT_MAX_NEW_TOKENS = 128


def add_bench_commands(commands: argparse._SubParsersAction) -> None:
    """Register the benchmark subcommands on the main parser."""
    from duospec.bench.data import TASKS
    from duospec.bench.methods import bench_methods
    from duospec.bench.profile import DEFAULT_SIZES
    from duospec.cli_options import add_model_arguments

    bench = commands.add_parser(
        "bench",
        help="Spec-Bench: every method against ar and the transformers baselines, with a report and plots",
        description="Run Spec-Bench questions through each method and the transformers baselines in one process, "
        "interleaved per question; write results.jsonl (resumable), summary.json, report.md and PNG plots.",
    )
    methods = ", ".join(f"{name} ({method.summary})" for name, method in bench_methods().items())
    bench.add_argument("--methods", type=_names, default=None, help=f"comma-separated; ar is always included (default: all): {methods}")
    bench.add_argument("--tasks", type=_names, default=None, help=f"comma-separated Spec-Bench tasks (default: all in the questions file): {', '.join(TASKS)}")
    bench.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"questions per task (default {DEFAULT_LIMIT}: 7 answers per method of Spec-Bench, about 2 minutes per method on llama.cpp "
        "on a 2-core CPU with the default pair; the full Spec-Bench run is --limit 80, printed at the end with its estimated time)",
    )
    bench.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help=f"per answer (default {DEFAULT_MAX_NEW_TOKENS})")
    bench.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); greedy match against ar is checked only then")
    bench.add_argument("--top-p", type=float, default=1.0)
    bench.add_argument("--top-k", type=int, default=0)
    bench.add_argument("--seed", type=int, default=0, help="seed of every answer's sampling (default 0)")
    bench.add_argument(
        "--questions",
        default=None,
        metavar="NAME|FILE",
        help="a packaged question set, spec_bench (default: Spec-Bench's 480 questions) or editing (12 two-turn code and text edits), "
        "or a JSONL file in Spec-Bench's format (question_id, category, turns)",
    )
    bench.add_argument("--out", type=Path, default=None, help="output directory (default: bench-results/<timestamp>); rerun with the same --out to resume")
    bench.add_argument(
        "--sweep-budget",
        type=_sizes,
        nargs="?",
        const=None,
        default=False,
        metavar="BUDGETS",
        help="instead of the method comparison: specexec at each tree budget (comma-separated; default 1,2,4,...,2048) against ar, "
        "plotting accepted tokens per target pass and tokens/s against budget (sweep.png, sweep.md, sweep.json)",
    )
    bench.add_argument("--tree-depth", type=int, default=None, help="specexec: the tree's depth cap (default 16)")
    bench.add_argument("--gamma", type=int, default=None, help="fixed draft tokens per round for sd, pld, multiseq and duo (default: chosen from measured costs)")
    bench.add_argument("--tree-budget", "--budget", dest="budget", type=int, default=None, help="fixed specexec tree budget (default: chosen each round from measured costs)")
    bench.add_argument(
        "--warm",
        action="store_true",
        help="answer later turns of a conversation warm: each method (llama-ar and llama-pld too) keeps the prefix its previous turn "
        "left cached, so turn 2 prefills only the new turn (default: every answer starts from empty caches, its whole prompt timed)",
    )
    add_model_arguments(bench)
    bench.set_defaults(handler=run_bench_command)

    profile = commands.add_parser(
        "profile",
        help="measure one target pass over n = 1 .. 256 tokens and one draft step on this machine",
        description="Measure what the draft budget depends on: the target's cost of one pass over n new tokens and "
        "the draft's cost per token. Prints the table, writes profile.json and profile.png, and renews the costs the "
        "draft budget keeps on disk (measured once per model, dtype, device and thread count).",
    )
    profile.add_argument("--sizes", type=_sizes, default=DEFAULT_SIZES, help=f"comma-separated n (default: {','.join(map(str, DEFAULT_SIZES))})")
    profile.add_argument("--context", type=int, default=256, help="cached tokens before each measured pass (default 256)")
    profile.add_argument("--repeats", type=int, default=3, help="passes per size; the median counts (default 3)")
    profile.add_argument("--no-draft", action="store_true", help="measure the target only")
    profile.add_argument("--out", type=Path, default=None, help="output directory (default: bench-results/profile-<timestamp>)")
    add_model_arguments(profile)
    profile.set_defaults(handler=run_profile_command)


def run_bench_command(args: argparse.Namespace) -> int:
    from duospec.bench.data import available_tasks, load_questions, questions_file, select_questions
    from duospec.bench.methods import resolve_methods
    from duospec.bench.report import collect_meta, speedup_table, write_report
    from duospec.bench.runner import BenchSettings, check_out_dir, pipeline_flags, run_bench
    from duospec.cli_options import EXIT_INTERRUPTED, decoding_options, load_pipeline
    from duospec.models.registry import DEFAULT_DRAFT, DEFAULT_TARGET

    settings = BenchSettings(
        methods=args.methods,
        tasks=args.tasks,
        limit=args.limit,
        questions=questions_file(args.questions),
        gamma=args.gamma,
        tree_budget=args.budget,
        warm=args.warm,
        **decoding_options(args),
    )
    # Check everything that can be checked before spending time on loading models.
    settings.validate()
    questions = load_questions(settings.questions_path)
    tasks = list(settings.tasks) if settings.tasks else available_tasks(questions)
    select_questions(questions, tasks, settings.limit)
    target = args.target or DEFAULT_TARGET
    draft = args.draft if args.draft is not None else (DEFAULT_DRAFT if target == DEFAULT_TARGET else None)
    from duospec.models.loading import has_gguf

    methods = resolve_methods(list(settings.methods) if settings.methods else None, draft is not None, has_gguf(target))
    out = args.out or Path("bench-results") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")

    _quiet_transformers()
    if args.sweep_budget is not False:
        return _run_sweep_command(args, questions, tasks, settings, out)
    command = bench_command(args, methods, tasks, settings.limit, out)
    check_out_dir(out, _planned_flags(args, target, draft, settings))  # before any model is loaded
    try:
        pipe = load_pipeline(args)
        check_out_dir(out, pipeline_flags(pipe, settings))
        print(f"duospec: writing to {out}", file=sys.stderr)
        records = run_bench(pipe, settings, out)
    except KeyboardInterrupt:
        print(f"\nduospec: interrupted; every finished answer is saved in {out}/results.jsonl. To resume:\n  {command}", file=sys.stderr)
        return EXIT_INTERRUPTED
    run_methods = methods
    if pipe.deterministic:
        from duospec.bench.methods import with_default_mode

        run_methods = with_default_mode(methods)  # with the default-mode answers that measure the mode's cost
    run = {"methods": run_methods, "tasks": tasks, "limit": settings.limit, "questions": str(args.questions or "Spec-Bench (packaged)")}
    summary = write_report(out, records, collect_meta(pipeline_flags(pipe, settings), run, command))
    if "duo" in methods:
        from duospec.bench.timeline import write_timeline

        question = next(q for q in questions if q.task in tasks)
        decode = settings.decode()
        print(f"duospec: duo timeline of one answer: {write_timeline(out, pipe, pipe.encode(question.turns[0]), decode)}", file=sys.stderr)
        if pipe.duo_runtime().report:
            print("duospec: duo thread split:\n  " + "\n  ".join(pipe.duo_runtime().report), file=sys.stderr)
    pipe.close()
    print(speedup_table(summary))
    print(f"\nreport: {out / 'report.md'} (with summary.json, results.jsonl and plots beside it)")
    full_limit = max(sum(1 for q in questions if q.task == task) for task in tasks)
    if settings.limit < full_limit:
        full_out = Path("bench-results") / "full"
        estimate = _full_run_estimate([r for r in records if r["method"] in run_methods], questions, tasks)
        print(f"the full run ({full_limit} questions per task; about {estimate} on this machine):")
        print(f"  {bench_command(args, methods, tasks, full_limit, full_out)}")
    return 0


def _run_sweep_command(args: argparse.Namespace, questions: list, tasks: list[str], settings, out: Path) -> int:
    """`--sweep-budget`: specexec at each budget against ar (bench/sweep.py)."""
    from duospec.bench.data import select_questions
    from duospec.bench.settings import DecodeSettings
    from duospec.bench.sweep import DEFAULT_SWEEP, render_sweep, run_sweep
    from duospec.cli_options import load_pipeline
    from duospec.config import MAX_TREE_BUDGET, DuospecError

    budgets = args.sweep_budget or DEFAULT_SWEEP
    if max(budgets) > MAX_TREE_BUDGET:
        raise DuospecError(f"--sweep-budget takes budgets in 1..{MAX_TREE_BUDGET}, got {max(budgets)}")
    chosen = select_questions(questions, tasks, settings.limit)
    decode = DecodeSettings(settings.max_new_tokens, settings.temperature, settings.top_p, settings.top_k, settings.seed)
    with load_pipeline(args) as pipe:
        print(f"duospec: budget sweep of specexec over {len(chosen)} question(s), writing to {out}", file=sys.stderr)
        summary = run_sweep(pipe, chosen, tuple(budgets), decode, args.tree_depth, out)
    print(render_sweep(summary))
    print(f"plot: {out / 'sweep.png'}")
    return 0


def _planned_flags(args: argparse.Namespace, target: str, draft: str | None, settings) -> dict:
    """The result flags the loaded pipeline will have (see runner.pipeline_flags), computed without loading."""
    import torch

    from duospec.api import draft_label, resolve_draft_quantization
    from duospec.bench.runner import result_flags
    from duospec.models.hf import resolve_device, resolve_dtype
    from duospec.models.loading import default_threads, resolve_backend

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    deterministic = getattr(args, "deterministic", False)
    backend = resolve_backend(args.backend, target, device, deterministic=deterministic)
    label = None
    if draft is not None:
        draft_backend = resolve_backend(args.draft_backend or args.backend, draft, device)
        quantization = resolve_draft_quantization(args.draft_quant, device, dtype) if draft_backend == "transformers" else "none"
        label = draft_label(draft, quantization, draft_backend)
    threads = args.threads or (default_threads() if backend == "llama.cpp" else torch.get_num_threads())
    flags = result_flags(target, label, str(dtype), str(device), threads, settings)
    if backend != "transformers":
        flags["backend"] = backend
    if deterministic:
        flags["deterministic"] = True
    return flags


def bench_command(args: argparse.Namespace, methods: list[str], tasks: list[str], limit: int, out: Path) -> str:
    """The `duospec bench` command line that reproduces (or resumes) a run."""
    words = ["duospec", "bench", "--methods", ",".join(methods), "--tasks", ",".join(tasks), "--limit", str(limit)]
    words += ["--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature)]
    if args.top_p != 1.0:
        words += ["--top-p", str(args.top_p)]
    if args.top_k != 0:
        words += ["--top-k", str(args.top_k)]
    words += ["--seed", str(args.seed)]
    if args.questions is not None:
        words += ["--questions", str(args.questions)]
    for flag, value in (("--gamma", getattr(args, "gamma", None)), ("--tree-budget", getattr(args, "budget", None))):
        if value is not None:
            words += [flag, str(value)]
    if getattr(args, "warm", False):
        words.append("--warm")
    return shlex.join([*words, *_model_words(args), "--out", str(out)])


def _model_words(args: argparse.Namespace) -> list[str]:
    """The model and hardware flags given (defaults left out)."""
    words = []
    for flag in ("target", "draft", "device", "threads", "draft_backend", "draft_threads", "ctx_size"):
        if getattr(args, flag) is not None:
            words += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.backend != "auto":
        words += ["--backend", args.backend]
    if args.dtype != "bfloat16":
        words += ["--dtype", args.dtype]
    if args.draft_quant != "auto":
        words += ["--draft-quant", args.draft_quant]
    if getattr(args, "deterministic", False):
        words.append("--deterministic")
    if getattr(args, "no_prefix_cache", False):
        words.append("--no-prefix-cache")
    return words


def _full_run_estimate(records: list[dict], questions: list, tasks: list[str]) -> str:
    """Mean seconds per answer of each method so far, times the answers of the full run."""
    answers = sum(len(q.turns) for q in questions if q.task in tasks)
    per_method: dict[str, list[float]] = {}
    for record in records:
        per_method.setdefault(record["method"], []).append(record["seconds"])
    seconds = sum(answers * sum(times) / len(times) for times in per_method.values())
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def run_profile_command(args: argparse.Namespace) -> int:
    from duospec.bench.profile import format_table, run_profile, write_profile
    from duospec.bench.report import collect_meta
    from duospec.bench.runner import draft_name
    from duospec.budget.kept import profiles_dir
    from duospec.cli_options import load_pipeline
    from duospec.config import DuospecError

    if args.context < 1 or args.repeats < 1:
        raise DuospecError("--context and --repeats must be at least 1")
    out = args.out or Path("bench-results") / datetime.datetime.now().strftime("profile-%Y%m%d-%H%M%S")
    pipe = load_pipeline(args)
    with_draft = not args.no_draft and draft_name(pipe) is not None
    profile = run_profile(pipe, args.sizes, context_tokens=args.context, repeats=args.repeats, with_draft=with_draft)
    print(format_table(profile))
    # The budget keeps its own, smaller measurement on disk; a profile run is the moment to renew it.
    pipe.costs.target_profile(remeasure=True)
    if with_draft:
        pipe.costs.draft_step_seconds(remeasure=True)
    kept_on_disk = pipe.costs.identity(pipe.target) is not None
    print("renewed the draft budget's measured costs" + (f" (kept in {profiles_dir()})" if kept_on_disk else ""))
    flags = {"target": pipe.target.name, "draft": profile["draft"], "dtype": str(pipe.dtype), "device": str(pipe.device), "threads": pipe.threads}
    if pipe.deterministic:
        flags["deterministic"] = True
    words = ["duospec", "profile", "--sizes", ",".join(map(str, args.sizes)), "--context", str(args.context), "--repeats", str(args.repeats)]
    command = shlex.join([*words, *(["--no-draft"] if args.no_draft else []), *_model_words(args), "--out", str(out)])
    paths = write_profile(out, profile, collect_meta(flags, {"sizes": list(args.sizes)}, command))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def _names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("give at least one name (comma-separated)")
    return names


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"sizes must be comma-separated integers, got {text!r}") from error
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("sizes must be positive integers, e.g. 1,2,4,8")
    return sizes


def _quiet_transformers() -> None:
    """transformers warns about its own internal calls during assisted generation; in the middle of a
    progress bar that is noise, so the bench keeps only its errors."""
    from transformers.utils import logging

    logging.set_verbosity_error()
