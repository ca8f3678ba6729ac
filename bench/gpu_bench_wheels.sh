#!/usr/bin/env bash
# Wheels the grpo stage needs on the GPU machine besides ../shared/tools/gpu-wheelhouse.sh's:
# pydantic (stages.common.params), mlflow-skinny (the stage's callbacks `import mlflow`), liger-kernel
# (grpo.use_liger_kernel: TRL checks it is installed),
# with the dependencies the GPU image lacks. Run here, from the project root (needs PyPI):
#   bash bench/gpu_bench_wheels.sh        # -> .whl/bench/ (about 11 MiB)
set -euo pipefail
mkdir -p .whl/bench
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl/bench \
    pydantic==2.14.3 pydantic_core==2.50.4 annotated_types==0.8.0 typing_inspection==0.4.5 \
    mlflow_skinny==3.17.2 cachetools==7.3.2 databricks_sdk==0.156.0 google_auth==2.62.2 pyasn1==0.6.5 \
    pyasn1_modules==0.4.2 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 gitpython==3.2.1 gitdb==4.0.12 \
    smmap==5.0.3 importlib_metadata==9.1.0 opentelemetry_api==1.45.2 opentelemetry_proto==1.45.2 \
    opentelemetry_sdk==1.45.2 opentelemetry_semantic_conventions==0.66b2 python_dotenv==1.2.4 sqlparse==0.6.1 \
    liger_kernel==0.8.5
ls .whl/bench
