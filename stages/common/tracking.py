"""MLflow at the edges: where runs go, how stage runs nest, what every run is tagged with.

Local default: a SQLite store and an artifact root inside mlruns/ (MLflow 3 keeps the plain
file store in maintenance mode). MLFLOW_TRACKING_URI switches to a server.

Nesting: every stage run is a child of one pipeline run. The Prefect flow passes its parent
in PIPELINE_PARENT_RUN_ID; under a plain `dvc repro` the first stage creates a parent for
that `dvc` process and the later stages find it by tag. A stage run by hand stands alone.

Runs a kill leaves open: every run is tagged with its owner process (pipeline.host, .pid,
.pid_started); each stage start and each flow start closes the runs of its experiment whose
process on this host has ended (close_orphans): a killed stage or flow as KILLED, a `dvc repro`
parent (which nothing else closes) as FAILED, KILLED or FINISHED after its children.

Outages of a tracking server: a stage that cannot reach it at the start fails in seconds,
before any work (TrackingUnavailable); once the work is done, a failed metrics log or end of
run only warns (tolerate_outage), so a finished stage keeps its outputs. Credentials
(MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN) are read by MLflow from the environment only.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any, Iterator

import yaml

from stages.common.params import ROOT, Params
from stages.common.paths import ROOT as WORKSPACE

PARENT_ENV = "PIPELINE_PARENT_RUN_ID"
log = logging.getLogger(__name__)
# The local store, in the workspace. An experiment DVC runs in a temporary copy of the repository
# (`dvc exp run --queue` / `--temp`) logs to the store of the repository it was queued from, which DVC
# names in DVC_ROOT: the copy is deleted afterwards. Tests point it elsewhere with PIPELINE_MLRUNS_DIR.
MLRUNS = Path(os.environ.get("PIPELINE_MLRUNS_DIR") or Path(os.environ.get("DVC_ROOT") or WORKSPACE) / "mlruns")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{MLRUNS / 'mlflow.db'}"


def redact(text: str) -> str:
    """Text with the user:password of any URL in it masked, for messages and logs."""
    return re.sub(r"//[^/@\s]+@", "//***@", text)


def is_local() -> bool:
    return tracking_uri().startswith(("sqlite:", "file:")) or "://" not in tracking_uri()


def setup(experiment: str) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    if is_local():
        MLRUNS.mkdir(exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        location = (MLRUNS / "artifacts" / experiment).as_uri() if is_local() else None
        exp_id = mlflow.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


class TrackingUnavailable(RuntimeError):
    """The tracking server could not be used when a stage started; nothing was loaded or trained."""


@contextlib.contextmanager
def quick_http(retries: int = 0, timeout_s: int = 10) -> Iterator[None]:
    """MLflow HTTP calls in this block give up after `retries` retries and `timeout_s` seconds.

    MLflow retries a refused connection 7 times with growing backoff (minutes) and reads its
    settings from the environment at each request, so they are set here for the block only,
    and only those the user has not set.
    """
    added = {k: v for k, v in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
                               "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextlib.contextmanager
def tolerate_outage(what: str) -> Iterator[None]:
    """For tracking calls after the work is done: with a tracking server that cannot be reached,
    warn (naming `what`) and go on instead of failing the stage. The local store still raises."""
    if is_local():
        yield
        return
    from mlflow.exceptions import MlflowException

    try:
        with quick_http(retries=1):
            yield
    except (MlflowException, OSError) as err:
        log.warning("MLflow at %s could not be reached: %s (%s)", redact(tracking_uri()), what, redact(str(err)))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stage_deps(stage: str) -> list[str]:
    """The deps of a stage as dvc.yaml declares them, templates resolved as DVC resolves them."""
    from stages.common.paths import stage_spec

    return stage_spec(stage, ROOT)["deps"]


def inputs_digest(stage: str, exclude: tuple[str, ...] = ()) -> str:
    """sha256 over the contents of a stage's declared deps (what DVC would hash), short form;
    deps named in `exclude` are left out."""
    h = hashlib.sha256()
    for dep in sorted(d for d in stage_deps(stage) if d not in exclude):
        p = WORKSPACE / dep if (WORKSPACE / dep).exists() else ROOT / dep
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else ([p] if p.exists() else [])
        for f in files:
            h.update(str(f.relative_to(p.parent)).encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become JSON strings (MLflow params are strings)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = json.dumps(d) if isinstance(d, (list, tuple)) else d
    return out


def metric_name(name: str) -> str:
    """MLflow-legal metric name: lm-eval's 'exact_match,strict-match' -> 'exact_match/strict-match'."""
    return "".join(c if c.isalnum() or c in "_-./ " else "/" for c in name)


