#!/usr/bin/env bash
# Runs on the GPU machine (through the device tool), from the repository root:
#   bash bench/gpu_long_context_device.sh BACKEND:TIMEOUT_S:LENGTH,LENGTH,...[:FLAG+FLAG] ...
# e.g. unsloth:420:4096,8192,16384 trl:420:4096,8192,16384
# Installs the carried wheels (bench/gpu_env.sh), then runs bench/gpu_long_context.py once per
# spec under its own time limit. Results and logs go to $OUT.
set -u
source bench/gpu_env.sh
for spec in "$@"; do
  IFS=: read -r backend limit lengths extra <<< "$spec"
  extra="${extra//+/ }"
  tag="$(echo "$extra" | sed -e 's/--//g' -e 's/[ =]/_/g')"
  name="long_${backend}${tag:+_$tag}"
  start=$(date +%s)
  timeout "$limit" python3 bench/gpu_long_context.py --backend "$backend" --lengths ${lengths//,/ } ${extra:+$extra} \
      --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? in $(( $(date +%s) - start )) s"
  grep -E "^length|Error|Traceback|OUT OF MEMORY" "$OUT/$name.log" | cut -c1-400 | tail -12
done
