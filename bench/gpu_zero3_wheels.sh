#!/usr/bin/env bash
# DeepSpeed for the ZeRO-3 memory layout (bench/gpu_scaling.py run memory-zero3): the GPU image has no
# deepspeed and PyPI ships it as source only. Built here as a pure-Python wheel (DS_BUILD_OPS=0: its CUDA
# ops compile just in time on the GPU machine, which has nvcc and ninja), plus hjson, the one
# requirement the image lacks. Run here, from the project root (needs PyPI):
#   bash bench/gpu_zero3_wheels.sh        # -> .whl/zero3/ (about 2.2 MiB); carry .whl/zero3 with the call
# Kept apart from .whl/bench: with deepspeed importable, transformers and TRL take other code paths.
set -euo pipefail
mkdir -p .whl/zero3
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl/zero3 deepspeed==0.19.8
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl/zero3 .whl/zero3/deepspeed-0.19.8.tar.gz
rm .whl/zero3/deepspeed-0.19.8.tar.gz
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl/zero3 hjson==3.1.0
ls .whl/zero3
