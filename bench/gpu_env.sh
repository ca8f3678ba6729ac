# Sourced on the GPU machine (device tool) by the bench/*_device.sh scripts, from the repository
# root: installs the carried wheels into /tmp/site (.whl/house from shared/tools/gpu-wheelhouse.sh
# with TRL_VERSION=1.14.2; .whl/bench from bench/gpu_bench_wheels.sh: what the grpo stage imports
# and the GPU image lacks; .whl/learn, when carried, from bench/gpu_learn_wheels.sh: lm-eval and
# MLflow's SQLite store for bench/learning.py), sets the offline/telemetry environment, and
# records the machine in $OUT.
wheels=(.whl/house/*.whl .whl/bench/*.whl)
[ -d .whl/learn ] && wheels+=(.whl/learn/*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheels[@]}" || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       UNSLOTH_DISABLE_STATISTICS=1 UNSLOTH_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
export PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
