"""Stage `grpo`: GRPO with TRL's GRPOTrainer, continuing from the SFT output.

    python -m stages.grpo             # reads params.yaml: project, model, grpo

Configured, not subclassed: every knob in params.grpo is passed to GRPOConfig. The steps:
backend -> model -> data -> rewards -> config -> trainer (with callbacks) -> train -> save.

- Backend (model.backend) and rollout engine (model.generation) are chosen in
  stages.common.models and written to the metrics.
- Checkpoints every grpo.save_steps in checkpoints/grpo (a DVC `persist` output). Run again
  with the same params after a kill and training resumes from the last checkpoint, same data
  order, same MLflow run. Changing params other than the step budget starts afresh.
- MLflow: TRL's metrics every logging step plus memory, throughput, and (beta = 0,
  grpo.monitor_kl) a KL estimate against the base model with the adapter disabled; a table of
  sample completions every grpo.log_completions_every steps; the reward-curve PNG.
Deviations from TRL: TRL 1.14 has no max_prompt_length, so longer prompts are dropped here
(and counted) instead of being truncated.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from stages.common import models, tracking
from stages.common.answer_format import AnswerFormat, completion_text, parse
from stages.common.params import Params, check_runtime, load_params
from stages.common.paths import path, write_metrics

RUN_STATE = "run_state.json"
# Keys that may change between a checkpoint and its resume (a longer budget, other logging).
RESUMABLE_KEYS = {"max_steps", "num_train_epochs", "save_steps", "logging_steps", "log_completions_every",
                  "monitor_kl_every"}


# ------------------------------------------------------------------ rewards and samples
class SampleRecorder:
    """Wraps the reward functions to keep the latest batch (prompts, completions, scores),
    which the callbacks turn into a completions table and a KL estimate. One per run."""

    def __init__(self) -> None:
        self.batch: dict[str, Any] = {}

    def wrap(self, func):
        def recorded(prompts, completions, **kwargs):
            scores = func(prompts, completions, **kwargs)
            if self.batch.get("completions") is not completions:
                self.batch = {"prompts": prompts, "completions": completions, "answer": kwargs.get("answer"),
                              "completion_ids": kwargs.get("completion_ids"), "scores": {}}
            self.batch["scores"][func.__name__] = scores
            return scores

        recorded.__name__ = func.__name__
        return recorded


def kl_to_base(model, tokenizer, prompts, completion_ids, limit: int = 8, rows_per_pass: int = 2) -> float | None:
    """Mean per-token KL(policy || base) on sampled completions (k3 estimator), the base being
    the same model with its LoRA adapter disabled. None when there is no adapter to disable.
    rows_per_pass bounds the logits tensor (rows x completion length x vocabulary)."""
    import torch

    if not hasattr(model, "disable_adapter") or not completion_ids:
        return None
    rows = []
    for prompt, comp in list(zip(prompts, completion_ids))[:limit]:
        if not len(comp):
            continue
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) \
            if isinstance(prompt, list) else str(prompt)
        rows.append((tokenizer(text, add_special_tokens=False).input_ids, list(comp)))
    if not rows:
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for first in range(0, len(rows), rows_per_pass):
            chunk = rows[first:first + rows_per_pass]
            width_p, width_c = max(len(p) for p, _ in chunk), max(len(c) for _, c in chunk)
            ids = torch.full((len(chunk), width_p + width_c), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (p, c) in enumerate(chunk):
                ids[i, width_p - len(p):width_p + len(c)] = torch.tensor(p + c)
                mask[i, width_p - len(p):width_p + len(c)] = 1
            ids, mask = ids.to(model.device), mask.to(model.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            targets, target_mask = ids[:, width_p:], mask[:, width_p:].bool()

            def logprobs():
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               logits_to_keep=width_c + 1).logits[:, :-1]
                # One row at a time in float32: the full-vocabulary softmax is the large tensor.
                return torch.stack([torch.log_softmax(logits[i].float(), -1).gather(-1, targets[i, :, None])[:, 0]
                                    for i in range(len(chunk))])

            policy = logprobs()
            with model.disable_adapter():
                base = logprobs()
            delta = (base - policy)[target_mask]
            total += (torch.exp(delta) - delta - 1).sum().item()
            count += delta.numel()
    model.train(was_training)
    return total / count if count else None


def build_callbacks(params: Params, recorder: SampleRecorder, fmt: AnswerFormat):
    from transformers import TrainerCallback

    g = params.grpo

    class MonitorCallback(TrainerCallback):
        """Adds the monitoring KL to the logs and logs a table of sample completions."""

        def on_log(self, args, state, control, logs=None, model=None, processing_class=None, **kw):
            import mlflow

            batch = recorder.batch
            if logs is None or not batch:
                return
            if g.beta == 0 and g.monitor_kl and model is not None \
                    and (state.global_step - 1) % g.monitor_kl_every == 0:  # steps 1, 1 + N, ...
                kl = kl_to_base(model, processing_class, batch["prompts"], batch.get("completion_ids"))
                if kl is not None:
                    logs["kl_monitor"] = kl
            if g.log_completions_every and state.global_step % g.log_completions_every == 0 and mlflow.active_run():
                rows = {"step": [], "prompt": [], "completion": [], "gold": [], "extracted": []}
                names = list(batch["scores"])
                for name in names:
                    rows[f"reward/{name}"] = []
                answers = batch.get("answer") or [None] * len(batch["completions"])
                for i, (p, c) in enumerate(zip(batch["prompts"], batch["completions"])):
                    text = completion_text(c)
                    rows["step"].append(state.global_step)
                    rows["prompt"].append(completion_text(p) if isinstance(p, list) else str(p))
                    rows["completion"].append(text)
                    rows["gold"].append(answers[i])
                    rows["extracted"].append(parse(text, fmt).strict)
                    for name in names:
                        rows[f"reward/{name}"].append(batch["scores"][name][i])
                with tracking.tolerate_outage(f"the completions table of step {state.global_step} was not logged"):
                    mlflow.log_table(rows, artifact_file=f"completions/step_{state.global_step:05d}.json")

    return MonitorCallback()


# ------------------------------------------------------------------ data
def load_prompts(file: Path, tokenizer, max_prompt_length: int):
    """(prompts that fit, how many were dropped as too long, the kept prompts' token counts)."""
    import datasets

    data = datasets.Dataset.from_parquet(str(file))
    if len(data) == 0:
        raise ValueError(f"{file} has no prompts: check the prepare stage's metrics")

    def length(row):
        text = tokenizer.apply_chat_template(list(row["prompt"]), tokenize=False, add_generation_prompt=True)
        return {"prompt_tokens": len(tokenizer(text, add_special_tokens=False).input_ids)}

    data = data.map(length)
    kept = data.filter(lambda r: r["prompt_tokens"] <= max_prompt_length)
    if len(kept) == 0:
        raise ValueError(f"all {len(data)} prompts are longer than grpo.max_prompt_length={max_prompt_length} tokens")
    return kept.remove_columns(["prompt_tokens"]), len(data) - len(kept), kept["prompt_tokens"]


# ------------------------------------------------------------------ resume
def params_digest(params: Params) -> str:
    grpo = {k: v for k, v in params.grpo.model_dump().items() if k not in RESUMABLE_KEYS}
    blob = json.dumps({"project": params.project.model_dump(), "model": params.model.model_dump(), "grpo": grpo},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resume_point(ckpt_dir: Path, digest: str) -> tuple[str | None, dict]:
    """(last checkpoint to resume from or None, saved run state). Stale checkpoints are cleared."""
    state_file = ckpt_dir / RUN_STATE
    if ckpt_dir.exists() and state_file.exists():
        state = json.loads(state_file.read_text())
        # A kill during a save leaves a checkpoint without trainer_state.json: skip it.
        complete = sorted((c for c in ckpt_dir.glob("checkpoint-*") if (c / "trainer_state.json").exists()),
                          key=lambda c: int(c.name.split("-")[-1]))
        if state.get("params_digest") == digest and complete:
            last = complete[-1]
            for partial in ckpt_dir.glob("checkpoint-*"):
                if int(partial.name.split("-")[-1]) > int(last.name.split("-")[-1]):
                    shutil.rmtree(partial)
            return str(last), state
        print(f"grpo: params changed since the checkpoints in {ckpt_dir} were written; starting afresh")
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True)
    return None, {}


# ------------------------------------------------------------------ outputs
def write_curves(history: list[dict], reward_names: list[str], csv_file: Path, png_file: Path) -> None:
    """Per-step CSV that `dvc plots` draws, and the same curves as a PNG (DVC's HTML needs a CDN)."""
    cols = ["step", "reward", "reward_std", "frac_reward_zero_std", "kl", "kl_monitor", "completions/mean_length",
            "loss", "learning_rate"] + [f"rewards/{n}/mean" for n in reward_names]
    rows = [h for h in history if "reward" in h]
    csv_file.parent.mkdir(parents=True, exist_ok=True)
    with csv_file.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        for h in rows:
            writer.writerow([int(h["step"]) if c == "step" else h.get(c, "") for c in cols])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, [h.get("reward", math.nan) for h in rows], label="total", linewidth=2)
    for n in reward_names:
        axes[0].plot(steps, [h.get(f"rewards/{n}/mean", math.nan) for h in rows], label=n, alpha=0.8)
    axes[0].set(title="mean reward per step", xlabel="step")
    axes[0].legend(fontsize=8)
    axes[1].plot(steps, [h.get("frac_reward_zero_std", math.nan) for h in rows])
    axes[1].set(title="fraction of groups with zero reward std", xlabel="step", ylim=(-0.05, 1.05))
    kl_key = "kl" if any("kl" in h for h in rows) else "kl_monitor"
    axes[2].plot(steps, [h.get(kl_key, math.nan) for h in rows])
    axes[2].set(title=f"KL to reference ({kl_key})", xlabel="step")
    fig.tight_layout()
    fig.savefig(png_file, dpi=100)
    plt.close(fig)


