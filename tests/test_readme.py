"""The README and docs/ say what the code does: the README's two commands are the ones CI runs,
character for character; its Python example runs; every `duospec ...` command line in the README and
docs/*.md parses with the CLI's own parser; every relative link resolves."""

import ast
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def ci_commands() -> list[str]:
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]


def test_ci_runs_exactly_the_readme_commands():
    readme = (REPO / "README.md").read_text()
    commands = ci_commands()
    assert len(commands) == 2, commands
    for command in commands:
        assert f"\n{command}\n" in readme, f"README lacks the CI command: {command}"


def test_readme_install_pins_the_cpu_torch():
    assert ci_commands()[0].startswith("pip install torch==2.13.0 && ")


def test_the_install_page_shows_the_ci_commands_too():
    install = (DOCS / "install.md").read_text()
    for command in ci_commands():
        assert f"\n{command}\n" in install, f"docs/install.md lacks the CI command: {command}"


def _python_block(section: str) -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index(section)
    block_start = readme.index("```python\n", start) + len("```python\n")
    return readme[block_start : readme.index("```", block_start)]


def test_the_python_api_example_prints_what_it_means(monkeypatch, capsys):
    """The README's API example, run on a tiny pipeline in place of the embedded pair: each print
    is a readable line, the stream ends its line before the next print."""
    import duospec
    from tiny_models import tiny_model, tiny_pipeline

    monkeypatch.setattr(duospec, "load", lambda *args, **kwargs: tiny_pipeline(tiny_model(0), chat=True))
    exec(compile(_python_block("## The Python API"), "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    rate_line = next(i for i, line in enumerate(lines) if "tokens per pass" in line)
    assert re.fullmatch(r"[\d.]+ tok/s, [\d.]+ tokens per pass, \d+ drafted, \d+ accepted", lines[rate_line])
    assert re.fullmatch(r"acceptance: (None|[\d.]+)", lines[-1])
    assert not lines[-2].endswith("acceptance:")  # the stream's text ended its own line


# --- the docs pages: markdown parsed just enough to find code blocks, inline code, links, headings ----------


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, indented ones (inside list items) included."""
    blocks, language, body, indent = [], None, [], 0
    for line in text.splitlines():
        stripped = line.lstrip()
        if language is None:
            if stripped.startswith("```"):
                language, body, indent = stripped[3:].strip(), [], len(line) - len(stripped)
        elif stripped.startswith("```"):
            blocks.append((language, "\n".join(body)))
            language = None
        else:
            body.append(line[indent:] if line[:indent].strip() == "" else line)
    assert language is None, "an unclosed code block"
    return blocks


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return re.sub(r"`[^`\n]*`", "", "\n".join(lines))


def shell_commands(block: str) -> list[str]:
    """The lines of a shell block, continuation lines joined, prompts (`$ `) dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip().removeprefix("$ ") for line in joined.splitlines() if line.strip()]


def duospec_argvs(command: str) -> list[list[str]]:
    """Every `duospec ...` in a shell line (after `&&`, `;` or `|` too), as the argv it would get."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    argvs, current = [], []
    for token in lexer:
        if token in {"&&", "||", ";", "|", "&"}:
            argvs.append(current)
            current = []
        else:
            current.append(token)
    argvs.append(current)
    return [argv[1:] for argv in argvs if argv[:1] == ["duospec"]]


def documented_duospec_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every duospec command line in a shell block, or after `$ ` in a text block."""
    found = []
    for path in markdown_files():
        for language, block in code_blocks(path.read_text()):
            if language in {"bash", "sh", "shell", "console"}:
                lines = shell_commands(block)
            elif language == "text":
                lines = [line[2:] for line in block.splitlines() if line.startswith("$ ")]
            else:
                continue
            for line in lines:
                if re.search(r"(^|[\s;&|])duospec\s", line):  # other lines (curl's JSON, say) need no shell parse
                    found += [(f"{_name(path)}: {line}", argv) for argv in duospec_argvs(line)]
    return found


def _parser():
    from duospec.cli import build_parser

    return build_parser()


def _subcommands(parser) -> dict:
    import argparse

    (action,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return action.choices


def test_the_docs_show_duospec_commands_for_every_subcommand():
    commands = documented_duospec_commands()
    assert len(commands) >= 30, commands
    shown = {argv[0] for _, argv in commands if argv}
    assert set(_subcommands(_parser())) <= shown, shown


def test_every_documented_duospec_command_parses(capsys):
    from duospec.bench.methods import bench_methods
    from duospec.drafting import METHODS

    parser = _parser()
    failures = []
    for where, argv in documented_duospec_commands():
        if "--version" in argv or "--help" in argv:
            continue
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            failures.append(f"{where}\n    {capsys.readouterr().err.strip().splitlines()[-1]}")
            continue
        method = getattr(args, "method", None)
        if method is not None and method not in METHODS:
            failures.append(f"{where}\n    unknown method {method!r}")
        for name in getattr(args, "methods", None) or []:
            if name not in bench_methods():
                failures.append(f"{where}\n    unknown bench method {name!r}")
        questions = getattr(args, "questions", None)
        if questions and questions.endswith(".jsonl"):
            if not (REPO / questions).is_file():
                failures.append(f"{where}\n    no such questions file {questions}")
    assert not failures, "commands in the docs that `duospec` would refuse:\n" + "\n".join(failures)


def test_every_flag_in_a_documented_synopsis_exists():
    """The usage summaries (text blocks whose lines start `duospec <subcommand>`) name real flags."""
    subcommands = _subcommands(_parser())
    checked, failures = 0, []
    for path in markdown_files():
        for language, block in code_blocks(path.read_text()):
            if language != "text":
                continue
            command = None
            for line in block.splitlines():
                start = re.match(r"duospec (\w+)\b", line)
                if start:
                    command = start.group(1)
                    assert command in subcommands, f"{_name(path)}: no subcommand {command}"
                elif not line.startswith(" "):
                    command = None
                if command is None:
                    continue
                known = subcommands[command]._option_string_actions
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", line):
                    checked += 1
                    if flag not in known:
                        failures.append(f"{_name(path)}: duospec {command} has no {flag}")
    assert checked >= 60, checked
    assert not failures, "\n".join(failures)


def test_the_documented_load_signature_is_the_real_one():
    import inspect

    import duospec

    api = (DOCS / "api.md").read_text()
    text = next(block for language, block in code_blocks(api) if block.startswith("duospec.load("))
    documented = ast.parse("def load" + text[len("duospec.load") :] + ": pass").body[0].args
    real = inspect.signature(duospec.load).parameters.values()
    positional = [p for p in real if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    keyword = [p for p in real if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert [a.arg for a in documented.args] == [p.name for p in positional]
    assert [ast.literal_eval(d) for d in documented.defaults] == [p.default for p in positional]
    assert [a.arg for a in documented.kwonlyargs] == [p.name for p in keyword]
    assert [ast.literal_eval(d) for d in documented.kw_defaults] == [p.default for p in keyword]


# --- links -----------------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: links reduced to their text, lower case, punctuation dropped,
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            base = slug(line.lstrip("#"))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def relative_links(path: Path) -> list[str]:
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(path.read_text()))
    return [target for target in targets if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("path", markdown_files(), ids=_name)
def test_every_relative_link_resolves(path):
    failures = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            failures.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            failures.append(f"{target}: no heading with that anchor in {_name(linked)}")
    assert not failures, f"{_name(path)}:\n" + "\n".join(failures)


def test_the_readme_and_the_index_link_every_docs_page():
    pages = {page.name for page in DOCS.glob("*.md")} - {"README.md"}
    readme_links = {(REPO / target.partition("#")[0]).resolve() for target in relative_links(REPO / "README.md")}
    index_links = {(DOCS / target.partition("#")[0]).resolve() for target in relative_links(DOCS / "README.md")}
    assert (DOCS / "README.md").resolve() in readme_links
    for page in pages:
        assert (DOCS / page).resolve() in readme_links, f"README.md does not link docs/{page}"
        assert (DOCS / page).resolve() in index_links, f"docs/README.md does not list {page}"


def test_the_readme_stays_a_front_page():
    assert len((REPO / "README.md").read_text().splitlines()) <= 400
