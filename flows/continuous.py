"""Continuous training: each tick trains GRPO further when there is new data, and does nothing otherwise.

    python -m flows.continuous                 # one tick, on the temporary local server
    python -m flows.deploy                     # ticks on an interval (see flows/deploy.py)

A tick:
1. takes the workspace lock at once or skips (another run is using the workspace);
2. looks for work: new data means the data stage (`prepare`) is out of date (`dvc status`: the
   source data, its code or params changed) or its outputs' md5 in dvc.lock differ from the ones
   the last training tick recorded in the state file (checkpoints/continuous.json, beside the
   GRPO checkpoints); with a `step_budget`, steps left under the budget are work too;
3. work: the params with grpo.max_steps += flow.continuous_steps (capped at the budget) and
   grpo.continue_on_new_prompts on are checked as the pipeline checks them (stages/check.py) and
   written to params.yaml, then the train stages (grpo, evaluate, register and what they depend
   on) run under one MLflow parent, exactly as in flows/pipeline.py. checkpoints/grpo is a
   persistent DVC out, so the grpo stage resumes from its last checkpoint, on the new prompts when
   only the prompts changed (unseen ones first, the learning-rate schedule continuing: see
   stages/common/checkpoints.py), and trains the added steps; the state file then records the
   data's md5;
4. no work: no stage and no MLflow run; the log and the `continuous-tick` artifact say why.

A resume must not continue a checkpoint on a base model rebuilt under it: the tiny model
(`model.name_or_path: tiny`) is built from the prepared data (its tokenizer is trained on it),
so when new data would rebuild it while checkpoints/grpo holds a checkpoint, the tick stops
before base_model runs (ResumeRefused, the flow run fails with the reason): the new data is
prepared, nothing else changes. A hub or local base model does not depend on the data.

The first tick (no state file) counts as new data. Two ticks with no new data train nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.pipeline import flow_tags, open_parent, run_stages
from flows.workspace import (WorkspaceBusy, declared_path, locked_outs_digest, resolve_params, stage_order,
                             workspace_lock, write_params)
from stages.check import check
from stages.common.params import ROOT, Params

TRAIN_TARGETS = ["grpo", "evaluate", "register"]


@dataclass(frozen=True)
class Decision:
    train: bool
    reason: str
    max_steps: int  # grpo.max_steps for this tick


def decide(*, data_changed: bool, data_digest: str | None, state: dict[str, Any], current_steps: int,
           add_steps: int, step_budget: int | None) -> Decision:
    """Whether a tick trains, and to how many GRPO steps."""
    if step_budget is not None and current_steps >= step_budget:
        return Decision(False, f"step budget reached: grpo.max_steps is {current_steps}, budget {step_budget}", current_steps)
    target = current_steps + add_steps if step_budget is None else min(current_steps + add_steps, step_budget)
    if not state:
        return Decision(True, f"first training tick: GRPO to {target} steps", target)
    if data_changed:
        return Decision(True, f"the data stage is out of date (new source data, code or params): GRPO to {target} steps", target)
    if data_digest != state.get("data_digest"):
        return Decision(True, f"new prepared data since the last training tick: GRPO to {target} steps", target)
    if step_budget is not None:
        return Decision(True, f"no new data, {step_budget - current_steps} steps of budget left: GRPO to {target} steps", target)
    return Decision(False, f"no new training data since the last training tick ({state.get('time', '?')}); nothing to train",
                    current_steps)


def read_state(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err}); delete it to start continuous training afresh") from None


class ResumeRefused(RuntimeError):
    """New data would rebuild the model a GRPO checkpoint was trained on."""


def has_checkpoint(ckpt_dir: Path) -> bool:
    return any(ckpt_dir.glob("checkpoint-*"))


def base_rebuild_guard(repo: Path, params: Params, ckpt_dir: Path, base_stage: str = "base_model"):
    """A run_stages guard: stop before `base_stage` rebuilds the tiny base model (built from the
    prepared data) under a GRPO checkpoint that would then resume on it."""
    def guard(stage: str) -> None:
        if stage != base_stage or params.model.name_or_path != "tiny" or not has_checkpoint(ckpt_dir):
            return
        if stage_out_of_date(str(repo), stage):
            raise ResumeRefused(
                f"refused to resume GRPO: the data changed, and the tiny base model is built from the prepared data "
                f"(its tokenizer is trained on it), so stage {stage} would rebuild it under the checkpoints in "
                f"{ckpt_dir}, which were trained on the current one. The new data is prepared; nothing else changed. "
                f"To train on it from a new base model, delete {ckpt_dir} (models/grpo stays in DVC's cache) and "
                "run again; or use a hub or local base model, which does not depend on the data.")
    return guard


@task(task_run_name="dvc status {stage}", cache_policy=NO_CACHE)
def stage_out_of_date(root: str, stage: str) -> bool:
    """`dvc status <stage>`: True if DVC would re-run it."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", stage], cwd=root,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"`dvc status {stage}` failed: {proc.stderr.strip()[-2000:]}")
    return bool(json.loads(proc.stdout or "{}"))


