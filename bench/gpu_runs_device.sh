#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root:
#   bash bench/gpu_runs_device.sh 'NAME|SECONDS|COMMAND' ...
# Installs the carried wheels (bench/gpu_env.sh), then runs each COMMAND under its own time limit
# (SIGABRT at the limit: with PYTHONFAULTHANDLER set, Python prints every thread's stack first, so
# a hang shows where it is). Each run's output goes to runs/NAME.log; JSON results a command writes
# under runs/ come back too: everything is packed into $OUT/runs.tgz (the device tool returns at
# most 8 files), after every run. A summary line per run, and the log's last lines on failure, go to stdout.
set -u
source bench/gpu_env.sh
export PYTHONFAULTHANDLER=1
mkdir -p runs
for spec in "$@"; do
  IFS='|' read -r name limit cmd <<< "$spec"
  start=$(date +%s)
  timeout -s ABRT -k 20 "$limit" bash -c "$cmd" > "runs/$name.log" 2>&1
  rc=$?
  echo "== $name rc=$rc in $(( $(date +%s) - start )) s"
  [ $rc -eq 0 ] || grep -v "^\s*$" "runs/$name.log" | grep -v "it/s\]\|s/it\]" | tail -40
  grep -hE '"(step_seconds_median|generated_tokens_per_s|generate_only_tokens_per_s|peak_allocated_gib|allocated)"' "runs/$name.log" | head -6
  tar -czf "$OUT/runs.tgz" runs  # after every run: a call cut at its limit still returns what ran
done
