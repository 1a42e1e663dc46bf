"""Whether llama.cpp may use its repacked (AMX) weights on this CPU: one decode in a child process decides.

llama.cpp's AMX matmul kernels make 8-32-token passes about 1.5x cheaper on Intel Xeons with AMX, but
built by GCC 11/12 they crash in the first decode (llama.cpp issue 20824, a miscompile; built with
clang >= 15 or GCC >= 13 they run). Nothing in a build says which compiler made it, and a crash is
the one failure a user cannot recover from. So the first time a build with AMX kernels meets a CPU
that has AMX, a child process loads the model with repacked weights and decodes a batch and a token.
Its exit decides: clean -> repacked weights; a crash, a hang or any other failure -> plain weights,
with one message. The verdict is kept on disk per (llama.cpp build, model file), so later runs pay
nothing. Builds without AMX kernels, and CPUs without AMX, never probe.

    decide(applies=True, kept=None, probe=lambda: "crashed (signal 11)")
    -> Verdict(repack=False, outcome="crashed (signal 11)", probed=True)
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PROBE_TIMEOUT_SECONDS = float(os.environ.get("DUOSPEC_AMX_PROBE_TIMEOUT", "180"))
OK = "ok"


@dataclass(frozen=True)
class Verdict:
    repack: bool  # whether llama.cpp's repacked weight layouts (its AMX path included) may be used
    outcome: str  # "ok", "crashed (signal N)", "hung (...)", "failed (...)", or "not applicable"
    probed: bool  # whether a child process ran now (False: not needed, or a kept verdict)


def amx_path_applies(system_info: str, cpu_flags: str) -> bool:
    """Whether this build has AMX kernels (llama_print_system_info) and the CPU runs them (/proc/cpuinfo)."""
    return "AMX_INT8 = 1" in system_info and "amx_int8" in cpu_flags


def decide(applies: bool, kept: str | None, probe: Callable[[], str]) -> Verdict:
    """The decision table: no AMX path -> repack; a kept verdict -> as kept; else probe now."""
    if not applies:
        return Verdict(True, "not applicable", False)
    if kept is not None:
        return Verdict(kept == OK, kept, False)
    outcome = probe()
    return Verdict(outcome == OK, outcome, True)


def run_probe(command: list[str], timeout: float = PROBE_TIMEOUT_SECONDS) -> str:
    """Run a probe child; "ok" when it exits 0, else what went wrong, in a few words."""
    try:
        completed = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"hung (no answer in {timeout:.0f} s)"
    except OSError as error:
        return f"failed ({error.strerror})"
    if completed.returncode == 0:
        return OK
    if completed.returncode < 0:
        try:
            name = signal.Signals(-completed.returncode).name
        except ValueError:
            name = f"signal {-completed.returncode}"
        return f"crashed ({name})"
    last_line = (completed.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or [""]
    return f"failed (exit {completed.returncode}{': ' + last_line[0][:200] if last_line[0] else ''})"


def probe_command(model_path: Path) -> list[str]:
    """The child runs as a plain script: it imports llama_cpp alone, not duospec (a second faster)."""
    return [sys.executable, str(Path(__file__).with_name("amx_probe_child.py")), str(model_path)]


def build_identity(llama_cpp) -> str:
    """What the verdict depends on in the build: its shared libraries' names, sizes and times."""
    library_dir = Path(llama_cpp.__file__).parent / "lib"
    files = sorted(library_dir.glob("*.so*")) if library_dir.is_dir() else []
    described = [f"{path.name}:{path.stat().st_size}:{int(path.stat().st_mtime)}" for path in files]
    return hashlib.sha256("|".join(described or [getattr(llama_cpp, "__version__", "?")]).encode()).hexdigest()[:16]


def verdict_file() -> Path:
    from duospec.budget.kept import profiles_dir

    return profiles_dir() / "llama-amx-probe.json"


def repack_allowed(llama_cpp, model_path: Path, notify: Callable[[str], None] | None = None) -> bool:
    """Whether this model may load with repacked weights under this build (probing once if needed)."""
    system = llama_cpp.llama_print_system_info().decode(errors="replace")
    try:
        cpu_flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpu_flags = ""
    applies = amx_path_applies(system, cpu_flags)
    if not applies:
        return True
    stat = model_path.stat()
    key = f"{build_identity(llama_cpp)}:{model_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    kept = _read_verdicts()
    say = notify or (lambda message: print(f"duospec: {message}", file=sys.stderr))

    def probe() -> str:
        say("this llama.cpp build has AMX kernels: checking once, in a child process, that they run on this CPU")
        return run_probe(probe_command(model_path))

    verdict = decide(applies, kept.get(key), probe)
    if verdict.probed:
        _keep_verdict(key, verdict.outcome)
    if not verdict.repack and verdict.probed:
        say(
            f"llama.cpp's AMX kernels {verdict.outcome} on this CPU (llama.cpp issue 20824: GCC 11/12 miscompile them); "
            "running with plain weights. Rebuild llama-cpp-python with clang >= 15 (scripts/install.sh) for their speed."
        )
    return verdict.repack


def _read_verdicts() -> dict[str, str]:
    try:
        data = json.loads(verdict_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _keep_verdict(key: str, outcome: str) -> None:
    path = verdict_file()
    verdicts = _read_verdicts()
    verdicts[key] = outcome
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(verdicts, indent=1))
        temporary.replace(path)
    except OSError:
        pass  # a read-only cache: the probe runs again next time, nothing else changes
