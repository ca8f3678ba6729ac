#!/usr/bin/env bash
# Create or update the project virtualenv (.venv) with the CPU stack; idempotent.
# Re-runs install nothing unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.installed-$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
echo "install: creating/updating .venv (first time: a few minutes; llama-cpp-python compiles ~5 min)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned to the CPU build, so nothing later pulls the CUDA wheels.
python -m pip install -q "torch==2.13.0"
# Portable llama.cpp build (no -march=native): the wheel pip caches runs on any x86-64 CPU. Without the
# multimodal library (LLAVA_BUILD, unused here) it compiles in 367 s instead of 450 s on 2 cores.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}"
python -m pip install -q "torch==2.13.0" -e ".[dev]"
python -m pip check
rm -f .venv/.installed-*
touch "$stamp"
echo "install: done"
