"""The scheduled deployments: a nightly full run and continuous training, served from this
workspace or run by workers of a work pool on other machines.

Served from here (this process runs the flow runs):

    prefect server start                                   # shell 1; UI at http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api       # shell 2, in the repository root
    python -m flows.deploy                                 # nightly at 02:00 UTC + a continuous tick every 15 min
    python -m flows.deploy --only continuous --continuous-interval 300 --step-budget 2000
    prefect deployment run 'gsm8k-grpo-pipeline/nightly'   # a run now, from any shell

Schedules fire only with a real Prefect server: the temporary local server registers the
deployments but never schedules them. This process runs the flow runs itself, one at a time
(`limit=1`), in the directory it was started from; a nightly run and a tick that meet anyway
(e.g. a second serving process) are kept apart by the workspace lock (flows/workspace.py): the
nightly run waits for it, a tick skips. Ctrl-C stops serving and pauses the schedules.

Run by a work pool's workers (server and UI on one machine, training on a GPU machine):

    prefect work-pool create gpu --type process                       # once, against the server
    python -m flows.deploy --pool gpu --working-dir /srv/gsm8k-grpo   # registers the deployments, exits
    prefect worker start --pool gpu --limit 1                         # on the GPU machine, in its venv

The deployments name their flows by module path (flows.pipeline.pipeline, ...), so no code is
packaged or pulled: the worker runs each flow run in --working-dir (default: this checkout's
path), its own clone of this repository with its venv installed (scripts/install.sh), and the
flow runs `dvc repro` there. `--limit 1` keeps one flow run at a time on that machine.
"""
from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

from prefect import deploy, serve
from prefect.deployments.runner import EntrypointType

from flows.continuous import TRAIN_TARGETS, continuous
from flows.pipeline import pipeline
from stages.common.params import ROOT


def deployments(only: str | None, nightly_cron: str, continuous_interval: float,
                train_targets: list[str] | None, step_budget: int | None, **pool: Any) -> list:
    """The RunnerDeployments: `nightly` (cron) and `continuous` (interval). `pool`: to_deployment's
    work-pool options (work_pool_name, job_variables, entrypoint_type); none when served here."""
    out = []
    if only in (None, "nightly"):
        out.append(pipeline.to_deployment(
            name="nightly", cron=nightly_cron, tags=["gsm8k-grpo", "nightly"], **pool,
            description="The whole DVC pipeline with params.yaml as it is; DVC skips what is up to date."))
    if only in (None, "continuous"):
        out.append(continuous.to_deployment(
            name="continuous", interval=timedelta(seconds=continuous_interval), tags=["gsm8k-grpo", "continuous"],
            parameters={"train_targets": train_targets or TRAIN_TARGETS, "step_budget": step_budget}, **pool,
            description="Train GRPO flow.continuous_steps further when the training data changed; else nothing."))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["nightly", "continuous"], help="serve just one of the two deployments")
    parser.add_argument("--nightly-cron", default="0 2 * * *", help="cron schedule of the full run, UTC (default 02:00 daily)")
    parser.add_argument("--continuous-interval", type=float, default=900.0,
                        help="seconds between continuous-training ticks (default 900)")
    parser.add_argument("--train-targets", nargs="+", metavar="STAGE",
                        help=f"stages a training tick runs, with their upstream (default {' '.join(TRAIN_TARGETS)})")
    parser.add_argument("--step-budget", type=int,
                        help="most GRPO steps continuous training may reach (default: no cap; train only on new data)")
    parser.add_argument("--pool", help="register the deployments with this work pool (create it first: "
                        "`prefect work-pool create NAME --type process`) and exit; its workers run them")
    parser.add_argument("--working-dir", default=str(ROOT),
                        help="with --pool: the repository's path on the worker machines (default: this checkout's)")
    args = parser.parse_args(argv)
    schedule = (args.only, args.nightly_cron, args.continuous_interval, args.train_targets, args.step_budget)
    if not args.pool:
        serve(*deployments(*schedule), limit=1)
        return
    found = deployments(*schedule, work_pool_name=args.pool, job_variables={"working_dir": args.working_dir},
                        entrypoint_type=EntrypointType.MODULE_PATH)
    for deployment_id, d in zip(deploy(*found, work_pool_name=args.pool, build=False, push=False,
                                       print_next_steps_message=False, ignore_warnings=True), found):
        print(f"deployed {d.flow_name}/{d.name} ({deployment_id}) to work pool {args.pool!r}; "
              f"workers run it in {args.working_dir}")


if __name__ == "__main__":
    main()
