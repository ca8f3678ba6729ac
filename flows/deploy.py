"""Serve the scheduled deployments from this workspace: a nightly full run and continuous training.

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
"""
from __future__ import annotations

import argparse
from datetime import timedelta

from prefect import serve

from flows.continuous import TRAIN_TARGETS, continuous
from flows.pipeline import pipeline


def deployments(only: str | None, nightly_cron: str, continuous_interval: float,
                train_targets: list[str] | None, step_budget: int | None) -> list:
    """The RunnerDeployments to serve: `nightly` (cron) and `continuous` (interval)."""
    out = []
    if only in (None, "nightly"):
        out.append(pipeline.to_deployment(
            name="nightly", cron=nightly_cron, tags=["gsm8k-grpo", "nightly"],
            description="The whole DVC pipeline with params.yaml as it is; DVC skips what is up to date."))
    if only in (None, "continuous"):
        out.append(continuous.to_deployment(
            name="continuous", interval=timedelta(seconds=continuous_interval), tags=["gsm8k-grpo", "continuous"],
            parameters={"train_targets": train_targets or TRAIN_TARGETS, "step_budget": step_budget},
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
    args = parser.parse_args(argv)
    serve(*deployments(args.only, args.nightly_cron, args.continuous_interval, args.train_targets, args.step_budget),
          limit=1)


if __name__ == "__main__":
    main()
