"""Shared fixtures: an isolated environment, tiny params, prepared data and the tiny model.

Session-scoped fixtures build the tiny data and model once (a few seconds) in a temporary
folder; tests never write into the project's own data/, models/ or mlruns/.

Under pytest-xdist (`make test` runs `-n 2`) every worker is its own process with its own
MLflow store (the path carries its pid), Prefect home and session fixtures: workers share no
state. Each worker's torch gets its share of the cores, so two workers do not each start a
thread per core.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

# The real servers' fixtures (PostgreSQL, S3, team MLflow and Prefect), shared by all test modules.
pytest_plugins = ("tests.servers",)

# Before any stage module is imported: no hub, no telemetry, a private MLflow store.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # read by torch at import and inherited by the stage subprocesses tests start
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
# The gguf stage's llama.cpp converter (scripts/fetch_llama_cpp.sh): one fetch for the session, in
# this checkout's .cache, also for the stages that run in copies of the repository (tests/test_flows.py
# copy_repo), which would otherwise download and unpack the 75 MB sdist once per copy.
os.environ.setdefault("LLAMA_CPP_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "llama.cpp"))
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PIPELINE_PARENT_RUN_ID", None)
# One store per test process: xdist workers inherit the controller's environment, and two processes
# creating one SQLite store at once race in its migrations (seen on the GPU tier: alembic CommandError).
_MLRUNS = Path(f"/tmp/gsm8k-grpo-tests-{os.getpid()}/mlruns")
os.environ["PIPELINE_MLRUNS_DIR"] = str(_MLRUNS)


def _modules_using_the_harness() -> set[str]:
    """Test files (as xdist names them, tests/test_x.py) with a test that takes the `harness` fixture."""
    here = Path(__file__).resolve().parent
    uses = re.compile(r"^def test_\w+\([^)]*\bharness\b", re.M)
    return {f"tests/{f.name}" for f in here.glob("test_*.py") if uses.search(f.read_text())}


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (each module on one worker, its module fixtures built once), except that the
    modules using the in-process Prefect `harness` share one worker: its server start (15-20 s on
    2 cores) is then paid once per run instead of once per worker."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    together = _modules_using_the_harness()

    class HarnessModulesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return "tests/(modules using the prefect harness)" if module in together else module

    return HarnessModulesTogether(config, log)


def tiny(overrides: dict[str, Any] | None = None, preset: str = "tiny"):
    """Params of a preset (default tiny) with nested overrides, validated by the real loader."""
    from stages.common.params import validate
    from stages.preset import merge, resolve

    return validate(merge(resolve(preset).model_dump(), overrides or {}), origin=f"preset {preset} + test overrides")


# mlflow.set_tracking_uri / set_experiment write MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID into
# os.environ for child processes. Every test ends with these back at the values they had when the
# session started (not when the test started: module fixtures run before function fixtures).
_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")
_BASELINE = {key: os.environ.get(key) for key in _MLFLOW_ENV}


def _restore_mlflow_env() -> None:
    for key, value in _BASELINE.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _no_mlflow_env_leaks():
    _restore_mlflow_env()
    yield
    _restore_mlflow_env()


@pytest.fixture(scope="session")
def tiny_params():
    return tiny()


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, tiny_params) -> Path:
    from stages import prepare

    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare.run(tiny_params, out)
    return out


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tiny_params, prepared_dir) -> Path:
    from stages import base_model

    out = tmp_path_factory.mktemp("models") / "base"
    base_model.run(tiny_params, prepared_dir, out)
    return out


@pytest.fixture(scope="session")
def harness():
    """Flows run in this process against a temporary Prefect server and database (prefect_test_harness).

    One per worker session, shared by the modules that run flows in-process (test_flows,
    test_continuous, test_failures); each started its own before, ~20 s of a 2-core machine each.
    Their tests read back only their own flow runs (by flow run id). The harness changes Prefect's
    in-process settings, not the environment: the flows that tests start as subprocesses use the
    server they are given, or a temporary one of their own, as before.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def mlruns_dir() -> Path:
    _MLRUNS.mkdir(parents=True, exist_ok=True)
    return _MLRUNS
