"""The UIs, one command away: MLflow on the project's store, the Prefect server for scheduled runs.

    make ui             # python -m flows.ui mlflow   -> http://127.0.0.1:5000
    make prefect-ui     # python -m flows.ui prefect  -> http://127.0.0.1:4200
    make ui PORT=5050   # another port

Each prints its URL, then runs the server in the foreground (Ctrl-C stops it). `mlflow ui` started
by hand in the project root shows an empty store unless it is given the backend URI; here the URI
is the one the stages log to (stages/common/tracking.py: the local SQLite store under mlruns/,
or MLFLOW_TRACKING_URI when set, in which case there is nothing to start: its URL is printed). A
port already in use stops with a one-line fix instead of the server's traceback.
"""
from __future__ import annotations

import argparse
import errno
import os
import shutil
import socket
import sys
from pathlib import Path

HOST = "127.0.0.1"
DEFAULT_PORTS = {"mlflow": 5000, "prefect": 4200}


class PortInUse(RuntimeError):
    """The port a UI should listen on is taken."""


def check_port(host: str, port: int, ui: str) -> None:
    """Raise PortInUse (with the fix) when nothing can listen on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
            target = "ui" if ui == "mlflow" else "prefect-ui"
            raise PortInUse(f"port {port} on {host} is in use (another `make {target}` still running?): "
                            f"stop it, or pick another port: `make {target} PORT={port + 1}`") from None


def mlflow_command(port: int) -> tuple[list[str], str]:
    """(command, url) of the MLflow UI on the store the stages log to."""
    from stages.common import tracking

    tracking.MLRUNS.mkdir(parents=True, exist_ok=True)
    exe = _venv_tool("mlflow")
    # --workers 1: one gunicorn/uvicorn worker is plenty for one person, and light on 2 cores.
    cmd = [exe, "ui", "--backend-store-uri", tracking.tracking_uri(), "--host", HOST, "--port", str(port),
           "--workers", "1"]
    return cmd, f"http://{HOST}:{port}"


def prefect_command(port: int) -> tuple[list[str], str]:
    cmd = [_venv_tool("prefect"), "server", "start", "--host", HOST, "--port", str(port)]
    return cmd, f"http://{HOST}:{port}"


def _venv_tool(name: str) -> str:
    """The console script of this venv (servers exec further tools from PATH, so the venv goes first)."""
    here = Path(sys.executable).parent
    os.environ["PATH"] = str(here) + os.pathsep + os.environ.get("PATH", "")
    return str(here / name) if (here / name).exists() else (shutil.which(name) or name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ui", choices=sorted(DEFAULT_PORTS), help="which UI to start")
    parser.add_argument("--port", type=int, help="port to listen on (default: mlflow 5000, prefect 4200)")
    args = parser.parse_args(argv)
    port = args.port or DEFAULT_PORTS[args.ui]

    if args.ui == "mlflow":
        from stages.common import tracking

        if not tracking.is_local():
            print(f"MLflow: MLFLOW_TRACKING_URI is a tracking server; its UI: {tracking.redact(tracking.tracking_uri())}")
            return
    try:
        check_port(HOST, port, args.ui)
    except PortInUse as err:
        raise SystemExit(f"error: {err}") from None
    if args.ui == "mlflow":
        cmd, url = mlflow_command(port)
        # No job runner: its consumer processes serve GenAI scorer jobs the pipeline never runs, and poll
        # the store all the time (an idle SQLite server: ~19 s of CPU a minute with them, 0.1 s without).
        os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        print(f"MLflow UI: {url}  (store {tracking.tracking_uri()}; Ctrl-C stops it)", flush=True)
    else:
        cmd, url = prefect_command(port)
        print(f"Prefect UI: {url}  (Ctrl-C stops it)\n"
              f"  scheduled runs, in another shell: export PREFECT_API_URL={url}/api && python -m flows.deploy",
              flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