def summarize(history: list[dict], reward_names: list[str], window: int = 5) -> dict:
    rows = [h for h in history if "reward" in h]

    def mean(key: str, part: list[dict]) -> float | None:
        vals = [h[key] for h in part if key in h]
        return sum(vals) / len(vals) if vals else None

    def median(key: str) -> float | None:
        # Medians: the first step (compilation, warm-up) would dominate a mean of a short run.
        vals = sorted(h[key] for h in rows if key in h)
        return vals[len(vals) // 2] if vals else None

    last, first = rows[-window:], rows[:window]
    out = {
        "reward_final": mean("reward", last), "reward_first": mean("reward", first),
        "frac_reward_zero_std_mean": mean("frac_reward_zero_std", rows),
        "frac_reward_zero_std_final": mean("frac_reward_zero_std", last),
        "completion_length_final": mean("completions/mean_length", last),
        "generated_tokens_per_s": median("throughput/generated_tokens_per_s"),
        "train_tokens_per_s": median("throughput/train_tokens_per_s"),
        "step_seconds": median("step_seconds"),
        "kl_final": mean("kl", last) if any("kl" in h for h in rows) else mean("kl_monitor", last),
    }
    out["rewards_final"] = {n: mean(f"rewards/{n}/mean", last) for n in reward_names}
    return out


# ------------------------------------------------------------------ the stage
def run(params: Params, prompts_file: Path, base_dir: Path, sft_dir: Path, out_dir: Path, ckpt_dir: Path,
        plots_dir: Path, resume_state: dict | None = None) -> dict:
    """Train and save; returns the metrics. resume_state is filled with {'resumed_from': ...}."""
    check_runtime(params)
    g, m = params.grpo, params.model
    fmt = AnswerFormat(**params.project.answer_format.model_dump())
    backend, backend_why = models.choose_backend(m.backend)
    generation, generation_why = models.choose_generation(m.generation)
    print(f"grpo: backend={backend} ({backend_why}); generation={generation} ({generation_why})")
    tracking.tag_active_run({"backend": backend, "backend_reason": backend_why,
                             "generation": generation, "generation_reason": generation_why})
    if backend == "unsloth" and generation == "vllm":
        os.environ.setdefault("UNSLOTH_VLLM_STANDBY", "1")  # must be set before unsloth is imported
    if backend == "unsloth":
        # Before stages.common.training imports transformers and peft: Unsloth patches them on import.
        import unsloth  # noqa: F401

    from stages.common.training import MlflowMetricsCallback, load_for_training, optimizer, precision_flags

    # ---- model: continue from the SFT adapter (or full model) when there is one
    init = sft_dir if sft_dir and ((sft_dir / "adapter_config.json").exists() or (sft_dir / "config.json").exists()) else None
    model, tokenizer = load_for_training(m, base_dir, backend, init_adapter=init,
                                         fast_inference=backend == "unsloth" and generation == "vllm", seed=g.seed)

    # ---- data and rewards
    from stages.common.rewards import build_reward_funcs

    data, dropped, prompt_lengths = load_prompts(prompts_file, tokenizer, g.max_prompt_length)
    funcs, weights = build_reward_funcs(g.rewards, fmt, g.on_reward_error,
                                        max_completion_length=g.max_completion_length)
    recorder = SampleRecorder()
    funcs = [recorder.wrap(f) for f in funcs]
    reward_names = [f.__name__ for f in funcs]

    # ---- config: every knob from params, passed through
    from trl import GRPOConfig, GRPOTrainer

    batch_kwargs = {"generation_batch_size": g.generation_batch_size} if g.generation_batch_size else \
        {"steps_per_generation": g.steps_per_generation} if g.steps_per_generation else {}
    vllm_kwargs = {}
    if generation == "vllm":
        vllm_kwargs = {"use_vllm": True, "vllm_gpu_memory_utilization": m.gpu_memory_utilization,
                       "vllm_importance_sampling_correction": g.vllm_importance_sampling_correction,
                       "vllm_importance_sampling_cap": g.vllm_importance_sampling_cap}
        if backend == "trl":
            vllm_kwargs["vllm_mode"] = "colocate"
    config = GRPOConfig(
        output_dir=str(ckpt_dir), seed=g.seed, data_seed=g.seed, report_to="none",
        num_generations=g.num_generations, per_device_train_batch_size=g.per_device_train_batch_size,
        gradient_accumulation_steps=g.gradient_accumulation_steps, num_iterations=g.num_iterations,
        max_completion_length=g.max_completion_length, temperature=g.temperature, top_p=g.top_p,
        top_k=g.top_k or 0, min_p=g.min_p, repetition_penalty=g.repetition_penalty,
        learning_rate=g.learning_rate, lr_scheduler_type=g.lr_scheduler_type, warmup_steps=g.warmup_ratio,
        weight_decay=g.weight_decay, optim=optimizer(g.optim, backend), max_grad_norm=g.max_grad_norm,
        beta=g.beta, epsilon=g.epsilon,
        # Resolved here: left None, Unsloth sets 0.28 for dapo (5.0 for cispo) while TRL uses epsilon.
        epsilon_high=g.epsilon_high if g.epsilon_high is not None else g.epsilon, delta=g.delta, loss_type=g.loss_type,
        importance_sampling_level=g.importance_sampling_level, scale_rewards=g.scale_rewards,
        mask_truncated_completions=g.mask_truncated_completions, reward_weights=weights,
        max_steps=g.max_steps, num_train_epochs=g.num_train_epochs, save_steps=g.save_steps,
        save_strategy="steps", logging_steps=g.logging_steps, use_cpu=not models.has_cuda(),
        **batch_kwargs, **vllm_kwargs, **precision_flags(m.dtype))

    metrics_cb = MlflowMetricsCallback(completions_per_step=g.effective_generation_batch_size)
    trainer_cls = GRPOTrainer
    if g.group_prompts_by_length:
        from stages.common.length_groups import length_grouped_trainer

        trainer_cls = length_grouped_trainer(GRPOTrainer, prompt_lengths)
    trainer = trainer_cls(model=model, reward_funcs=funcs, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[build_callbacks(params, recorder, fmt), metrics_cb])

    # ---- train (resuming when a matching checkpoint exists)
    last = (resume_state or {}).get("checkpoint")
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - start

    # ---- save adapter (or full model) + tokenizer
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    trainer.model.save_pretrained(str(out_dir))
    models.save_tokenizer(tokenizer, out_dir, [Path(models.base_info(base_dir)["tokenizer"])])

    plots_dir.mkdir(parents=True, exist_ok=True)
    write_curves(metrics_cb.history, reward_names, plots_dir / "grpo_rewards.csv", plots_dir / "grpo_rewards.png")
    return {
        "backend": backend, "backend_reason": backend_why, "generation": generation,
        "generation_reason": generation_why, "steps": result.global_step,
        "resumed_from_checkpoint": Path(last).name if last else None,
        "prompts": len(data), "prompts_dropped_too_long": dropped, "seconds": round(seconds, 2),
        **summarize(metrics_cb.history, reward_names), **metrics_cb.peak,
    }


def train(params: Params) -> dict:
    """The stage with its edges: resume point, MLflow run, outputs at the declared paths."""
    import mlflow

    ckpt_dir, plots_dir = path("grpo_checkpoints"), path("plots")
    digest = params_digest(params)
    last, state = resume_point(ckpt_dir, digest)
    if last:
        print(f"grpo: resuming from {last}")
    with tracking.stage_run("grpo", params, resume_run_id=state.get("mlflow_run_id") if last else None) as active:
        (ckpt_dir / RUN_STATE).write_text(json.dumps({"params_digest": digest, "mlflow_run_id": active.info.run_id}) + "\n")
        if last:
            mlflow.set_tag("resumed_from", Path(last).name)
        metrics = run(params, path("prepared") / "grpo.parquet", path("base_model"), path("sft"), path("grpo"),
                      ckpt_dir, plots_dir, resume_state={"checkpoint": last})
        tracking.log_metrics(metrics, prefix="final/")
        with tracking.tolerate_outage("the reward curves were not logged; they are in plots/"):
            mlflow.log_artifact(str(plots_dir / "grpo_rewards.png"))
            mlflow.log_artifact(str(plots_dir / "grpo_rewards.csv"))
    write_metrics("grpo", metrics)
    return metrics


def main() -> None:
    train(load_params())


if __name__ == "__main__":
    main()
