#!/usr/bin/env bash
# The longest completion that one real GRPO step of the stage fits on this GPU (issue 11): Unsloth +
# vLLM fast_inference, Qwen3-1.7B shapes, LoRA r32, 1 prompt x 8 generations (eos's logit is zeroed, but
# with grpo.min_p off it is sampled now and then: 30,954 of 32,768 tokens on average, session 8), with
# Unsloth Standby on or off. Runs on the GPU machine (device tool), from the repository root:
#   bash bench/gpu_longest_completion_device.sh on|off GPU_MEMORY_UTILIZATION SECONDS L1 L2 ...
# Tries L1 < L2 < ... one process each (bench/gpu_grpo.py, one step), stopping at the first length
# that fails or when the SECONDS budget for all tries runs out; a try cut by the budget is neither fit
# nor failure (its log says how far it got). Logs and JSON come back in $OUT/runs.tgz
# (bench/gpu_runs_device.sh). Generation is real, so a try costs 5-6 ms per completion token position
# on an H200 (4.9 at 16K, 6.3 at 32K) plus about 90 s of engine start and compiles; bench/gpu_long_context.py measures the training side
# alone at longer lengths in one process.
set -u
mode=$1 util=$2 budget=$3
shift 3
case "$mode" in on) sleep_mode=true ;; off) sleep_mode=false ;; *) echo "mode must be on or off"; exit 2 ;; esac
end=$(( $(date +%s) + budget ))
for length in "$@"; do
  left=$(( end - $(date +%s) ))
  if [ "$left" -lt 90 ]; then echo "== standby $mode: ${left} s left, $length not tried"; break; fi
  name="S_${mode}_${length}"
  bash bench/gpu_runs_device.sh "$name|$left|python3 bench/gpu_grpo.py --backend unsloth --generation vllm \
--prompts-per-step 1 --steps 1 --warmup 0 --completion-length $length --no-monitor-kl --work-dir /tmp/bench_grpo/standby_$mode --set grpo.min_p=null \
--set grpo.vllm_enable_sleep_mode=$sleep_mode --set model.gpu_memory_utilization=$util --out runs/$name.json"
  if [ -f "runs/$name.json" ]; then echo "== standby $mode: $length fits"; else echo "== standby $mode: $length did not finish"; break; fi
done
