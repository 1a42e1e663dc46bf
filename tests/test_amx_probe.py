"""The crash-safe probe that decides whether llama.cpp's repacked (AMX) weights are used
(duospec/models/amx_probe.py): its decision table, real child processes that pass, crash, hang or
fail, the verdict kept per build and model, and a real probe of a tiny GGUF."""

from __future__ import annotations

import sys

import pytest

from duospec.models import amx_probe
from duospec.models.amx_probe import OK, Verdict, amx_path_applies, decide, run_probe

AMX_BUILD = "AVX2 = 1 | AMX_INT8 = 1 |"
PLAIN_BUILD = "AVX2 = 1 | AVX512 = 1 |"  # the README's build on AMD and Intel alike
AMX_CPU = "flags : avx2 amx_tile amx_int8"
NO_AMX_CPU = "flags : avx2 avx512f"


def test_the_amx_path_applies_only_to_an_amx_build_on_an_amx_cpu():
    assert amx_path_applies(AMX_BUILD, AMX_CPU)
    assert not amx_path_applies(AMX_BUILD, NO_AMX_CPU)
    assert not amx_path_applies(PLAIN_BUILD, AMX_CPU)
    assert not amx_path_applies(PLAIN_BUILD, NO_AMX_CPU)


def _no_probe() -> str:
    raise AssertionError("probed although the decision needed no probe")


@pytest.mark.parametrize(
    "applies, kept, probe_outcome, expected",
    [
        (False, None, None, Verdict(True, "not applicable", False)),  # AMD, or a build without AMX kernels
        (True, OK, None, Verdict(True, OK, False)),  # kept from an earlier run: no child
        (True, "crashed (SIGSEGV)", None, Verdict(False, "crashed (SIGSEGV)", False)),
        (True, None, OK, Verdict(True, OK, True)),  # a clang/GCC 13 build: AMX runs
        (True, None, "crashed (SIGSEGV)", Verdict(False, "crashed (SIGSEGV)", True)),  # a GCC 12 build
        (True, None, "hung (no answer in 180 s)", Verdict(False, "hung (no answer in 180 s)", True)),
        (True, None, "failed (exit 1: ImportError)", Verdict(False, "failed (exit 1: ImportError)", True)),
    ],
)
def test_decision_table(applies, kept, probe_outcome, expected):
    probe = _no_probe if probe_outcome is None else (lambda: probe_outcome)
    assert decide(applies, kept, probe) == expected


def test_a_child_that_exits_cleanly_is_ok():
    assert run_probe([sys.executable, "-c", "pass"]) == OK


def test_a_child_that_crashes_is_a_crash():
    assert run_probe([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"]) == "crashed (SIGSEGV)"


def test_a_child_that_hangs_is_killed_and_called_hung():
    assert run_probe([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1) == "hung (no answer in 1 s)"


def test_a_child_that_fails_says_why_in_one_line():
    outcome = run_probe([sys.executable, "-c", "raise ImportError('a foreign llama.cpp build')"])
    assert outcome.startswith("failed (exit 1") and "a foreign llama.cpp build" in outcome and "\n" not in outcome


def test_the_verdict_is_kept_per_build_and_model(tmp_path, monkeypatch, capsys):
    """A crashing probe on an AMX CPU: plain weights and one message; the next load reads the kept
    verdict and probes no more. Another model file is probed on its own."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import llama_cpp

    monkeypatch.setattr(amx_probe, "verdict_file", lambda: tmp_path / "cache" / "llama-amx-probe.json")
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: AMX_BUILD.encode())
    monkeypatch.setattr(amx_probe.Path, "read_text", lambda self, *a, **k: AMX_CPU if str(self) == "/proc/cpuinfo" else _read(self))
    calls = []
    monkeypatch.setattr(amx_probe, "run_probe", lambda command: calls.append(command) or "crashed (SIGSEGV)")
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    assert amx_probe.repack_allowed(llama_cpp, model) is False
    err = capsys.readouterr().err
    assert err.count("crashed (SIGSEGV)") == 1 and "plain weights" in err
    assert amx_probe.repack_allowed(llama_cpp, model) is False
    assert len(calls) == 1  # kept: no second child
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + bytes(61))
    monkeypatch.setattr(amx_probe, "run_probe", lambda command: calls.append(command) or OK)
    assert amx_probe.repack_allowed(llama_cpp, other) is True
    assert len(calls) == 2


def _read(path):
    with open(path) as handle:
        return handle.read()


def test_no_probe_on_a_cpu_without_amx(tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: AMX_BUILD.encode())
    monkeypatch.setattr(amx_probe.Path, "read_text", lambda self, *a, **k: NO_AMX_CPU if str(self) == "/proc/cpuinfo" else _read(self))
    monkeypatch.setattr(amx_probe, "run_probe", lambda command: pytest.fail("probed on a CPU without AMX"))
    assert amx_probe.repack_allowed(llama_cpp, tmp_path / "model.gguf") is True


def test_the_real_probe_child_decodes_a_tiny_gguf(tmp_path):
    """The child itself, on this machine's build: load with repacked weights, decode, exit 0."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from tiny_gguf import write_gguf
    from tiny_models import tiny_model

    path = write_gguf(tiny_model(0), tmp_path / "tiny.gguf")
    assert run_probe(amx_probe.probe_command(path), timeout=120) == OK
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(path.read_bytes()[:200])
    outcome = run_probe(amx_probe.probe_command(broken), timeout=120)
    assert outcome.startswith("failed (exit 3"), outcome
