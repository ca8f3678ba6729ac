"""The pipeline as a Prefect flow: every DVC stage of dvc.yaml, in dependency order, one task each.

    python -m flows.pipeline                              # params.yaml as it is
    python -m flows.pipeline --preset tiny --set grpo.beta=0.04 --experiment my-exp
    python -m flows.pipeline --stages base_model          # base_model and what it depends on

Each task runs `dvc repro --single-item <stage>` in a subprocess with the venv's DVC, so DVC
decides what is up to date, dvc.lock stays the record, and the stage's output lands in the
Prefect log. The order is read from dvc.yaml at run time, never listed here.

- Params: a preset and `--set key.path=value` overrides are validated by the project loader
  before anything runs (a bad one fails the flow at once with the loader's message), then
  written into params.yaml in full, as `python -m stages.preset` and `dvc exp run -S` do: the
  workspace keeps the params of its last run, and dvc.lock agrees with them.
- MLflow: the flow opens one parent run (tags pipeline.launcher=prefect, prefect.flow_run_id);
  each stage's run is its child through PIPELINE_PARENT_RUN_ID (stages/common/tracking.py).
  The parent ends FAILED when a stage fails for good.
- Retries: params.flow.retries, delays doubling from params.flow.retry_delay_seconds. Nothing
  here touches checkpoints/grpo (a persistent DVC out), so a retried grpo stage resumes.
- One run per workspace: the whole run holds <root>/.pipeline.lock; a second run waits up to
  `lock_timeout` seconds, then fails naming the lock.
- Artifacts: a markdown summary (scores, registry decision, MLflow link, GGUF files) and a table
  of GSM8K scores, also when a stage failed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from flows import summary
from flows.workspace import (declared_path, resolve_params, stage_order, workspace_lock,
                             WorkspaceBusy, write_params)
from stages.common import tracking
from stages.common.params import ROOT, Params, ParamsError, parse_overrides

TAIL_LINES = 30  # lines of a failed stage's output quoted in the error


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message quotes the end of its output."""


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


@task(task_run_name="dvc repro {stage}", cache_policy=NO_CACHE)  # DVC, not Prefect, decides what is up to date
def run_stage(root: str, stage: str, env: dict[str, str]) -> dict[str, Any]:
    """`dvc repro --single-item <stage>`: the flow walks the DAG itself, so each stage is checked once."""
    logger = get_run_logger()
    venv_bin = str(Path(sys.executable).parent)  # the stage cmds say `python`: make it this venv's
    full_env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"}
    full_env.setdefault("TQDM_MININTERVAL", "10")  # progress bars: a log line every 10 s, not every step
    full_env.update(env)
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    result, start = "ran", time.perf_counter()
    with subprocess.Popen(cmd, cwd=root, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                logger.info(line)
                tail.append(line)
                result = _result(line, result)
    seconds = round(time.perf_counter() - start, 2)
    if proc.returncode:
        raise StageFailed(f"stage {stage} failed (`dvc repro` exited {proc.returncode}); last output:\n" + "\n".join(tail))
    logger.info(f"stage {stage}: {result} ({seconds} s)")
    return {"stage": stage, "result": result, "seconds": seconds}


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
        return f"`{self.run_id}` in `{uri}` (browse: `mlflow ui --backend-store-uri {uri}`)"

    def env(self) -> dict[str, str]:
        """What a stage subprocess needs to log into this run's store and experiment, as its child."""
        return {tracking.PARENT_ENV: self.run_id, "PIPELINE_MLRUNS_DIR": str(tracking.MLRUNS),
                "MLFLOW_EXPERIMENT_NAME": self.experiment}


def open_parent(experiment: str, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> ParentRun:
    import mlflow

    exp_id = tracking.setup(experiment)
    client = mlflow.MlflowClient(tracking.tracking_uri())
    run = client.create_run(exp_id, run_name=run_name, tags={
        "pipeline.parent": "true", "pipeline.launcher": "prefect", "git_commit": tracking.git_commit(), **tags})
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


def publish(root: Path, title: str, status: str, mlflow_link: str, stages: list[dict[str, Any]], note: str = "") -> None:
    """The run's markdown summary and score table as Prefect artifacts."""
    metrics_dir, gguf_dir = declared_path(root, "metrics"), declared_path(root, "gguf")
    text = summary.markdown(title=title, status=status, metrics_dir=metrics_dir, gguf_dir=gguf_dir,
                            mlflow_link=mlflow_link, stages=stages, note=note)
    create_markdown_artifact(text, key="pipeline-summary", description=f"{title}: {status}")
    create_table_artifact(summary.table_rows(metrics_dir), key="gsm8k-scores", description="GSM8K accuracy (0-1)")


# ------------------------------------------------------------------ the run
def run_stages(root: Path, order: list[str], params: Params, parent: ParentRun, title: str,
               note: str = "") -> list[dict[str, Any]]:
    """Run the stages in order under one MLflow parent; close it and publish the summary either way."""
    logger = get_run_logger()
    retries = params.flow.retries
    stage_task = run_stage.with_options(
        retries=retries, retry_delay_seconds=exponential_backoff(params.flow.retry_delay_seconds) if retries else 0)
    results: list[dict[str, Any]] = []
    logger.info(f"stages: {' -> '.join(order)}; MLflow parent run {parent.run_id} in experiment {parent.experiment!r}")
    for stage in order:
        try:
            results.append(stage_task(str(root), stage, parent.env()))
        except BaseException as err:
            results.append({"stage": stage, "result": "failed", "seconds": None})
            close_parent(parent, "FAILED", declared_path(root, "metrics"))
            publish(root, title, f"failed at {stage}", parent.link, results, note=f"```\n{err}\n```")
            raise
    close_parent(parent, "FINISHED", declared_path(root, "metrics"))
    publish(root, title, "finished", parent.link, results, note=note)
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
    resolve_params(repo, preset, overrides)  # a bad preset or override fails here, before anything runs
    order = stage_order(repo, stages)
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
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
        resolve_params(ROOT, args.preset, overrides)  # fail in a second, before Prefect starts a server
    except ParamsError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        pipeline(preset=args.preset, overrides=overrides or None, experiment=args.experiment, stages=args.stages,
                 lock_timeout=args.lock_timeout)
    except (StageFailed, WorkspaceBusy) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
