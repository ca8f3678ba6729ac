"""One load client for the team-mode concurrency test: a run with M params, M metric values and one artifact.

    python -m tests.mlflow_load --experiment load-abc --client 3 --values 50

Each value is its own request (log_param / log_metric), as a training loop's logging is; the
artifact is a small JSON file naming the client. Credentials and the server come from the
environment (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME/PASSWORD). Nothing is caught: any
error ends the process non-zero with its traceback. Prints one JSON line: client, run id,
seconds, requests.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def metric_value(client: int, step: int) -> float:
    """The value client `client` logs at `step`: unique, so a value in the wrong run or step shows."""
    return client * 1000.0 + step + 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="MLflow experiment id to log into")
    parser.add_argument("--client", type=int, required=True, help="this client's number (names the run)")
    parser.add_argument("--values", type=int, required=True, help="M: params and metric steps to log")
    args = parser.parse_args()

    import mlflow

    client = mlflow.MlflowClient()
    start = time.perf_counter()
    run_id = client.create_run(args.experiment, run_name=f"load-{args.client}").info.run_id
    for i in range(args.values):
        client.log_param(run_id, f"p{i}", f"c{args.client}-v{i}")
    for step in range(args.values):
        client.log_metric(run_id, "load", metric_value(args.client, step), step=step)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "client.json"
        artifact.write_text(json.dumps({"client": args.client, "run_id": run_id}))
        client.log_artifact(run_id, str(artifact))
    client.set_terminated(run_id, "FINISHED")
    print(json.dumps({"client": args.client, "run_id": run_id, "seconds": round(time.perf_counter() - start, 3),
                      "requests": 2 * args.values + 3}))


if __name__ == "__main__":
    main()
