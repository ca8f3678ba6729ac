"""GRPO on the fast paths, on a GPU: vLLM rollouts with the Unsloth backend (fast_inference, one
engine sharing the LoRA model's weights) and with plain TRL (colocated vLLM). The tiny model with a
LoRA adapter and a reward that varies (so advantages are not zero) trains 3 steps; the adapter must
move, and reward, KL, memory and throughput must reach MLflow. Run with tests/gpu/run.sh.

One test per file: pytest-xdist runs each file in its own process, and a process hosts one vLLM engine."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import tiny

RUN = {
    "model": {"dtype": "bfloat16", "lora": {"enabled": True, "r": 16, "alpha": 32}, "generation": "vllm",
              "gpu_memory_utilization": 0.15, "max_seq_length": 256},
    "sft": {"enabled": False},
    "grpo": {"rewards": [{"name": "tag_count"}, {"name": "tests.test_training:distinct_chars"}],
             "max_steps": 3, "save_steps": 100, "log_completions_every": 1, "max_completion_length": 32,
             "max_prompt_length": 192, "learning_rate": 1e-2, "monitor_kl_every": 1, "optim": "adamw_torch",
             # Full-vocabulary sampling: with min_p and the correction on, the stage would (rightly) leave
             # Unsloth for plain TRL (tests/gpu/test_grpo_vllm_unsloth_min_p.py turns the correction off).
             "min_p": None},
}


def train_and_check(backend, tmp_path, prepared_dir, base_dir, lora: bool = True, grpo_values: dict | None = None):
    """lora False: full fine-tuning (trl backend), where the KL monitor's reference is a frozen copy of the
    model that must follow it onto the GPU (learn-gpu's first vLLM run crashed there, 2026-11-30).
    grpo_values: params.grpo values over RUN's (the sampling or the log-prob path a test is about)."""
    import mlflow
    from safetensors.torch import load_file

    from stages import grpo
    from stages.common import tracking
    from stages.common.models import base_info

    model = {**RUN["model"], "backend": backend, "lora": {**RUN["model"]["lora"], "enabled": lora}}
    if not lora:
        model["dtype"] = "float32"  # as learn-gpu trains: pure bf16 weights would round small updates away
    params = tiny({**RUN, "model": model, "grpo": {**RUN["grpo"], **(grpo_values or {})}})
    with tracking.stage_run("grpo", params) as run:
        metrics = grpo.run(params, prepared_dir / "grpo.parquet", base_dir, tmp_path / "no_sft", tmp_path / "grpo",
                           tmp_path / "ckpt", tmp_path / "plots")
    assert (metrics["backend"], metrics["generation"]) == (backend, "vllm")
    assert metrics["steps"] == 3
    # plain TRL takes vLLM's importance-sampling weights from the loss's forward (stages/common/on_policy_is.py)
    assert metrics["importance_sampling_from_loss"] == (backend == "trl")

    if lora:
        adapter = load_file(tmp_path / "grpo" / "adapter_model.safetensors")
        moved = [k for k, v in adapter.items() if "lora_B" in k and v.float().abs().sum() > 0]
        assert moved, "every lora_B is still at its zero initialisation: GRPO did not train the adapter"
    else:
        before = load_file(str(Path(base_info(base_dir)["model"]) / "model.safetensors"))
        after = load_file(str(tmp_path / "grpo" / "model.safetensors"))
        changed = [k for k in before if k in after and not torch.equal(before[k], after[k].to(before[k].dtype))]
        assert changed, "no weight differs from the base model: GRPO did not train"

    logged = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    expected = ["reward", "rewards/distinct_chars/mean", "kl_monitor", "memory/cuda_peak_allocated_gib",
                "throughput/generated_tokens_per_s", "step_seconds"]
    if backend == "trl":  # logged by the loss-pass trainer in place of TRL's extra pass
        expected += ["sampling/importance_sampling_ratio/mean", "sampling/sampling_logp_difference/mean"]
    for key in expected:
        assert key in logged, f"{key} missing from MLflow; have {sorted(logged)}"
    assert "kl" not in logged, "beta is 0: a `kl` value would not be a measurement"
    assert logged["memory/cuda_peak_allocated_gib"] > 0
