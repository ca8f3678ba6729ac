"""Remake the README's pictures: the run report, and two pipeline runs compared in the MLflow UI.

    make pipeline                                                # run 1
    .venv/bin/python -m flows.pipeline --set grpo.learning_rate=3e-3   # run 2, one knob changed
    .venv/bin/python scripts/screenshots.py                      # -> docs/report.png, docs/mlflow-compare.png

Both pictures come from headless Chromium (Debian's, through flows/browser.py): the report is
opened from reports/pipeline/report.html; for the comparison, `mlflow ui` is started on a free
loopback port on the project's store (flows/ui.py's command), its compare view is opened on the
two latest finished pipeline parent runs of the experiment, and the server is stopped again.
Requests that would leave the machine are blocked (and listed, if any).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

from flows import browser
from flows.ui import mlflow_command
from flows.workspace import declared_path
from stages.common import tracking
from stages.common.params import ROOT, load_params
from stages.common.ranks import free_port

DOCS = ROOT / "docs"


def report_picture(html: Path, out: Path, height: int) -> None:
    if not html.exists():
        raise SystemExit(f"error: {html} not found: run the pipeline first (`make pipeline`)")
    with browser.page(width=1200, height=height) as (tab, traffic):
        tab.goto(html.as_uri(), wait_until="load")
        tab.screenshot(path=str(out))
    _report(out, traffic)


def latest_parent_runs(experiment: str, count: int = 2) -> tuple[str, list[str]]:
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: no MLflow experiment {experiment!r} in {tracking.tracking_uri()}: run the pipeline first")
    runs = client.search_runs([exp.experiment_id], "tags.`pipeline.parent` = 'true' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=count)
    if len(runs) < count:
        raise SystemExit(f"error: {len(runs)} finished pipeline run(s) in {experiment!r}, {count} needed: run the "
                         "pipeline again with one knob changed (see this script's docstring)")
    return exp.experiment_id, [r.info.run_id for r in runs]


def compare_picture(experiment: str, out: Path, height: int) -> None:
    exp_id, run_ids = latest_parent_runs(experiment)
    port = free_port()
    cmd, url = mlflow_command(port)
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_healthy(f"{url}/health", server)
        view = f"{url}/#/compare-runs?runs={quote(json.dumps(run_ids))}&experiments={quote(json.dumps([exp_id]))}"
        with browser.page(width=1400, height=height) as (tab, traffic):
            tab.goto(view, wait_until="networkidle")
            tab.get_by_text("Parameters").first.wait_for(timeout=120_000)  # the compare table is drawn
            tab.wait_for_timeout(3000)  # the charts animate in
            tab.screenshot(path=str(out))
        _report(out, traffic)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: mlflow ui exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    raise SystemExit(f"error: mlflow ui did not answer at {url} within {timeout:.0f} s")


def _report(out: Path, traffic: browser.Traffic) -> None:
    print(f"wrote {out.relative_to(ROOT)}" + (f" (blocked {len(traffic.blocked)} outside requests: "
                                                f"{sorted(set(traffic.blocked))[:3]})" if traffic.blocked else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", help="MLflow experiment (default: params project.name)")
    args = parser.parse_args()
    DOCS.mkdir(exist_ok=True)
    report_picture(declared_path(ROOT, "run_report") / "report.html", DOCS / "report.png", height=1500)
    compare_picture(args.experiment or load_params().project.name, DOCS / "mlflow-compare.png", height=1000)


if __name__ == "__main__":
    main()
