"""sft and grpo as 2 processes on CPU: `accelerate launch` with recipes/accelerate/ddp.yaml (DDP
over gloo), the command stages/launch.py builds from params `launch`, on the tiny model.

- Both ranks train, and their parameters are identical after every optimizer step (a probe on
  each process, tests/ddp_probe.py, saves them through the stage's run(callbacks=) hook).
- The main process alone tracks and writes: one MLflow run, each step's metrics once, one set
  of outputs.
- The launcher SIGKILLed mid-run takes its workers with it, and a rerun resumes at the last
  checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import psutil
import pytest

from stages import launch
from tests.servers import free_port
from tests.test_training import KILL_RUN, ROOT, _workspace

pytestmark = pytest.mark.slow


def _env(work: Path, mlruns_dir: Path, experiment: str) -> dict[str, str]:
    return {**os.environ, "PIPELINE_WORKDIR": str(work), "PIPELINE_MLRUNS_DIR": str(mlruns_dir),
            "MLFLOW_EXPERIMENT_NAME": experiment, "PYTHONUNBUFFERED": "1"}


def _two_processes(extra: dict) -> dict:
    return {**extra, "launch": {"num_processes": 2, "main_process_port": free_port()}}


def _probe_command(work: Path, stage: str, probe: Path) -> list[str]:
    """What `python -m stages.launch <stage>` runs for this workspace's params, with the probe as module."""
    from stages.common.params import load_params

    params = load_params(work / "params.yaml")
    return launch.accelerate_command(params.launch, "tests.ddp_probe", None, (stage, str(probe)))


def _weights(probe: Path, rank: int, step: int) -> dict:
    import torch

    return torch.load(probe / f"rank{rank}-step{step}.pt")


def _assert_trained_in_step(probe: Path, first: int, last: int) -> list[dict]:
    """Two processes in one process group, each with its share of the data; each rank's parameters
    moved from `first` to `last`, and the ranks agree at every step. Returns each rank's layout."""
    import torch

    layouts = [json.loads((probe / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(x["process_index"], x["world_size"], x["group_size"]) for x in layouts] == [(0, 2, 2), (1, 2, 2)]
    for rank in (0, 1):
        start, end = _weights(probe, rank, first), _weights(probe, rank, last)
        assert any(not torch.equal(start[k], end[k]) for k in start), f"rank {rank} did not train"
    for step in range(first, last + 1):
        zero, one = _weights(probe, 0, step), _weights(probe, 1, step)
        assert zero.keys() == one.keys()
        differing = [k for k in zero if not torch.equal(zero[k], one[k])]
        assert not differing, f"after step {step} the ranks differ in {differing[:3]}"
    return layouts


def _runs(experiment: str):
    import mlflow

    from stages.common import tracking

    client = mlflow.MlflowClient(tracking.tracking_uri())
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_sft_on_two_processes_trains_both_ranks_in_step_and_writes_once(tmp_path, prepared_dir, base_dir, mlruns_dir):
    work = _workspace(tmp_path, prepared_dir, base_dir, _two_processes(
        {"sft": {"max_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 4, "max_length": 256}}))
    probe, experiment = tmp_path / "probe", f"test-ddp-sft-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(_probe_command(work, "sft", probe), cwd=ROOT, env=_env(work, mlruns_dir, experiment),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    layouts = _assert_trained_in_step(probe, 0, 2)
    examples = len(pd.read_parquet(prepared_dir / "sft.parquet"))
    assert [x["batches_per_epoch"] for x in layouts] == [math.ceil(examples / (4 * 2))] * 2, "each rank gets half the data"

    client, runs = _runs(experiment)
    assert len(runs) == 1, f"{len(runs)} MLflow runs for one stage execution"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2]
    metrics = json.loads((work / "metrics" / "sft.json").read_text())
    assert metrics["steps"] == 2
    written = sorted(p.name for p in (work / "models" / "sft").iterdir())
    assert "model.safetensors" in written and "tokenizer.model" in written
    assert not {"trainer", "training_args.bin"} & set(written)


def test_grpo_on_two_processes_killed_then_resumed(tmp_path, prepared_dir, base_dir, mlruns_dir):
    """The real launcher (`python -m stages.launch grpo`) is SIGKILLed once checkpoint-2 is complete;
    its workers die with it. The rerun (with the probe) resumes at the last checkpoint, both ranks
    train in step, and the run's outputs and MLflow records are written once."""
    from transformers import AutoModelForCausalLM

    run = {**KILL_RUN, "grpo": {**KILL_RUN["grpo"], "max_steps": 4, "save_steps": 2}}
    work = _workspace(tmp_path, prepared_dir, base_dir, _two_processes(run))
    experiment = f"test-ddp-grpo-{uuid.uuid4().hex[:8]}"
    env = _env(work, mlruns_dir, experiment)
    ckpt = work / "checkpoints" / "grpo"

    launcher = subprocess.Popen([sys.executable, "-m", "stages.launch", "grpo"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 400
    while not (ckpt / "checkpoint-2" / "trainer_state.json").exists():
        assert launcher.poll() is None, f"grpo exited early: {launcher.stderr.read()[-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint-2 within 400 s"
        time.sleep(0.1)
    workers = psutil.Process(launcher.pid).children(recursive=True)
    assert len([w for w in workers if "stages.grpo" in " ".join(w.cmdline())]) == 2
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"workers outlived the killed launcher: {[w.pid for w in alive]}"
    first_run = json.loads((ckpt / "run_state.json").read_text())["mlflow_run_id"]
    assert not (work / "metrics" / "grpo.json").exists(), "the run finished before it was killed"

    probe = tmp_path / "probe"
    again = subprocess.run(_probe_command(work, "grpo", probe), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    Path("/tmp/ddp_again.err").write_text(again.stderr)
    assert again.returncode == 0, again.stderr[-4000:]
    metrics = json.loads((work / "metrics" / "grpo.json").read_text())
    assert metrics["resumed_from_checkpoint"] == "checkpoint-2" and metrics["steps"] == 4
    _assert_trained_in_step(probe, 2, 4)

    client, runs = _runs(experiment)
    by_id = {r.info.run_id: r for r in runs}
    resumed_run = json.loads((ckpt / "run_state.json").read_text())["mlflow_run_id"]
    assert set(by_id) == {first_run, resumed_run} and first_run != resumed_run, "one MLflow run per launch"
    assert by_id[first_run].info.status == "KILLED" and by_id[resumed_run].info.status == "FINISHED"
    assert by_id[resumed_run].data.tags["resumed_from_run_id"] == first_run
    steps = [m.step for m in client.get_metric_history(resumed_run, "reward")]
    assert sorted(steps) == [1, 2, 3, 4], f"each step once: {steps}"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    assert AutoModelForCausalLM.from_pretrained(work / "models" / "grpo") is not None
    assert not (work / "models" / "grpo" / "training_args.bin").exists()