def _report(text: str) -> None:
    get_run_logger().info(text)
    create_markdown_artifact(f"# Continuous training tick\n\n{text}\n", key="continuous-tick", description=text[:200])


@flow(name="gsm8k-grpo-continuous")
def continuous(experiment: str | None = None, train_targets: list[str] | None = None, data_stage: str = "prepare",
               step_budget: int | None = None, lock_timeout: float = 0.0, root: str | None = None) -> dict[str, Any]:
    """One continuous-training tick (see the module docstring).

    train_targets: stages to run when there is work (default grpo, evaluate, register, plus their
    upstream). data_stage: the stage whose outputs are the training data. step_budget: the most
    GRPO steps continuous training may reach (None: no cap, train only on new data).
    """
    repo = Path(root) if root else ROOT
    params = resolve_params(repo)
    order = stage_order(repo, train_targets or TRAIN_TARGETS)
    ckpt_dir = declared_path(repo, "grpo_checkpoints")
    state_file = ckpt_dir.parent / "continuous.json"
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(workspace_lock(repo, lock_timeout, get_run_logger().info))
        except WorkspaceBusy as err:
            _report(f"skipped: {err}")
            return {"trained": False, "reason": str(err)}
        decision = decide(data_changed=stage_out_of_date(str(repo), data_stage),
                          data_digest=locked_outs_digest(repo, data_stage), state=read_state(state_file),
                          current_steps=params.grpo.max_steps, add_steps=params.flow.continuous_steps,
                          step_budget=step_budget)
        if not decision.train:
            _report(decision.reason)
            return {"trained": False, "reason": decision.reason}
        _report(f"training: {decision.reason}")
        # continue_on_new_prompts: the grpo stage resumes across new prompts (unseen ones first).
        steps = {"grpo.max_steps": decision.max_steps, "grpo.continue_on_new_prompts": True}
        for warning in check(resolve_params(repo, None, steps), repo, order):
            get_run_logger().warning(warning)
        params_text = (repo / "params.yaml").read_text()
        params = write_params(repo, None, steps)
        experiment = experiment or params.project.name
        parent = open_parent(experiment, f"continuous {flow_run.name}", {**flow_tags(), "pipeline.continuous": "true"},
                             {"grpo.max_steps": decision.max_steps, "reason": decision.reason})
        try:
            results = run_stages(repo, order, params, parent, title="Continuous training tick", note=decision.reason,
                                 guard=base_rebuild_guard(repo, params, ckpt_dir))
        except ResumeRefused:
            (repo / "params.yaml").write_text(params_text)  # nothing was trained: the added steps are not spent
            raise
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({
            "data_digest": locked_outs_digest(repo, data_stage), "grpo_max_steps": decision.max_steps,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "flow_run_id": str(flow_run.id),
            "mlflow_parent_run_id": parent.run_id}, indent=2) + "\n")
    return {"trained": True, "reason": decision.reason, "max_steps": decision.max_steps,
            "parent_run_id": parent.run_id, "stages": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", help="MLflow experiment name (default: params project.name)")
    parser.add_argument("--train-targets", nargs="+", metavar="STAGE", help=f"stages a training tick runs (default {TRAIN_TARGETS})")
    parser.add_argument("--step-budget", type=int, help="most GRPO steps continuous training may reach (default: no cap)")
    args = parser.parse_args(argv)
    result = continuous(experiment=args.experiment, train_targets=args.train_targets, step_budget=args.step_budget)
    print(json.dumps({k: v for k, v in result.items() if k != "stages"}))


if __name__ == "__main__":
    main()
