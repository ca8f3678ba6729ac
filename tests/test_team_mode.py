"""Team mode on the servers a team runs (tests/servers.py): MLflow on PostgreSQL with its
artifacts on S3 and basic-auth, Prefect on PostgreSQL with basic auth, a DVC remote on S3.

One tiny pipeline run (`python -m flows.pipeline`, all stages through `register`) in clone A
logs to those servers while 8 load clients log to the same MLflow server at once. Then:
- nothing was lost: every load value arrived exactly once, every pipeline step metric too;
- the flow run is in the Prefect server's API, completed, one task per stage;
- clone A pushes its DVC outputs to S3; clone B (`git clone` of A: no DVC cache, no outputs)
  pulls them and runs `evaluate` without training anything, scoring what A scored;
- a machine with only the MLflow URL and credentials loads `models:/<name>@champion`;
- two flow runs at once, in A and B, register two versions without clobbering aliases;
- nobody gets in anonymously, and no credential appears in any log, store, artifact or output.
The numbers of the load test are printed (run with -s) and recorded in docs/reliability.md.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from stages.common.params import load_params
from stages.preset import render
from tests.conftest import tiny
from tests.mlflow_load import metric_value
from tests.servers import (DVC_REMOTE, MLFLOW_ADMIN, ROOT, TEAM_USER, Credentials, Postgres, S3, TeamMlflow,
                           background, basic_auth, http_status, prefect_client_env, read_flow_run)
from tests.test_flows import copy_repo

pytestmark = [pytest.mark.servers, pytest.mark.slow]

CLIENTS, VALUES = 8, 60  # N load processes, M params and M metric steps each
HF_TOKEN = f"hf_planted{uuid.uuid4().hex}"  # a credential the pipeline must carry nowhere
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
# The tiny profile, shortened: these tests prove the servers' plumbing (every stage logs, registers and
# pushes through them), not what training reaches; tests/test_flows.py runs the tiny preset unchanged.
TEAM = {"sft": {"max_steps": 4, "logging_steps": 2},
        "grpo": {"max_steps": 3, "save_steps": 3, "max_completion_length": 16},
        "evaluate": {"limit": 4}, "gguf": {"eval_questions": 2, "quantizations": ["q8_0"]}}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=team-test", "-c", "user.email=team@test.invalid", *args],
                          cwd=repo, capture_output=True, text=True, check=True).stdout


def dvc(repo: Path, env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc


def machine_env(tmp: Path, *extra: dict[str, str]) -> dict[str, str]:
    """A team member's environment: the project's quiet/offline settings, a planted HF token, no
    local MLflow store or Prefect server of its own, plus `extra` (server URLs and credentials)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_"))}
    env.pop("PIPELINE_MLRUNS_DIR", None)
    env.update({"HF_TOKEN": HF_TOKEN, "PREFECT_HOME": str(tmp / "prefect-home"), "DVC_NO_ANALYTICS": "1",
                "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"})
    for more in extra:
        env.update(more)
    return env


@dataclass
class TeamRun:
    a: Path
    env: dict[str, str]  # clone A's: MLflow + Prefect + S3 credentials
    stdout: str
    name: str  # registered model (project.name)
    experiment_id: str
    parent_run_id: str
    load: list[dict]
    load_seconds: float
    load_experiment: str
    load_started: float  # epoch seconds
    pushed: str


