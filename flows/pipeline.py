"""The pipeline as a Prefect flow: every DVC stage of dvc.yaml, in dependency order, one task each.

    python -m flows.pipeline                              # params.yaml as it is
    python -m flows.pipeline --preset tiny --set grpo.beta=0.04 --experiment my-exp
    python -m flows.pipeline --stages base_model          # base_model and what it depends on
    python -m flows.pipeline --verbose                    # every stage's output on the console too

Each task runs `dvc repro --single-item <stage>` in a subprocess with the venv's DVC, so DVC
decides what is up to date and dvc.lock stays the record. The order is read from dvc.yaml at run
time, never listed here.

- Console (flows/console.py): one line per stage as it starts and ends (result, time, key
  figure), a live progress bar while it runs, a summary table at the end; a failure prints the
  stage, its error, its log file and, for the errors newcomers meet first, a one-line fix
  (flows/hints.py). Each stage's whole output goes to reports/pipeline/logs/<stage>.log (the
  `run_report` path in dvc.yaml) and to the Prefect run log; `--verbose` also streams it.
- Report (flows/report.py): reports/pipeline/report.html (self-contained) and report.md, written
  at the end of every run, failed ones included; attached with the stage logs to the MLflow
  parent run and, as markdown, to the Prefect flow run; its path is printed at the end.

- Params: a preset and `--set key.path=value` overrides are checked before anything runs
  (stages/check.py: the typed loader, the machine, grpo's reward names and imports, the data
  files; `dvc repro` deletes a stage's outputs before running it, so a stage must not fail on its
  params), then written into params.yaml in full, as `python -m stages.preset` and `dvc exp run -S` do: the
  workspace keeps the params of its last run, and dvc.lock agrees with them.
- MLflow: the flow opens one parent run (tags pipeline.launcher=prefect, prefect.flow_run_id);
  each stage's run is its child through PIPELINE_PARENT_RUN_ID (stages/common/tracking.py).
  The parent ends FAILED when a stage fails for good; a parent or stage run that a killed flow
  left RUNNING is closed as KILLED when the next run starts (tracking.close_orphans).
- Retries: params.flow.retries, delays doubling from params.flow.retry_delay_seconds, for
  transient and unknown errors only: a stage that fails with one of the project's own check
  errors (ParamsError, DataError, RewardConfigError, MergeCheckError, EvalError, ...) fails the
  flow at once (stages/common/errors.py: how the kind crosses the `dvc repro` process). Nothing
  here touches checkpoints/grpo (a persistent DVC out), so a retried grpo stage resumes.
- One run per workspace: the whole run holds <root>/.pipeline.lock; a second run waits up to
  `lock_timeout` seconds, then fails naming the lock.
- Artifacts: a markdown summary (scores, registry decision, MLflow link, GGUF files), a table
  of GSM8K scores and the run report, also when a stage failed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run
from prefect.tasks import exponential_backoff

from flows import report, summary
from flows.console import CONSOLE, StageLog, error_of
from flows.hints import fix_for
from flows.workspace import (declared_path, resolve_params, stage_order, workspace_lock,
                             WorkspaceBusy, write_params)
from stages.check import CHECK_ERRORS, check
from stages.common import errors, tracking
from stages.common.params import ROOT, Params, parse_overrides
from stages.common.paths import declared_paths

UI_URL = "http://127.0.0.1:5000"  # `make ui` (flows/ui.py) serves the local store here

class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message quotes the end of its output.

    stage, error (its exception line), log_file and seconds are kept for the console's three-line
    failure report; kind (stages/common/errors.py) decides on a retry: only `check` is not retried.
    """

    def __init__(self, message: str, stage: str = "", error: str = "", log_file: Path | None = None,
                 seconds: float | None = None, kind: str = errors.UNKNOWN) -> None:
        super().__init__(message)
        self.stage, self.error, self.log_file, self.seconds, self.kind = stage, error or message, log_file, seconds, kind

    def __reduce__(self):  # Prefect may pickle a task's exception: keep every field
        return StageFailed, (str(self), self.stage, self.error, self.log_file, self.seconds, self.kind)


