# Sourced on the GPU machine (device tool) by the bench/*_device.sh scripts and tests/gpu/run.sh,
# from the repository root. Installs the carried wheels and records the machine in $OUT:
#   .whl/house  ../shared/tools/gpu-wheelhouse.sh with TRL_VERSION=1.14.2 (Unsloth + TRL)
#   .whl/bench  bench/gpu_bench_wheels.sh (what the stages import that the GPU image lacks)
#   .whl/learn  bench/gpu_learn_wheels.sh, when carried (lm-eval, MLflow's SQLite store)
#   .whl/zero3  bench/gpu_zero3_wheels.sh, when carried: DeepSpeed into /tmp/zero3, which only
#               bench/gpu_scaling.py's memory-zero3 layout puts on its PYTHONPATH
#   vLLM 0.26.0 from ../shared/tools/gpu-vllm-wheelhouse.sh, when its parts were copied to
#   /tmp/parts by earlier runs on the same machine (its header says how): joined and installed once
#   into /tmp/vsite. vLLM's pins win: a package it brings is not installed again from the folders
#   above (two versions of one package break imports).
vsite=/tmp/vsite
if [ ! -d "$vsite/vllm" ] && ls /tmp/parts/part.* >/dev/null 2>&1; then
  # The wheelhouse comes in six parts (part.00-part.05), one per call; a call that started a fresh machine
  # (a failed or idle-released one) leaves the earlier parts behind on the old one.
  missing=$(for k in 00 01 02 03 04 05; do [ -f /tmp/parts/part.$k ] || printf 'part.%s ' $k; done)
  [ -z "$missing" ] || { echo "vLLM wheel parts missing on this machine: $missing- the part calls reached another" \
      "machine; send all six again, back to back"; exit 1; }
  mkdir -p /tmp/vwh && cat /tmp/parts/part.* | tar -x -C /tmp/vwh \
    && python3 -m pip install -q --no-index --no-deps --no-compile --target "$vsite" /tmp/vwh/*.whl || exit 1
fi
norm() { basename "$1" | cut -d- -f1 | tr 'A-Z-' 'a-z_'; }
have=" "
[ -d /tmp/vwh ] && for w in /tmp/vwh/*.whl; do have+="$(norm "$w") "; done
wheels=()
for w in .whl/house/*.whl .whl/bench/*.whl .whl/learn/*.whl; do
  [ -f "$w" ] || continue
  case "$have" in *" $(norm "$w") "*) continue ;; esac
  wheels+=("$w")
done
[ -d /tmp/site/trl ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}" || exit 1
if ls .whl/zero3/*.whl >/dev/null 2>&1 && [ ! -d /tmp/zero3/deepspeed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/zero3 .whl/zero3/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$vsite PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       UNSLOTH_DISABLE_STATISTICS=1 UNSLOTH_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false \
       VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PATH=/tmp/site/bin:$vsite/bin:$PATH
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 - <<'PY'
from importlib.metadata import version, PackageNotFoundError
for name in ("vllm", "unsloth", "unsloth_zoo", "trl", "transformers", "peft", "accelerate", "datasets", "lm_eval",
             "bitsandbytes", "triton", "flashinfer-python"):
    try:
        print(name, version(name))
    except PackageNotFoundError:
        print(name, "-")
PY
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
