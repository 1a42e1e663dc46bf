"""Inputs at the edges, each with a clear error or the right result and nothing lost (issue 13's list):
a draft with the same vocabulary size but other ids, a prompt one token short of the context, a prompt
beside --prompts-file, an empty prompts file, chat messages without role or content, a pipeline reused
after an interrupted generation, and a multi-byte character split across rounds."""

from __future__ import annotations

import json
import random

import pytest
from tiny_models import _CHARACTERS, SPECIALS, tiny_model, tiny_pipeline, tiny_tokenizer
from transformers import Qwen2Tokenizer

from duospec.api import GenerationInterrupted, _TextAssembler, check_same_vocabulary
from duospec.cli import main
from duospec.config import DuospecError

CONTEXT = 32


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=0, max_positions=CONTEXT)


def test_a_draft_with_the_same_vocabulary_size_but_other_ids_is_refused():
    same = tiny_tokenizer()
    symbols = SPECIALS + _CHARACTERS[: 64 - len(SPECIALS)]
    shuffled = symbols[:2] + list(reversed(symbols[2:]))  # same 64 strings, other ids
    other = Qwen2Tokenizer(vocab={s: i for i, s in enumerate(shuffled)}, merges=[], unk_token="<|endoftext|>", eos_token="<eos>", pad_token="<|endoftext|>")
    assert len(other.get_vocab()) == len(same.get_vocab())
    with pytest.raises(DuospecError, match="do not share a tokenizer"):
        check_same_vocabulary(same, other, "target", "draft")


@pytest.mark.parametrize("method", ["ar", "sd", "pld", "specexec"])
def test_a_prompt_one_token_short_of_the_context_gives_one_token(target, method):
    pipe = tiny_pipeline(target, target)
    prompt = [5 + (i % 40) for i in range(CONTEXT - 1)]
    result = pipe.generate(prompt, method=method, max_new_tokens=10, temperature=0)
    assert result.stats.new_tokens == 1 and result.stats.finish_reason in ("context", "eos")
    with pytest.raises(DuospecError, match="context holds 32; shorten the prompt"):
        pipe.generate(prompt + [7], method=method, max_new_tokens=10)


def test_chat_messages_without_role_or_content_are_refused(target):
    pipe = tiny_pipeline(target)
    for messages in ([{"content": "hi"}], [{"role": "user"}], [{"role": "user", "content": None}], [{"role": "", "content": "x"}]):
        with pytest.raises(DuospecError, match="need a 'role' and a string 'content'"):
            pipe.generate(messages, max_new_tokens=2)


