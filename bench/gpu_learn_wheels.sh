#!/usr/bin/env bash
# Wheels bench/learning.py needs on the GPU machine besides .whl/house and .whl/bench, installed
# with them by bench/gpu_env.sh: lm-eval for the evaluate stage, and MLflow's SQLite tracking store
# (stages/common/tracking.py: sqlite:///.../mlflow.db) with what it imports and the GPU image lacks:
# sqlalchemy, alembic, mako, and cryptography + cffi (mlflow/store/model_registry/dbmodels/models.py
# imports cryptography.fernet at module level; cryptography's Rust module needs _cffi_backend), and more_itertools
# for lm-eval's vLLM backend.
# Only what the stages import at run time: lm-eval's other requirements (evaluate,
# pytablewriter and its deps, sqlitedict, word2number, rouge-score, nltk) are not imported by the
# project's task (stages/eval_task, HF backend, no cache), nor is sqlalchemy's greenlet (asyncio only).
# Run here, from the project root (needs PyPI):
#   bash bench/gpu_learn_wheels.sh        # -> .whl/learn/ (about 15.7 MiB, 8.7 of it lm-eval's wheel)
set -euo pipefail
rm -rf .whl/learn
mkdir -p .whl/learn
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl/learn \
    lm_eval==0.4.13 alembic==1.20.1 mako==1.4.3 cryptography==50.0.2 cffi==2.1.1 more_itertools==11.2.1
# SQLAlchemy's pure-Python wheel (its C speedups are optional): 1.9 MiB instead of 3.3 for cp312.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    --platform any -d .whl/learn sqlalchemy==2.0.58
ls .whl/learn
