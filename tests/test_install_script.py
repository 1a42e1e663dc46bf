"""scripts/install.sh picks llama.cpp's build by the CPU: clang with the AMX kernels on AMX CPUs,
GCC without them elsewhere. Run dry (DUOSPEC_INSTALL_DRY_RUN prints the commands) with the CPU flags
read from a file of the test's own."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install.sh"


def dry_run(tmp_path: Path, flags: str) -> list[str]:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
    env = {**os.environ, "DUOSPEC_INSTALL_DRY_RUN": "1", "DUOSPEC_CPUINFO": str(cpuinfo)}
    completed = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120, check=True)
    return completed.stdout.splitlines()


def test_a_cpu_without_amx_builds_as_before(tmp_path):
    commands = dry_run(tmp_path, "fpu sse avx2 fma")
    assert commands[0] == "pip install torch==2.13.0"
    assert len(commands) == 2 and "-mno-amx-tile" in commands[1] and 'pip install -e .[models,llamacpp]' in commands[1]


def test_the_script_pins_the_llama_cpp_python_of_pyproject():
    pin = next(line for line in SCRIPT.read_text().splitlines() if line.startswith("LLAMA_CPP_PYTHON="))
    assert pin.split('"')[1] in (SCRIPT.parents[1] / "pyproject.toml").read_text()


def test_an_amx_cpu_builds_the_amx_kernels_with_clang(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

    if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
        pytest.skip("this machine's llama-cpp-python already has the AMX kernels: the script keeps it")
    if os.geteuid() != 0 and not any(Path(d, f"clang-{v}").exists() for d in os.environ["PATH"].split(":") for v in (15, 16, 17, 18)):
        pytest.skip("neither root (to install clang-16) nor a clang >= 15 here")
    commands = dry_run(tmp_path, "fpu sse avx2 amx_bf16 amx_tile amx_int8")
    amx_build = [line for line in commands if "--force-reinstall" in line]
    assert len(amx_build) == 1 and "CC=" in amx_build[0] and "clang" in amx_build[0] and "-mno-amx" not in amx_build[0]
    assert "llama-cpp-python==0.3.36" in amx_build[0]
    assert commands.index(amx_build[0]) < len(commands) - 1  # before the package itself, which then reuses it