def test_a_prompt_beside_prompts_file_and_an_empty_prompts_file(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("abc\n")
    assert main(["generate", "xyz", "--prompts-file", str(prompts)]) == 2
    assert "either a PROMPT or --prompts-file, not both" in capsys.readouterr().err
    for content in ("", "\n\n  \n"):
        prompts.write_text(content)
        assert main(["generate", "--prompts-file", str(prompts)]) == 2
        assert "holds no prompts" in capsys.readouterr().err


def test_a_pipeline_reused_after_an_interrupt_answers_as_a_fresh_one(target):
    """Ctrl-C in the middle of a round (here: inside the target's forward) must leave nothing behind
    that changes the next answer: caches, budget state, the active stream."""
    expected = tiny_pipeline(target, target).generate("abc", method="sd", max_new_tokens=20, temperature=0, chat=False)
    pipe = tiny_pipeline(target, target)
    pipe.generate("w", method="sd", max_new_tokens=2, chat=False)  # costs measured: the interrupt lands in generation
    forward = pipe.target.forward
    calls = {"n": 0}

    def interrupted_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    pipe.target.forward = interrupted_forward
    with pytest.raises(GenerationInterrupted) as interrupt:
        pipe.generate("abc", method="sd", max_new_tokens=20, temperature=0, chat=False)
    partial = interrupt.value.result
    assert partial.stats.finish_reason == "interrupted" and partial.token_ids == expected.token_ids[: len(partial.token_ids)]
    pipe.target.forward = forward
    again = pipe.generate("abc", method="sd", max_new_tokens=20, temperature=0, chat=False)
    assert again.token_ids == expected.token_ids and again.text == expected.text


def _gpt2_byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> symbol map (printable bytes stand for themselves, the rest shift past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


def _byte_level_tokenizer() -> tuple[Qwen2Tokenizer, list[int]]:
    """Single-byte tokens for "é" (0xC3 0xA9) and "東" (0xE6 0x9D 0xB1), in the GPT-2 byte map Qwen uses."""
    byte_symbol = _gpt2_byte_symbols()
    text = "aé東b"
    symbols = ["<|endoftext|>", "<eos>", *dict.fromkeys(byte_symbol[b] for b in text.encode())]
    tokenizer = Qwen2Tokenizer(vocab={s: i for i, s in enumerate(symbols)}, merges=[], unk_token="<|endoftext|>", eos_token="<eos>", pad_token="<|endoftext|>")
    ids = [symbols.index(byte_symbol[b]) for b in text.encode()]
    assert tokenizer.decode(ids) == text
    return tokenizer, ids


@pytest.mark.parametrize("seed", range(6))
def test_a_multi_byte_character_split_across_rounds_streams_whole(seed):
    tokenizer, ids = _byte_level_tokenizer()
    rng = random.Random(seed)
    rounds, rest = [], list(ids) * 3
    while rest:  # random round sizes, so characters split at every possible byte boundary
        size = rng.randint(1, 3)
        rounds.append(rest[:size])
        rest = rest[size:]
    assembler = _TextAssembler(tokenizer)
    pieces = [assembler.push(r) for r in rounds] + [assembler.flush()]
    assert "".join(pieces) == "aé東b" * 3 and not any("\ufffd" in p for p in pieces)
    assert assembler.text() == "aé東b" * 3


def test_an_unfinished_character_at_the_very_end_is_flushed_not_lost():
    tokenizer, ids = _byte_level_tokenizer()
    assembler = _TextAssembler(tokenizer)
    assert assembler.push(ids[:2]) == ""  # "a" and the first byte of "é": the round waits for the character
    assert assembler.flush() == "a\ufffd"  # an answer cut inside a character: nothing lost, the replacement once
    assert assembler.token_ids == ids[:2]  # the tokens are kept, whatever their text


@pytest.mark.parametrize("damaged", ["config.json", "tokenizer.json"])
def test_a_damaged_file_in_a_checkpoint_names_the_checkpoint_and_the_fix(tmp_path, damaged):
    import duospec

    tiny_model(seed=0).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    (tmp_path / damaged).write_text("{broken")
    with pytest.raises(DuospecError) as error:
        duospec.load(str(tmp_path), backend="transformers", dtype="float32", progress=False)
    message = str(error.value)
    assert str(tmp_path) in message and "download or convert it again" in message
    assert "hub id" not in message  # a local checkpoint is not mistaken for a missing download


class _InterruptAfter:
    """Raises KeyboardInterrupt (what Ctrl-C raises in the main thread) at the n-th call of a model's
    forward: a Ctrl-C that lands in the middle of the cost measurement, with the cache half-filled."""

    def __init__(self, model, calls: int) -> None:
        self.model, self.calls, self.real = model, calls, model.forward

    def __call__(self, *args, **kwargs):
        self.calls -= 1
        if self.calls == 0:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


def test_ctrl_c_during_the_cost_measurement_keeps_no_figure_and_the_pipeline_still_works(target, monkeypatch):
    """The measurement is interrupted after a few of its passes: no cost figure is kept (the next call
    measures again), and the same pipeline then answers exactly as a fresh one."""
    pipe = tiny_pipeline(target, target)
    interrupter = _InterruptAfter(pipe.target, calls=4)
    monkeypatch.setattr(pipe.target, "forward", interrupter)
    with pytest.raises(KeyboardInterrupt):
        pipe.generate("ab", method="sd", max_new_tokens=8)  # sd measures costs first
    assert interrupter.calls == 0 and pipe.costs.target_costs is None  # interrupted inside the measurement, nothing taken from it
    monkeypatch.setattr(pipe.target, "forward", interrupter.real)
    again = pipe.generate("ab", method="sd", max_new_tokens=8)
    assert pipe.costs.target_costs is not None  # measured again, whole
    assert again.token_ids == tiny_pipeline(target, target).generate("ab", method="ar", max_new_tokens=8).token_ids


def test_ctrl_c_while_the_model_loads_or_costs_are_measured_exits_130_without_a_traceback(tmp_path, capsys, monkeypatch):
    import transformers

    import duospec.budget.kept

    target = tiny_model(seed=0)
    target.save_pretrained(tmp_path / "target")
    tiny_tokenizer().save_pretrained(tmp_path / "target")
    flags = ["generate", "ab", "--method", "sd", "--max-new-tokens", "4", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "target"), "--dtype", "float32"]

    def interrupted_load(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", interrupted_load)
        assert main(flags) == 130
    err = capsys.readouterr().err
    assert "duospec: interrupted" in err and "Traceback" not in err

    def interrupted_measurement(*args, **kwargs):
        raise KeyboardInterrupt

    kept_before = sorted(duospec.budget.kept.profiles_dir().glob("*.json"))
    with monkeypatch.context() as patch:
        patch.setattr(duospec.budget.kept, "measure_target_costs", interrupted_measurement)
        assert main(flags) == 130
    err = capsys.readouterr().err
    assert "duospec: interrupted" in err and "Traceback" not in err
    new_figures = set(duospec.budget.kept.profiles_dir().glob("*.json")) - set(kept_before)
    kept_keys = [json.loads(path.read_text())["key"] for path in new_figures]
    assert not [key for key in kept_keys if "target" in key], kept_keys  # the draft's finished step may be kept, no target curve
    assert main(flags) == 0  # nothing half-done was kept: the next run measures and answers