def log_metrics(metrics: dict[str, Any], step: int | None = None, prefix: str = "") -> None:
    """Log the finite numeric leaves of a (nested) metrics dict."""
    import mlflow

    # Booleans (a check passed) become 0/1 so they show up next to the numbers.
    flat = {metric_name(prefix + k): float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and math.isfinite(v)}
    if flat:
        with tolerate_outage(f"{len(flat)} metrics such as {next(iter(flat))!r} were not logged; "
                             "the stage's metrics file keeps them"):
            mlflow.log_metrics(flat, step=step)


def replay_unlogged(file: Path) -> int:
    """Send the metrics a training callback kept in `file` during a server outage to their runs
    (same steps and timestamps); the file is then renamed *.sent. Returns the number of logs."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(tracking_uri())
    entries = [json.loads(line) for line in Path(file).read_text().splitlines() if line.strip()]
    for e in entries:
        client.log_batch(e["run_id"], metrics=[Metric(k, v, e["timestamp"], e["step"]) for k, v in e["metrics"].items()])
    Path(file).rename(Path(file).with_name(Path(file).name + ".sent"))
    return len(entries)


def tag_active_run(tags: dict[str, str]) -> None:
    """Tag the current stage run, if there is one (library code also runs without MLflow)."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tags(tags)


# ------------------------------------------------------------------ runs a kill left open
def owner_tags(pid: int | None = None) -> dict[str, str]:
    """Tags naming the process that owns a run (default: this one), so that a later start on the
    same host can tell a run whose process has died from one still going."""
    import psutil

    proc = psutil.Process(pid)
    return {"pipeline.host": socket.gethostname(), "pipeline.pid": str(proc.pid),
            "pipeline.pid_started": f"{proc.create_time():.2f}"}


def _owner_gone(tags: dict[str, str]) -> bool:
    """True when the run's owner process, on this host, no longer exists (or its pid was reused)."""
    import psutil

    try:
        return abs(psutil.Process(int(tags["pipeline.pid"])).create_time() - float(tags["pipeline.pid_started"])) > 0.5
    except psutil.NoSuchProcess:
        return True
    except (KeyError, ValueError, psutil.Error):
        return False


def _closing_status(run: Any, children: list[Any]) -> str:
    """A `dvc repro` parent ends when dvc does, never closed by anyone: its children say how it went.
    Any other run still RUNNING without its process was killed."""
    if run.data.tags.get("pipeline.launcher") != "dvc repro":
        return "KILLED"
    statuses = {c.info.status for c in children}
    return "FAILED" if "FAILED" in statuses else "KILLED" if statuses & {"KILLED", "RUNNING"} else "FINISHED"


