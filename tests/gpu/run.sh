#!/usr/bin/env bash
# The GPU test tier: on a CUDA machine, from the repository root,
#   bash tests/gpu/run.sh                 # installs the carried wheels (bench/gpu_env.sh), runs pytest -m gpu
#   GPU_TEST_FILES="tests/gpu/test_grpo_vllm_trl.py" bash tests/gpu/run.sh   # some files only
# The H200 behind docs/benchmarks.md had no network: carry .whl/house .whl/bench .whl/learn and the
# vLLM parts (../shared/tools/gpu-vllm-wheelhouse.sh), as bench/gpu_env.sh says. On a machine with
# the `gpu` extra installed, the loop below is the same run.
# One test file at a time, each in its own process: a process hosts one vLLM engine, and vLLM sizes
# its KV cache from the GPU memory in use while it starts, other processes' included (with the files
# in parallel, on 2026-11-30, the evaluation test's engine counted 20 GiB of others' memory as its own).
set -u
source bench/gpu_env.sh
logs=runs/gpu_tests  # each file's log and junit XML; packed into $OUT/gpu_tests.tgz after every file
mkdir -p "$logs"
rc=0
for f in ${GPU_TEST_FILES:-tests/gpu/test_*.py}; do
  name=$(basename "$f" .py)
  python3 -m pytest -m gpu "$f" -p no:cacheprovider -v -rA --junitxml="$logs/$name.xml" \
      > "$logs/$name.log" 2>&1
  status=$?
  grep -E "^(PASSED|FAILED|ERROR) |^=+ .*(passed|failed|error).* =+$" "$logs/$name.log"
  [ $status -eq 0 ] || { rc=1; grep -E "^E " "$logs/$name.log" | head -15; }
  tar -czf "$OUT/gpu_tests.tgz" -C runs gpu_tests
done
exit $rc
