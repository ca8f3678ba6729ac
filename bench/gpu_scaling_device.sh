#!/usr/bin/env bash
# Runs on a GPU machine with several GPUs (through the device tool), from the repository root:
#   bash bench/gpu_scaling_device.sh GPUS LAYOUT [LAYOUT...]
# e.g. bash bench/gpu_scaling_device.sh 2 one-gpu ddp-colocate server memory-ddp memory-fsdp2
# Installs the carried wheels and records the machine (bench/gpu_env.sh), then runs
# bench/gpu_scaling.py once per layout, each under a 540 s limit (the device tool allows 10 minutes
# per command: run the layouts in separate calls when they do not fit together; on 2x H200 with 6
# steps they took 117-173 s each). Results, stage logs and the tables go to $OUT.
set -u
source bench/gpu_env.sh
gpus=$1; shift
for layout in "$@"; do
  start=$(date +%s)
  timeout 540 python3 bench/gpu_scaling.py run "$layout" --gpus "$gpus" --out-dir "$OUT" > "$OUT/$layout.log" 2>&1
  echo "== $layout rc=$? in $(( $(date +%s) - start )) s"
  cp "/tmp/bench_scaling/$layout/stage.log" "$OUT/$layout.stage.log" 2>/dev/null
  grep -E "Error|error:|Traceback|step_seconds_median|generated_tokens_per_s_median|peak_allocated" "$OUT/$layout.log" | tail -15
done
python3 bench/gpu_scaling.py table --out-dir "$OUT" | tee "$OUT/scaling_table.md"
