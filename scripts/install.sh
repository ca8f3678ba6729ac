#!/usr/bin/env bash
# Create or update the project virtualenv (.venv) with the CPU stack; idempotent.
# Re-runs install nothing unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.installed-$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
echo "install: creating/updating .venv (the first time about 7 minutes on 2 cores: llama-cpp-python compiles meanwhile)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# llama-cpp-python is published only as source: its wheel is built in the background (a few minutes
# the first time, instant from pip's cache after) while everything else installs, then installed from
# that wheel. Portable build (no -march=native): the wheel pip caches runs on any x86-64 CPU. Without the
# multimodal library (LLAVA_BUILD, unused here) it compiles in 367 s instead of 450 s on 2 cores.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}"
mkdir -p .cache/wheels
# The requirements from pyproject.toml (one source for the pins): llama-cpp-python's, and all the others.
mapfile -t reqs < <(python - <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
wanted = project["dependencies"] + extras["dev"] + extras["team"]
llama = [r for r in wanted if r.startswith("llama-cpp-python")]
print(llama[0])
print("\n".join(r for r in wanted if r not in llama and not r.startswith(project["name"])))
PY
)
python -m pip wheel -q --no-deps --wheel-dir .cache/wheels "${reqs[0]}" > .cache/llama-cpp-python-build.log 2>&1 &
llama_build=$!
# The gguf stage's converter comes from the same sdist (scripts/fetch_llama_cpp.sh): fetched meanwhile too.
bash scripts/fetch_llama_cpp.sh > .cache/llama-cpp-converter-fetch.log 2>&1 &
converter_fetch=$!
# torch first, pinned to the CPU build, so nothing later pulls the CUDA wheels.
python -m pip install -q "torch==2.13.0"
python -m pip install -q "torch==2.13.0" "${reqs[@]:1}"
if ! wait "$llama_build"; then
  echo "install: building ${reqs[0]} failed; its log: .cache/llama-cpp-python-build.log" >&2
  tail -20 .cache/llama-cpp-python-build.log >&2
  exit 1
fi
if ! wait "$converter_fetch"; then  # not fatal: the gguf stage fetches it again when it runs
  echo "install: could not fetch llama.cpp's converter yet (the gguf stage will retry); its log: .cache/llama-cpp-converter-fetch.log" >&2
fi
python -m pip install -q --find-links .cache/wheels "torch==2.13.0" -e ".[dev]"
python -m pip check
rm -f .venv/.installed-*
touch "$stamp"
echo "install: done"
