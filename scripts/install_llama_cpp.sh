#!/usr/bin/env bash
# Installs llama-cpp-python (ember's fast backend for GGUF chat models) into a virtualenv,
# built from source with flags chosen from this CPU.
#
#   bash scripts/install_llama_cpp.sh [VENV]      (default .venv)
#
# It never fails its caller: without llama.cpp ember serves chat on transformers, so a failed
# build prints one line naming its log and exits 0. Already installed at this version: it
# prints nothing. LLAMA_CPP_VERSION overrides the version; CMAKE_ARGS adds to the flags.
set -u

venv=${1:-.venv}
version=${LLAMA_CPP_VERSION:-0.3.36}
python="$venv/bin/python"
log="$venv/llama-cpp-build.log"

if [ ! -x "$python" ]; then
    echo "no Python at $python: llama-cpp-python not installed; ember will serve chat on transformers (slower)"
    exit 0
fi

installed() {
    "$python" - "$version" >/dev/null 2>&1 <<'EOF'
import sys

import llama_cpp

sys.exit(llama_cpp.__version__ != sys.argv[1])
EOF
}

if installed; then
    exit 0
fi

# Does the C and C++ compiler take these flags?
compiler_accepts() {
    local compiler
    for compiler in "${CC:-cc}" "${CXX:-c++}"; do
        "$compiler" "$@" -fsyntax-only -x c /dev/null >/dev/null 2>&1 || return 1
    done
}

cmake_args="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# Native code, but no AMX: on Xeons with AMX a native build segfaults in its first decode
# (llama.cpp#20824), and a wheel built here may be copied to one.
if [ "$(uname -m)" = x86_64 ] && compiler_accepts $no_amx; then
    cmake_args="$cmake_args -DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'"
fi
cmake_args="$cmake_args ${CMAKE_ARGS:-}"
cores=$(nproc 2>/dev/null || echo 2)

cached=$("$python" -m pip cache list "llama_cpp_python-$version-*" 2>/dev/null | grep -c '\.whl')
if [ "${cached:-0}" -eq 0 ]; then
    echo "llama-cpp-python has no binary wheel for this platform: building it from source once" \
         "(about 8-25 minutes on 2 cores; this machine has $cores); pip caches the wheel," \
         "later installs are instant"
fi

{
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S') llama-cpp-python==$version, CMAKE_ARGS=$cmake_args"
    # Its own dependencies (numpy comes with ember); --no-deps below keeps pip from
    # touching anything else in the venv.
    "$python" -m pip install diskcache jinja2 typing-extensions &&
        CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$cores" \
            "$python" -m pip install --no-deps --force-reinstall "llama-cpp-python==$version"
} >"$log" 2>&1

if ! installed; then
    echo "llama-cpp-python did not build; ember will serve chat on transformers (slower). Log: $log"
fi
exit 0
