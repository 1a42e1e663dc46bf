"""`duospec` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from duospec.cli_options import EXIT_INTERRUPTED, EXIT_USAGE, add_model_arguments, add_sampling_arguments, decoding_options, load_pipeline
from duospec.config import DuospecError

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duospec", description="Lossless speculative decoding on the hardware you have.")
    parser.add_argument("--version", action="version", version=f"duospec {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text for one prompt or a file of prompts")
    generate.add_argument("prompt", nargs="?", default=None, help="the prompt, or - to read it from standard input")
    generate.add_argument("--prompts-file", type=Path, default=None, help="one prompt per line, or JSONL with a 'prompt' field")
    generate.add_argument("--json", action="store_true", help="print one JSON object per prompt (JSONL) instead of streaming text")
    add_sampling_arguments(generate)
    add_model_arguments(generate)
    generate.set_defaults(handler=run_generate)

    from duospec.bench.cli_commands import add_bench_commands

    add_bench_commands(commands)
    from duospec.server.run import add_serve_command

    add_serve_command(commands)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("duospec")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except DuospecError as error:
        print(f"duospec: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before any text existed (loading models, measuring costs)
        print("\nduospec: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts to answer, from the argument, standard input or --prompts-file."""
    if args.prompts_file is not None:
        if args.prompt is not None:
            raise DuospecError("give either a PROMPT or --prompts-file, not both")
        return list(_prompts_from_file(args.prompts_file))
    if args.prompt is None:
        raise DuospecError("no prompt given; pass PROMPT, - (read standard input) or --prompts-file FILE")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise DuospecError("the prompt is empty; give some text")
    return [prompt]


