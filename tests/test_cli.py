"""`duospec generate` end to end on tiny checkpoints saved to disk (the path a user's model takes)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from duospec.cli import main
from tiny_models import perturbed, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A target and a partly-right draft, saved as transformers checkpoints."""
    root = tmp_path_factory.mktemp("models")
    target = tiny_model(seed=0)
    for name, model in (("target", target), ("draft", perturbed(target, noise=0.2, seed=7))):
        model.save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    return root / "target", root / "draft"


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def model_flags(checkpoints) -> list[str]:
    target, draft = checkpoints
    return ["--target", str(target), "--draft", str(draft), "--dtype", "float32"]


def test_json_output_has_every_field_and_methods_agree(checkpoints, capsys):
    records = {}
    for method in ("ar", "sd", "pld"):
        code, out, _ = run_cli(["generate", "w1 w2 w3", "--method", method, "--max-new-tokens", "12", "--json", *model_flags(checkpoints)], capsys)
        assert code == 0
        (line,) = out.strip().splitlines()
        records[method] = json.loads(line)
    for key in ("text", "token_ids", "prompt_tokens", "new_tokens", "method", "draft_tokens_per_round", "seconds", "tokens_per_second",
                "ttft_seconds", "target_passes", "mean_accepted", "acceptance_rate"):
        assert key in records["sd"], key
    assert records["sd"]["token_ids"] == records["ar"]["token_ids"] == records["pld"]["token_ids"]
    assert records["ar"]["new_tokens"] == 12 and records["ar"]["mean_accepted"] == 1.0
    # What was drafted is reported per round, never as one "gamma" (0 where most rounds drafted nothing).
    assert "gamma" not in records["sd"] and records["sd"]["gamma_auto"] is True
    sd = records["sd"]
    assert sum(sd["draft_tokens_per_round"]) == sd["drafted_tokens"] and len(sd["draft_tokens_per_round"]) == len(sd["tokens_per_pass"]) - 1


def test_streamed_text_equals_json_text(checkpoints, capsys):
    args = ["generate", "w5 w6", "--method", "sd", "--gamma", "3", "--max-new-tokens", "10", *model_flags(checkpoints)]
    code, streamed, err = run_cli(args, capsys)
    assert code == 0
    # gamma 3 each round, fewer where the request's end caps a round
    assert "[sd] 10 tokens" in err and re.search(r"drafted \d+ in \d+ of \d+ rounds \([0-3]\.\d per round\)", err), err
    assert re.search(r"prompt \d+ tokens in [\d.]+ s \([\d.]+ tok/s\), generation [\d.]+ tok/s after the first token", err), err
    _, out, _ = run_cli([*args, "--json"], capsys)
    record = json.loads(out)
    assert streamed == record["text"] + "\n"  # the streamed answer ends its line
    # gamma 3 each round, capped by the tokens the request still has room for: recompute every round's draft
    emitted, drafts = 1, []
    for emitted_in_round in record["tokens_per_pass"][1:]:
        drafts.append(min(3, 10 - emitted - 1))
        emitted += emitted_in_round
    drafts = [d for d in drafts if d > 0]
    assert record["drafted_tokens"] == sum(drafts) and record["drafting_rounds"] == len(drafts)
    assert record["mean_draft_per_round"] == round(sum(drafts) / len(drafts), 3)
    assert f"({sum(drafts) / len(drafts):.1f} per round)" in err
    assert record["generation_tokens_per_second"] == pytest.approx((10 - 1) / (record["seconds"] - record["ttft_seconds"]), rel=1e-2)


