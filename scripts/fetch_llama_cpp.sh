#!/usr/bin/env bash
# Fetch llama.cpp's HF -> GGUF converter from the pinned llama-cpp-python sdist; idempotent.
#
#   scripts/fetch_llama_cpp.sh            # -> .cache/llama.cpp/llama.cpp/convert_hf_to_gguf.py
#
# The installed llama-cpp-python wheel holds the compiled library but not the converter. The
# sdist vendors the llama.cpp source it was built from, so converter and runtime match. We keep
# only what the converter imports: convert_hf_to_gguf.py, conversion/ (one module per model
# family) and gguf-py/ (the converter puts it first on sys.path; it is newer than the gguf
# 0.19.0 wheel despite the same version number, so it must be the one used).
# Needs PyPI (pip download); a second run does nothing. LLAMA_CPP_CACHE moves the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# The version pyproject.toml pins (one source): converter and compiled library come from the same sdist.
VERSION=$("$PY" -c 'import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(d.split("==")[1] for d in deps if d.startswith("llama-cpp-python==")))')
CACHE=${LLAMA_CPP_CACHE:-.cache/llama.cpp}
DEST=$CACHE/llama.cpp
STAMP=$DEST/.llama-cpp-python-$VERSION

if [ -f "$STAMP" ]; then
  echo "$DEST"
  exit 0
fi
mkdir -p "$CACHE"
# Parallel callers (pytest workers, dvc and a flow) wait for one fetch instead of racing.
if command -v flock >/dev/null; then
  exec 9>"$CACHE/.lock"
  flock 9
  if [ -f "$STAMP" ]; then echo "$DEST"; exit 0; fi
fi
SDIST=$CACHE/llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$SDIST" ]; then
  echo "fetch_llama_cpp: downloading the llama-cpp-python $VERSION sdist (~75 MB)" >&2
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE" >&2
fi
TMP=$(mktemp -d "$CACHE/extract.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
SRC=llama_cpp_python-$VERSION/vendor/llama.cpp
tar -xzf "$SDIST" -C "$TMP" "$SRC/convert_hf_to_gguf.py" "$SRC/conversion" "$SRC/gguf-py" "$SRC/LICENSE"
rm -rf "$DEST"
mv "$TMP/$SRC" "$DEST"
touch "$STAMP"
echo "$DEST"