def wait_for_stage_run(client, experiment: str, stage: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until the pipeline's run of `stage` exists (the pipeline is then logging training steps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the pipeline ended before its sft stage started"
        exp = client.get_experiment_by_name(experiment)
        if exp and client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'", max_results=1):
            return
        time.sleep(1)
    raise TimeoutError(f"no {stage} run after {timeout} s")


def run_load(env: dict[str, str], experiment_id: str, logs: Path) -> tuple[list[dict], float]:
    """CLIENTS processes at once, each logging VALUES params and metric steps and an artifact."""
    start = time.perf_counter()
    with contextlib.ExitStack() as clients:
        procs = [clients.enter_context(background(
            [sys.executable, "-m", "tests.mlflow_load", "--experiment", experiment_id, "--client", str(i),
             "--values", str(VALUES)], logs / f"load-{i}.log", env, cwd=ROOT)) for i in range(CLIENTS)]
        for proc in procs:
            proc.wait(timeout=900)
    seconds = time.perf_counter() - start
    results = []
    for i, proc in enumerate(procs):
        out = (logs / f"load-{i}.log").read_text()
        assert proc.returncode == 0 and "Traceback" not in out, f"load client {i} failed:\n{out[-3000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results, seconds


@pytest.fixture(scope="module")
def team_run(tmp_path_factory, as_team_user, team_mlflow: TeamMlflow, team_prefect: str, s3: S3,
             team_credentials: Credentials) -> TeamRun:
    """Clone A runs the whole tiny pipeline against the team servers, under concurrent load, then pushes to S3."""
    import mlflow

    tmp = tmp_path_factory.mktemp("team-a")
    a = copy_repo(tmp / "a")
    (a / "params.yaml").write_text(render(tiny(TEAM)))
    env = machine_env(tmp, team_mlflow.client_env(), prefect_client_env(team_prefect, team_credentials), s3.env())
    name = load_params(a / "params.yaml").project.name
    client = mlflow.MlflowClient(team_mlflow.uri)
    load_experiment = f"load-{uuid.uuid4().hex[:8]}"
    load_exp_id = client.create_experiment(load_experiment)

    with background([sys.executable, "-m", "flows.pipeline"], tmp / "pipeline.log", env, cwd=a) as pipeline:
        wait_for_stage_run(client, name, "sft", pipeline)
        load_started = time.time()
        load, load_seconds = run_load(env, load_exp_id, tmp)
        pipeline.wait(timeout=1800)
    stdout = (tmp / "pipeline.log").read_text()
    assert pipeline.returncode == 0, stdout[-5000:]

    exp = client.get_experiment_by_name(name)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`pipeline.parent` = 'true'")

    # The team's remote: endpoint in .dvc/config (committed), credentials in the environment only.
    dvc(a, env, "remote", "add", "--default", "team", DVC_REMOTE)
    dvc(a, env, "remote", "modify", "team", "endpointurl", s3.endpoint)
    pushed = dvc(a, env, "push").stdout
    git(a, "add", "-A")
    git(a, "commit", "-q", "-m", "tiny pipeline run on the team servers")
    return TeamRun(a=a, env=env, stdout=stdout, name=name, experiment_id=exp.experiment_id,
                   parent_run_id=parent.info.run_id, load=load, load_seconds=load_seconds,
                   load_experiment=load_exp_id, load_started=load_started, pushed=pushed)


@pytest.fixture(scope="module")
def clone_b(tmp_path_factory, team_run: TeamRun, team_mlflow: TeamMlflow, team_prefect: str, s3: S3,
            team_credentials: Credentials) -> tuple[Path, dict[str, str]]:
    """`git clone` of A, then `dvc pull` from S3: the outputs without the work."""
    tmp = tmp_path_factory.mktemp("team-b")
    b = tmp / "b"
    subprocess.run(["git", "clone", "-q", str(team_run.a), str(b)], check=True)
    env = machine_env(tmp, team_mlflow.client_env(), prefect_client_env(team_prefect, team_credentials), s3.env())
    dvc(b, env, "pull")
    return b, env


@pytest.fixture(scope="module")
def as_team_user(team_mlflow: TeamMlflow):
    """This test process talks to the MLflow server as the team user (MLflow reads the environment)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", TEAM_USER)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", team_mlflow.credentials.mlflow_team)
        patch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
        yield


def mlflow_client(server: TeamMlflow):
    import mlflow

    assert os.environ.get("MLFLOW_TRACKING_USERNAME") == TEAM_USER, "use the as_team_user fixture"
    return mlflow.MlflowClient(server.uri)


# ------------------------------------------------------------------ the pipeline on the team servers
def test_pipeline_logs_to_the_servers_registers_and_appears_in_prefect(team_run, team_mlflow, team_prefect, s3,
                                                                       team_credentials):
    client = mlflow_client(team_mlflow)
    runs = client.search_runs([team_run.experiment_id], f"tags.`mlflow.parentRunId` = '{team_run.parent_run_id}'")
    stages = sorted(r.data.tags["stage"] for r in runs)
    declared = sorted(yaml.safe_load((team_run.a / "dvc.yaml").read_text())["stages"])
    # Every stage logs a run, except publish while publish.enabled is false (the tiny preset).
    assert stages == [s for s in declared if s != "publish"], stages
    assert all(r.info.status == "FINISHED" for r in runs)
    parent = client.get_run(team_run.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["pipeline.launcher"] == "prefect"

    # Every GRPO step's metrics arrived once, though 8 clients were logging at the same time.
    # (TRL's per-step `reward`: the trainer's end-of-training summary log at the last step
    # carries the callback's step_seconds and memory metrics a second time.)
    (grpo,) = [r for r in runs if r.data.tags["stage"] == "grpo"]
    steps = load_params(team_run.a / "params.yaml").grpo.max_steps
    history = client.get_metric_history(grpo.info.run_id, "reward")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))

    # The registry: both models, the first version champion; their files are in the S3 bucket.
    version = client.get_model_version_by_alias(team_run.name, "champion")
    adapter = client.get_model_version_by_alias(f"{team_run.name}-adapter", "champion")
    assert version.run_id == adapter.run_id
    keys = s3.keys("mlflow/")
    assert any(k.endswith("/MLmodel") and version.run_id in k or k.endswith("/MLmodel") for k in keys), keys[:20]
    assert any(k.endswith(".gguf") for k in keys), "the GGUF exports are not in the bucket"

    # Prefect: the flow run of the parent's tag, completed, one task per stage, under basic auth.
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    flow_run, task_runs = read_flow_run(team_prefect, team_credentials, flow_run_id)
    assert flow_run["state"]["type"] == "COMPLETED", flow_run["state"]
    assert sorted(t["name"].removeprefix("dvc repro ") for t in task_runs) == declared
    assert {t["state"]["type"] for t in task_runs} == {"COMPLETED"}


def test_concurrent_clients_lose_nothing(team_run, team_mlflow):
    """N processes x (M params + M metric steps + 1 artifact), while the pipeline logged its stages."""
    client = mlflow_client(team_mlflow)
    assert len({r["run_id"] for r in team_run.load}) == CLIENTS
    for result in team_run.load:
        run = client.get_run(result["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.params == {f"p{i}": f"c{result['client']}-v{i}" for i in range(VALUES)}
        history = client.get_metric_history(result["run_id"], "load")
        assert sorted((m.step, m.value) for m in history) == [
            (step, metric_value(result["client"], step)) for step in range(VALUES)]  # each exactly once
        local = client.download_artifacts(result["run_id"], "client.json")
        assert json.loads(Path(local).read_text()) == {"client": result["client"], "run_id": result["run_id"]}

    # The load overlapped the pipeline's logging: it started while the flow's parent run was open.
    parent = client.get_run(team_run.parent_run_id)
    assert parent.info.start_time / 1000 < team_run.load_started < parent.info.end_time / 1000

    requests = sum(r["requests"] for r in team_run.load)
    server_errors = sum(" 500 " in line or " 502 " in line or " 503 " in line
                        for line in (team_mlflow.logs / "mlflow.log").read_text().splitlines())
    print(f"\nteam load: N={CLIENTS} clients x M={VALUES} (params, metric steps) + 1 artifact each; "
          f"{requests} requests in {team_run.load_seconds:.1f} s = {requests / team_run.load_seconds:.1f} req/s; "
          f"per client {min(r['seconds'] for r in team_run.load):.1f}-{max(r['seconds'] for r in team_run.load):.1f} s; "
          f"client errors 0; server 5xx lines {server_errors}")
    assert server_errors == 0


# ------------------------------------------------------------------ artifacts across machines
def test_second_clone_pulls_and_evaluates_without_retraining(team_run, clone_b):
    b, env = clone_b
    for out in ("models/grpo", "models/sft", "models/merged", "models/base", "data/prepared"):
        assert (b / out).is_dir(), f"{out} was not pulled"
    trained = {p: p.stat().st_mtime_ns for p in (b / "models").rglob("*") if p.is_file()}

    proc = dvc(b, env, "repro", "--single-item", "--force", "evaluate")
    assert "Running stage 'evaluate'" in proc.stdout
    assert not [s for s in ("prepare", "base_model", "sft", "grpo", "merge") if f"Running stage '{s}'" in proc.stdout]
    assert {p: p.stat().st_mtime_ns for p in (b / "models").rglob("*") if p.is_file()} == trained
    ours = json.loads((b / "metrics" / "evaluate.json").read_text())
    theirs = json.loads((team_run.a / "metrics" / "evaluate.json").read_text())
    for model in ("sft", "grpo"):
        assert (ours[model]["strict"], ours[model]["flexible"]) == (theirs[model]["strict"], theirs[model]["flexible"])


def test_champion_loads_on_a_machine_with_only_the_url_and_credentials(team_run, team_mlflow, tmp_path):
    """No checkout, no AWS credentials, no local store: MLflow serves the S3 artifacts through itself."""
    code = ("import mlflow, json; m = mlflow.pyfunc.load_model('models:/%s@champion'); "
            "print(json.dumps(m.predict([%r], params={'max_new_tokens': 8}).to_dict('records')))"
            % (team_run.name, QUESTION))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "MLFLOW_DISABLE_TELEMETRY": "true", **team_mlflow.client_env()}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["question"] == QUESTION and isinstance(row["completion"], str)
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()  # no local store used


def test_two_clones_register_at_once_without_clobbering(team_run, clone_b, team_mlflow, tmp_path):
    """Flows in A and B at once, each re-registering (a registry param changed): two new versions,
    each from its own run; `candidate` on one of them; `champion` kept (equal scores do not promote)."""
    client = mlflow_client(team_mlflow)
    champion_before = client.get_model_version_by_alias(team_run.name, "champion").version
    b, env_b = clone_b
    cmd = [sys.executable, "-m", "flows.pipeline", "--stages", "register", "--set", "registry.min_improvement=0.001"]
    with contextlib.ExitStack() as flows:
        procs = [flows.enter_context(background(cmd, tmp_path / f"flow-{i}.log", env, cwd=repo))
                 for i, (repo, env) in enumerate(((team_run.a, team_run.env), (b, env_b)))]
        for proc in procs:
            proc.wait(timeout=1800)
    outputs = [(tmp_path / f"flow-{i}.log").read_text() for i in range(2)]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-5000:]
    # Only the registry changed: neither clone trains again (B pulled checkpoints/grpo with the rest:
    # the persistent output is cached, so the remote holds it).
    for out in outputs:
        assert not [s for s in ("sft", "grpo") if f"Running stage '{s}'" in out]

    registered = [json.loads((repo / "metrics" / "register.json").read_text()) for repo in (team_run.a, b)]
    versions = [r["models"][team_run.name] for r in registered]
    assert len(set(versions)) == 2
    for result, version in zip(registered, versions):
        assert client.get_model_version(team_run.name, version).run_id == result["run_id"]
        assert not result["promoted"]
    assert client.get_model_version_by_alias(team_run.name, "candidate").version in versions
    assert client.get_model_version_by_alias(team_run.name, "champion").version == champion_before


# ------------------------------------------------------------------ security
def test_anonymous_and_wrong_credentials_are_refused(team_mlflow, team_prefect, s3, postgres: Postgres,
                                                     team_credentials):
    import psycopg2
    from botocore.exceptions import ClientError

    search = f"{team_mlflow.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(search) == 401
    assert http_status(search, basic_auth(TEAM_USER, "wrong")) == 401
    assert http_status(search, basic_auth(TEAM_USER, team_credentials.mlflow_team)) == 200
    assert http_status(search, basic_auth(MLFLOW_ADMIN, team_credentials.mlflow_admin)) == 200

    flows = f"{team_prefect}/flows/filter"
    user, password = team_credentials.prefect_auth.split(":", 1)
    assert http_status(flows, data=b"{}") == 401
    assert http_status(flows, basic_auth(user, "wrong"), data=b"{}") == 401
    assert http_status(flows, basic_auth(user, password), data=b"{}") == 200

    # S3: private bucket, no public grant or policy, and unsigned or badly signed requests get nothing.
    s3.client().put_object(Bucket=s3.bucket, Key="probe/secret.txt", Body=b"team only")
    assert s3.client().get_object(Bucket=s3.bucket, Key="probe/secret.txt")["Body"].read() == b"team only"
    assert s3.client().get_bucket_policy_status(Bucket=s3.bucket)["PolicyStatus"]["IsPublic"] is False
    block = s3.client().get_public_access_block(Bucket=s3.bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values()) and len(block) == 4
    policy = json.loads(s3.client().get_bucket_policy(Bucket=s3.bucket)["Policy"])
    assert [s["Principal"] for s in policy["Statement"]] == [{"AWS": s3.principal}]
    grantees = [g["Grantee"] for g in s3.client().get_bucket_acl(Bucket=s3.bucket)["Grants"]]
    assert not [g for g in grantees if "AllUsers" in g.get("URI", "") or "AuthenticatedUsers" in g.get("URI", "")]
    # moto answers an unsigned request with 500 (it has no Authorization header to check), S3 with 403.
    assert http_status(f"{s3.endpoint}/{s3.bucket}/probe/secret.txt") in (403, 500)
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        s3.client(secret_key="wrong").get_object(Bucket=s3.bucket, Key="probe/secret.txt")

    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host=postgres.host, port=postgres.port, user=postgres.user, password="wrong", dbname="mlflow")


def test_no_credential_in_any_log_store_artifact_or_output(team_run, clone_b, team_logs, postgres, s3,
                                                           team_credentials, tmp_path):
    """The planted HF token and every real credential of the session, searched for in the servers'
    logs, a dump of every database, every object in the bucket, both clones and the pipeline's output."""
    needles = {"HF_TOKEN": HF_TOKEN, "AWS secret": s3.secret_key, "PostgreSQL password": postgres.password,
               **{f"credential {i}": c.split(":")[-1] for i, c in enumerate(team_credentials.all())}}
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    for database in ("mlflow", "mlflow_auth", "prefect"):
        dump = subprocess.run(["pg_dump", "-h", postgres.host, "-p", str(postgres.port), "-U", postgres.user, database],
                              env={**os.environ, **postgres.env()}, capture_output=True, check=True, timeout=120)
        (dumps / f"{database}.sql").write_bytes(dump.stdout)
    assert b"stage" in (dumps / "mlflow.sql").read_bytes() and b"dvc repro" in (dumps / "prefect.sql").read_bytes()
    objects = tmp_path / "s3"
    for key in s3.keys(""):
        target = objects / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    assert list(objects.rglob("MLmodel"))

    roots = [team_logs, dumps, objects, team_run.a, clone_b[0]]
    texts = [team_run.stdout]
    for what, needle in needles.items():
        found = [str(f) for root in roots for f in root.rglob("*")
                 if f.is_file() and not f.is_symlink() and needle.encode() in f.read_bytes()]
        assert found == [], f"{what} found in {found}"
        assert not [t for t in texts if needle in t], f"{what} in the pipeline's output"
