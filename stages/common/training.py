"""What the sft and grpo stages share: model setup per backend, dtype flags, and callbacks
that log to MLflow (metrics with memory and throughput, NaN guard). A tracking server that
goes away mid-training does not stop training: see MlflowMetricsCallback.

The backend is chosen once (stages.common.models.choose_backend); both stages call
`load_for_training`, which returns a model ready for TRL's trainers.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from stages.common import models
from stages.common.params import ModelParams

UNLOGGED = "unlogged_metrics.jsonl"
log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


def precision_flags(dtype: str) -> dict[str, bool]:
    """bf16/fp16 flags for TRL configs; fp32 (CPU) sets neither."""
    import torch

    resolved = models.torch_dtype(dtype)
    return {"bf16": resolved == torch.bfloat16, "fp16": resolved == torch.float16}


def completions_per_step(g) -> float:
    """Completions generated per optimizer step on one process: TRL generates a batch of
    per_device_train_batch_size x steps_per_generation completions and trains on it for
    steps_per_generation x num_iterations micro-batches, gradient_accumulation_steps per step."""
    return g.per_device_train_batch_size * g.gradient_accumulation_steps / g.num_iterations


def optimizer(name: str, backend: str) -> str:
    """8-bit optimizers need bitsandbytes and CUDA; on the CPU path fall back to adamw_torch."""
    if "8bit" in name and backend != "unsloth" and not models.has_cuda():
        return "adamw_torch"
    return name


def load_for_training(m: ModelParams, base_dir: Path, backend: str, init_adapter: Path | None = None,
                      fast_inference: bool = False, seed: int = 0,
                      gradient_checkpointing: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer) with a trainable LoRA (or full weights when LoRA is off).

    init_adapter: an earlier stage's output to continue from: a LoRA adapter folder (its
    weights are loaded into the new trainable adapter) or a full model folder.
    """
    info = models.base_info(base_dir)
    tokenizer = models.load_tokenizer(info["tokenizer"])
    full_model_dir = init_adapter if init_adapter and (Path(init_adapter) / "config.json").exists() else None
    adapter_dir = init_adapter if init_adapter and (Path(init_adapter) / "adapter_config.json").exists() else None
    source = str(full_model_dir or info["model"])

    if backend == "unsloth":
        from unsloth import FastLanguageModel  # imported before trl/transformers touch the model

        if models.keep_training_attention_off_cudnn(models.has_cuda()):
            print("unsloth: torch's cuDNN attention is off for training (a plan per new shape; "
                  "UNSLOTH_SDPA_TRAIN_CUDNN=1 keeps it)")
        model, _ = FastLanguageModel.from_pretrained(
            model_name=source, max_seq_length=m.max_seq_length, load_in_4bit=m.load_in_4bit,
            fast_inference=fast_inference, max_lora_rank=m.lora.r, gpu_memory_utilization=m.gpu_memory_utilization,
            dtype=None if m.dtype == "auto" else models.torch_dtype(m.dtype), revision=info.get("revision"))
        if m.lora.enabled:
            model = FastLanguageModel.get_peft_model(
                model, r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                target_modules=m.lora.target_modules, random_state=seed,
                use_gradient_checkpointing="unsloth" if gradient_checkpointing else False)
            if adapter_dir:
                _load_adapter_weights(model, adapter_dir)
        return model, tokenizer

    model = models.load_causal_lm(source, dtype=m.dtype, revision=None if full_model_dir else info.get("revision"),
                                  trust_remote_code=m.trust_remote_code)
    if not m.lora.enabled:
        return model, tokenizer
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True), tokenizer
    config = LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                        target_modules=m.lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config), tokenizer


def _load_adapter_weights(model: Any, adapter_dir: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{adapter_dir}: adapter does not match the model's LoRA layout "
                           f"(unexpected keys such as {result.unexpected_keys[:3]}); same model.lora settings?")