def test_prompts_file_stdout_splits_back_into_its_answers(checkpoints, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2\nw3 w4 w5\nw6\n")
    flags = ["--method", "ar", "--max-new-tokens", "5", *model_flags(checkpoints)]
    code, out, err = run_cli(["generate", "--prompts-file", str(prompts), *flags], capsys)
    assert code == 0 and out.endswith("\n")
    answers = re.split(r"(?:^|\n)=== duospec: answer \d+ of 3 ===\n", out)
    assert answers[0] == "" and len(answers) == 4
    _, jsonl, _ = run_cli(["generate", "--prompts-file", str(prompts), "--json", *flags], capsys)
    records = [json.loads(line) for line in jsonl.strip().splitlines()]
    assert [answer[:-1] for answer in answers[1:]] == [record["text"] for record in records]
    assert [(r["prompt_index"], r["prompt"]) for r in records] == [(1, "w1 w2"), (2, "w3 w4 w5"), (3, "w6")]
    assert [line.split("]")[0] for line in err.splitlines() if line.startswith("[")] == ["[ar prompt 1/3", "[ar prompt 2/3", "[ar prompt 3/3"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and re.fullmatch(r"duospec \S+\n", capsys.readouterr().out)


def test_a_missing_model_file_is_no_such_file(capsys):
    for target in ("/tmp/nonexistent-duospec.gguf", "./no/such/checkpoint"):
        code, _, err = run_cli(["generate", "w1", "--target", target], capsys)
        assert code == 2 and f"no such file or directory: {target}" in err and "hub" not in err.split(";")[0], err


def test_prompts_file_plain_and_jsonl(checkpoints, capsys, tmp_path):
    plain = tmp_path / "prompts.txt"
    plain.write_text("w1 w2\n\nw3 w4\n")
    code, out, _ = run_cli(["generate", "--prompts-file", str(plain), "--method", "pld", "--max-new-tokens", "4", "--json", *model_flags(checkpoints)], capsys)
    assert code == 0 and len(out.strip().splitlines()) == 2
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "w1 w2"}) + "\n" + json.dumps({"prompt": "w9"}) + "\n")
    code, out, _ = run_cli(["generate", "--prompts-file", str(jsonl), "--method", "ar", "--max-new-tokens", "4", "--json", *model_flags(checkpoints)], capsys)
    first, second = (json.loads(line) for line in out.strip().splitlines())
    assert first["prompt_tokens"] != second["prompt_tokens"]
    code_lines = tmp_path / "code.txt"  # a plain prompt may start with "{" (code) and is still a prompt
    code_lines.write_text("w1 w2\n{ w3 w4 }\n")
    code, out, _ = run_cli(["generate", "--prompts-file", str(code_lines), "--method", "ar", "--max-new-tokens", "2", "--json", *model_flags(checkpoints)], capsys)
    assert code == 0 and len(out.strip().splitlines()) == 2


def test_prompts_file_errors_name_the_line(checkpoints, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "w1"}) + "\n" + json.dumps({"text": "w2"}) + "\n")
    code, _, err = run_cli(["generate", "--prompts-file", str(bad), *model_flags(checkpoints)], capsys)
    assert code == 2 and f"{bad}:2: a JSONL line needs a non-empty string field 'prompt'" in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "w1"\n')
    code, _, err = run_cli(["generate", "--prompts-file", str(broken), *model_flags(checkpoints)], capsys)
    assert code == 2 and f"{broken}:1: not valid JSON" in err
    code, _, err = run_cli(["generate", "--prompts-file", str(tmp_path / "missing.txt"), *model_flags(checkpoints)], capsys)
    assert code == 2 and "cannot read prompts file" in err


