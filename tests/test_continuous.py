"""Continuous training (flows/continuous.py) on new data.

- A tmp DVC repository whose stages are small Python commands (prepare -> base_model -> grpo,
  the last one leaving a checkpoint) under `prefect_test_harness`: with the tiny model, new data
  would rebuild the base model under the checkpoint, so the tick refuses, and nothing but the
  prepared data changes.
- The real chain against a real `prefect server start` on loopback, in a copy of the repository:
  a first tick trains GRPO; new rows land in data/gsm8k; the next tick resumes GRPO from
  its checkpoint on the new data, evaluates, and goes through the registry gate. The base model is
  a local folder (a saved tiny model), which does not depend on the data.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import yaml

from flows.continuous import ResumeRefused, continuous
from stages.common.params import ROOT
from tests.test_flows import artifacts_of, copy_repo, copy_stage, make_dvc_repo
from tests.servers import prefect_server
from tests.test_servers import client_env

TRAIN = textwrap.dedent('''
    import pathlib, yaml
    steps = yaml.safe_load(open("params.yaml"))["grpo"]["max_steps"]
    pathlib.Path("models/grpo").mkdir(parents=True, exist_ok=True)
    pathlib.Path("models/grpo/steps.txt").write_text(str(steps))
    checkpoint = pathlib.Path(f"checkpoints/grpo/checkpoint-{steps}")
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "trainer_state.json").write_text("{}")
''')


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (relative path -> hash)."""
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.mark.slow  # three flow runs, 15-23 s: over test-fast's share (make test runs it)
def test_new_data_that_would_rebuild_the_tiny_base_model_is_refused(harness, tmp_path, mlruns_dir):
    repo = make_dvc_repo(tmp_path / "repo", {
        "prepare": copy_stage("src.txt", "data/prepared/train.txt"),
        "base_model": copy_stage("data/prepared/train.txt", "models/base/model.txt"),
        "grpo": {"cmd": "python train.py", "deps": ["models/base/model.txt", "train.py"], "params": ["grpo.max_steps"],
                 "outs": ["models/grpo", {"checkpoints/grpo": {"persist": True, "cache": False}}]},
    }, params={"model": {"name_or_path": "tiny"}, "grpo": {"max_steps": 10}, "flow": {"continuous_steps": 5}})
    (repo / "train.py").write_text(TRAIN)
    tick = {"root": str(repo), "experiment": f"test-continuous-{uuid.uuid4().hex[:8]}", "train_targets": ["grpo"]}
    assert continuous(**tick)["max_steps"] == 15
    trained = {name: digest(repo / name) for name in ("models", "checkpoints/grpo")}
    params_before = (repo / "params.yaml").read_text()

    (repo / "src.txt").write_text("new data\n")
    state = continuous(**tick, return_state=True)
    raised = state.result(raise_on_failure=False)
    assert isinstance(raised, ResumeRefused)
    assert "the tiny base model is built from the prepared data" in str(raised)
    assert "stage base_model would rebuild it under the checkpoints in" in str(raised)
    assert {name: digest(repo / name) for name in trained} == trained  # no model, no checkpoint touched
    assert (repo / "params.yaml").read_text() == params_before  # the step budget is not spent
    assert (repo / "data/prepared/train.txt").read_text() == "new data\n"  # the new data is prepared
    report = artifacts_of(state.state_details.flow_run_id)["pipeline-summary"]
    assert "failed at base_model" in report and "refused to resume GRPO" in report
    # Still refused at the next tick, with the same reason; never trained.
    again = continuous(**tick, return_state=True).result(raise_on_failure=False)
    assert isinstance(again, ResumeRefused) and (repo / "models/grpo/steps.txt").read_text() == "15"


