"""A tracking server that is down when a stage starts, or goes away while it trains.

Down at the start: the stage fails in seconds naming the URI, before any model loads. Gone
mid-training: a real `mlflow server` (SQLite backend in tmp, loopback) is killed with SIGKILL
while a tiny GRPO run logs every step; training finishes, the model is saved, the metrics MLflow
missed are in unlogged_metrics.jsonl, and once a server is back on the same store they replay.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid

import pytest

from stages.common import tracking
from tests.conftest import tiny
from tests.servers import free_port, mlflow_server

STEPS = 6


def kill_after_first_metric(uri: str, run_id: str, server: subprocess.Popen, seen: list[str],
                            timeout: float = 240) -> None:
    """SIGKILL the server (its whole process group) once the run has a training metric on it
    (not only the system metrics MLflow samples on its own)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = client.get_run(run_id).data.metrics
        if "step_seconds" in metrics:
            seen.extend(metrics)
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
            return
        time.sleep(0.2)


def test_stage_fails_fast_when_the_server_is_down(monkeypatch, mlruns_dir, tiny_params):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    entered = []
    start = time.perf_counter()
    with pytest.raises(tracking.TrackingUnavailable) as err:
        with tracking.stage_run("sft", tiny_params):
            entered.append("the stage body ran")  # where the model would load
    seconds = time.perf_counter() - start
    assert seconds < 10, f"took {seconds:.1f} s to give up"
    assert uri in str(err.value) and "no model loaded, no training" in str(err.value)
    assert entered == []
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the quick settings were for the probe only


@pytest.mark.slow
def test_grpo_survives_a_server_killed_mid_training(tmp_path, monkeypatch, caplog, prepared_dir, base_dir):
    import mlflow

    from stages import grpo

    params = tiny({"grpo": {"max_steps": STEPS, "logging_steps": 1, "save_steps": 3, "log_completions_every": 0,
                            "per_device_train_batch_size": 4}})
    store, out, ckpt = tmp_path / "server", tmp_path / "grpo", tmp_path / "checkpoints"
    store.mkdir()
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"outage-{uuid.uuid4().hex[:8]}")
    with mlflow_server(store) as (uri, server):
        port = int(uri.rsplit(":", 1)[1])
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        seen: list[str] = []
        with tracking.stage_run("grpo", params) as run:
            run_id = run.info.run_id
            killer = threading.Thread(target=kill_after_first_metric, args=(uri, run_id, server, seen), daemon=True)
            killer.start()
            metrics = grpo.run(params, prepared_dir / "grpo.parquet", base_dir, tmp_path / "no-sft", out, ckpt,
                               tmp_path / "plots")
            killer.join(timeout=60)
            tracking.log_metrics({"steps": metrics["steps"]}, prefix="final/")  # as the stages do: warns only
        assert seen and server.poll() is not None, "the server was not killed during training"

    # Training finished and its outputs were saved.
    assert metrics["steps"] == STEPS
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()

    # What the server took before it died, and what waits in the JSONL, cover every step.
    db = mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    logged = {m.step for m in db.get_metric_history(run_id, "step_seconds")}
    unlogged_file = ckpt / "unlogged_metrics.jsonl"
    entries = [json.loads(line) for line in unlogged_file.read_text().splitlines()]
    kept = {e["step"] for e in entries if "step_seconds" in e["metrics"]}
    assert logged and kept and logged | kept == set(range(1, STEPS + 1)), (logged, kept)
    assert {e["run_id"] for e in entries} == {run_id}
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "training goes on" in messages and str(unlogged_file) in messages
    assert f"run {run_id} was not marked FINISHED" in messages and "final/steps" in messages

    # Back on the same store: the kept metrics replay with their steps.
    with mlflow_server(store, port=port):
        assert tracking.replay_unlogged(unlogged_file) == len(entries)
        history = mlflow.MlflowClient(uri).get_metric_history(run_id, "step_seconds")
    assert {m.step for m in history} == set(range(1, STEPS + 1))
    assert not unlogged_file.exists() and unlogged_file.with_name(unlogged_file.name + ".sent").exists()
