"""Every help text that states a default agrees with the code (issue 22: `bench --help` said one thing
and the code did another).

The test walks every sub-command's options. Where the help names a literal default ("default 16",
"(default: bfloat16)") it must be the option's own default, or, where argparse's default is None
because the code fills the value in later, the constant the code fills it in from.
"""

from __future__ import annotations

import argparse
import re

import pytest

from duospec.bench.cli_commands import DEFAULT_MAX_NEW_TOKENS
from duospec.bench.sweep import DEFAULT_SWEEP
from duospec.cli import build_parser
from duospec.drafting.specexec import DEFAULT_DEPTH
from duospec.models.llamacpp import DEFAULT_CONTEXT
from duospec.server.run import LOOPBACK

# Options whose argparse default is None and whose help states the value the code then uses.
COMPUTED_DEFAULTS = {"--tree-depth": DEFAULT_DEPTH, "--ctx-size": DEFAULT_CONTEXT, "--sweep-budget": DEFAULT_SWEEP}
# "default N" / "default: X" / "(default X)", the literal being a number or one plain word.
STATED_DEFAULT = re.compile(r"(?:\(|;\s)default:?\s+(?P<value>[-\w.]+(?:,[\w.]+)*)(?=[\s;:)]|,\s|$)")
WORDS_THAT_ARE_NOT_VALUES = {"chosen", "as", "the", "cuda", "embedded", "torch's", "all", "bench-results", "$DUOSPEC_API_KEY"}


def all_options() -> list[tuple[str, argparse.Action]]:
    """(command, action) for every option of every sub-command."""
    parser = build_parser()
    found = []
    for action in parser._actions:  # argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                found += [(command, option) for option in sub._actions if option.option_strings and option.help]
    return found


def stated_default(help_text: str) -> str | None:
    match = STATED_DEFAULT.search(help_text)
    if match is None or match.group("value") in WORDS_THAT_ARE_NOT_VALUES:
        return None
    return match.group("value")


def test_the_walk_reaches_every_command() -> None:
    commands = {command for command, _ in all_options()}
    assert {"generate", "bench", "profile", "serve"} <= commands
    assert len([1 for _, option in all_options() if stated_default(option.help or "")]) >= 15


@pytest.mark.parametrize("command,option", all_options(), ids=lambda value: value if isinstance(value, str) else value.option_strings[0])
def test_a_stated_default_is_the_code_default(command: str, option: argparse.Action) -> None:
    stated = stated_default(option.help or "")
    if stated is None or isinstance(option.default, bool) and option.nargs == 0:
        return  # a flag's help describes what happens without it, not a value
    name = option.option_strings[0]
    actual = COMPUTED_DEFAULTS.get(name) if option.default is None or option.default is False else option.default
    assert actual is not None, f"duospec {command} {name}: help says default {stated!r} but the code's default is None and no constant backs it"
    if isinstance(actual, (list, tuple)):
        if ",...," in stated:  # "1,2,4,...,2048": the start and the end of the sequence
            head, tail = stated.split(",...,")
            assert ",".join(map(str, actual)).startswith(head + ",") and str(actual[-1]) == tail, f"duospec {command} {name}: help says {stated}, code has {actual}"
            return
        actual = ",".join(map(str, actual))
    if isinstance(actual, int) and "," in stated:
        stated = stated.replace(",", "")  # 1,000,000
    if isinstance(actual, float) and stated.replace(".", "", 1).isdigit():
        assert float(stated) == actual, f"duospec {command} {name}: help says {stated}, code has {actual}"
    else:
        assert str(actual) == stated, f"duospec {command} {name}: help says {stated!r}, code has {actual!r}"


def test_methods_default_all_means_every_method() -> None:
    """`bench --methods` says "(default: all)": None must select every registered method."""
    from duospec.bench.methods import bench_methods, resolve_methods

    assert resolve_methods(None, has_draft=True, has_gguf=False) == [name for name in bench_methods() if not name.startswith("llama-")]


def test_help_constants_are_the_ones_the_code_uses() -> None:
    assert DEFAULT_MAX_NEW_TOKENS > 0 and LOOPBACK == "127.0.0.1"
