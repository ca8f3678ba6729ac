"""Pipeline cost on CPU: the README's main job from a clean workspace, stage by stage.

    .venv/bin/python bench/pipeline_cost.py [--preset tiny] [--out bench/results/pipeline_cost.json]

In a fresh copy of this checkout (tracked files only, the project's .venv linked in):
1. every stage of dvc.yaml through the Prefect flow (`python -m flows.pipeline --preset tiny`,
   the README's `make pipeline` after install), wall time per stage (from the stage table of
   the run's report, reports/pipeline/report.md) and in total;
2. a no-op `dvc repro` once everything is up to date (goal: under 5 s);
3. the flow's overhead over plain `dvc repro` for the same stages: both run prepare +
   base_model from scratch in two more fresh copies (goal: under 20 s or 10%).
Writes a JSON, a PNG bar chart of stage times, and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"


def fresh_copy(dst: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    (dst / ".venv").symlink_to(ROOT / ".venv")
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dst, check=True)
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@local", "commit", "-qm", "bench"], cwd=dst, check=True)
    return dst


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{(done.stdout + done.stderr)[-4000:]}")
    return seconds, done.stdout + done.stderr


def stage_seconds(report_md: str) -> dict[str, float]:
    """Stage -> seconds from the report's stage table (`| sft | done | 20.4 s | ... |`)."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (\w+) \| [^|]+ \| ([\d.]+) s \|", report_md, re.M)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "pipeline_cost.json"))
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="pipeline-cost-"))
    prefect_home = base / "prefect"
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PREFECT_HOME": str(prefect_home),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}
    for key in ("MLFLOW_TRACKING_URI", "PIPELINE_WORKDIR", "PIPELINE_MLRUNS_DIR", "PIPELINE_PARENT_RUN_ID"):
        env.pop(key, None)
    py = str(VENV_BIN / "python")

    work = fresh_copy(base / "full")
    total, _ = timed([py, "-m", "flows.pipeline", "--preset", args.preset], work, env)
    stages = stage_seconds((work / "reports" / "pipeline" / "report.md").read_text())
    if not stages:
        raise SystemExit(f"no stage times in {work / 'reports/pipeline/report.md'}: its stage table changed?")
    noop, _ = timed([py, "-m", "dvc", "repro"], work, env)

    plain_dir, flow_dir = fresh_copy(base / "plain"), fresh_copy(base / "flow")
    for d in (plain_dir, flow_dir):
        timed([py, "-m", "stages.preset", args.preset], d, env)
    plain, _ = timed([py, "-m", "dvc", "repro", "base_model"], plain_dir, env)
    flow, _ = timed([py, "-m", "flows.pipeline", "--stages", "base_model"], flow_dir, env)

    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
        "python": platform.python_version(), "preset": args.preset,
        "pipeline_seconds": round(total, 1), "stage_seconds": stages,
        "noop_dvc_repro_seconds": round(noop, 2),
        "prepare_base_model": {"dvc_repro_seconds": round(plain, 1), "flow_seconds": round(flow, 1),
                               "flow_overhead_seconds": round(flow - plain, 1)},
        "goals": {"pipeline_under_600_s": total < 600, "noop_under_5_s": noop < 5,
                  "flow_overhead_ok": (flow - plain) < max(20.0, 0.1 * plain)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(list(stages), list(stages.values()))
    ax.invert_yaxis()
    ax.set(xlabel="seconds", title=f"{args.preset} pipeline on {os.cpu_count()} CPU cores: {total:.0f} s in all")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(json.dumps(result, indent=2))
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