def retry_unless_check(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: a check error fails at once, anything else is retried."""
    err = state.result(raise_on_failure=False)
    return not (isinstance(err, StageFailed) and err.kind == errors.CHECK)


# ------------------------------------------------------------------ one stage
def _result(line: str, current: str) -> str:
    """What DVC did with the stage, from its own messages."""
    if "didn't change, skipping" in line:
        return "up to date"
    if "is cached - skipping run" in line:
        return "restored from run cache"
    if line.startswith("Running stage"):
        return "ran"
    return current


def log_dir(root: Path) -> Path:
    """Where this run's stage logs go (beside the run report)."""
    return declared_path(root, "run_report") / "logs"


@task(task_run_name="dvc repro {stage}", cache_policy=NO_CACHE)  # DVC, not Prefect, decides what is up to date
def run_stage(root: str, stage: str, env: dict[str, str]) -> dict[str, Any]:
    """`dvc repro --single-item <stage>`: the flow walks the DAG itself, so each stage is checked once.

    The stage's whole output goes to its log file; ordinary lines also go to the Prefect run log
    (on the console only with --verbose), progress-bar redraws only to the console's live bar. An
    uncaught error's class and kind come back through PIPELINE_ERROR_FILE (stages/common/errors.py).
    """
    logger = get_run_logger()
    venv_bin = str(Path(sys.executable).parent)  # the stage cmds say `python`: make it this venv's
    full_env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"}
    # Progress bars: a redraw every second feeds the live bar; with --verbose a log line every 10 s, not every step.
    full_env.setdefault("TQDM_MININTERVAL", "10" if CONSOLE.verbose else "1")
    full_env.update(env)
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    log_file = log_dir(Path(root)) / f"{stage.replace(':', '_').replace('/', '_')}.log"
    error_file = log_file.with_suffix(".error.json")
    error_file.unlink(missing_ok=True)
    full_env[errors.ERROR_FILE_ENV] = str(error_file)
    result, start = "ran", time.perf_counter()
    with CONSOLE.stage(stage, log_file, attempt=task_run.run_count or 1) as log, \
            subprocess.Popen(cmd, cwd=root, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if line and (log.feed(line) or CONSOLE.verbose):
                logger.info(line)
                result = _result(line, result)
    seconds = round(time.perf_counter() - start, 2)
    if proc.returncode:
        CONSOLE.stage_done(stage, "failed", seconds)
        raise _failure(stage, proc.returncode, log, seconds, errors.read(error_file))
    cards = declared_paths(Path(root)).get("cards")  # model_card's figure; a workspace may declare no cards
    figure = summary.key_figure(stage, declared_path(Path(root), "metrics"), cards and Path(root) / cards)
    CONSOLE.stage_done(stage, result, seconds, figure)
    logger.info(f"stage {stage}: {result} ({seconds} s)")
    return {"stage": stage, "result": result, "seconds": seconds, "figure": figure, "log": _shown(log_file, root)}


def _failure(stage: str, returncode: int, log: StageLog, seconds: float, reported: dict[str, str] | None) -> StageFailed:
    """The stage's error as it reported it (None: killed by a signal, or DVC failed before it ran)."""
    tail = list(log.tail)
    kind = reported["kind"] if reported else errors.UNKNOWN
    error = f"{reported['error']}: {reported['message']}" if reported else error_of(tail)
    retry = "a check error: not retried" if kind == errors.CHECK else f"{kind}: retried while flow.retries allows"
    return StageFailed(f"stage {stage} failed (`dvc repro` exited {returncode}; {retry}); last output:\n" + "\n".join(tail),
                       stage=stage, error=error, log_file=log.file, seconds=seconds, kind=kind)


def _shown(path: Path, root: str | Path) -> str:
    """A path as the user reads it: relative to the repository root when inside it."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------ MLflow parent
@dataclass(frozen=True)
class ParentRun:
    run_id: str
    experiment_id: str
    experiment: str

    @property
    def link(self) -> str:
        uri = tracking.redact(tracking.tracking_uri())
        if uri.startswith(("http://", "https://")):
            return f"[{self.run_id}]({uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id})"
        return f"`{self.run_id}` in `{uri}` (browse: `make ui`, then {self.url()})"

    def url(self) -> str:
        """Where the run is in the MLflow UI: the tracking server's, or `make ui`'s on the local store."""
        uri = tracking.redact(tracking.tracking_uri())
        ui = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_URL
        return f"{ui}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def env(self) -> dict[str, str]:
        """What a stage subprocess needs to log into this run's store and experiment, as its child."""
        return {tracking.PARENT_ENV: self.run_id, "PIPELINE_MLRUNS_DIR": str(tracking.MLRUNS),
                "MLFLOW_EXPERIMENT_NAME": self.experiment}


def open_parent(experiment: str, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> ParentRun:
    import mlflow

    exp_id = tracking.setup(experiment)
    tracking.close_orphans(exp_id)  # the parent and stages of a run killed earlier
    client = mlflow.MlflowClient(tracking.tracking_uri())
    run = client.create_run(exp_id, run_name=run_name, tags={
        "pipeline.parent": "true", "pipeline.launcher": "prefect", "git_commit": tracking.git_commit(),
        **tracking.owner_tags(), **tags})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    return ParentRun(run.info.run_id, exp_id, experiment)


def close_parent(parent: ParentRun, status: str, metrics_dir: Path) -> None:
    """End the parent run; its GSM8K scores are logged on it so pipeline runs compare side by side."""
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri())
    for row in summary.scores(metrics_dir):
        for kind in ("strict", "flexible"):
            if row[kind] is not None:
                client.log_metric(parent.run_id, f"gsm8k/{row['model']}/{kind}", row[kind])
    client.set_terminated(parent.run_id, status=status)


def flow_tags() -> dict[str, str]:
    return {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name),
            "prefect.flow_name": str(flow_run.flow_name)}


def publish(root: Path, title: str, status: str, mlflow_link: str, stages: list[dict[str, Any]], note: str = "",
            report_files: report.ReportFiles | None = None) -> None:
    """The run's markdown summary, score table and report as Prefect artifacts."""
    metrics_dir, gguf_dir = declared_path(root, "metrics"), declared_path(root, "gguf")
    text = summary.markdown(title=title, status=status, metrics_dir=metrics_dir, gguf_dir=gguf_dir,
                            mlflow_link=mlflow_link, stages=stages, note=note)
    create_markdown_artifact(text, key="pipeline-summary", description=f"{title}: {status}")
    create_table_artifact(summary.table_rows(metrics_dir), key="gsm8k-scores", description="GSM8K accuracy (0-1)")
    if report_files is not None:
        create_markdown_artifact(report.prefect_markdown(report_files.markdown.read_text(), report_files.html),
                                 key="run-report", description=f"run report: {report_files.html}")


# ------------------------------------------------------------------ the end of a run
def write_report(root: Path, parent: ParentRun, title: str, status: str, results: list[dict[str, Any]],
                 note: str) -> report.ReportFiles | None:
    """The run report, attached to the MLflow parent run with the stage logs; None if it could not be written."""
    import mlflow

    run = report.Run(title=title, status=status, stages=results, mlflow_run_id=parent.run_id,
                     mlflow_experiment_id=parent.experiment_id, mlflow_link=parent.link,
                     prefect_flow_run=str(flow_run.name or ""), note=note)
    try:
        files = report.build(root, run)
    except Exception as err:  # noqa: BLE001 - the report must never cost a run its result; say why it is missing
        get_run_logger().warning(f"the run report was not written: {type(err).__name__}: {err}")
        CONSOLE.print(f"[yellow]warning[/]: the run report was not written: {type(err).__name__}: {err}")
        return None
    client = mlflow.MlflowClient(tracking.tracking_uri())
    with tracking.tolerate_outage("the run report and stage logs were not attached to the MLflow parent run"):
        client.log_artifact(parent.run_id, str(files.html), "report")
        client.log_artifact(parent.run_id, str(files.markdown), "report")
        for image in files.images:
            client.log_artifact(parent.run_id, str(image), "report/img")
        logs = log_dir(root)
        if logs.is_dir():
            client.log_artifacts(parent.run_id, str(logs), "logs")
    return files


def finish(root: Path, parent: ParentRun, title: str, results: list[dict[str, Any]], note: str = "",
           failed: BaseException | None = None) -> None:
    """What every run ends with, failed or not: the report, the parent run closed, the Prefect
    artifacts, the console's summary (and the failure: stage, error, log, fix)."""
    metrics_dir, gguf_dir = declared_path(root, "metrics"), declared_path(root, "gguf")
    status = f"failed at {results[-1]['stage']}" if failed else "finished"
    files = write_report(root, parent, title, status, results, note)
    close_parent(parent, "KILLED" if isinstance(failed, KeyboardInterrupt) else "FAILED" if failed else "FINISHED",
                 metrics_dir)
    publish(root, title, status, parent.link, results, note=f"```\n{failed}\n```" if failed else note,
            report_files=files)
    paths = {"report": _shown(files.html, root) if files else "not written (see the warning above)",
             "GGUF": ", ".join(_shown(gguf_dir / name, root) for name, _ in summary.gguf_files(gguf_dir)) or "none yet",
             "MLflow": f"run {parent.run_id} (experiment {parent.experiment!r}): {parent.url()}"}
    CONSOLE.summary(results, summary.accuracy(metrics_dir), summary.decision(metrics_dir), paths)
    if isinstance(failed, StageFailed):
        CONSOLE.failure(failed.stage, failed.error, failed.log_file, fix_for(failed.error + "\n" + str(failed), root))


# ------------------------------------------------------------------ the run
def run_stages(root: Path, order: list[str], params: Params, parent: ParentRun, title: str,
               note: str = "", guard: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run the stages in order under one MLflow parent; close it, report and summarise either way.

    guard: called with each stage's name before it runs; what it raises stops the run there."""
    logger = get_run_logger()
    retries = params.flow.retries
    stage_task = run_stage.with_options(
        retries=retries, retry_delay_seconds=exponential_backoff(params.flow.retry_delay_seconds) if retries else 0,
        retry_condition_fn=retry_unless_check)
    results: list[dict[str, Any]] = []
    logger.info(f"stages: {' -> '.join(order)}; MLflow parent run {parent.run_id} in experiment {parent.experiment!r}")
    logs = log_dir(root)
    shutil.rmtree(logs, ignore_errors=True)  # this run's logs only
    CONSOLE.plan(order, logs)
    for stage in order:
        try:
            if guard:
                guard(stage)
            results.append(stage_task(str(root), stage, parent.env()))
        except BaseException as err:
            failed = err if isinstance(err, StageFailed) else None
            results.append({"stage": stage, "result": "failed", "seconds": failed.seconds if failed else None,
                            "figure": (failed.error.splitlines() or [""])[0] if failed else type(err).__name__,
                            "log": _shown(failed.log_file, root) if failed and failed.log_file else ""})
            finish(root, parent, title, results, failed=err)
            raise
    finish(root, parent, title, results, note=note)
    return results


@flow(name="gsm8k-grpo-pipeline")
def pipeline(preset: str | None = None, overrides: dict[str, Any] | None = None, experiment: str | None = None,
             stages: list[str] | None = None, lock_timeout: float = 600.0, root: str | None = None) -> dict[str, Any]:
    """Run the DVC stages (all of dvc.yaml, or `stages` and what they depend on) once.

    preset: write presets/<name>.yaml to params.yaml first. overrides: {"grpo.beta": 0.04, ...}.
    experiment: MLflow experiment (default: params project.name). lock_timeout: seconds to wait
    for another run on this workspace. root: the repository (default: this checkout).
    """
    logger = get_run_logger()
    repo = Path(root) if root else ROOT
    order = stage_order(repo, stages)
    # A bad preset, override or params value fails here, before DVC deletes any output.
    for warning in check(resolve_params(repo, preset, overrides), repo, order):
        logger.warning(warning)
    with workspace_lock(repo, lock_timeout, logger.info):
        params = write_params(repo, preset, overrides)
        experiment = experiment or params.project.name
        logged = {"preset": preset or "-", **{f"override.{k}": v for k, v in (overrides or {}).items()}}
        parent = open_parent(experiment, f"pipeline {flow_run.name}", flow_tags(), logged)
        results = run_stages(repo, order, params, parent, title="GSM8K pipeline")
    return {"parent_run_id": parent.run_id, "experiment": experiment, "stages": results}


# ------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="write presets/<name>.yaml to params.yaml first (see presets/)")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", default=[],
                        help="override one params key, e.g. grpo.beta=0.04 (value parsed as YAML); repeatable")
    parser.add_argument("--experiment", help="MLflow experiment name (default: params project.name)")
    parser.add_argument("--stages", nargs="+", metavar="STAGE", help="run only these stages and their upstream stages")
    parser.add_argument("--lock-timeout", type=float, default=600.0,
                        help="seconds to wait while another run holds this workspace (default 600)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="stream every stage's output and Prefect's log to the console (it always goes to the "
                             "stage's log file)")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
        # Fail in seconds, before Prefect starts a server and before DVC deletes any output.
        check(resolve_params(ROOT, args.preset, overrides), ROOT, stage_order(ROOT, args.stages))
    except (*CHECK_ERRORS, ValueError) as err:  # ValueError: an unknown stage name
        fix = fix_for(str(err), ROOT)
        raise SystemExit(f"error: {err}" + (f"\n  fix: {fix}" if fix else "")
                         + "\nNothing was run; no output was touched.") from None
    CONSOLE.set_verbose(args.verbose)
    try:
        pipeline(preset=args.preset, overrides=overrides or None, experiment=args.experiment, stages=args.stages,
                 lock_timeout=args.lock_timeout)
    except StageFailed:
        raise SystemExit(1) from None  # the console has printed the stage, its error, its log and a fix
    except WorkspaceBusy as err:
        raise SystemExit(f"error: {err}") from None
    except RuntimeError as err:
        if "ephemeral Prefect API server" not in str(err):
            raise
        raise SystemExit(  # Prefect's temporary server: slow to start on a busy machine
            f"error: {err}\n  fix: give it longer (`export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=300`), or "
            "start a server once (`make prefect-ui`) and `export PREFECT_API_URL=http://127.0.0.1:4200/api`") from None


if __name__ == "__main__":
    main()
