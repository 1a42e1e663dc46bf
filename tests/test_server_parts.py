"""The server's pure parts, without a process: stop sequences over streamed text, request parsing."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="duospec serve needs its extra: pip install -e '.[serve]'")

from duospec.server.errors import APIError
from duospec.server.schema import parse_chat, parse_completion
from duospec.server.stops import StopMatcher


def feed(stops: list[str], rounds: list[str]) -> tuple[str, StopMatcher]:
    matcher = StopMatcher(stops)
    shown = "".join(matcher.push(text) for text in rounds)
    return shown + matcher.flush(), matcher


def test_no_stop_shows_everything():
    shown, matcher = feed(["END"], ["ab", "cE", "Nd", "ef"])
    assert shown == "abcENdef" and not matcher.stopped


def test_stop_split_across_rounds_is_never_shown():
    matcher = StopMatcher(["\n\n"])
    assert matcher.push("one\n") == "one"  # the newline might begin the stop: held back
    assert matcher.push("\ntwo") == ""
    assert matcher.stopped and matcher.shown == "one" and matcher.stop_end() == 5


def test_the_earliest_stop_wins_and_text_after_it_is_dropped():
    shown, matcher = feed(["yz", "cd"], ["abcdxyz"])
    assert shown == "ab" and matcher.matched == "cd"
    assert matcher.push("more") == "" and matcher.flush() == ""


def test_held_back_prefix_is_released_when_it_turns_out_not_to_be_a_stop():
    matcher = StopMatcher(["abc"])
    assert matcher.push("xab") == "x"
    assert matcher.push("d") == "abd"


def test_stop_at_the_very_start():
    shown, matcher = feed(["ab"], ["a", "b", "c"])
    assert shown == "" and matcher.stopped and matcher.stop_end() == 2


def test_chat_content_parts_are_joined_and_developer_is_system():
    spec = parse_chat({"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert spec.prompt == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]


def test_openai_defaults():
    spec = parse_chat({"messages": [{"role": "user", "content": "x"}]})
    assert spec.temperature == 1.0 and spec.top_p == 1.0 and spec.max_tokens is None and spec.method is None and not spec.stream


def test_max_completion_tokens_and_max_tokens():
    assert parse_chat({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 7}).max_tokens == 7
    with pytest.raises(APIError, match="disagree"):
        parse_chat({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 7, "max_tokens": 8})


def test_a_one_prompt_list_is_one_prompt():
    assert parse_completion({"prompt": ["hello"]}).prompt == "hello"
    assert parse_completion({"prompt": [[5, 6]]}).prompt == [5, 6]
    assert parse_completion({"prompt": [5, 6]}).prompt == [5, 6]


@pytest.mark.parametrize("body, param", [({"messages": [{"role": "user", "content": "x"}], "seed": True}, "seed"), ({"prompt": 5}, "prompt"), ({"prompt": "x", "top_k": "3"}, "top_k")])
def test_wrong_types_name_the_field(body, param):
    parse = parse_chat if "messages" in body else parse_completion
    with pytest.raises(APIError) as raised:
        parse(body)
    assert raised.value.status == 400 and raised.value.param == param and f"field '{param}" in raised.value.message