# ------------------------------------------------------------------ the real chain
def _rows(start: int, count: int) -> str:
    return "".join(json.dumps({"question": f"Ann has {n} apples and buys {n + 1} more. How many apples does she have?",
                               "answer": f"{n} + {n + 1} = {2 * n + 1}\n#### {2 * n + 1}"}) + "\n"
                   for n in range(start, start + count))


def _tick(repo: Path, env: dict[str, str], *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "flows.continuous", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _locked_md5(repo: Path, stage: str, out: str) -> str:
    """The md5 dvc.lock records for one output of a stage (its metrics file, with times, is another)."""
    (md5,) = [o["md5"] for o in yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]["outs"]
              if o["path"] == out]
    return md5


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A server of its own, not the session's (tests/servers.py): the test reads back every
    continuous-training flow run on it, and test_servers starts some on the shared one."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as api:
        yield api


@pytest.mark.slow
@pytest.mark.servers
def test_new_data_resumes_grpo_then_evaluates_and_gates(prefect_api, tmp_path, base_dir):
    import mlflow

    from stages.preset import render
    from tests.conftest import tiny

    repo = copy_repo(tmp_path / "repo")
    params = tiny({
        "model": {"name_or_path": str(base_dir / "model")},  # a local folder: the base does not depend on the data
        "prepare": {"sft_examples": 0, "max_train_rows": 40},
        "sft": {"enabled": False},
        "grpo": {"max_steps": 0, "save_steps": 1, "log_completions_every": 0},
        "evaluate": {"limit": 4},
        "gguf": {"quantizations": ["q8_0"], "eval_questions": 2},
        "flow": {"continuous_steps": 2, "retries": 0},
    })
    (repo / "params.yaml").write_text(render(params))
    env = {**client_env(tmp_path, repo, prefect_api), "LLAMA_CPP_CACHE": str(ROOT / ".cache" / "llama.cpp")}

    first = _tick(repo, env, "--train-targets", "grpo")
    assert first["trained"] and first["max_steps"] == 2, first
    assert (repo / "checkpoints/grpo/checkpoint-2/trainer_state.json").exists()
    base_md5 = _locked_md5(repo, "base_model", "models/base")

    with (repo / "data/gsm8k/train.jsonl").open("a") as f:  # new data where the data stage reads it (a DVC dep)
        f.write(_rows(100, 20))
    second = _tick(repo, env)  # grpo, evaluate, register and their upstream stages
    assert second["trained"] and second["max_steps"] == 4, second
    assert "the data stage is out of date" in second["reason"]
    assert json.loads((repo / "metrics/prepare.json").read_text())["rows_in_train"] == 7473 + 20
    grpo = json.loads((repo / "metrics/grpo.json").read_text())
    assert (grpo["resumed_from_checkpoint"], grpo["steps"]) == ("checkpoint-2", 4)  # resumed, on the new data
    assert grpo["prompts_not_trained_before"] > 0  # and the prompts it had not seen came first
    assert _locked_md5(repo, "base_model", "models/base") == base_md5  # the base model was not rebuilt under the checkpoint
    scores = json.loads((repo / "metrics/evaluate.json").read_text())
    assert scores["grpo"]["evaluated"] == 1 and scores["grpo"]["n"] == 4
    decision = json.loads((repo / "metrics/register.json").read_text())
    assert "promoted" in decision, decision

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(params.project.name)
    parents = {r.info.run_id: r for r in client.search_runs([exp.experiment_id], "tags.`pipeline.continuous` = 'true'")}
    assert set(parents) == {first["parent_run_id"], second["parent_run_id"]}
    assert {r.info.status for r in parents.values()} == {"FINISHED"}
    version = client.get_model_version_by_alias(params.project.name, "candidate")
    assert version.run_id and client.get_run(version.run_id).data.tags["mlflow.parentRunId"] == second["parent_run_id"]

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as prefect:
        runs = prefect.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["gsm8k-grpo-continuous"])))
    assert sorted(r.state.type.value for r in runs) == ["COMPLETED", "COMPLETED"]
