#!/usr/bin/env bash
# The GPU test tier: on a CUDA machine, from the repository root,
#   bash tests/gpu/run.sh                 # installs the carried wheels (bench/gpu_env.sh), runs pytest -m gpu
# The H200 behind docs/benchmarks.md had no network: carry .whl/house .whl/bench .whl/learn and the
# vLLM parts (../shared/tools/gpu-vllm-wheelhouse.sh), as bench/gpu_env.sh says. On a machine with
# the `gpu` extra installed, `python -m pytest -m gpu tests/gpu` is the same run.
# The test files run in parallel processes (pytest-xdist, one file per worker): each vLLM engine
# takes a small share of the GPU, and a process never hosts two engines.
set -u
source bench/gpu_env.sh
python3 -m pytest -m gpu tests/gpu -n 4 --dist loadfile -p no:cacheprovider -v -rA \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | grep -vE "it/s\]|s/it\]"
exit "${PIPESTATUS[0]}"
