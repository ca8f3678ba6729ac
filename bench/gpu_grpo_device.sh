#!/usr/bin/env bash
# Runs on the GPU machine (through the device tool), from the repository root:
#   bash bench/gpu_grpo_device.sh BACKEND:LENGTH:PROMPTS:STEPS:TIMEOUT_S[:FLAG+FLAG...] ...
# e.g. unsloth:512:1:8:250:--import-unsloth-first+--kl-variant=batched
# Installs the carried wheels (.whl/house from shared/tools/gpu-wheelhouse.sh with
# TRL_VERSION=1.14.2, .whl/bench: pydantic and mlflow-skinny, which the stage imports and the
# image lacks), records the machine, then runs bench/gpu_grpo.py once per spec, each under
# its own time limit. Results and logs go to $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/house/*.whl .whl/bench/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       UNSLOTH_DISABLE_STATISTICS=1 UNSLOTH_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
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
