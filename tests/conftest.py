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


# Seconds each test module takes in a full `make test` (setup + call + teardown of its tests, summed;
# from the junit XML of the 2-core machine's run of 2026-12-01, docs/benchmarks.md). Only the scheduler
# below reads them, to start the longest work first; a module not listed counts 0.3 s per test (the fast
# tests' average). Refresh them from a full run's junit XML (`make test TEST_ARGS=--junitxml=tests.xml`)
# when a module's cost moves by much: a wrong figure costs balance, never a result.
MODULE_SECONDS = {
    "tests/test_team_mode.py": 412, "tests/test_flows.py": 355, "tests/test_continuous.py": 316,
    "tests/test_faults.py": 290, "tests/test_learning.py": 190, "tests/test_training.py": 152,
    "tests/test_servers.py": 125, "tests/test_sweeps.py": 102, "tests/test_team_outage.py": 87,
    "tests/test_console.py": 79, "tests/test_distributed.py": 71, "tests/test_auth.py": 62,
    "tests/test_secrets.py": 61, "tests/test_export.py": 59, "tests/test_bench_scripts.py": 47,
    "tests/test_tracking_outage.py": 46, "tests/test_failures.py": 44, "tests/test_register.py": 26,
    "tests/test_workers.py": 24, "tests/test_publish.py": 22, "tests/test_dvc_deps.py": 16,
    "tests/test_loss_types.py": 15,
}

# Modules that share one worker because they share a session fixture whose start is expensive, keyed by
# the fixture (its tests name it as an argument): the in-process Prefect `harness` (15-20 s to start on
# 2 cores), the loopback `prefect_api` server (tests/servers.py; a module defining its own is left
# alone), and the team stack (PostgreSQL, S3; tests/servers.py).
SHARED = {"harness": ("harness",), "prefect server": ("prefect_api",),
          "team servers": ("postgres", "s3", "team_credentials", "team_mlflow", "team_prefect")}


def _shared_groups() -> dict[str, str]:
    """Test file (as xdist names it, tests/test_x.py) -> the group of SHARED it belongs to (first match)."""
    here = Path(__file__).resolve().parent
    groups: dict[str, str] = {}
    for f in sorted(here.glob("test_*.py")):
        text = f.read_text()
        for group, fixtures in SHARED.items():
            names = "|".join(fixtures)
            uses = re.search(rf"^def test_\w+\([^)]*\b({names})\b", text, re.M)
            defines_its_own = re.search(rf"^def ({names})\(", text, re.M)
            if uses and not defines_its_own:
                groups[f"tests/{f.name}"] = f"tests/(modules sharing the {group})"
                break
    return groups


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (each module on one worker, its module fixtures built once), with three changes:

    - the modules of each SHARED group run on one worker, so the fixture starts once per run instead of
      once per worker;
    - the longest work is handed out first (MODULE_SECONDS), so the last module to start is a short
      one and the two workers finish together; xdist's own order (most tests first) left minute-long
      single-test modules such as test_learning for the end;
    - a worker gets its next module when its last test is the only one left, not two: a worker runs a
      test once it knows the next one, so that costs nothing, and it no longer takes a module that a
      free worker would have started at once while it is still in a test of minutes.
    """
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    groups = _shared_groups()

    def expected_seconds(nodeids) -> float:
        per_module: dict[str, int] = {}
        for nodeid in nodeids:
            module = nodeid.split("::", 1)[0]
            per_module[module] = per_module.get(module, 0) + 1
        return sum(MODULE_SECONDS.get(module, 0.3 * count) for module, count in per_module.items())

    class Balanced(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return groups.get(module, module)

        def _assign_work_unit(self, node) -> None:
            longest = max(self.workqueue, key=lambda scope: expected_seconds(self.workqueue[scope]))
            self.workqueue.move_to_end(longest, last=False)
            super()._assign_work_unit(node)

        def _reschedule(self, node) -> None:
            if self.workqueue and not node.shutting_down and self._pending_of(self.assigned_work[node]) > 1:
                return
            super()._reschedule(node)

    return Balanced(config, log)


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
