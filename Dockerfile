# GPU training image: the whole pipeline (`dvc repro`) on one CUDA GPU with the `gpu` extra
# (Unsloth, vLLM 0.26.0, bitsandbytes).
#
#   docker build -t gsm8k-grpo .
#   docker run --gpus all gsm8k-grpo                                   # dvc repro
#   docker run --gpus all -v "$PWD":/workspace gsm8k-grpo              # same, on your checkout
#   docker run --gpus all gsm8k-grpo python -m stages.grpo             # one stage
#
# Pinned base: the torch the `gpu` extra pins (2.11.0, CUDA 13.0: what vllm 0.26.0 requires and what the
# H200 behind docs/benchmarks.md ran), so pip never replaces the image's CUDA build. The devel variant
# has nvcc and a compiler: Triton and Unsloth compile kernels at run time, and llama-cpp-python is
# only published as an sdist, so it is compiled during `pip install`. (No Docker engine where this
# project is developed: the image is checked as text by tests/test_packaging.py, not built.)
FROM pytorch/pytorch:2.11.0-cuda13.0-cudnn9-devel

# git: DVC keeps its experiment state in git. cmake and build-essential: the llama.cpp build.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git cmake build-essential \
    && rm -rf /var/lib/apt/lists/*

# No telemetry from any tool in the pipeline.
ENV HF_HUB_DISABLE_TELEMETRY=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    UNSLOTH_DISABLE_STATISTICS=1 \
    TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

# Model downloads land inside the workspace (git-ignored), so a mounted checkout keeps them
# between runs. Set HF_HUB_OFFLINE=1 at `docker run` once the base model is cached.
ENV HF_HOME=/workspace/.cache/huggingface

# A portable llama.cpp (no -march=native): the image runs on any x86-64 host, not only the
# one that built it. The gguf stage uses llama.cpp for conversion, quantization and a short
# CPU check, so its CUDA backend is not needed.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"

WORKDIR /workspace

# Dependencies first, so that editing params or docs does not reinstall them. (The package
# builds without README.md; `COPY . .` brings it.) Commands run from /workspace, so its
# stages/ and flows/ take precedence over the installed copy.
COPY pyproject.toml ./
COPY stages/ stages/
COPY flows/ flows/
RUN pip install ".[gpu]"

# The rest of the repository (see .dockerignore): dvc.yaml, params.yaml, presets, the shipped
# GSM8K, and .git for DVC. A mounted checkout replaces it at run time.
COPY . .
# A mounted checkout is owned by the host user; let git (and so DVC) work in it anyway.
RUN git config --global --add safe.directory /workspace

CMD ["dvc", "repro"]
