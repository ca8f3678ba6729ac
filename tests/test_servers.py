"""Against real servers on loopback: a `prefect server start` (tests/servers.py's `prefect_api`, one
per worker session) that schedules the continuous deployment served by `python -m flows.deploy`, and team mode, where the pipeline logs to an
`mlflow server` (SQLite backend, local artifact root). Every server is stopped in `finally`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny
from tests.servers import QUIET, background, mlflow_server
from tests.test_flows import copy_repo

pytestmark = [pytest.mark.servers, pytest.mark.slow]


def client_env(tmp_path: Path, repo: Path, api: str) -> dict[str, str]:
    return {**os.environ, **QUIET, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect-client"),
            "PIPELINE_MLRUNS_DIR": str(repo / "mlruns"), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}


def tick_reports(api: str) -> list[str]:
    """The `continuous-tick` artifact of each completed continuous run, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowFilter, FlowFilterName,
                                                FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["gsm8k-grpo-continuous"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))),
            sort=FlowRunSort.START_TIME_ASC)
        reports = []
        for run in runs:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
            reports.append(" ".join(a.data for a in found if a.key == "continuous-tick"))
        return reports


def test_continuous_deployment_trains_once_then_idles(prefect_api, tmp_path):
    """Served every 5 s: the first tick trains (here: the stages up to base_model), later ticks find no new data."""
    repo = copy_repo(tmp_path / "repo")
    env = client_env(tmp_path, repo, prefect_api)
    cmd = [sys.executable, "-m", "flows.deploy", "--only", "continuous", "--continuous-interval", "5",
           "--train-targets", "base_model"]
    reports: list[str] = []
    with background(cmd, tmp_path / "serve.log", env, cwd=repo) as serving:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert serving.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            reports = tick_reports(prefect_api)
            if len(reports) >= 2:
                break
            time.sleep(3)
    log = (tmp_path / "serve.log").read_text()[-3000:]
    assert len(reports) >= 2, f"ticks so far: {reports}\n{log}"
    assert "training: first training tick" in reports[0], log
    assert all("nothing to train" in r for r in reports[1:]), reports
    assert set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == {"prepare", "base_model"}


def test_team_mode_logs_to_an_mlflow_server(prefect_api, tmp_path):
    """The two real stages with MLFLOW_TRACKING_URI pointing at `mlflow server`."""
    import mlflow

    repo = copy_repo(tmp_path / "repo")
    with mlflow_server(tmp_path) as (uri, _):
        env = {**client_env(tmp_path, repo, prefect_api), "MLFLOW_TRACKING_URI": uri}
        run = subprocess.run([sys.executable, "-m", "flows.pipeline", "--stages", "base_model"], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name(tiny().project.name)
        runs = client.search_runs([exp.experiment_id])
    assert not (repo / "mlruns").exists()  # nothing went to the local store
    (parent,) = [r for r in runs if r.data.tags.get("pipeline.parent") == "true"]
    children = [r for r in runs if r is not parent]
    assert parent.info.status == "FINISHED" and parent.data.tags["pipeline.launcher"] == "prefect"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.tags["stage"] for c in children) == ["base_model", "prepare"]
