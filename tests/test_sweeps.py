"""Sweeps the way the README documents them: GRPO variants queued with `dvc exp run --queue -S ...`
and run by `dvc queue start -j 2`, in a copy of this repository on the tiny profile, with real
DVC and the default local MLflow store.

Each queued experiment runs in a temporary copy of the repository that DVC deletes afterwards;
its MLflow run must land in the store of the repository it was queued from (DVC_ROOT).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.preset import render
from tests.conftest import tiny
from tests.test_flows import copy_repo

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# sft off and two GRPO steps with short completions: the sweep's plumbing, not its results.
BASE = {"sft": {"enabled": False},
        "grpo": {"max_steps": 2, "save_steps": 2, "log_completions_every": 0, "max_completion_length": 16}}
VARIANTS = {"sweep-dr-grpo": ["grpo.loss_type=dr_grpo", "grpo.scale_rewards=none"],
            "sweep-lr": ["grpo.learning_rate=0.003"]}


def _dvc(repo: Path, env: dict, *args: str, timeout: float = 900) -> str:
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=repo, check=True,
                   capture_output=True)


def test_queued_grpo_variants_run_and_show_up_in_dvc_and_mlflow(tmp_path):
    import mlflow

    repo = copy_repo(tmp_path / "repo")
    (repo / "params.yaml").write_text(render(tiny(BASE)))
    env = {k: v for k, v in os.environ.items() if k not in ("PIPELINE_MLRUNS_DIR", "PIPELINE_WORKDIR")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the stage cmds say `python`
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "tiny sweep baseline")
    _dvc(repo, env, "repro", "sft")  # the upstream stages once; the experiments share them through the cache
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "upstream outputs")

    for name, overrides in VARIANTS.items():
        _dvc(repo, env, "exp", "run", "--queue", "grpo", "-n", name, *[a for o in overrides for a in ("-S", o)])
    try:
        _dvc(repo, env, "queue", "start", "-j", "2")
        deadline = time.monotonic() + 900
        while any(state in _dvc(repo, env, "queue", "status") for state in ("Queued", "Running")):
            assert time.monotonic() < deadline, _dvc(repo, env, "queue", "status")
            time.sleep(5)
    finally:
        subprocess.run([str(BIN / "dvc"), "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True)
    status = _dvc(repo, env, "queue", "status")
    assert "Failed" not in status, status + "\n".join(_dvc(repo, env, "queue", "logs", name) for name in VARIANTS)

    shown = json.loads(_dvc(repo, env, "exp", "show", "--json"))
    found = {rev["name"]: rev["data"] for row in shown for exp in (row.get("experiments") or []) for rev in exp["revs"]}
    assert set(VARIANTS) <= set(found), f"experiments shown: {sorted(found)}"
    for name, overrides in VARIANTS.items():
        grpo_params = found[name]["params"]["params.yaml"]["data"]["grpo"]
        for override in overrides:
            key, value = override.removeprefix("grpo.").split("=")
            assert str(grpo_params[key]) == value, (name, key, grpo_params[key])
        assert found[name]["metrics"]["metrics/grpo.json"]["data"]["steps"] == 2

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'grpo'")
    by_exp = {r.data.tags.get("dvc_exp_name"): r for r in runs}
    assert set(VARIANTS) <= set(by_exp), f"grpo runs in the repository's store: {sorted(map(str, by_exp))}"
    assert by_exp["sweep-dr-grpo"].data.params["grpo.loss_type"] == "dr_grpo"
    assert by_exp["sweep-dr-grpo"].data.params["grpo.scale_rewards"] == "none"
    assert float(by_exp["sweep-lr"].data.params["grpo.learning_rate"]) == 0.003
    assert all(by_exp[name].info.status == "FINISHED" for name in VARIANTS)
