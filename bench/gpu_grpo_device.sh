#!/usr/bin/env bash
# Runs on the GPU machine (through the device tool), from the repository root:
#   bash bench/gpu_grpo_device.sh BACKEND:LENGTH:PROMPTS:STEPS:TIMEOUT_S[:FLAG+FLAG...] ...
# e.g. unsloth:512:1:8:250:--import-unsloth-first+--kl-variant=batched
# Installs the carried wheels and records the machine (bench/gpu_env.sh), then runs
# bench/gpu_grpo.py once per spec, each under its own time limit. Results and logs go to $OUT.
set -u
source bench/gpu_env.sh
for spec in "$@"; do
  IFS=: read -r backend length prompts steps limit extra <<< "$spec"
  extra="${extra//+/ }"
  tag="$(echo "$extra" | sed -e 's/--//g' -e 's/[ =]/_/g')"
  name="${backend}_${length}_p${prompts}${tag:+_$tag}"
  start=$(date +%s)
  timeout "$limit" python3 bench/gpu_grpo.py --backend "$backend" --completion-length "$length" \
      --prompts-per-step "$prompts" --steps "$steps" ${extra:+$extra} --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name rc=$rc in $(( $(date +%s) - start )) s"
  grep -E "Error|error:|Traceback|Unsloth|step_seconds_median|generate_only|cuda_peak" "$OUT/$name.log" | grep -v "^  0%" | tail -25
done
