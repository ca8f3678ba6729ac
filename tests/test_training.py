"""The sft and grpo stages on the tiny model, on CPU: LoRA trains, MLflow gets the per-reward,
memory and KL metrics and the completions table, the adapter generates, and a GRPO run killed
with SIGKILL resumes from its last checkpoint."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.common.answer_format import completion_text
from tests.conftest import tiny

ROOT = Path(__file__).resolve().parents[1]


def distinct_chars(prompts, completions, **kwargs):
    """A reward that varies even for a random model, so advantages are not all zero."""
    return [len(set(completion_text(c))) / 10 for c in completions]


LORA_RUN = {
    "model": {"lora": {"enabled": True, "r": 8, "alpha": 16}},
    "sft": {"max_steps": 3, "per_device_train_batch_size": 4},
    "grpo": {"rewards": [{"name": "tag_count"}, {"name": "tests.test_training:distinct_chars"}],
             "max_steps": 3, "save_steps": 100, "log_completions_every": 1, "max_completion_length": 24,
             "learning_rate": 1e-2},
}


def test_backend_choice_on_cpu():
    from stages.common import models

    assert models.choose_backend("auto")[0] == "trl"
    assert "no CUDA" in models.choose_backend("auto")[1]
    with pytest.raises(RuntimeError, match="needs CUDA"):
        models.choose_backend("unsloth")
    assert models.choose_generation("auto")[0] == "transformers"


def test_nonfinite_loss_stops_with_clear_error():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from stages.common.training import MlflowMetricsCallback, NonFiniteLossError

    cb = MlflowMetricsCallback()
    args = TrainingArguments(output_dir="/tmp/unused", report_to="none", use_cpu=True)
    state = TrainerState()
    state.global_step = 7
    with pytest.raises(NonFiniteLossError, match="nan at step 7.*last good checkpoint"):
        cb.on_log(args, state, TrainerControl(), logs={"loss": math.nan})


def test_sft_disabled_writes_marker(tmp_path, prepared_dir, base_dir):
    from stages import sft

    out = tmp_path / "sft"
    assert sft.run(tiny({"sft": {"enabled": False}}), prepared_dir / "sft.parquet", base_dir, out) == {"skipped": True}
    assert (out / sft.SKIPPED).exists()


@pytest.mark.slow
def test_sft_then_grpo_lora_trains_and_logs(tmp_path, prepared_dir, base_dir, mlruns_dir):
    import mlflow
    import torch
    from safetensors.torch import load_file

    from stages import grpo, sft
    from stages.common import models, tracking

    params = tiny(LORA_RUN)
    sft_dir, grpo_dir = tmp_path / "sft", tmp_path / "grpo"
    sft_metrics = sft.run(params, prepared_dir / "sft.parquet", base_dir, sft_dir)
    assert sft_metrics["steps"] == 3 and (sft_dir / "adapter_config.json").exists()
    assert (sft_dir / "tokenizer.model").exists()

    with tracking.stage_run("grpo", params) as run:
        metrics = grpo.run(params, prepared_dir / "grpo.parquet", base_dir, sft_dir, grpo_dir,
                           tmp_path / "ckpt", tmp_path / "plots")
    assert metrics["steps"] == 3 and metrics["backend"] == "trl"

    # LoRA weights moved away from the SFT adapter they started from.
    before, after = load_file(sft_dir / "adapter_model.safetensors"), load_file(grpo_dir / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "GRPO did not change any LoRA weight"

    client = mlflow.MlflowClient()
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["backend"] == "trl" and tags["generation"] == "transformers" and tags["stage"] == "grpo"
    assert tags["git_commit"] and tags["inputs_digest"]
    logged = client.get_run(run.info.run_id).data.metrics
    for key in ("rewards/tag_count/mean", "rewards/distinct_chars/mean", "reward", "memory/rss_gib",
                "kl_monitor", "frac_reward_zero_std", "step_seconds", "throughput/generated_tokens_per_s"):
        assert key in logged, f"{key} missing from MLflow; have {sorted(logged)}"
    assert len(client.get_metric_history(run.info.run_id, "reward")) == 3
    tables = [a.path for a in client.list_artifacts(run.info.run_id, "completions")]
    assert tables, "no completions table logged"
    table = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=tables[0])).read_text())
    assert {"completion", "gold", "extracted", "reward/distinct_chars"} <= set(table["columns"])

    csv_text = (tmp_path / "plots" / "grpo_rewards.csv").read_text().splitlines()
    assert csv_text[0].startswith("step,reward") and len(csv_text) == 4
    assert (tmp_path / "plots" / "grpo_rewards.png").stat().st_size > 1000

    model = models.load_with_adapter(base_dir, grpo_dir)
    tok = models.load_tokenizer(grpo_dir)
    ids = tok("Question: 2 + 2?", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.input_ids.shape[1] + 5


def _workspace(tmp_path: Path, prepared_dir: Path, base_dir: Path, overrides: dict) -> Path:
    from stages.preset import render

    work = tmp_path / "work"
    shutil.copytree(prepared_dir, work / "data" / "prepared")
    shutil.copytree(base_dir, work / "models" / "base")
    (work / "params.yaml").write_text(render(tiny(overrides)))
    return work


@pytest.mark.slow
def test_grpo_killed_mid_run_resumes_from_checkpoint(tmp_path, prepared_dir, base_dir, mlruns_dir):
    overrides = {"sft": {"enabled": False},
                 "grpo": {"rewards": [{"name": "tests.test_training:distinct_chars"}], "max_steps": 10,
                          "save_steps": 2, "max_completion_length": 16, "log_completions_every": 0}}
    work = _workspace(tmp_path, prepared_dir, base_dir, overrides)
    env = {**os.environ, "PIPELINE_WORKDIR": str(work), "PIPELINE_MLRUNS_DIR": str(mlruns_dir)}
    ckpt = work / "checkpoints" / "grpo"

    first = subprocess.Popen([sys.executable, "-m", "stages.grpo"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (ckpt / "checkpoint-2" / "trainer_state.json").exists():
        assert first.poll() is None, f"grpo exited early: {first.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    run_id = json.loads((ckpt / "run_state.json").read_text())["mlflow_run_id"]
    assert not (work / "metrics" / "grpo.json").exists(), "the run finished before it was killed"

    second = subprocess.run([sys.executable, "-m", "stages.grpo"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads((work / "metrics" / "grpo.json").read_text())
    assert metrics["resumed_from_checkpoint"] in {"checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"}
    assert metrics["steps"] == 10
    assert (work / "models" / "grpo" / "model.safetensors").exists()
    assert json.loads((ckpt / "run_state.json").read_text())["mlflow_run_id"] == run_id, "resume opened a new MLflow run"

    import mlflow

    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.tags.get("resumed_from") == metrics["resumed_from_checkpoint"]
    assert run.info.status == "FINISHED"
