"""The GPU benchmark scripts, run on the CPU with a small model of the same vocabulary (their `--shapes
small` mode): they drive the real grpo stage, so a change to the stage's hooks that breaks them shows
here instead of on scarce GPU time (bench/gpu_long_context.py once failed on the GPU on a removed helper)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_base")  # the small random model, built once by the first script


def run_script(script: str, *args: str, cwd: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_gpu_grpo_measures_steps_of_forced_length(tmp_path, base_dir):
    out = tmp_path / "grpo.json"
    run_script("gpu_grpo.py", "--backend", "trl", "--shapes", "small", "--completion-length", "16", "--steps", "2",
               "--warmup", "1", "--base-dir", str(base_dir), "--work-dir", str(tmp_path / "work"), "--out", str(out),
               cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["complete"] is True
    assert [row["step"] for row in result["per_step"]] == [1.0, 2.0]
    assert result["summary"]["completion_length_mean"] == 16  # eos never sampled: every completion full length
    assert result["summary"]["step_seconds_median"] > 0
    assert result["phases_per_step"]["2"], "TRL's phase timers reported nothing"


def test_gpu_long_context_runs_each_length_once(tmp_path, base_dir):
    out = tmp_path / "long.json"
    run_script("gpu_long_context.py", "--backend", "trl", "--shapes", "small", "--lengths", "32", "16",
               "--base-dir", str(base_dir), "--work-dir", str(tmp_path / "work"), "--out", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["status"] == "complete"
    assert result["longest_length_that_fits"] == 32
    assert [(s["length"], s["completion_mean_length"]) for s in result["steps"]] == [(16, 16), (32, 32)]
    assert all(s["step_seconds"] > 0 for s in result["steps"])


def test_pipeline_cost_reads_stage_times_from_the_reports_stage_table():
    # The console's stage lines changed once and left the bench with no stage times; it reads the report now.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import pipeline_cost

    from flows.report import Run, _stages_section

    run = Run(stages=[{"stage": "prepare", "result": "done", "seconds": 3.42, "figure": "7,473 rows", "log": "logs/prepare.log"},
                      {"stage": "evaluate_base", "result": "up to date", "seconds": 0.9},
                      {"stage": "gguf", "result": "failed", "seconds": None}])
    assert pipeline_cost.stage_seconds("\n".join(_stages_section(run))) == {"prepare": 3.4, "evaluate_base": 0.9}
