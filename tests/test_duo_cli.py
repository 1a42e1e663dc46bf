"""`duospec generate --method duo` as a user runs it: same tokens as `ar`, a foreign draft refused, and
no draft process left behind after Ctrl-C or after the main process is killed outright.

Every subprocess here has a deadline, is killed in a `finally`, and starts with SIGINT at its default
disposition (a suite run from a background job inherits "ignore SIGINT", and the child would then
never stop).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from duospec.cli import main
from tiny_models import perturbed, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 240


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("duo-models")
    target = tiny_model(seed=0, max_positions=1_000_000)
    for name, model in (("target", target), ("draft", perturbed(target, noise=0.05, seed=7))):
        model.save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    return root / "target", root / "draft"


def _json_run(args: list[str], capsys) -> dict:
    assert main(args) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_duo_cli_equals_ar_and_verbose_explains_the_budget(checkpoints, capsys):
    target, draft = checkpoints
    flags = ["--target", str(target), "--draft", str(draft), "--dtype", "float32", "--no-chat", "--max-new-tokens", "24", "--json"]
    reference = _json_run(["generate", "w1 w2 w3", "--method", "ar", *flags], capsys)
    assert main(["generate", "w1 w2 w3", "--method", "duo", "--verbose", *flags]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["token_ids"] == reference["token_ids"] and result["method"] == "duo"
    assert "duo thread split" in captured.err and "chosen:" in captured.err and "duo budget" in captured.err


def test_duo_refuses_a_draft_with_another_vocabulary(checkpoints, capsys, tmp_path):
    other = tmp_path / "other-draft"
    tiny_model(seed=3, vocab_size=48).save_pretrained(other)
    tiny_tokenizer(48).save_pretrained(other)
    target, _ = checkpoints
    code = main(["generate", "w1 w2", "--method", "duo", "--target", str(target), "--draft", str(other), "--dtype", "float32"])
    err = capsys.readouterr().err
    assert code == 2 and "do not share a tokenizer" in err and "Traceback" not in err


def _children_of(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def _running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may be slow to reap an orphan)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for this module's subprocesses: the thread split is measured by the first only."""
    return tmp_path_factory.mktemp("duo-cache")


def _start_long_duo(checkpoints, cache: Path) -> subprocess.Popen:
    target, draft = checkpoints
    env = {**os.environ, "PYTHONPATH": str(REPO), "DUOSPEC_CACHE": str(cache)}
    return subprocess.Popen(
        [sys.executable, "-m", "duospec", "generate", "w1 w2 w3", "--method", "duo", "--max-new-tokens", "100000",
         "--no-chat", "--target", str(target), "--draft", str(draft), "--dtype", "float32"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_generation(process: subprocess.Popen) -> list[int]:
    """Block until text streams (split measured, draft process running); return the draft's pid(s)."""
    os.set_blocking(process.stdout.fileno(), False)
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        if process.stdout.read(1):
            children = [pid for pid in _children_of(process.pid) if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
            if children:
                return children
        time.sleep(0.2)
    raise AssertionError("generation did not start before the deadline")


def _assert_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 15
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in pids if _running(pid)], "a draft process survived"


def test_ctrl_c_stops_duo_and_its_draft_process(checkpoints, cache_dir):
    process = _start_long_duo(checkpoints, cache_dir)
    try:
        drafts = _wait_for_generation(process)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        err = process.stderr.read()
        assert process.returncode == 130 and "interrupted; kept the" in err and "Traceback" not in err
        _assert_gone(drafts)
    finally:
        process.kill()
        process.wait(timeout=30)


def test_killing_the_main_process_takes_the_draft_process_with_it(checkpoints, cache_dir):
    process = _start_long_duo(checkpoints, cache_dir)
    try:
        drafts = _wait_for_generation(process)
        process.kill()  # SIGKILL: no cleanup code runs in the main process
        process.wait(timeout=30)
        _assert_gone(drafts)
    finally:
        process.kill()
        process.wait(timeout=30)