def save_trained(trainer, out_dir: Path) -> bool:
    """Save the trained adapter (or full model) to out_dir with Trainer.save_model: every process takes
    part (ZeRO-3 and FSDP gather the sharded weights), the main process alone writes. The pickled
    TrainingArguments it adds is removed: the output holds weights and tokenizer. Returns whether
    this process wrote."""
    trainer.save_model(str(out_dir))
    if not trainer.is_world_process_zero():
        return False
    (Path(out_dir) / "training_args.bin").unlink(missing_ok=True)
    return True


def memory_metrics() -> dict[str, float]:
    """Peak GPU memory (allocated, reserved) on CUDA, else this process's resident memory."""
    import torch

    gib = 1024 ** 3
    if torch.cuda.is_available():
        return {"memory/cuda_peak_allocated_gib": torch.cuda.max_memory_allocated() / gib,
                "memory/cuda_peak_reserved_gib": torch.cuda.max_memory_reserved() / gib}
    import psutil

    return {"memory/rss_gib": psutil.Process(os.getpid()).memory_info().rss / gib}


class ContinueSchedule(TrainerCallback):
    """On a resume, the first step's learning rate comes from the schedule on the current step budget.

    The checkpoint's optimizer still holds the rate its own schedule had reached: with a longer budget
    (continuous training: max_steps 100 -> 120) that is 0.0 at the end of a linear decay, so the first
    resumed step would train at rate 0 before the scheduler, rebuilt on the new horizon, takes over."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
        schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
        if state.global_step == 0 or optimizer is None or not hasattr(schedule, "lr_lambdas"):
            return
        for group, base, fn in zip(optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
            group["lr"] = base * fn(schedule.last_epoch)
        schedule._last_lr = [group["lr"] for group in optimizer.param_groups]


class MlflowMetricsCallback(TrainerCallback):
    """Logs every trainer log to the active MLflow run, with memory and throughput added;
    stops with a clear error on a NaN/inf loss (before the bad step is checkpointed).

    Logs that MLflow does not take (its server went away) are kept, oldest first, and sent
    again at the next log; training goes on. Those still unsent when training ends are written
    to `unlogged_file` (default <output_dir>/unlogged_metrics.jsonl; one JSON object per log:
    run_id, step, timestamp in ms, metrics) with a warning; tracking.replay_unlogged sends them.
    """

    def __init__(self, completions_per_step: float | None = None, unlogged_file: Path | None = None,
                 drop_kl: bool = False):
        self.completions_per_step = completions_per_step
        self.unlogged_file = unlogged_file
        # beta 0: nothing is measured against a reference, yet Unsloth logs kl = 0.0; it is left out
        # so it is never read as a measurement (the monitoring KL is `kl_monitor`).
        self.drop_kl = drop_kl
        self.history: list[dict[str, float]] = []
        self.pending: list[dict[str, Any]] = []
        self._failing = False
        self._last_time: float | None = None
        self._last_tokens: float | None = None
        self.peak: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kw):
        self._last_time = time.perf_counter()
        self._last_tokens = None
        if state.global_step > 0:  # resumed: carry the history up to the checkpoint, each step once
            import mlflow

            from stages.common.tracking import metric_name

            restored = [h for h in state.log_history if "step" in h and h["step"] <= state.global_step and "loss" in h]
            for h in restored:
                numeric = self._numeric({k: v for k, v in h.items() if k != "step"})
                self.history.append({"step": float(h["step"]), **numeric})
                if mlflow.active_run() is not None:
                    self.pending.append({"run_id": mlflow.active_run().info.run_id, "step": int(h["step"]),
                                         "timestamp": int(time.time() * 1000),
                                         "metrics": {metric_name(k): v for k, v in numeric.items()}})
            if self.pending:
                self._send(state.global_step)

    @staticmethod
    def _numeric(logs: dict) -> dict[str, float]:
        return {k: float(v) for k, v in logs.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is None:
            return
        # In place: callbacks after this one (a benchmark's timers) see the same figures.
        if self.drop_kl:
            logs.pop("kl", None)
        for key in ("loss", "train_loss"):
            if key in logs and not math.isfinite(float(logs[key])):
                raise NonFiniteLossError(
                    f"{key} is {logs[key]} at step {state.global_step}; stopping. The last good checkpoint "
                    f"(every save_steps) is kept in {args.output_dir}. Lower the learning rate or check the data.")
        if "train_runtime" in logs:  # the trainer's closing summary, at the last step: no step figures of its own
            self._log(state.global_step, self._numeric(logs))
            return
        now = time.perf_counter()
        elapsed = now - (self._last_time or now)
        self._last_time = now
        tokens = logs.get("num_tokens")
        if tokens is not None and self._last_tokens is not None and elapsed > 0:
            logs["throughput/train_tokens_per_s"] = (tokens - self._last_tokens) / elapsed
        if tokens is not None:
            self._last_tokens = tokens
        mean_len = logs.get("completions/mean_length")
        if mean_len is not None and self.completions_per_step and elapsed > 0:
            steps = max(1, args.logging_steps)
            # mean_len is TRL's mean over every process's completions; completions_per_step counts one process's
            total = mean_len * self.completions_per_step * args.world_size * steps
            logs["throughput/generated_tokens_per_s"] = total / elapsed
        logs["step_seconds"] = elapsed / max(1, args.logging_steps)
        logs.update(memory_metrics())
        for key, value in logs.items():
            if key.startswith("memory/"):
                self.peak[key] = max(self.peak.get(key, 0.0), value)
        numeric = self._numeric(logs)
        self.history.append({"step": float(state.global_step), **numeric})
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            # Saved with the next checkpoint, so a resumed run carries these too.
            state.log_history[-1].update({k: v for k, v in numeric.items() if k not in state.log_history[-1]})
            if self.drop_kl:
                state.log_history[-1].pop("kl", None)
        self._log(state.global_step, numeric)

    def _log(self, step: int, numeric: dict[str, float]) -> None:
        import mlflow

        if mlflow.active_run() is not None:
            from stages.common.tracking import metric_name

            self.pending.append({"run_id": mlflow.active_run().info.run_id, "step": step,
                                 "timestamp": int(time.time() * 1000),
                                 "metrics": {metric_name(k): v for k, v in numeric.items()}})
            self._send(step)

    def on_train_end(self, args, state, control, **kw):
        if not self.pending or self._send(state.global_step):
            return
        file = Path(self.unlogged_file or Path(args.output_dir) / UNLOGGED)
        file.parent.mkdir(parents=True, exist_ok=True)
        with file.open("a") as out:
            for entry in self.pending:
                out.write(json.dumps(entry) + "\n")
        log.warning("MLflow still unreachable at the end of training: the metrics of %d logs (steps %s-%s) "
                    "were written to %s; send them later with stages.common.tracking.replay_unlogged",
                    len(self.pending), self.pending[0]["step"], self.pending[-1]["step"], file)
        self.pending = []

    def _send(self, step: int) -> bool:
        """Send the kept logs, oldest first; True when none is left."""
        import mlflow
        from mlflow.exceptions import MlflowException

        from stages.common.tracking import quick_http, redact

        while self.pending:
            entry = self.pending[0]
            try:
                with quick_http():  # a server that is down costs milliseconds per log, not minutes of retries
                    mlflow.log_metrics(entry["metrics"], step=entry["step"], timestamp=entry["timestamp"],
                                       run_id=entry["run_id"])
            except (MlflowException, OSError) as err:
                if not self._failing:
                    log.warning("MLflow did not take the metrics of step %s (%s); training goes on, the metrics "
                                "are kept and sent again at every log", step, redact(str(err)))
                self._failing = True
                return False
            self.pending.pop(0)
        if self._failing:
            log.warning("MLflow takes metrics again (step %s): the kept logs were sent", step)
            self._failing = False
        return True
