"""Failing well: how a stage's error is classified and crosses the `dvc repro` process, which
failures the flow retries, and MLflow runs that a killed process left RUNNING.

Real parts: stage processes under real `dvc repro` in tmp DVC repositories, the flow under
`prefect_test_harness`, a real MLflow SQLite store, real processes that are killed.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import psutil
import pytest

from stages.common import errors, tracking
from stages.common.params import ParamsError
from stages.common.tracking import TrackingUnavailable
from stages.prepare import DataError
from stages.preset import render
from tests.conftest import tiny
from tests.test_flows import make_dvc_repo, mlflow_client

PY = sys.executable


# ------------------------------------------------------------------ classification
def _raised(make):
    try:
        make()
    except Exception as err:  # noqa: BLE001 - the point is to look at what was raised
        return err
    raise AssertionError("nothing raised")


def _refused():
    with socket.socket() as s:
        s.connect(("127.0.0.1", _closed_port()))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wrapped_refusal():
    try:
        _refused()
    except OSError as err:
        raise RuntimeError("the request failed") from err


@pytest.mark.parametrize("make, kind", [
    (lambda: (_ for _ in ()).throw(DataError("bad rows")), errors.CHECK),
    (lambda: (_ for _ in ()).throw(ParamsError("bad key")), errors.CHECK),
    (lambda: (_ for _ in ()).throw(RuntimeError("Error(s) in loading state_dict for Linear:\n\tsize mismatch for weight")), errors.CHECK),
    (lambda: (_ for _ in ()).throw(TrackingUnavailable("server down")), errors.TRANSIENT),
    (_refused, errors.TRANSIENT),
    (_wrapped_refusal, errors.TRANSIENT),  # the cause decides
    (lambda: {}["missing"], errors.UNKNOWN),
    (lambda: (_ for _ in ()).throw(OSError(28, "No space left on device")), errors.UNKNOWN),
])
def test_classify(make, kind):
    assert errors.classify(_raised(make)) == kind


def test_a_stage_run_as_main_reports_its_own_error_class(tmp_path, mlruns_dir):
    """`python -m stages.prepare` defines DataError in __main__: still the project's check error."""
    (tmp_path / "train.jsonl").write_text("")
    params = tiny({"prepare": {"source": "file", "train_file": str(tmp_path / "train.jsonl"),
                               "test_file": str(tmp_path / "train.jsonl")}})
    (tmp_path / "params.yaml").write_text(render(params))
    error_file = tmp_path / "error.json"
    env = {**os.environ, "PIPELINE_WORKDIR": str(tmp_path), errors.ERROR_FILE_ENV: str(error_file)}
    proc = subprocess.run([PY, "-m", "stages.prepare"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr  # the usual traceback is still printed
    assert errors.read(error_file) == {"kind": "check", "error": "stages.prepare.DataError",
                                       "message": f"{tmp_path / 'train.jsonl'}: the file is empty"}


def test_no_error_file_without_an_error_or_without_the_variable(tmp_path):
    code = "import stages; raise SystemExit(2)"
    env = {**os.environ, errors.ERROR_FILE_ENV: str(tmp_path / "error.json")}
    assert subprocess.run([PY, "-c", code], env=env, timeout=60).returncode == 2
    assert errors.read(tmp_path / "error.json") is None
    env.pop(errors.ERROR_FILE_ENV)
    proc = subprocess.run([PY, "-c", "import stages; raise KeyError('x')"], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 1 and not list(tmp_path.iterdir())


# ------------------------------------------------------------------ retries in the flow
STAGE_ERRORS = textwrap.dedent('''
    import os, pathlib, sys
    with open("attempts.log", "a") as f:
        f.write("attempt\\n")
    attempts = pathlib.Path("attempts.log").read_text().count("attempt")
    if sys.argv[1] == "check":
        from stages.prepare import DataError
        raise DataError("row 3: the answer is not a number")
    if sys.argv[1] == "flaky" and attempts == 1:  # the first attempt meets a tracking server that is down
        os.environ["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:" + sys.argv[2]
        from stages.common import tracking
        tracking._connect("boom", "flaky")  # raises TrackingUnavailable
    pathlib.Path("done.txt").write_text(str(attempts))
''')


def _errors_repo(tmp_path: Path, action: str, retries: int = 2) -> Path:
    repo = make_dvc_repo(tmp_path / "repo", {
        "boom": {"cmd": f"python stage_errors.py {action} {_closed_port()}", "deps": ["stage_errors.py"],
                 "outs": ["done.txt"]},
    }, params={"flow": {"retries": retries, "retry_delay_seconds": 0}})
    (repo / "stage_errors.py").write_text(STAGE_ERRORS)
    return repo


def test_a_check_error_runs_exactly_once(harness, tmp_path, mlruns_dir):
    from flows.pipeline import StageFailed, pipeline

    repo = _errors_repo(tmp_path, "check")
    state = pipeline(root=str(repo), experiment=f"test-failures-{uuid.uuid4().hex[:8]}", return_state=True)
    raised = state.result(raise_on_failure=False)
    assert isinstance(raised, StageFailed) and raised.kind == errors.CHECK
    assert (repo / "attempts.log").read_text().count("attempt") == 1  # retries: 2, none used
    assert raised.error == "stages.prepare.DataError: row 3: the answer is not a number"
    assert "a check error: not retried" in str(raised)
    assert raised.log_file == repo / "reports/pipeline/logs/boom.log"
    assert "DataError: row 3" in raised.log_file.read_text()  # the traceback is in the log


def test_a_transient_error_is_retried(harness, tmp_path, mlruns_dir):
    from flows.pipeline import pipeline

    repo = _errors_repo(tmp_path, "flaky")
    result = pipeline(root=str(repo), experiment=f"test-failures-{uuid.uuid4().hex[:8]}")
    assert [s["result"] for s in result["stages"]] == ["ran"]
    assert (repo / "done.txt").read_text() == "2"  # the second attempt succeeded


@pytest.mark.slow
def test_a_transient_error_that_persists_uses_every_retry(harness, tmp_path, mlruns_dir):
    from flows.pipeline import StageFailed, pipeline

    repo = _errors_repo(tmp_path, "flaky", retries=1)
    (repo / "stage_errors.py").write_text(STAGE_ERRORS.replace("and attempts == 1", ""))
    state = pipeline(root=str(repo), experiment=f"test-failures-{uuid.uuid4().hex[:8]}", return_state=True)
    raised = state.result(raise_on_failure=False)
    assert isinstance(raised, StageFailed) and raised.kind == errors.TRANSIENT
    assert raised.error.startswith("stages.common.tracking.TrackingUnavailable: stage boom did not start")
    assert "transient: retried while flow.retries allows" in str(raised)
    assert (repo / "attempts.log").read_text().count("attempt") == 2


# ------------------------------------------------------------------ runs a kill left open
def _dead_process_tags() -> dict[str, str]:
    """Owner tags of a real process that has since been killed."""
    proc = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    tags = tracking.owner_tags(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return tags


def test_runs_of_dead_processes_are_closed_at_the_next_start(mlruns_dir):
    client = mlflow_client()
    exp_id = tracking.setup(f"test-orphans-{uuid.uuid4().hex[:8]}")
    dead, alive = _dead_process_tags(), tracking.owner_tags()
    elsewhere = {**dead, "pipeline.host": "another-host"}

    def run(name, tags, parent=None, status=None):
        extra = {"mlflow.parentRunId": parent} if parent else {}
        r = client.create_run(exp_id, run_name=name, tags={**tags, **extra})
        if status:
            client.set_terminated(r.info.run_id, status)
        return r.info.run_id

    flow_parent = run("killed flow", {**dead, "pipeline.parent": "true", "pipeline.launcher": "prefect"})
    flow_child = run("grpo", dead, flow_parent)
    failed_repro = run("dvc-repro", {**dead, "pipeline.parent": "true", "pipeline.launcher": "dvc repro"})
    run("prepare", dead, failed_repro, "FINISHED")
    run("sft", dead, failed_repro, "FAILED")
    good_repro = run("dvc-repro", {**dead, "pipeline.parent": "true", "pipeline.launcher": "dvc repro"})
    run("prepare", dead, good_repro, "FINISHED")
    live = run("live", alive)
    remote = run("remote", elsewhere)

    closed = dict(tracking.close_orphans(exp_id))
    assert closed == {flow_child: "KILLED", flow_parent: "KILLED", failed_repro: "FAILED", good_repro: "FINISHED"}
    for run_id, status in closed.items():
        r = client.get_run(run_id)
        assert r.info.status == status and r.data.tags["pipeline.closed_by"].startswith("a later start: process ")
    assert client.get_run(live).info.status == "RUNNING" and client.get_run(remote).info.status == "RUNNING"
    assert tracking.close_orphans(exp_id) == []


def test_an_orphan_closed_by_a_flow_starting_at_the_same_moment_is_left_to_it(mlruns_dir, monkeypatch):
    """Two flows start at once and find the same orphan; the other one's tag lands first. On the
    PostgreSQL server that made our tag insert fail (UniqueViolation, seen in tests/test_team_mode.py);
    SQLite cannot interleave two writers like that, so the other flow's write is made here, from inside
    set_tag, just before the error the server gave."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow_client()
    exp_id = tracking.setup(f"test-orphans-{uuid.uuid4().hex[:8]}")
    orphan = client.create_run(exp_id, run_name="grpo", tags=_dead_process_tags()).info.run_id
    real_set_tag = mlflow.MlflowClient.set_tag

    def other_flow_first(self, run_id, key, value, *args, **kwargs):
        real_set_tag(self, run_id, key, "the other flow", *args, **kwargs)
        raise MlflowException("duplicate key value violates unique constraint \"tag_pk\"")

    monkeypatch.setattr(mlflow.MlflowClient, "set_tag", other_flow_first)
    assert tracking.close_orphans(exp_id) == []  # no error, and the run is left to its closer
    assert client.get_run(orphan).data.tags["pipeline.closed_by"] == "the other flow"

    def failing(self, *args, **kwargs):  # a failure with no other closer is still an error
        raise MlflowException("the server is read-only")

    monkeypatch.setattr(mlflow.MlflowClient, "set_tag", failing)
    other = client.create_run(exp_id, run_name="sft", tags=_dead_process_tags()).info.run_id
    with pytest.raises(MlflowException, match="read-only"):
        tracking.close_orphans(exp_id)
    assert client.get_run(other).info.status == "RUNNING"


@pytest.mark.slow
def test_a_killed_stage_is_closed_when_the_next_stage_starts(tmp_path, mlruns_dir):
    (tmp_path / "params.yaml").write_text(render(tiny()))
    experiment = f"test-killed-stage-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PIPELINE_WORKDIR": str(tmp_path), "MLFLOW_EXPERIMENT_NAME": experiment}
    code = ("import time; from stages.common import tracking; from stages.common.params import load_params\n"
            "with tracking.stage_run('sft', load_params()) as run:\n"
            "    print(run.info.run_id, flush=True); time.sleep(120)")
    proc = subprocess.Popen([PY, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    client = mlflow_client()
    assert client.get_run(run_id).info.status == "RUNNING"
    start = subprocess.run([PY, "-c", "from stages.common import tracking; from stages.common.params import load_params\n"
                            "with tracking.stage_run('grpo', load_params()): pass"], env=env, timeout=120,
                           capture_output=True, text=True)
    assert start.returncode == 0, start.stderr[-2000:]
    assert client.get_run(run_id).info.status == "KILLED"
    assert f"MLflow run {run_id} (sft) was left RUNNING by a process that has ended; closed as KILLED" in start.stderr
