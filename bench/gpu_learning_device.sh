#!/usr/bin/env bash
# Runs on the GPU machine (through the device tool), from the repository root:
#   bash bench/gpu_learning_device.sh TIMEOUT_S "LEARNING_ARGS" ["LEARNING_ARGS" ...]
# e.g. bash bench/gpu_learning_device.sh 540 "--preset learn-gpu --seeds 0 1 2 --parallel 3"
# Installs the carried wheels (bench/gpu_env.sh; carry .whl/house .whl/bench .whl/learn), runs
# bench/learning.py once per argument string, all at once, each under TIMEOUT_S, and packs the
# JSON, PNG and log of each into $OUT/learning_gpu.tgz (job1.*, job2.*, ...).
set -u
source bench/gpu_env.sh
limit=$1
shift
rm -rf /tmp/learn_out && mkdir -p /tmp/learn_out
i=0
for job in "$@"; do
  i=$((i + 1))
  echo "job$i: $job" | tee -a /tmp/learn_out/jobs.txt
  timeout "$limit" python3 bench/learning.py $job --out "/tmp/learn_out/job$i.json" > "/tmp/learn_out/job$i.log" 2>&1 &
done
wait
for log in /tmp/learn_out/job*.log; do echo "== $log"; grep -E "^seed|^\||median|Error|Traceback|failed" "$log" | tail -14; done
tar czf "$OUT/learning_gpu.tgz" -C /tmp/learn_out .
