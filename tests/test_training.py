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


def test_unsloth_training_turns_cudnn_attention_off_unless_told_to_keep_it(monkeypatch):
    # torch's backend switches are plain flags, also on a CPU build; the GPU effect is in docs/benchmarks.md
    import torch

    from stages.common import models

    switch = torch.backends.cuda
    try:
        assert models.keep_training_attention_off_cudnn(cuda=False) is False and switch.cudnn_sdp_enabled()
        monkeypatch.setenv("UNSLOTH_SDPA_TRAIN_CUDNN", "1")
        assert models.keep_training_attention_off_cudnn(cuda=True) is False and switch.cudnn_sdp_enabled()
        monkeypatch.delenv("UNSLOTH_SDPA_TRAIN_CUDNN")
        assert models.keep_training_attention_off_cudnn(cuda=True) is True and not switch.cudnn_sdp_enabled()
    finally:
        switch.enable_cudnn_sdp(True)


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


KILL_RUN = {"sft": {"enabled": False},
            "grpo": {"rewards": [{"name": "tests.test_training:distinct_chars"}], "max_steps": 8, "save_steps": 2,
                     "max_completion_length": 16, "log_completions_every": 0, "lr_scheduler_type": "constant",
                     "warmup_ratio": 0.0}}


def _run_stage(work: Path, mlruns_dir: Path, kill_after: str | None = None) -> subprocess.CompletedProcess | None:
    """`python -m stages.grpo` in work; with kill_after, SIGKILL it once that checkpoint is complete."""
    env = {**os.environ, "PIPELINE_WORKDIR": str(work), "PIPELINE_MLRUNS_DIR": str(mlruns_dir)}
    if kill_after is None:
        return subprocess.run([sys.executable, "-m", "stages.grpo"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
    proc = subprocess.Popen([sys.executable, "-m", "stages.grpo"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = work / "checkpoints" / "grpo" / kill_after / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not done.exists():
        assert proc.poll() is None, f"grpo exited early: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {kill_after} within 240 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return None


@pytest.mark.slow
def test_grpo_killed_mid_run_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path, prepared_dir, base_dir, mlruns_dir):
    """Kill after checkpoint-2, rerun unchanged: it resumes there, as a new MLflow run linked to the
    killed one (now KILLED), with every step logged once; and it ends with the step count and
    weights of a run that was never interrupted (CPU, fixed seed: equal within 1e-5)."""
    import mlflow
    import torch
    from safetensors.torch import load_file

    killed = _workspace(tmp_path / "a", prepared_dir, base_dir, KILL_RUN)
    whole = _workspace(tmp_path / "b", prepared_dir, base_dir, KILL_RUN)

    _run_stage(killed, mlruns_dir, kill_after="checkpoint-2")
    first_run = json.loads((killed / "checkpoints" / "grpo" / "run_state.json").read_text())["mlflow_run_id"]
    assert not (killed / "metrics" / "grpo.json").exists(), "the run finished before it was killed"
    second = _run_stage(killed, mlruns_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads((killed / "metrics" / "grpo.json").read_text())
    assert metrics["resumed_from_checkpoint"] in {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    assert metrics["steps"] == 8

    from stages.common import tracking

    client = mlflow.MlflowClient(tracking.tracking_uri())  # the store the stage processes logged to
    resumed_run = json.loads((killed / "checkpoints" / "grpo" / "run_state.json").read_text())["mlflow_run_id"]
    assert resumed_run != first_run
    tags = client.get_run(resumed_run).data.tags
    assert tags["resumed_from_run_id"] == first_run and tags["resumed_from"] == metrics["resumed_from_checkpoint"]
    assert client.get_run(first_run).info.status == "KILLED"
    assert client.get_run(resumed_run).info.status == "FINISHED"
    history = [m.step for m in client.get_metric_history(resumed_run, "reward")]
    assert sorted(history) == list(range(1, 9)), f"each step once, the restored ones included: {history}"
    csv_steps = [int(line.split(",")[0]) for line in (killed / "plots" / "grpo_rewards.csv").read_text().splitlines()[1:]]
    assert csv_steps == list(range(1, 9))

    uninterrupted = _run_stage(whole, mlruns_dir)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert json.loads((whole / "metrics" / "grpo.json").read_text())["steps"] == 8
    a = load_file(killed / "models" / "grpo" / "model.safetensors")
    b = load_file(whole / "models" / "grpo" / "model.safetensors")
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-5, f"resumed and uninterrupted runs differ by up to {worst}"


@pytest.mark.slow
def test_changed_inputs_start_fresh_and_keep_the_old_checkpoints(tmp_path, prepared_dir, base_dir, mlruns_dir):
    """A finished run, then its training data changes: the rerun starts at step 0 (not from the old
    final checkpoint), and the old checkpoints are set aside with the reason."""
    import pandas as pd

    work = _workspace(tmp_path, prepared_dir, base_dir, {**KILL_RUN, "grpo": {**KILL_RUN["grpo"], "max_steps": 2}})
    assert _run_stage(work, mlruns_dir).returncode == 0
    data = work / "data" / "prepared" / "grpo.parquet"
    pd.read_parquet(data).iloc[::-1].reset_index(drop=True).to_parquet(data)  # same rows, other order: other bytes
    again = _run_stage(work, mlruns_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((work / "metrics" / "grpo.json").read_text())
    assert metrics["resumed_from_checkpoint"] is None and metrics["steps"] == 2
    assert "inputs changed" in again.stdout
    stale = list((work / "checkpoints" / "grpo.stale").iterdir())
    assert len(stale) == 1 and (stale[0] / "checkpoint-2").is_dir()


def test_unsloth_vllm_with_truncated_sampling_and_the_correction_falls_back_to_trl_loudly(monkeypatch, capsys):
    """Test double for the hardware: this machine has no CUDA, so the backend and engine choices
    are stubbed as a GPU machine with Unsloth and vLLM would make them."""
    from stages.common import engines, models

    monkeypatch.setattr(models, "choose_backend", lambda requested: ("unsloth", "requested"))
    monkeypatch.setattr(models, "choose_generation", lambda requested: ("vllm", "requested"))
    explicit = tiny({"model": {"backend": "unsloth", "generation": "vllm"}, "grpo": {"min_p": 0.1}})
    (backend, why), (generation, _) = engines.engines(explicit)
    assert (backend, generation) == ("trl", "vllm") and why.startswith("fallback:") and "min_p" in why
    assert "WARNING" in capsys.readouterr().out
    auto = tiny({"model": {"backend": "auto", "generation": "vllm"}, "grpo": {"min_p": None, "top_k": 20}})
    assert engines.engines(auto)[0][0] == "trl"
    full_vocabulary = tiny({"model": {"backend": "unsloth", "generation": "vllm"},
                            "grpo": {"min_p": None, "top_k": None, "top_p": 1.0}})
    assert engines.engines(full_vocabulary)[0] == ("unsloth", "requested")
    # the stall needs the importance-sampling correction too (bench/results/session16): without it Unsloth keeps min_p
    uncorrected = tiny({"model": {"backend": "unsloth", "generation": "vllm"},
                        "grpo": {"min_p": 0.1, "vllm_importance_sampling_correction": False}})
    assert engines.engines(uncorrected)[0] == ("unsloth", "requested")
    server = tiny({"model": {"backend": "unsloth", "generation": "vllm"},
                   "grpo": {"min_p": None, "vllm_mode": "server"}})
    with pytest.raises(ValueError, match="vllm_mode: server needs model.backend: trl"):
        engines.engines(server)



def test_vllm_v1_runner_only_where_trls_warm_up_would_overrun_v2(monkeypatch, capsys):
    """TRL warms vLLM up on 4096 tokens over max_num_seqs requests; above max_model_len each, vLLM 0.26's V2
    runner crashed on the H200 (bench/repro_trl_vllm_tiny.py: 8 x 224 crashed, 64 x 224 and V1 ran)."""
    from stages.common.engines import avoid_vllm_dummy_run_overflow

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    assert not avoid_vllm_dummy_run_overflow(64, 224) and not avoid_vllm_dummy_run_overflow(512, 160)
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ
    assert avoid_vllm_dummy_run_overflow(8, 224)
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0" and "V1 model runner" in capsys.readouterr().out
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")  # the user's choice stands
    assert not avoid_vllm_dummy_run_overflow(8, 224) and os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1"


def test_a_single_colocated_run_takes_its_own_free_rendezvous_port(monkeypatch):
    # two runs starting together both took TRL's 29500 (H200, 2026-11-30): each now binds a port the OS picks
    import socket

    from stages.common.ranks import own_rendezvous_port

    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    port = own_rendezvous_port()
    assert port and os.environ["MASTER_PORT"] == str(port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # it is free: the store can listen there
    assert own_rendezvous_port() is None and os.environ["MASTER_PORT"] == str(port)  # set: left alone
    monkeypatch.delenv("MASTER_PORT")
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched processes share the launcher's port
    assert own_rendezvous_port() is None and "MASTER_PORT" not in os.environ


def test_learning_bench_shares_gpus_round_robin_with_one_gate_per_gpu(monkeypatch):
    # GPU counts are stand-ins (no GPU here); on the H200, three vLLM seeds whose engines started together
    # failed to size their caches
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import learning

    vllm = {"model": {"generation": "vllm"}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    plan = learning.gpu_plan("learn-gpu", vllm, [0, 1, 2])
    assert [plan[s][0] for s in (0, 1, 2)] == ["0", "1", "0"]
    assert plan[0][1] is plan[2][1] and plan[0][1] is not plan[1][1]  # one gate per GPU
    assert learning.gpu_plan("learn-gpu", {"model": {"generation": "transformers"}}, [0, 1, 2]) == {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert learning.gpu_plan("learn-gpu", vllm, [0, 1]) == {}


def test_learning_bench_gate_opens_when_the_engine_is_up_not_when_the_stage_ends():
    # A real process stands in for the grpo stage: it prints vLLM's ready line, then works on.
    import threading

    sys.path.insert(0, str(ROOT / "bench"))
    import learning

    gate = threading.Lock()
    # TRL's colocate mode hides vLLM's INFO line; its CUDA graph bar (updates ending in \r) still shows
    bar = "Capturing CUDA graphs (FULL):   0%|  | 0/19\rCapturing CUDA graphs (FULL):  16%|  | 3/19\r"
    stage = [sys.executable, "-c", f"import sys, time; sys.stderr.write({bar!r}); sys.stderr.flush(); time.sleep(2); print('done')"]
    waited = {}

    def second_seed() -> None:
        time.sleep(0.2)  # the first seed holds the gate by then
        start = time.monotonic()
        with gate:
            waited["s"] = time.monotonic() - start

    other = threading.Thread(target=second_seed)
    other.start()
    code, output = learning.run_stage(stage, dict(os.environ), gate)
    other.join()
    assert code == 0 and output.rstrip().endswith("done")
    assert waited["s"] < 1.5  # let go at the ready line, not after the 2-s stage
    assert gate.acquire(blocking=False)  # and released exactly once: free again
    gate.release()
    code, output = learning.run_stage([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), gate)
    assert code == 3 and gate.acquire(blocking=False)  # a stage that fails before its engine lets go too


def test_learning_bench_merges_seeds_run_in_separate_calls(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import learning

    def seed(n, gain=None):
        if gain is None:
            return {"seed": n, "failed_stage": "grpo"}
        return {"seed": n, "accuracy": {"base": 0.0, "sft": 0.4, "grpo": 0.4 + gain}, "grpo_minus_sft": gain,
                "total_seconds": 1.0, "hacking": {"flagged": False}}

    def run(name, seeds, overrides=None):
        file = tmp_path / name
        file.write_text(json.dumps({"date": "2026-11-30", "machine": "m", "preset": "learn-gpu",
                                    "overrides": overrides or {"model.generation": "vllm"}, "per_seed": seeds}))
        return file

    first = run("a.json", [seed(0, 0.24), seed(1), seed(2, 0.432)])
    second = run("b.json", [seed(1, 0.30)])
    learning.merge([first, second], tmp_path / "all.json")
    merged = json.loads((tmp_path / "all.json").read_text())
    assert [s["seed"] for s in merged["per_seed"]] == [0, 1, 2] and merged["median_gain_points"] == 30.0
    assert merged["goal_met"] and "failed" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="differ in preset or overrides"):
        learning.merge([first, run("c.json", [seed(1, 0.3)], {"model.generation": "transformers"})], tmp_path / "x.json")
    with pytest.raises(SystemExit, match="1 seed\\(s\\) failed"):  # a seed still missing keeps the verdict open
        learning.merge([first], tmp_path / "y.json")


@pytest.mark.slow
def test_continuous_training_takes_new_prompts_first_and_continues_the_lr_schedule(tmp_path, prepared_dir, base_dir,
                                                                                   mlruns_dir):
    """grpo.continue_on_new_prompts: 2 steps on 8 prompts, then 8 more prompts arrive and the budget
    grows to 4 steps. The rerun resumes at checkpoint-2 (not fresh), steps 3-4 train only on prompts
    not trained before, and the linear schedule continues over the 4-step horizon: steps 3 and 4
    train at lr0 x 2/4 and 1/4 (TRL logs the rate a step used; a restart would give lr0 and 3/4,
    the checkpoint's optimizer left alone 0.0 for step 3)."""
    import pandas as pd

    from stages.common import checkpoints
    from stages.preset import render

    grpo = {**KILL_RUN["grpo"], "max_steps": 2, "continue_on_new_prompts": True, "lr_scheduler_type": "linear",
            "learning_rate": 1e-3}
    work = _workspace(tmp_path, prepared_dir, base_dir, {**KILL_RUN, "grpo": grpo})
    data_file = work / "data" / "prepared" / "grpo.parquet"
    rows = pd.read_parquet(data_file)
    rows.head(8).to_parquet(data_file)
    first = _run_stage(work, mlruns_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = work / "checkpoints" / "grpo"
    trained_before = checkpoints.consumed(ckpt / "checkpoint-2")
    assert len(trained_before) == 4, "2 steps x 2 prompts (8 completions, 4 per prompt)"

    rows.head(16).to_parquet(data_file)  # 8 new prompts
    (work / "params.yaml").write_text(render(tiny({**KILL_RUN, "grpo": {**grpo, "max_steps": 4}})))
    second = _run_stage(work, mlruns_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads((work / "metrics" / "grpo.json").read_text())
    assert metrics["resumed_from_checkpoint"] == "checkpoint-2" and metrics["steps"] == 4
    assert metrics["prompts_not_trained_before"] == 12
    later = checkpoints.consumed(ckpt / "checkpoint-4") - trained_before
    assert len(later) == 4 and not later & trained_before

    curve = {int(r.split(",")[0]): r.split(",") for r in (work / "plots" / "grpo_rewards.csv").read_text().splitlines()[1:]}
    header = (work / "plots" / "grpo_rewards.csv").read_text().splitlines()[0].split(",")
    used = [float(curve[step][header.index("learning_rate")]) for step in (3, 4)]
    assert used == pytest.approx([1e-3 * 2 / 4, 1e-3 / 4], rel=1e-3), f"learning rates of steps 3 and 4: {used}"


def test_the_trainers_closing_summary_adds_no_second_value_to_step_metrics():
    """HF's end-of-training summary arrives at the last step: it must not bring a second
    step_seconds / memory / throughput value for that step."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from stages.common.training import MlflowMetricsCallback

    cb = MlflowMetricsCallback(completions_per_step=8)
    args = TrainingArguments(output_dir="/tmp/unused", report_to="none", use_cpu=True)
    state = TrainerState()
    state.global_step = 3
    cb.on_train_begin(args, state, TrainerControl())
    cb.on_log(args, state, TrainerControl(), logs={"loss": 0.5, "reward": 1.0, "completions/mean_length": 4.0})
    cb.on_log(args, state, TrainerControl(), logs={"train_runtime": 9.0, "train_loss": 0.5})
    step_rows = [h for h in cb.history if "step_seconds" in h]
    assert len(step_rows) == 1 and step_rows[0]["step"] == 3


def test_learning_bench_continues_a_kept_workspace_only_with_its_own_params(tmp_path, capsys):
    # A workspace whose stages all finished in an earlier run (progress.json): nothing runs again, the
    # result comes from its files; a workspace made with other params is refused before anything runs.
    sys.path.insert(0, str(ROOT / "bench"))
    import learning

    work = tmp_path / "seed0"
    (work / "metrics").mkdir(parents=True)
    (work / "plots").mkdir()
    (work / "params.yaml").write_text(learning.seed_params(0, "learn", {}))
    finished = {"_".join(stage): 1.0 for stage in learning.STAGES}
    (work / "progress.json").write_text(json.dumps({"seconds": finished, "grpo_engine": ["grpo: backend=trl"]}))
    (work / "metrics" / "evaluate.json").write_text(json.dumps({m: {"strict": a} for m, a in (("base", 0.0), ("sft", 0.4), ("grpo", 0.7))}))
    (work / "metrics" / "grpo.json").write_text(json.dumps({"resumed_from_checkpoint": "checkpoint-50"}))
    (work / "plots" / "grpo_rewards.csv").write_text("step,rewards/correctness/mean\n5,0.3\n10,0.5\n")

    learning.check_workspaces(tmp_path, [0, 1], "learn", {})  # seed 1 has no workspace yet: fine
    result = learning.run_seed(0, "learn", {}, tmp_path, dict(os.environ), tmp_path / "out.json")
    assert result["total_seconds"] == 6.0 and round(result["grpo_minus_sft"], 3) == 0.3
    assert result["finished_in_earlier_runs"] == list(finished) and result["grpo_resumed_from"] == "checkpoint-50"
    assert capsys.readouterr().out.count("finished in an earlier run") == len(learning.STAGES)
    with pytest.raises(SystemExit, match="seed 0's workspace was made with other params"):
        learning.check_workspaces(tmp_path, [0], "learn", {"grpo.learning_rate": 2e-4})


def test_first_and_final_reward_come_from_different_rows_in_a_short_run():
    from stages.common.monitoring import summarize

    def run(rewards):
        return summarize([{"step": i + 1, "reward": r} for i, r in enumerate(rewards)], [])

    short = run([0.0, 1.0, 2.0, 3.0])  # fewer than 2 x 5 rows: the halves
    assert (short["reward_first"], short["reward_final"]) == (0.5, 2.5)
    long = run(list(range(12)))  # the first and last 5 rows
    assert (long["reward_first"], long["reward_final"]) == (2.0, 9.0)
    one = run([7.0])
    assert one["reward_first"] == one["reward_final"] == 7.0
