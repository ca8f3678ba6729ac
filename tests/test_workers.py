"""The pipeline run by a Prefect worker, as on a GPU machine whose server and UI live elsewhere:
a real `prefect server start` on loopback, a process work pool, the deployments registered with
`python -m flows.deploy --pool`, and `prefect worker start` picking up one tiny run (the prepare
stage) in a copy of this repository.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import yaml

from tests.test_flows import copy_repo
from tests.servers import BIN, background
from tests.test_servers import client_env

pytestmark = [pytest.mark.servers, pytest.mark.slow]

POOL = "gpu-test"


def _run(cmd: list[str], env: dict, cwd=None) -> str:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_a_process_worker_runs_a_deployed_pipeline(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    repo = copy_repo(tmp_path / "repo")
    env = {**client_env(tmp_path, repo, prefect_api), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    _run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"], env)
    deployed = _run([sys.executable, "-m", "flows.deploy", "--pool", POOL, "--only", "nightly",
                     "--working-dir", str(repo)], env, cwd=repo)
    assert "gsm8k-grpo-pipeline/nightly" in deployed and str(repo) in deployed

    # The worker starts elsewhere (not in the repository): the deployment says where to run.
    with background([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--limit", "1"],
                    tmp_path / "worker.log", env, cwd=tmp_path):
        started = _run([str(BIN / "prefect"), "deployment", "run", "gsm8k-grpo-pipeline/nightly",
                        "--params", '{"stages": ["prepare"]}'], env)
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
        with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 600
            run = client.read_flow_run(flow_run_id)
            while not (run.state and run.state.is_final()):
                assert time.monotonic() < deadline, f"flow run still {run.state}:\n{(tmp_path / 'worker.log').read_text()[-3000:]}"
                time.sleep(2)
                run = client.read_flow_run(flow_run_id)
    log = (tmp_path / "worker.log").read_text()
    assert run.state.is_completed(), f"{run.state}:\n{log[-3000:]}"
    assert run.work_pool_name == POOL and flow_run_id in log, log[-3000:]
    assert (repo / "data" / "prepared" / "grpo.parquet").exists()
    assert set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == {"prepare"}
