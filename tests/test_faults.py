"""Faults tried as a user would meet them, on the tiny profile (docs/reliability.md lists them):
bad params edits under `make repro` and the flow, the grpo stage killed under `dvc repro`, the
whole flow killed mid-GRPO, a full disk while a checkpoint is written, a truncated checkpoint.

Real parts throughout: a copy of the repository with real DVC, `make repro`, the flow CLI against
a real `prefect server start` on loopback, the real stages on the tiny model, SIGKILL. The one
stand-in: a full disk is a write hook on torch.save (a size-limited mount needs privileges).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages.common.checkpoints import checkpoint_problem
from stages.common.params import ROOT
from stages.preset import render
from tests.conftest import tiny
from tests.test_flows import copy_repo
from tests.test_servers import client_env

pytestmark = pytest.mark.slow

PY = sys.executable
OUTPUTS = ("data/prepared", "models", "checkpoints", "metrics", "plots", "dvc.lock")
FAST = {"sft": {"max_steps": 4},
        "grpo": {"max_steps": 6, "save_steps": 2, "max_completion_length": 16, "log_completions_every": 0}}


def snapshot(repo: Path, names: tuple[str, ...] = OUTPUTS) -> dict[str, str]:
    """sha256 of every file of the named outputs (relative path -> hash)."""
    out = {}
    for name in names:
        top = repo / name
        for f in sorted([top] if top.is_file() else top.rglob("*")):
            if f.is_file():
                out[str(f.relative_to(repo))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def snapshot_of(full: dict[str, str], prefix: str) -> dict[str, str]:
    return {name: digest for name, digest in full.items() if name.startswith(prefix)}


def run(cmd: list[str], repo: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


def set_params(repo: Path, overrides: dict) -> None:
    (repo / "params.yaml").write_text(render(tiny({**FAST, **overrides})))


def start_and_kill_when(cmd: list[str], repo: Path, env: dict[str, str], ready: Path, log: Path,
                        timeout: float = 600) -> None:
    """Run cmd in a process group of its own and SIGKILL the whole group once `ready` exists."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError(f"{ready} did not appear:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of the repository where `dvc repro grpo` has run (prepare, base_model, sft, grpo)."""
    repo = copy_repo(tmp_path_factory.mktemp("faults") / "repo")
    (repo / ".venv").symlink_to(ROOT / ".venv")  # `make repro` finds the installed venv: install is a no-op
    set_params(repo, {})
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "PIPELINE_MLRUNS_DIR": str(repo / "mlruns")}
    done = run([PY, "-m", "dvc", "repro", "grpo"], repo, env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return repo, env


# ------------------------------------------------------------------ bad params cost nothing
BAD_EDITS = {
    "malformed value": ({"grpo": {"learning_rate": "fast"}}, "grpo.learning_rate: got 'fast'"),
    "unknown reward name": ({"grpo": {"rewards": [{"name": "format_exactt"}]}}, "unknown reward 'format_exactt'"),
    "custom reward in a missing module": ({"grpo": {"rewards": [{"name": "my_team.rewards:score"}]}},
                                          "cannot import module 'my_team.rewards'"),
}


@pytest.mark.parametrize("case", list(BAD_EDITS))
def test_a_bad_params_edit_costs_nothing(workspace, case):
    """`make repro` and the flow stop before DVC runs a stage: every output stays byte-identical,
    checkpoints/grpo and models/grpo included. A plain `dvc repro` deletes grpo's cached outputs
    before the stage fails on its own check, which leaves checkpoints/grpo alone; `dvc checkout grpo`
    then restores the rest."""
    repo, env = workspace
    before, good = snapshot(repo), (repo / "params.yaml").read_text()
    edit, message = BAD_EDITS[case]
    raw = yaml.safe_load(good)
    for section, values in edit.items():
        raw[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        make = run(["make", "repro"], repo, env)
        assert make.returncode != 0 and message in make.stderr, make.stdout[-2000:] + make.stderr[-2000:]
        assert "Nothing was run; no output was touched." in make.stderr
        assert "Running stage" not in make.stdout
        flow = run([PY, "-m", "flows.pipeline"], repo, env)
        assert flow.returncode != 0 and message in flow.stderr, flow.stdout[-2000:] + flow.stderr[-2000:]
        assert snapshot(repo) == before

        plain = run([PY, "-m", "dvc", "repro", "grpo"], repo, env)
        assert plain.returncode != 0 and message in plain.stdout + plain.stderr, plain.stderr[-2000:]
        assert snapshot(repo, ("checkpoints",)) == snapshot_of(before, "checkpoints/")
        assert run([PY, "-m", "dvc", "checkout", "grpo"], repo, env).returncode == 0
        assert snapshot(repo) == before
    finally:
        (repo / "params.yaml").write_text(good)


# ------------------------------------------------------------------ kills
def test_stage_killed_under_dvc_repro_is_undone_by_dvc_checkout_and_resumes(workspace):
    """SIGKILL of `dvc repro grpo` mid-training: DVC had deleted models/grpo, metrics/grpo.json and
    the plots; `dvc checkout <those paths>` brings them back byte-identical; the next run resumes from the newest
    checkpoint, and the killed runs are closed in MLflow."""
    import mlflow

    repo, env = workspace
    kept = snapshot(repo, ("models/grpo", "metrics/grpo.json", "plots"))
    set_params(repo, {"grpo": {**FAST["grpo"], "max_steps": 12}})  # a longer budget: grpo resumes
    start_and_kill_when([PY, "-m", "dvc", "repro", "grpo"], repo, env,
                        repo / "checkpoints/grpo/checkpoint-8/trainer_state.json", repo.parent / "killed-repro.log")
    assert not (repo / "models/grpo").exists() and not (repo / "metrics/grpo.json").exists()

    # By path: `dvc checkout grpo` would also roll checkpoints/grpo back (it refuses without --force).
    checkout = run([PY, "-m", "dvc", "checkout", "models/grpo", "metrics/grpo.json", "plots/grpo_rewards.csv",
                    "plots/grpo_rewards.png"], repo, env)
    assert checkout.returncode == 0, checkout.stderr[-2000:]
    assert snapshot(repo, ("models/grpo", "metrics/grpo.json", "plots")) == kept

    again = run([PY, "-m", "dvc", "repro", "grpo"], repo, env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    metrics = json.loads((repo / "metrics/grpo.json").read_text())
    assert metrics["resumed_from_checkpoint"] in {"checkpoint-8", "checkpoint-10"} and metrics["steps"] == 12

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(tiny(FAST).project.name)
    parents = client.search_runs([exp.experiment_id], "tags.`pipeline.launcher` = 'dvc repro'", order_by=["start_time ASC"])
    # The first session finished (closed when the next one started), the killed one KILLED, the last still open.
    assert [p.info.status for p in parents] == ["FINISHED", "KILLED", "RUNNING"]
    assert parents[1].data.tags["pipeline.closed_by"].startswith("a later start: process ")


UPSTREAM = ("data/prepared", "models/base", "models/sft", "metrics/prepare.json", "metrics/base_model.json",
            "metrics/sft.json")


def test_flow_killed_mid_grpo_is_closed_and_resumed_by_the_next_run(workspace, prefect_api, tmp_path):
    """SIGKILL of the flow's whole process group mid-GRPO; the next flow run closes the killed parent
    as KILLED, resumes grpo and leaves every upstream output byte-identical."""
    import mlflow

    repo, env = workspace
    env = {**client_env(tmp_path, repo, prefect_api), "PATH": env["PATH"]}
    upstream = snapshot(repo, UPSTREAM)
    set_params(repo, {"grpo": {**FAST["grpo"], "max_steps": 18}})
    start_and_kill_when([PY, "-m", "flows.pipeline", "--stages", "grpo"], repo, env,
                        repo / "checkpoints/grpo/checkpoint-14/trainer_state.json", tmp_path / "killed-flow.log")

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(tiny(FAST).project.name)
    (killed,) = client.search_runs([exp.experiment_id], "tags.`pipeline.launcher` = 'prefect'")
    assert killed.info.status == "RUNNING"

    again = run([PY, "-m", "flows.pipeline", "--stages", "grpo"], repo, env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    metrics = json.loads((repo / "metrics/grpo.json").read_text())
    assert metrics["resumed_from_checkpoint"] in {"checkpoint-14", "checkpoint-16"} and metrics["steps"] == 18
    assert snapshot(repo, UPSTREAM) == upstream
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id], "tags.`pipeline.launcher` = 'prefect'")}
    assert runs[killed.info.run_id].info.status == "KILLED"
    assert sorted(r.info.status for r in runs.values()) == ["FINISHED", "KILLED"]


# ------------------------------------------------------------------ checkpoints: full disk, truncation
DISK_FULL = """
import errno, runpy, torch
real_save = torch.save
def save(obj, f, *args, **kwargs):  # the disk fills up while checkpoint-4 is written
    if "checkpoint-4" in str(f):
        with open(f, "wb") as out:
            out.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return real_save(obj, f, *args, **kwargs)
