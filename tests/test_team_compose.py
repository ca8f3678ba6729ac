"""docker-compose.yml describes the servers the tests run (tests/servers.py), so it cannot drift.

Docker cannot run here; instead the compose file is read and held to the tests' own builders:
image versions against what the tests start (Debian's PostgreSQL major, moto's version), each
server's command against the argument builders, environment variable names against the
environments the fixtures pass, ports, the databases and the auth config, and the pip specs
the servers install against pyproject's `team` extra.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from tests import servers
from tests.servers import PORTS, ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
# Placeholders for the compose file's ${...} and the tests' random values: only names are compared.
FAKE_PG = servers.Postgres(port=PORTS["postgres"], password="x", version="0", logs=Path("."), host="postgres")
FAKE_S3 = servers.S3(endpoint="http://s3:5000", access_key="x", secret_key="x", principal="x", logs=Path("."))
FAKE_CREDS = servers.Credentials("x", "x", "x:x", "x")
# Settings only one side has, and why.
ONLY_IN_COMPOSE = {"prefect-server": {"PREFECT_UI_API_URL"}}  # the tests run Prefect without its UI


def environment(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in SERVICES[service].get("environment", {}).items()}


def test_images_are_the_versions_the_tests_run():
    bindir = servers.postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed here, so there is no tested version to compare")
    said = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True).stdout
    tested_major = re.search(r"\(PostgreSQL\) (\d+)\.", said).group(1)
    assert SERVICES["postgres"]["image"] == f"postgres:{tested_major}"

    import moto

    assert SERVICES["s3"]["image"] == f"motoserver/moto:{moto.__version__}"
    for service in ("mlflow", "prefect-server", "worker", "s3-init"):
        assert SERVICES[service]["image"] == "gsm8k-grpo:gpu"  # the project's pins: the tests' MLflow and Prefect


def test_commands_are_the_tests_commands():
    assert SERVICES["mlflow"]["command"] == ["mlflow", *servers.mlflow_team_args(
        "postgres", PORTS["postgres"], "0.0.0.0", PORTS["mlflow"], served_as="mlflow")]
    assert SERVICES["prefect-server"]["command"] == ["prefect", *servers.prefect_server_args("0.0.0.0",
                                                                                             PORTS["prefect-server"])]
    assert SERVICES["postgres"]["command"] == ["postgres", *[
        arg for key, value in servers.PG_SETTINGS.items() for arg in ("-c", f"{key}={value}")]]
    init = SERVICES["s3-init"]["command"]
    assert init[:2] == ["python", "scripts/s3_bucket.py"] and init[init.index("--bucket") + 1] == servers.BUCKET


def test_ports_and_urls():
    published = {name: SERVICES[name].get("ports", []) for name in SERVICES}
    assert published["mlflow"] == [f"{PORTS['mlflow']}:{PORTS['mlflow']}"]
    assert published["prefect-server"] == [f"{PORTS['prefect-server']}:{PORTS['prefect-server']}"]
    assert published["s3"] == [f"9000:{PORTS['s3']}"]  # host 9000: 5000 is MLflow's
    assert published["postgres"] == []  # reached only by the other services
    worker = environment("worker")
    assert worker["MLFLOW_TRACKING_URI"] == f"http://mlflow:{PORTS['mlflow']}"
    assert worker["PREFECT_API_URL"] == f"http://prefect-server:{PORTS['prefect-server']}/api"


def test_environment_names_match_what_the_fixtures_pass():
    mlflow_env = servers.mlflow_team_env(FAKE_PG, FAKE_S3, FAKE_CREDS, Path("/etc/mlflow/basic_auth.ini"))
    assert set(environment("mlflow")) == set(mlflow_env)
    assert environment("mlflow")["MLFLOW_AUTH_CONFIG_PATH"] == mlflow_env["MLFLOW_AUTH_CONFIG_PATH"]

    prefect_env = servers.prefect_team_env(FAKE_PG, FAKE_CREDS)
    assert set(environment("prefect-server")) == set(prefect_env) | ONLY_IN_COMPOSE["prefect-server"]
    assert environment("prefect-server")["PREFECT_API_DATABASE_CONNECTION_URL"] == \
        prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"]

    # The worker is a team member's machine: what the tests' clones get.
    client = {**servers.TeamMlflow("x", FAKE_CREDS, Path(".")).client_env(),
              **servers.prefect_client_env("x", FAKE_CREDS), **FAKE_S3.env()}
    assert set(environment("worker")) == set(client)


def test_no_credential_has_a_default_or_sits_in_a_url():
    text = (ROOT / "docker-compose.yml").read_text()
    for name in ("POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY",
                 "MLFLOW_TRACKING_PASSWORD", "PREFECT_AUTH_STRING"):
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses and all(use.startswith(":?") for use in uses), (name, uses)
    assert not re.search(r"://[^/\s@]+:[^/\s@]+@", text), "a password in a URL"


def test_databases_and_auth_config_are_the_tests():
    created = set(re.findall(r"CREATE DATABASE (\w+);", COMPOSE["configs"]["postgres-init"]["content"]))
    assert created | {environment("postgres")["POSTGRES_DB"]} == set(servers.DATABASES)
    assert environment("postgres")["POSTGRES_USER"] == servers.PG_USER
    assert COMPOSE["configs"]["mlflow-auth"]["content"] == servers.mlflow_auth_ini("postgres", PORTS["postgres"])


def test_servers_install_the_team_extra():
    team = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["team"]
    for service in ("mlflow", "worker"):
        entrypoint = SERVICES[service]["entrypoint"]
        installed = [spec for spec in shlex.split(entrypoint[2].split("&&")[0]) if spec not in ("pip", "install",
                                                                                                 "--quiet")]
        assert installed == team, (service, installed)