def test_prompt_from_stdin(checkpoints, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("w1 w2 w3"))
    code, out, _ = run_cli(["generate", "-", "--method", "ar", "--max-new-tokens", "3", "--json", *model_flags(checkpoints)], capsys)
    assert code == 0 and json.loads(out)["new_tokens"] == 3


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "w1", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
        (["generate", "w1", "--temperature", "-1"], "temperature must be >= 0"),
        (["generate", "w1", "--top-p", "2"], "top_p must be in (0, 1]"),
        (["generate", "w1", "--lenience", "0"], "lenience must be in (0, 1]"),
        (["generate", "w1", "--method", "nope"], "unknown method 'nope'"),
        (["generate", ""], "the prompt is empty"),
        (["generate"], "no prompt given"),
    ],
)
def test_bad_flags_fail_before_loading_models(args, message, capsys):
    # --target points nowhere: these errors must come before any model is loaded.
    code, _, err = run_cli([*args, "--target", "/nonexistent/model"], capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_missing_target_is_a_clear_error(capsys, tmp_path):
    code, _, err = run_cli(["generate", "w1", "--target", str(tmp_path)], capsys)
    assert code == 2 and "holds no config.json" in err


def _default_sigint() -> None:
    """In the child before exec: a suite run where SIGINT is ignored (nohup, a background job) must not
    pass the ignore on, or the child would never stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_prints_what_was_generated(tmp_path):
    """A real SIGINT to a real process: the text streamed so far stays, the exit code is 130."""
    long_context = tiny_model(seed=0, max_positions=1_000_000)  # so generation is still running at the signal
    long_context.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "DUOSPEC_CACHE": str(tmp_path / "cache")}  # leave the user's cache alone
    process = subprocess.Popen(
        [sys.executable, "-m", "duospec", "generate", "w1 w2 w3", "--method", "ar", "--max-new-tokens", "100000",
         "--no-chat", "--target", str(tmp_path), "--dtype", "float32"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint,
    )
    try:
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(process.stdout.read(8)), daemon=True)
        reader.start()
        reader.join(timeout=120)  # wait (with a deadline) until generation has streamed something
        assert first and first[0], "nothing streamed within 120 s"
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        rest, err = process.communicate(timeout=60)
        assert process.returncode == 130
        kept = re.search(r"interrupted; kept the (\d+) tokens generated so far", err)
        assert kept and int(kept.group(1)) >= 1 and "Traceback" not in err
        assert len(first[0] + rest) >= int(kept.group(1))  # every kept token was printed (at least a character each)
    finally:
        process.kill()  # a no-op once it has exited; never a child left generating 100,000 tokens
        process.wait(timeout=30)


def test_ctrl_c_with_json_prints_the_partial_object(tmp_path):
    """With --json nothing streams, so the partial answer must come out as the JSON object itself."""
    long_context = tiny_model(seed=0, max_positions=1_000_000)
    long_context.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "DUOSPEC_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [sys.executable, "-m", "duospec", "generate", "w1 w2 w3", "--method", "pld", "--max-new-tokens", "100000",
         "--no-chat", "--target", str(tmp_path), "--dtype", "float32", "--json", "--verbose"],  # --verbose: the cost line
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint,
    )
    try:
        err_chunks: list[str] = []
        reader = threading.Thread(target=lambda: err_chunks.extend(iter(lambda: process.stderr.read(1), "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        # The costs are measured (their line printed) right before generation starts: a signal before
        # that would interrupt the measurement, which has no answer to print yet.
        while "pass seconds by tokens per pass" not in "".join(err_chunks):
            assert time.monotonic() < deadline, "costs not measured within 120 s:\n" + "".join(err_chunks)
            assert process.poll() is None, "".join(err_chunks)
            time.sleep(0.1)
        time.sleep(1.0)  # generation is running (100000 tokens take minutes)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)  # --json streams nothing, so its pipe cannot fill meanwhile
        out = process.stdout.read()  # at EOF now: bounded
        reader.join(timeout=10)
        assert process.returncode == 130, "".join(err_chunks)
        result = json.loads(out.strip().splitlines()[-1])
        assert result["finish_reason"] == "interrupted" and result["method"] == "pld"
        assert result["new_tokens"] == len(result["token_ids"]) >= 1 and result["text"]
    finally:
        process.kill()
        process.wait(timeout=30)


def test_a_draft_with_another_vocabulary_is_refused_by_every_path(checkpoints, capsys, tmp_path):
    """The check runs where a draft is loaded: for our methods and for the transformers baseline's plain copy."""
    import duospec
    from duospec.config import DuospecError

    other = tmp_path / "other-draft"
    tiny_model(seed=3, vocab_size=48).save_pretrained(other)
    tiny_tokenizer(48).save_pretrained(other)
    target, _ = checkpoints
    code, _, err = run_cli(["generate", "w1 w2", "--method", "sd", "--target", str(target), "--draft", str(other), "--dtype", "float32"], capsys)
    assert code == 2 and "do not share a tokenizer" in err and "Traceback" not in err
    from duospec.bench.baseline_models import baseline_models

    pipe = duospec.load(str(target), str(other), dtype="float32", draft_quantization="int8")
    with pytest.raises(DuospecError, match="do not share a tokenizer"):
        baseline_models(pipe).plain_draft()


def test_backend_llama_cpp_without_llama_cpp_python_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what an environment without the package gives
    code, _, err = run_cli(["generate", "w1", "--backend", "llama.cpp"], capsys)
    assert code == 2 and "needs llama-cpp-python" in err and "pip install" in err and "Traceback" not in err


def test_plain_generate_prints_no_warnings(checkpoints, capsys):
    """transformers 5.24 deprecated `past_key_values`; its FutureWarning must not reach users (nor any other)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run_cli(["generate", "w1 w2", "--method", "sd", "--max-new-tokens", "6", "--backend", "transformers", *model_flags(checkpoints)], capsys)
    assert code == 0
    assert not [str(w.message) for w in caught], [str(w.message) for w in caught]
    assert "warn" not in err.lower(), err


@pytest.mark.parametrize("method", ["sd", "pld", "suffix", "auto"])
def test_verbose_explains_each_methods_choice_and_its_rounds(checkpoints, capsys, method):
    """--verbose says by which rule the method drafts, from which measured costs, and what each round
    drafted and emitted (issue 22: it explained nothing for sd and pld)."""
    code, _, err = run_cli(["generate", "w1 w2 w3", "--method", method, "--max-new-tokens", "8", "--verbose", *model_flags(checkpoints)], capsys)
    assert code == 0
    rule = {"sd": "duospec: sd: target pass", "pld": "duospec: pld: target pass", "suffix": "duospec: suffix: each round looks up", "auto": "duospec: auto: each round drafts"}[method]
    assert rule in err, err
    if method in ("sd", "pld"):  # the rule's verdict, in the measured terms it rests on
        assert re.search(r"target pass [\d.]+ s \(1 token\), [\d.]+x \(2\)", err) and ("best draft length is" in err or "drafts nothing" in err), err
    (trace,) = [line for line in err.splitlines() if line.startswith("duospec: rounds (drafted/emitted):")]
    rounds = [tuple(map(int, pair.split("/"))) for pair in trace.split(":", 2)[2].split()]
    assert sum(emitted for _, emitted in rounds) == 8 - 1  # every token after the prompt's pass came from a round
    assert all(emitted <= drafted + 1 for drafted, emitted in rounds)
