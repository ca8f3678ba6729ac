"""A team server that goes away mid-run, and comes back (tests/servers.py's team stack).

- MLflow (PostgreSQL + S3 + basic-auth) is stopped (SIGTERM to its process group) while a tiny
  GRPO run logs every step, and started again on the same stores and port. Training goes on;
  the metrics MLflow missed wait in unlogged_metrics.jsonl and replay: every step arrives once.
- Prefect (on PostgreSQL) is stopped while the flow's first DVC stage runs, and started again on
  the same database and port. Prefect's client retries (PREFECT_CLIENT_MAX_RETRIES, doubling
  delays from 2 s), the stages finish, and the flow run ends COMPLETED in the server's API.
Each test prints its measurements (run with -s); docs/reliability.md records them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from stages.common import tracking
from stages.common.params import load_params
from tests.conftest import tiny
from tests.servers import (QUIET, TEAM_USER, background, prefect_api_call, prefect_client_env, read_flow_run,
                           stop_group, team_mlflow_server, team_prefect_server)
from tests.test_flows import copy_repo

pytestmark = [pytest.mark.servers, pytest.mark.slow]

STEPS = 8


def stop_after_first_metric(uri: str, run_id: str, server: subprocess.Popen, stopped: list[float],
                            timeout: float = 300) -> None:
    """Stop the server (SIGTERM, its whole group) once the run has a training metric on it."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "step_seconds" in client.get_run(run_id).data.metrics:
            stop_group(server, signal.SIGTERM)
            stopped.append(time.monotonic())
            return
        time.sleep(0.2)


def test_mlflow_stopped_mid_training_then_replayed(tmp_path, monkeypatch, postgres, s3, team_credentials,
                                                   prepared_dir, base_dir):
    import mlflow

    from stages import grpo

    params = tiny({"grpo": {"max_steps": STEPS, "logging_steps": 1, "save_steps": 4, "log_completions_every": 0,
                            "per_device_train_batch_size": 4}})
    out, ckpt = tmp_path / "grpo", tmp_path / "checkpoints"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"team-outage-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", TEAM_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team_credentials.mlflow_team)
    stopped: list[float] = []
    with team_mlflow_server(postgres, s3, team_credentials, tmp_path) as (server, proc):
        port = int(server.uri.rsplit(":", 1)[1])
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        with tracking.stage_run("grpo", params) as run:
            run_id = run.info.run_id
            stopper = threading.Thread(target=stop_after_first_metric, args=(server.uri, run_id, proc, stopped),
                                       daemon=True)
            stopper.start()
            metrics = grpo.run(params, prepared_dir / "grpo.parquet", base_dir, tmp_path / "no-sft", out, ckpt,
                               tmp_path / "plots")
            stopper.join(timeout=60)
    assert stopped, "the server was not stopped during training"
    assert metrics["steps"] == STEPS and any((out / f).exists() for f in ("adapter_config.json", "config.json"))

    unlogged = ckpt / "unlogged_metrics.jsonl"
    entries = [json.loads(line) for line in unlogged.read_text().splitlines()]
    kept = {e["step"] for e in entries if "reward" in e["metrics"]}
    with team_mlflow_server(postgres, s3, team_credentials, tmp_path, port=port) as (server, _):
        back = time.monotonic()
        start = time.perf_counter()
        assert tracking.replay_unlogged(unlogged) == len(entries)
        replay_seconds = time.perf_counter() - start
        client = mlflow.MlflowClient(server.uri)
        history = client.get_metric_history(run_id, "reward")
        client.set_terminated(run_id, "FINISHED")  # as the stage's warning tells the user to
    # TRL's per-step `reward`: every step once, none lost, none doubled. (Not step_seconds: the
    # trainer's end-of-training summary log at the last step carries it a second time.)
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(1, STEPS + 1)), steps
    assert kept and kept < set(steps)
    print(f"\nteam MLflow outage: stopped after step {min(kept) - 1} of {STEPS}, down {back - stopped[0]:.1f} s "
          f"(restart on PostgreSQL + S3); training went on; {len(entries)} logs kept ({len(kept)} steps), "
          f"replayed in {replay_seconds:.2f} s; {len(steps)}/{STEPS} steps on the server, no duplicates")


def wait_for_task(api: str, creds, flow_log: Path, flow: subprocess.Popen, timeout: float = 300) -> None:
    """Until the flow has a task run RUNNING (a DVC stage is executing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert flow.poll() is None, flow_log.read_text()[-3000:]
        running = {"task_runs": {"state": {"type": {"any_": ["RUNNING"]}}}}
        if prefect_api_call(api, creds, "/task_runs/filter", running):
            return
        time.sleep(0.5)
    raise TimeoutError(f"no task running after {timeout} s:\n{flow_log.read_text()[-3000:]}")


def test_prefect_stopped_mid_flow_then_reconciled(tmp_path, postgres, team_credentials):
    database = f"prefect_outage_{uuid.uuid4().hex[:8]}"
    postgres.create_database(database)
    repo = copy_repo(tmp_path / "repo")
    flow_log = tmp_path / "flow.log"
    with team_prefect_server(postgres, team_credentials, tmp_path, database=database) as (api, server):
        port = int(api.split(":")[-1].split("/")[0])
        env = {**os.environ, **QUIET, **prefect_client_env(api, team_credentials),
               "PIPELINE_MLRUNS_DIR": str(tmp_path / "mlruns"), "PREFECT_HOME": str(tmp_path / "prefect-client")}
        for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_KEY"):
            env.pop(name, None)
        start = time.monotonic()
        with background([sys.executable, "-m", "flows.pipeline", "--stages", "base_model"], flow_log, env,
                        cwd=repo) as flow:
            wait_for_task(api, team_credentials, flow_log, flow)
            stop_group(server, signal.SIGTERM)
            stopped = time.monotonic()
            running_when_stopped = flow.poll() is None
            with team_prefect_server(postgres, team_credentials, tmp_path, database=database, port=port) as (api, _):
                back = time.monotonic()
                flow.wait(timeout=600)
                finished = time.monotonic()
                flow_run_id = flow_run_of(repo, tmp_path / "mlruns")
                flow_run, task_runs = read_flow_run(api, team_credentials, flow_run_id)
    log_text = flow_log.read_text()
    assert running_when_stopped and flow.returncode == 0, log_text[-5000:]
    assert set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == {"prepare", "base_model"}
    assert flow_run["state"]["type"] == "COMPLETED", flow_run["state"]
    assert sorted(t["name"] for t in task_runs) == ["dvc repro base_model", "dvc repro prepare"]
    assert {t["state"]["type"] for t in task_runs} == {"COMPLETED"}
    print(f"\nteam Prefect outage: stopped while a stage ran, down {back - stopped:.1f} s (restart on PostgreSQL); "
          f"the flow finished {finished - back:.1f} s after the server was back, {finished - start:.1f} s in all; "
          f"flow run COMPLETED in the API, {len(task_runs)} tasks COMPLETED")


def flow_run_of(repo: Path, mlruns: Path) -> str:
    """The Prefect flow run id the pipeline's MLflow parent run is tagged with."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{mlruns / 'mlflow.db'}")
    exp = client.get_experiment_by_name(load_params(repo / "params.yaml").project.name)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`pipeline.parent` = 'true'")
    return parent.data.tags["prefect.flow_run_id"]