def _is_jsonl(path: Path, lines: list[str]) -> bool:
    """JSONL if the name says so or the first line is a JSON object; otherwise every line is a prompt,
    even one that starts with "{" (code)."""
    if path.suffix.lower() == ".jsonl":
        return True
    first = next((line for line in lines if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _prompts_from_file(path: Path) -> Iterator[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise DuospecError(f"cannot read prompts file {path}: {error.strerror}") from error
    found = False
    jsonl = _is_jsonl(path, lines)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if jsonl:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DuospecError(f"{path}:{number}: not valid JSON ({error.msg}); use one prompt per line or JSONL with a 'prompt' field") from error
            if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise DuospecError(f"{path}:{number}: a JSONL line needs a non-empty string field 'prompt'")
            found = True
            yield record["prompt"]
        else:
            found = True
            yield line
    if not found:
        raise DuospecError(f"{path} holds no prompts")


def run_generate(args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    options = dict(
        method=args.method,
        **decoding_options(args),
        gamma=args.gamma,
        lenience=args.lenience,
        tree_budget=args.budget,
        tree_depth=args.tree_depth,
        chat=False if args.no_chat else None,
    )
    _validate_early(options)
    pipe = load_pipeline(args)
    pipe.verbose = args.verbose
    try:
        return _generate_each(pipe, prompts, options, args)
    finally:
        pipe.close()  # a Duo draft process never outlives the command


ANSWER_HEADER = "=== duospec: answer {index} of {count} ==="  # stdout, before each answer of several


def _generate_each(pipe, prompts: list[str], options: dict, args: argparse.Namespace) -> int:
    """Answer each prompt in turn. With several, stdout shows each answer under ANSWER_HEADER (so it
    splits back into exactly its answers), the summaries on stderr name their prompt, and --json
    rows carry the prompt and its index."""
    count = len(prompts)
    for index, prompt in enumerate(prompts, start=1):
        label = f"prompt {index}/{count}" if count > 1 else ""
        if count > 1 and not args.json:
            sys.stdout.write(("\n" if index > 1 else "") + ANSWER_HEADER.format(index=index, count=count) + "\n")
        stream = pipe.stream(prompt, **options)
        try:
            for chunk in stream:
                if not args.json:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
        except KeyboardInterrupt:  # GenerationInterrupted, or Ctrl-C while this loop was printing
            partial = stream.stop("interrupted")
            _end_answer(args.json)
            _report(partial, args.json, label, index, prompt)
            print(f"duospec: interrupted; kept the {partial.stats.new_tokens} tokens generated so far", file=sys.stderr)
            return EXIT_INTERRUPTED
        _end_answer(args.json)
        _report(stream.result, args.json, label, index, prompt)
        if args.verbose:
            print(round_trace(stream.result.stats), file=sys.stderr)
    return 0


def _end_answer(as_json: bool) -> None:
    """Every streamed answer ends with a newline (the next output starts on a line of its own)."""
    if not as_json:
        sys.stdout.write("\n")
        sys.stdout.flush()


def _validate_early(options: dict) -> None:
    """Check flags before loading models, so a typo costs no loading time."""
    from duospec.config import GenerationRequest, SamplingConfig
    from duospec.drafting import method_spec

    method_spec(options["method"])
    sampling = SamplingConfig(temperature=options["temperature"], top_k=options["top_k"], top_p=options["top_p"], seed=options["seed"])
    GenerationRequest(method=options["method"], max_new_tokens=options["max_new_tokens"], sampling=sampling, gamma=options["gamma"], lenience=options["lenience"])


def _report(result, as_json: bool, label: str = "", index: int = 1, prompt: str | None = None) -> None:
    if as_json:
        print(json.dumps({"prompt_index": index, "prompt": prompt, **result.to_dict()}, ensure_ascii=False), flush=True)
        return
    print(summary_line(result.stats, label), file=sys.stderr)


def round_trace(stats, width: int = 40) -> str:
    """--verbose: each round as drafted/emitted tokens (emitted = accepted + the target's own), so a
    reader sees where drafting happened and paid, e.g. "rounds (drafted/emitted): 0/1 0/1 5/6 3/2"."""
    rounds = [f"{drafted}/{emitted}" for drafted, emitted in zip(stats.gammas, stats.tokens_per_pass[1:])]
    shown = rounds if len(rounds) <= width else [*rounds[: width // 2], "...", *rounds[-width // 2 :]]
    return f"duospec: rounds (drafted/emitted): {' '.join(shown) or 'none'}"


def summary_line(stats, label: str = "") -> str:
    """One line on what a generation did, rates of the prompt and of the answer apart (as llama.cpp
    reports them), and what was drafted per round instead of one "gamma"."""
    parts = [f"[{stats.method}{' ' + label if label else ''}] {stats.new_tokens} tokens in {stats.seconds:.2f} s"]
    new_prompt = stats.prompt_tokens - stats.reused_prompt_tokens
    cached = f", {stats.reused_prompt_tokens} more already cached" if stats.reused_prompt_tokens else ""
    if stats.prefill_seconds > 0:
        parts.append(f"prompt {new_prompt} tokens in {stats.prefill_seconds:.2f} s ({new_prompt / stats.prefill_seconds:.1f} tok/s{cached})")
    if stats.generation_tokens_per_second is not None:
        parts.append(f"generation {stats.generation_tokens_per_second:.2f} tok/s after the first token ({stats.ttft_seconds:.2f} s)")
    parts.append(f"{stats.mean_accepted:.2f} tokens per target pass")
    if stats.drafted_tokens:
        parts.append(
            f"drafted {stats.drafted_tokens} in {stats.drafting_rounds} of {len(stats.gammas)} rounds "
            f"({stats.mean_draft_per_round:.1f} per round), accepted {stats.accepted_tokens} ({stats.acceptance_rate:.0%})"
        )
    elif stats.gammas:
        parts.append("drafted nothing")
    if stats.auto_rounds:
        rounds = ", ".join(f"{name} {count}" for name, count in sorted(stats.auto_rounds.items(), key=lambda item: -item[1]))
        parts.append(f"rounds by method: {rounds}" + (f" ({stats.choice_note})" if stats.choice_note else ""))
    elif stats.choice_note:
        parts.append(stats.choice_note)
    if stats.fallback:
        parts.append(f"went on without its draft ({stats.fallback})")
    parts.append(f"stop: {stats.finish_reason}")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
