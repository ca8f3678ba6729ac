"""The Prefect flows: stage order from dvc.yaml, params validation, the workspace lock, failure
handling with the MLflow parent, the summary artifact, continuous-training ticks, and the real
pipeline: the README's main command (every stage, through the CLI, Prefect and DVC) in a copy of
the repository, then a `dvc exp run -S ...` there.

Flow logic runs under `prefect_test_harness` against real, tiny DVC repositories made in tmp
(`git init` + `dvc init`, stages that are small Python commands): real DVC, real MLflow store.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import yaml

# Before Prefect is imported: its home (profiles, local storage) in tmp, never ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from flows import summary  # noqa: E402
from flows.continuous import continuous, decide  # noqa: E402
from flows.pipeline import StageFailed, pipeline  # noqa: E402
from stages.common.params import parse_overrides  # noqa: E402
from flows.workspace import (LOCK_NAME, WorkspaceBusy, resolve_params, stage_order,  # noqa: E402
                             workspace_lock, write_params)
from stages.common.params import ROOT, ParamsError, load_params  # noqa: E402
from tests.conftest import tiny  # noqa: E402

PY = sys.executable

# The stage commands of the tmp DVC repositories: copy a file, fail loudly, or "train".
STEP = textwrap.dedent('''
    import pathlib, sys, yaml
    action, *args = sys.argv[1:]
    if action == "copy":
        src, dst = map(pathlib.Path, args)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(src.read_text())
    elif action == "fail":
        with open("attempts.log", "a") as f:
            f.write("attempt\\n")
        print("boom: the stage broke on purpose", file=sys.stderr)
        sys.exit(3)
    elif action == "train":
        steps = yaml.safe_load(open("params.yaml"))["grpo"]["max_steps"]
        out = pathlib.Path("models/grpo")
        out.mkdir(parents=True, exist_ok=True)
        (out / "steps.txt").write_text(str(steps))
        with open("train.log", "a") as f:
            f.write(f"{steps}\\n")
''')
VARS = {"paths": {"metrics": "metrics", "gguf": "models/gguf", "grpo_checkpoints": "checkpoints/grpo", "plots": "plots",
                  "run_report": "reports/pipeline"}}


def make_dvc_repo(root: Path, stages: dict, params: dict | None = None) -> Path:
    """A real DVC repository with the given dvc.yaml stages and a params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([PY, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "step.py").write_text(STEP)
    (root / "src.txt").write_text("first data\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"vars": [VARS], "stages": stages}, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(params or {}))
    return root


def copy_repo(dst: Path) -> Path:
    """This checkout's source files (tracked and new, not ignored; no outputs) in a fresh git + DVC repo."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in files:
        # metrics/, plots/ and dvc.lock are what a pipeline run here wrote (`make pipeline` before `make test`).
        if name and name != "dvc.lock" and not name.startswith(("metrics/", "plots/", "tests/")) and (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    # Tests run the tiny profile whatever params.yaml this checkout holds (a clean clone holds the GPU recipe).
    from stages.preset import render, resolve

    (dst / "params.yaml").write_text(render(resolve("tiny")))
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    return dst


def copy_stage(src: str, dst: str, deps: list[str] | None = None) -> dict:
    return {"cmd": f"python step.py copy {src} {dst}", "deps": [src, *(deps or [])], "outs": [dst]}


@pytest.fixture
def experiment(mlruns_dir) -> str:
    return f"test-flows-{uuid.uuid4().hex[:8]}"


def mlflow_client():
    import mlflow

    from stages.common import tracking

    return mlflow.MlflowClient(tracking.tracking_uri())


def artifacts_of(flow_run_id) -> dict[str, str]:
    """key -> data of a flow run's artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a.data if isinstance(a.data, str) else json.dumps(a.data) for a in found}


# ------------------------------------------------------------------ stage order
def test_stage_order_follows_dependencies_not_declaration(tmp_path):
    repo = make_dvc_repo(tmp_path / "repo", {
        "report": copy_stage("b.txt", "report.txt"),
        "make_a": copy_stage("src.txt", "a.txt"),
        "make_b": copy_stage("a.txt", "b.txt"),
        "side": copy_stage("src.txt", "side.txt"),
    })
    assert stage_order(repo) == ["make_a", "make_b", "report", "side"]
    assert stage_order(repo, ["make_b"]) == ["make_a", "make_b"]
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['nope'\]"):
        stage_order(repo, ["nope"])


def test_project_stage_order_is_read_from_dvc_yaml():
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    order = stage_order(ROOT)
    assert order[:2] == ["prepare", "base_model"]
    assert {name.split("@")[0] for name in order} == set(declared)
    assert stage_order(ROOT, ["base_model"]) == ["prepare", "base_model"]


# ------------------------------------------------------------------ params
def test_parse_overrides_reads_yaml_values():
    assert parse_overrides(["grpo.beta=0.04", "evaluate.models=[base, grpo]", "prepare.max_train_rows=null"]) == {
        "grpo.beta": 0.04, "evaluate.models": ["base", "grpo"], "prepare.max_train_rows": None}
    with pytest.raises(ParamsError, match="expected key.path=value"):
        parse_overrides(["grpo.beta"])


def test_overrides_are_written_to_params_yaml_with_header_and_help(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    header = (tmp_path / "params.yaml").read_text().splitlines()[0]
    write_params(tmp_path, None, {"grpo.beta": 0.04})
    write_params(tmp_path, None, {"grpo.max_steps": 9})
    text = (tmp_path / "params.yaml").read_text()
    assert text.splitlines()[0] == header
    assert text.count("flows.pipeline applied overrides") == 1 and '{"grpo.max_steps": 9}' in text
    assert "# KL coefficient" in text  # help comments survive
    params = load_params(tmp_path / "params.yaml")
    assert (params.grpo.beta, params.grpo.max_steps) == (0.04, 9)


def test_bad_override_fails_the_flow_before_anything_runs(harness, tmp_path, experiment):
    repo = make_dvc_repo(tmp_path / "repo", {"make_a": copy_stage("src.txt", "a.txt")})
    with pytest.raises(ParamsError) as err:
        resolve_params(repo, None, {"grpo.num_generations": 1})
    state = pipeline(root=str(repo), overrides={"grpo.num_generations": 1}, experiment=experiment, return_state=True)
    assert state.is_failed()
    raised = state.result(raise_on_failure=False)
    assert isinstance(raised, ParamsError) and str(raised) == str(err.value)
    assert "grpo.num_generations" in str(raised)
    assert not (repo / "a.txt").exists() and not (repo / "dvc.lock").exists() and not (repo / LOCK_NAME).exists()
    assert mlflow_client().get_experiment_by_name(experiment) is None
    assert yaml.safe_load((repo / "params.yaml").read_text()) == {}


# ------------------------------------------------------------------ lock
def _hold_lock(repo: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the workspace lock for `seconds`; returns once it holds it."""
    code = (f"import sys, time; from filelock import FileLock; lock = FileLock({str(repo / LOCK_NAME)!r}); "
            f"lock.acquire(); print('held', flush=True); time.sleep({seconds}); lock.release()")
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_waits_for_the_lock(tmp_path):
    holder = _hold_lock(tmp_path, 2.0)
    start, messages = time.perf_counter(), []
    with workspace_lock(tmp_path, timeout=60, log=messages.append):
        waited = time.perf_counter() - start
    holder.wait(timeout=30)
    assert waited > 1.0 and "waiting up to 60 s" in messages[0]


def test_second_concurrent_run_fails_with_a_clear_message(harness, tmp_path, experiment):
    repo = make_dvc_repo(tmp_path / "repo", {"make_a": copy_stage("src.txt", "a.txt")})
    holder = _hold_lock(repo, 30.0)
    try:
        state = pipeline(root=str(repo), experiment=experiment, lock_timeout=1, return_state=True)
    finally:
        holder.kill()
        holder.wait()
    raised = state.result(raise_on_failure=False)
    assert isinstance(raised, WorkspaceBusy)
    assert f"still holds {repo / LOCK_NAME} after 1 s" in str(raised)
    assert not (repo / "a.txt").exists()


# ------------------------------------------------------------------ failure
def test_failing_stage_fails_the_flow_and_marks_the_parent_failed(harness, tmp_path, experiment):
    repo = make_dvc_repo(tmp_path / "repo", {
        "make_a": copy_stage("src.txt", "a.txt"),
        "boom": {"cmd": "python step.py fail", "deps": ["a.txt"]},
    }, params={"flow": {"retries": 1, "retry_delay_seconds": 0}})
    state = pipeline(root=str(repo), experiment=experiment, return_state=True)
    assert state.is_failed()
    raised = state.result(raise_on_failure=False)
    assert isinstance(raised, StageFailed)
    assert "stage boom failed" in str(raised) and "boom: the stage broke on purpose" in str(raised)
    assert (repo / "attempts.log").read_text().count("attempt") == 2  # one retry
    assert "make_a" in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]

    client = mlflow_client()
    exp = client.get_experiment_by_name(experiment)
    (parent,) = client.search_runs([exp.experiment_id])
    assert parent.info.status == "FAILED"
    assert parent.data.tags["pipeline.launcher"] == "prefect"
    assert parent.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)

    artifacts = artifacts_of(state.state_details.flow_run_id)
    report = artifacts["pipeline-summary"]
    assert "failed at boom" in report and "| make_a | ran |" in report and parent.info.run_id in report
    # The run report and each stage's whole log, on disk, in MLflow and in Prefect, failed run included.
    log = (repo / "reports/pipeline/logs/boom.log").read_text()
    assert log.count("boom: the stage broke on purpose") == 2  # both attempts
    assert raised.stage == "boom" and raised.log_file == repo / "reports/pipeline/logs/boom.log"
    assert "# GSM8K pipeline: failed at boom" in (repo / "reports/pipeline/report.md").read_text()
    assert "| boom | failed |" in artifacts["run-report"]
    logged = {a.path for path in ("report", "logs") for a in client.list_artifacts(parent.info.run_id, path)}
    assert {"report/report.html", "report/report.md", "logs/make_a.log", "logs/boom.log"} <= logged


def test_successful_run_records_stage_results_and_a_finished_parent(harness, tmp_path, experiment):
    repo = make_dvc_repo(tmp_path / "repo", {
        "make_b": copy_stage("a.txt", "b.txt"),
        "make_a": copy_stage("src.txt", "a.txt"),
    })
    first = pipeline(root=str(repo), experiment=experiment, overrides={"grpo.beta": 0.04})
    assert [s["result"] for s in first["stages"]] == ["ran", "ran"]
    assert load_params(repo / "params.yaml").grpo.beta == 0.04
    second = pipeline(root=str(repo), experiment=experiment)
    assert [(s["stage"], s["result"]) for s in second["stages"]] == [("make_a", "up to date"), ("make_b", "up to date")]
    run = mlflow_client().get_run(first["parent_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["override.grpo.beta"] == "0.04"


# ------------------------------------------------------------------ summary
def test_summary_renders_without_metrics(tmp_path):
    text = summary.markdown(title="T", status="finished", metrics_dir=tmp_path / "metrics",
                            gguf_dir=tmp_path / "gguf", mlflow_link="`abc`")
    assert "| grpo | n/a | n/a |" in text and "| base | n/a | n/a |" in text
    assert text.count("n/a") == 8  # 3 models x 2 scores, registry, GGUF
    assert summary.table_rows(tmp_path) == [
        {"model": m, "gsm8k_strict": "n/a", "gsm8k_flexible": "n/a"} for m in ("base", "sft", "grpo")]


def test_summary_renders_scores_registry_and_gguf_files(tmp_path):
    metrics, gguf = tmp_path / "metrics", tmp_path / "gguf"
    metrics.mkdir()
    gguf.mkdir()
    # The layout stages/evaluate.py writes; grpo in lm-eval's own metric names, with no flexible score.
    (metrics / "eval_base.json").write_text(json.dumps({"base": {
        "evaluated": 1, "strict_stderr": 0.01, "strict": 0.05, "flexible": 0.1, "answer_block_rate": 0.9}}))
    (metrics / "evaluate.json").write_text(json.dumps({
        "dataset": "file:train.jsonl+test.jsonl", "base": {"evaluated": 1, "strict": 0.99, "flexible": 0.99},
        "sft": {"evaluated": 1, "strict": 0.2, "flexible": 0.25},
        "grpo": {"exact_match_stderr/strict-match": 0.01, "exact_match/strict-match": 0.4},
        "delta": {"grpo_minus_sft": {"strict": 0.2, "flexible": 0.0}}}))
    (metrics / "register.json").write_text(json.dumps({"promoted": True, "champion_version": 3}))
    (gguf / "model-q8_0.gguf").write_bytes(b"\0" * 2**20)
    text = summary.markdown(title="T", status="finished", metrics_dir=metrics, gguf_dir=gguf, mlflow_link="`abc`",
                            stages=[{"stage": "grpo", "result": "ran", "seconds": 1.5}])
    assert "## Scores (file:train.jsonl+test.jsonl)" in text and "GSM8K" not in text
    assert "| base | 0.0500 | 0.1000 |" in text
    assert "| sft | 0.2000 | 0.2500 |" in text
    assert "| grpo | 0.4000 | n/a |" in text
    assert "- promoted: True" in text and "- champion_version: 3" in text
    assert "`model-q8_0.gguf` (1.0 MiB)" in text and "| grpo | ran | 1.5000 |" in text


def test_summary_says_what_was_dropped_or_cut(tmp_path):
    (tmp_path / "prepare.json").write_text(json.dumps({
        "too_long": {"train": 2, "test": 1, "max_question_chars": 4000},
        "warnings": ["prepare.sft_examples is 256 but only 100 training rows are left after cleaning: 99 become SFT "
                     "examples and 1 GRPO prompt(s)"]}))
    (tmp_path / "evaluate.json").write_text(json.dumps({"grpo": {"strict": 0.1, "prompts_truncated": 3},
                                                        "sft": {"prompts_truncated": 0}}))
    text = summary.markdown(title="T", status="finished", metrics_dir=tmp_path, gguf_dir=tmp_path, mlflow_link="`abc`")
    assert "- prepare dropped 2 training and 1 test questions longer than 4000 characters" in text
    assert "- prepare: prepare.sft_examples is 256 but only 100 training rows" in text
    assert "- evaluate: 3 grpo prompt(s) longer than the model's context were cut by lm-eval" in text
    assert "sft prompt" not in text
    assert "Dropped or cut" not in summary.markdown(title="T", status="finished", metrics_dir=tmp_path / "none",
                                                     gguf_dir=tmp_path, mlflow_link="`abc`")


# ------------------------------------------------------------------ continuous training
def test_decide_trains_only_on_new_data_or_budget():
    seen = {"data_digest": "d1", "time": "t"}
    common = {"current_steps": 10, "add_steps": 5}
    assert decide(data_changed=False, data_digest="d1", state={}, step_budget=None, **common).max_steps == 15
    idle = decide(data_changed=False, data_digest="d1", state=seen, step_budget=None, **common)
    assert not idle.train and "nothing to train" in idle.reason
    assert decide(data_changed=False, data_digest="d2", state=seen, step_budget=None, **common).train
    assert decide(data_changed=True, data_digest="d1", state=seen, step_budget=None, **common).train
    budget = decide(data_changed=False, data_digest="d1", state=seen, step_budget=12, **common)
    assert budget.train and budget.max_steps == 12
    assert not decide(data_changed=True, data_digest="d2", state=seen, step_budget=10, **common).train


def test_continuous_ticks_train_once_per_new_data(harness, tmp_path, experiment):
    repo = make_dvc_repo(tmp_path / "repo", {
        "prepare": copy_stage("src.txt", "data/prepared/train.txt"),
        "grpo": {"cmd": "python step.py train", "deps": ["data/prepared/train.txt"],
                 "params": ["grpo.max_steps"], "outs": ["models/grpo"]},
    }, params={"model": {"name_or_path": "tiny"}, "grpo": {"max_steps": 10}, "flow": {"continuous_steps": 5}})
    tick = {"root": str(repo), "experiment": experiment, "train_targets": ["grpo"]}

    first = continuous(**tick)
    assert first["trained"] and first["max_steps"] == 15
    second = continuous(**tick)
    assert not second["trained"] and "nothing to train" in second["reason"]
    assert (repo / "train.log").read_text().split() == ["15"]

    (repo / "src.txt").write_text("new data\n")
    third = continuous(**tick)
    assert third["trained"] and third["max_steps"] == 20
    assert (repo / "train.log").read_text().split() == ["15", "20"]
    assert (repo / "data/prepared/train.txt").read_text() == "new data\n"
    state = json.loads((repo / "checkpoints/continuous.json").read_text())
    assert state["grpo_max_steps"] == 20 and state["mlflow_parent_run_id"] == third["parent_run_id"]
    assert len(mlflow_client().search_runs([mlflow_client().get_experiment_by_name(experiment).experiment_id])) == 2


# ------------------------------------------------------------------ the real stages
@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """The README's main command, `python -m flows.pipeline --preset tiny` (what `make pipeline` runs),
    in a copy of the repository: every stage of dvc.yaml, through Prefect and DVC."""
    tmp = tmp_path_factory.mktemp("pipeline")
    repo = copy_repo(tmp / "repo")
    mlruns = tmp / "mlruns"
    env = {**os.environ, "PIPELINE_MLRUNS_DIR": str(mlruns), "PREFECT_HOME": str(tmp / "prefect"),
           # DVC runs each stage as `python -m stages.<name>` from PATH, as `make repro` arranges.
           "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([PY, "-m", "flows.pipeline", "--preset", "tiny"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return repo, mlruns, env


@pytest.mark.slow
def test_the_main_command_runs_every_stage_under_one_parent(pipeline_run):
    repo, mlruns, env = pipeline_run
    declared = set(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    assert set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == declared
    assert (repo / "models/base/base.json").exists() and list((repo / "models/gguf").glob("*.gguf"))
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert evaluation["dataset"] == "gsm8k" and evaluation["grpo"]["evaluated"] == 1
    assert json.loads((repo / "metrics/register.json").read_text())["enabled"] is True
    status = subprocess.run([PY, "-m", "dvc", "status"], cwd=repo, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{mlruns / 'mlflow.db'}")
    exp = client.get_experiment_by_name(tiny().project.name)
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("pipeline.parent") == "true"]
    children = [r for r in runs if r is not parent and r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and parent.data.tags["pipeline.launcher"] == "prefect"
    assert parent.data.params["preset"] == "tiny"
    # publish is opt-in (publish.enabled is false here): it records its skip in metrics, not in MLflow.
    assert not load_params(repo / "params.yaml").publish.enabled
    assert sorted(c.data.tags["stage"] for c in children) == sorted(declared - {"publish"})
    assert "gsm8k/grpo/strict" in parent.data.metrics


@pytest.mark.slow
def test_dvc_exp_run_with_a_changed_param(pipeline_run):
    """`dvc exp run -S grpo.beta=0.04` on the tiny profile: GRPO and what follows it rerun, the
    experiment records the new value and its metrics."""
    repo, _, env = pipeline_run
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "baseline"], cwd=repo, check=True)
    lock_before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    proc = subprocess.run([PY, "-m", "dvc", "exp", "run", "-S", "grpo.beta=0.04"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("grpo", "evaluate", "merge", "gguf", "register"):
        assert f"Running stage '{stage}'" in proc.stdout, stage
    assert "Running stage 'sft'" not in proc.stdout  # not downstream of grpo.beta
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert lock["grpo"]["params"]["params.yaml"]["grpo"]["beta"] == 0.04
    assert lock["sft"] == lock_before["sft"]
    shown = json.loads(subprocess.run([PY, "-m", "dvc", "exp", "show", "--json"], cwd=repo, env=env,
                                      capture_output=True, text=True, check=True).stdout)

    def experiments(node):
        """Every named experiment in `dvc exp show --json`, wherever DVC nests it."""
        if isinstance(node, dict):
            if node.get("name") and isinstance(node.get("data"), dict) and "params" in node["data"]:
                yield node
            for value in node.values():
                yield from experiments(value)
        elif isinstance(node, list):
            for value in node:
                yield from experiments(value)

    (exp,) = [e for e in experiments(shown)
              if e["data"]["params"]["params.yaml"]["data"]["grpo"]["beta"] == 0.04]
    assert "metrics/evaluate.json" in exp["data"]["metrics"]
    assert json.loads((repo / "metrics/grpo.json").read_text())["steps"] == load_params(repo / "params.yaml").grpo.max_steps