def close_orphans(exp_id: str) -> list[tuple[str, str]]:
    """Close the runs of this experiment left RUNNING by a process on this host that has ended (a
    killed flow, stage or `dvc repro`, a finished `dvc repro` whose parent nobody closes): stage
    runs first as KILLED, then parents as _closing_status says. Returns [(run id, status)].
    Runs started on other hosts are left alone: their processes cannot be seen from here."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri())
    running = client.search_runs([exp_id], f"attributes.status = 'RUNNING' and tags.`pipeline.host` = '{socket.gethostname()}'",
                                 max_results=1000)
    orphans = [r for r in running if _owner_gone(r.data.tags)]
    orphans.sort(key=lambda r: r.data.tags.get("pipeline.parent") == "true")  # children first
    closed = []
    for run in orphans:
        status = "KILLED"
        if run.data.tags.get("pipeline.parent") == "true":
            children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'", max_results=1000)
            status = _closing_status(run, children)
        try:
            client.set_tag(run.info.run_id, "pipeline.closed_by",
                           f"a later start: process {run.data.tags['pipeline.pid']} on {run.data.tags['pipeline.host']} had ended")
        except MlflowException:
            # Two flows starting at once (team mode: two clones) find the same orphan; on a SQL server the
            # second tag insert violates the key. The first closer's tag means that run is in hand.
            if "pipeline.closed_by" not in client.get_run(run.info.run_id).data.tags:
                raise
            log.info("MLflow run %s is being closed by another flow that started at the same time", run.info.run_id)
            continue
        client.set_terminated(run.info.run_id, status=status)
        closed.append((run.info.run_id, status))
        log.warning("MLflow run %s (%s) was left RUNNING by a process that has ended; closed as %s",
                    run.info.run_id, run.data.tags.get("mlflow.runName", "?"), status)
    return closed


# ------------------------------------------------------------------ the parent run
def _dvc_process() -> Any | None:
    """The `dvc repro` process we run under (None when not under DVC)."""
    try:
        import psutil
    except ImportError:
        return None
    proc = psutil.Process().parent()
    while proc is not None:
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            return None
        if "dvc" in Path(proc.cmdline()[0]).name or " -m dvc" in cmd or "/dvc " in cmd + " ":
            return proc
        proc = proc.parent()
    return None


def _parent_run_id(exp_id: str) -> str | None:
    import mlflow

    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    dvc = _dvc_process()
    if dvc is None:
        return None
    session = f"{dvc.pid}-{int(dvc.create_time())}"
    client = mlflow.MlflowClient()
    found = client.search_runs([exp_id], f"tags.`pipeline.session` = '{session}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name="dvc-repro", tags={
        "pipeline.session": session, "pipeline.parent": "true", "pipeline.launcher": "dvc repro",
        "git_commit": git_commit(), **owner_tags(dvc.pid)})
    return run.info.run_id


@contextlib.contextmanager
def stage_run(stage: str, params: Params, extra_tags: dict[str, str] | None = None,
              resume_run_id: str | None = None, section: str | None = None) -> Iterator[Any]:
    """Open the MLflow run of one stage execution: nested, tagged, its params section logged
    (`section`, default the stage's name: evaluate_base reads `evaluate`, register `registry`).

    Runs that a killed process left RUNNING in the experiment are closed first (close_orphans)."""
    import mlflow

    # The flow may name another experiment (--experiment); the stages follow it.
    exp_id = _connect(stage, os.environ.get("MLFLOW_EXPERIMENT_NAME") or params.project.name)
    close_orphans(exp_id)
    mlflow.enable_system_metrics_logging()
    mlflow.set_system_metrics_sampling_interval(5)
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=True)
    else:
        parent = _parent_run_id(exp_id)
        exp_name = {"dvc_exp_name": os.environ["DVC_EXP_NAME"]} if os.environ.get("DVC_EXP_NAME") else {}
        run = mlflow.start_run(run_name=stage, parent_run_id=parent, log_system_metrics=True, tags={
            "stage": stage, "git_commit": git_commit(), "inputs_digest": inputs_digest(stage), **exp_name,
            **owner_tags(), **(extra_tags or {})})
        name = section or stage
        logged = {"project": params.project.model_dump(), "model": params.model.model_dump()}
        if getattr(params, name, None) is not None:
            logged[name] = getattr(params, name).model_dump()
        mlflow.log_params({k: str(v)[:6000] for k, v in flatten(logged).items()})
    try:
        yield run
    except KeyboardInterrupt:
        _end_run(run.info.run_id, "KILLED")
        raise
    except BaseException:
        _end_run(run.info.run_id, "FAILED")
        raise
    else:
        _end_run(run.info.run_id, "FINISHED")


def _connect(stage: str, experiment: str) -> str:
    """setup() for a stage: the first contact with a tracking server, so it fails in seconds
    (not after minutes of retries) and says that nothing was started."""
    if is_local():
        return setup(experiment)
    from mlflow.exceptions import MlflowException

    try:
        with quick_http(retries=1):
            return setup(experiment)
    except (MlflowException, OSError) as err:
        raise TrackingUnavailable(
            f"stage {stage} did not start (no model loaded, no training): the MLflow tracking server "
            f"{redact(tracking_uri())} cannot be used: {redact(str(err))}\nStart the server, fix "
            "MLFLOW_TRACKING_URI (credentials: MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or "
            "MLFLOW_TRACKING_TOKEN), or unset it to log to the local store.") from err


def mark_killed(run_id: str, note: str) -> None:
    """Close a run that a killed process left RUNNING (a resumed stage does this for the run it continues)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    with tolerate_outage(f"run {run_id} was not marked KILLED"):
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "killed_note", note)
            client.set_terminated(run_id, "KILLED")


def _end_run(run_id: str, status: str) -> None:
    """End the active run; a server gone by now costs a warning, not the finished stage."""
    import mlflow

    with tolerate_outage(f"run {run_id} was not marked {status} and shows as RUNNING; mark it later with "
                         f"mlflow.MlflowClient().set_terminated({run_id!r}, {status!r})"):
        mlflow.end_run(status=status)