torch.save = save
runpy.run_module("stages.grpo", run_name="__main__")
"""


@pytest.fixture(scope="module")
def grpo_work(tmp_path_factory, prepared_dir, base_dir, mlruns_dir):
    """The grpo stage alone (sft off) in a tmp workspace: first with a disk that fills up while
    checkpoint-4 is saved, then again with room. Returns (workspace, env, first, second)."""
    work = tmp_path_factory.mktemp("grpo-faults")
    shutil.copytree(prepared_dir, work / "data" / "prepared")
    shutil.copytree(base_dir, work / "models" / "base")
    (work / "params.yaml").write_text(render(tiny({"sft": {"enabled": False}, "grpo": FAST["grpo"]})))
    env = {**os.environ, "PIPELINE_WORKDIR": str(work), "PIPELINE_MLRUNS_DIR": str(mlruns_dir)}
    first = run([PY, "-c", DISK_FULL], ROOT, env)
    after_first = {"finished": (work / "metrics" / "grpo.json").exists(),
                   "checkpoints": sorted(p.name for p in (work / "checkpoints/grpo").glob("checkpoint-*"))}
    second = run([PY, "-m", "stages.grpo"], ROOT, env)
    return work, env, (first, after_first), second


def test_a_full_disk_while_saving_a_checkpoint_loses_only_the_steps_since_the_last_one(grpo_work):
    work, _, (first, after_first), second = grpo_work
    assert first.returncode == 1 and "OSError: [Errno 28] No space left on device" in first.stderr
    assert after_first == {"finished": False, "checkpoints": ["checkpoint-2", "checkpoint-4"]}  # 4: cut off
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads((work / "metrics" / "grpo.json").read_text())
    assert (metrics["resumed_from_checkpoint"], metrics["steps"]) == ("checkpoint-2", 6)
    assert checkpoint_problem(work / "checkpoints/grpo/checkpoint-6") is None


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(grpo_work, tmp_path):
    work, env = grpo_work[:2]
    copy = shutil.copytree(work, tmp_path / "work", ignore=shutil.ignore_patterns("metrics"))
    weights = copy / "checkpoints/grpo/checkpoint-6/model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (copy / "params.yaml").write_text(render(tiny({"sft": {"enabled": False}, "grpo": {**FAST["grpo"], "max_steps": 8}})))
    resumed = run([PY, "-m", "stages.grpo"], ROOT, {**env, "PIPELINE_WORKDIR": str(copy)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "warning: checkpoint-6 cannot be resumed from (model.safetensors unreadable" in resumed.stdout
    metrics = json.loads((copy / "metrics" / "grpo.json").read_text())
    assert (metrics["resumed_from_checkpoint"], metrics["steps"]) == ("checkpoint-4", 8)
