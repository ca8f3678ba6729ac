"""Credentials come from the environment and go nowhere else.

Fake tokens, unique to this run, are planted in every credential variable the project reads.
The real flow (`python -m flows.pipeline --preset tiny --stages sft`) then runs prepare,
base_model and a short SFT in a copy of the repository, with its own MLflow store and Prefect
home. Every byte it leaves behind (workspace files and DVC cache, params.yaml, dvc.lock,
metrics/, models/, data/, the stage logs and run report, the MLflow SQLite DB and artifacts,
Prefect's DB and logs) and its stdout/stderr are searched for the tokens. The publish stage, which
sends HF_TOKEN to the Hub, runs against the Hub TEST DOUBLE of tests/hub_double.py (the Hub cannot
be reached from here), and its workspace, MLflow store and output are searched the same way.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.hub_double import serve
from tests.test_flows import copy_repo
from tests.test_publish import PUBLISH, publish_env, run_publish, workspace

SECRET_VARS = ("HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PREFECT_API_KEY",
               "AWS_SECRET_ACCESS_KEY")


def files_containing(root: Path, needle: bytes) -> list[str]:
    """Every file under root (any depth, binary included) whose bytes contain needle."""
    return sorted(str(f.relative_to(root)) for f in root.rglob("*")
                  if f.is_file() and not f.is_symlink() and needle in f.read_bytes())


def test_tracking_messages_mask_credentials_in_uris():
    from stages.common.tracking import redact

    text = "API request to https://bob:s3cr%40t@mlflow.example:5000/api/2.0 failed; http://127.0.0.1:5000 ok"
    assert redact(text) == "API request to https://***@mlflow.example:5000/api/2.0 failed; http://127.0.0.1:5000 ok"


@pytest.mark.slow
def test_tokens_from_the_environment_are_written_nowhere(tmp_path):
    stem = f"tok{uuid.uuid4().hex}"  # every planted value contains it; nothing else can
    planted = {name: f"{stem}-{name.lower()}" for name in SECRET_VARS}
    repo, mlruns, prefect_home = copy_repo(tmp_path / "repo"), tmp_path / "mlruns", tmp_path / "prefect"
    env = {**os.environ, **planted, "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE", "PIPELINE_MLRUNS_DIR": str(mlruns),
           "PREFECT_HOME": str(prefect_home), "PREFECT_LOGGING_LEVEL": "DEBUG"}
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PIPELINE_PARENT_RUN_ID"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "flows.pipeline", "--preset", "tiny", "--stages", "sft",
           "--set", "sft.max_steps=2", "--set", "sft.logging_steps=1", "--set", "prepare.sft_examples=32"]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The run did write to every store searched below.
    assert set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == {"prepare", "base_model", "sft"}
    for written in (repo / "params.yaml", repo / "metrics" / "sft.json", repo / "models" / "sft",
                    repo / "data" / "prepared", mlruns / "mlflow.db", prefect_home):
        assert written.exists(), written
    # Positive controls: the search below does reach the stage logs in Prefect and the params in MLflow.
    assert files_containing(prefect_home, b"Running stage 'sft'"), "no stage log in Prefect's store"
    assert files_containing(mlruns, b"sft.max_steps"), "no logged params in the MLflow store"
    assert files_containing(repo / "reports" / "pipeline", b"Running stage 'sft'"), "no stage log file or report"

    needle = stem.encode()
    assert needle not in proc.stdout.encode() and needle not in proc.stderr.encode()
    assert files_containing(tmp_path, needle) == []


@pytest.mark.slow
def test_publish_sends_the_hub_token_to_the_hub_only(tmp_path, base_dir, prepared_dir):
    stem = f"tok{uuid.uuid4().hex}"
    planted = {name: f"{stem}-{name.lower()}" for name in SECRET_VARS}
    root = workspace(tmp_path / "workspace", base_dir, prepared_dir, PUBLISH)
    with serve(planted["HF_TOKEN"]) as hub:
        env = {**publish_env(root, hub.url, planted["HF_TOKEN"]), **planted, "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE"}
        run = run_publish(root, env, check=True)
    # Positive controls: the token did reach the Hub, and the stage did write to the stores searched below.
    assert hub.requests and all(r["authorized"] for r in hub.requests)
    assert files_containing(root / "mlruns", b"hub.merged"), "no publish run in the MLflow store"
    assert (root / "metrics" / "publish.json").exists()

    needle = stem.encode()
    assert needle not in run.stdout.encode() and needle not in run.stderr.encode()
    assert files_containing(tmp_path, needle) == []
