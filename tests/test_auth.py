"""MLflow's built-in authentication (`mlflow server --app-name basic-auth`) on loopback.

The server's auth config is a tmp ini (its own SQLite user DB); the admin password reaches the
server through MLFLOW_AUTH_ADMIN_PASSWORD, never a file. Without credentials the REST API
answers 401; a stage with MLFLOW_TRACKING_USERNAME/PASSWORD in its environment logs its run,
and the password is nowhere in that run or in the server's stores.
"""
from __future__ import annotations

import base64
import secrets
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from stages.common import tracking
from tests.servers import mlflow_server

pytestmark = [pytest.mark.servers, pytest.mark.slow]
# The basic-auth app needs mlflow's `auth` extra (Flask-WTF, for CSRF); without it the server cannot start.
pytest.importorskip("flask_wtf", reason="the MLflow basic-auth server needs `pip install 'mlflow[auth]'`")

ADMIN = "admin"


def status_of(url: str, user: str | None = None, password: str | None = None) -> int:
    """HTTP status of a GET, with basic auth when a user is given."""
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def write_auth_config(root: Path) -> Path:
    """The basic-auth ini (keys as in mlflow/server/auth/basic_auth.ini), without a password."""
    ini = root / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
                   f"admin_username = {ADMIN}\n")
    return ini


def test_stage_logs_with_credentials_from_the_environment(tmp_path, monkeypatch, tiny_params):
    import mlflow

    from stages import prepare

    password = f"pw-{secrets.token_hex(12)}"
    store = tmp_path / "server"
    store.mkdir()
    server_env = {"MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(store)), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"auth-{uuid.uuid4().hex[:8]}")
    with mlflow_server(store, args=("--app-name", "basic-auth"), env=server_env) as (uri, _):
        search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert status_of(search) == 401
        assert status_of(search, ADMIN, "wrong") == 401
        assert status_of(search, ADMIN, password) == 200

        # Wrong credentials: the stage stops at once, naming the server, before any work.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        start = time.perf_counter()
        with pytest.raises(tracking.TrackingUnavailable, match="401") as err:
            with tracking.stage_run("prepare", tiny_params):
                pytest.fail("the stage body ran with refused credentials")
        assert uri in str(err.value) and time.perf_counter() - start < 10

        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        with tracking.stage_run("prepare", tiny_params) as active:
            metrics = prepare.run(tiny_params, tmp_path / "prepared")
            tracking.log_metrics(metrics)
        run = mlflow.MlflowClient(uri).get_run(active.info.run_id)

    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "prepare"
    assert "prepare.sft_examples" in run.data.params and run.data.metrics
    logged = {**run.data.params, **run.data.tags}
    assert not [k for k, v in logged.items() if password in k or password in str(v)]
    leaked = [str(f) for f in store.rglob("*") if f.is_file() and password.encode() in f.read_bytes()]
    assert leaked == []
