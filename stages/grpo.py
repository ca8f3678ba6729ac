"""Stage `grpo`: GRPO with TRL's GRPOTrainer, continuing from the SFT output.

    python -m stages.grpo             # reads params.yaml: project, model, grpo

Configured, not subclassed: params.grpo reaches GRPOConfig through stages/common/trl_args.py,
which fails on any field it cannot place. The steps: backend -> model -> data -> rewards ->
config -> trainer (with callbacks) -> train -> save.

- Backend (model.backend: Unsloth or plain TRL) and rollout engine (model.generation: vLLM or
  transformers generate) are chosen in stages.common.models and tagged on the run. vLLM runs
  colocated (both backends; Unsloth's fast_inference on the unsloth backend) or as a
  `trl vllm-serve` server (grpo.vllm_mode: server, trl backend).
- Everything the run needs (reward names, custom reward imports, a vLLM server) is checked
  before any output or checkpoint is touched.
- Checkpoints every grpo.save_steps in checkpoints/grpo (a DVC `persist` output). The stage
  resumes from the last complete one only when it was made from the same inputs (data, upstream
  models, code, params: stages/common/checkpoints.py); otherwise the old ones are set aside and
  training starts fresh. A resumed run is a new MLflow run linked to the one it continues, and
  it carries the history up to its checkpoint, so no step appears twice.
- MLflow: TRL's metrics every logging step plus memory, throughput, a KL estimate when beta is 0
  and a table of sample completions (stages/common/monitoring.py); the reward-curve PNG.
Deviations from TRL: TRL 1.14 has no max_prompt_length, so longer prompts are dropped here
(and counted) instead of being truncated.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from stages.common import checkpoints, models, ranks, tracking
from stages.common.engines import avoid_vllm_dummy_run_overflow, engines, import_backend, preflight
from stages.common.params import Params, load_params
from stages.common.prompts import load_prompts, unseen_first
from stages.common.paths import PATHS, path, write_metrics

# Keys that may change between a checkpoint and its resume (a longer budget, other logging).
RESUMABLE_KEYS = {"max_steps", "num_train_epochs", "save_steps", "logging_steps", "log_completions_every",
                  "monitor_kl_every", "vllm_server_host", "vllm_server_port", "vllm_server_base_url",
                  "vllm_server_timeout", "vllm_enable_sleep_mode", "continue_on_new_prompts"}


# ------------------------------------------------------------------ config
# vLLM SamplingParams for a colocated engine (both backends). The trainer decodes the token ids itself, so
# vLLM's text and the per-token strings of the log-probs are never read; a colocated engine makes them in
# Python after every decode step, in line with the model. Flat log-probs: a few lists per sequence instead
# of a dict and an object per token, less for the garbage collector (TRL reads both forms alike).
COLOCATED_SAMPLING = {"detokenize": False, "flat_logprobs": True}


def grpo_config(params: Params, backend: str, generation: str, ckpt_dir: Path, reward_weights: list[float],
                in_given_order: bool = False):
    """in_given_order: train on the prompts in the dataset's order (no shuffle), and on a resume do not
    skip the batches the checkpoint had consumed (continuous training ordered them already)."""
    from trl import GRPOConfig

    from stages.common.training import precision_flags
    from stages.common.trl_args import grpo_kwargs
    from stages.common.vllm_server import max_model_len

    g, m = params.grpo, params.model
    kwargs = grpo_kwargs(g, GRPOConfig, backend)
    kwargs.update(use_vllm=generation == "vllm", vllm_gpu_memory_utilization=m.gpu_memory_utilization,
                  vllm_max_model_length=max_model_len(g))
    if backend == "unsloth":
        kwargs["vllm_enable_sleep_mode"] = False  # Unsloth's Standby instead (set before its import)
    if generation == "vllm" and g.vllm_mode == "colocate":
        kwargs["generation_kwargs"] = dict(COLOCATED_SAMPLING)
    if in_given_order:
        kwargs.update(shuffle_dataset=False, ignore_data_skip=True)
    return GRPOConfig(output_dir=str(ckpt_dir), report_to="none", reward_weights=reward_weights,
                      save_strategy="steps", use_cpu=not models.has_cuda(), **kwargs, **precision_flags(m.dtype))


def loss_pass_importance_sampling(params: Params, backend: str, generation: str, config) -> bool:
    """Whether the trainer takes vLLM's correction weights from the loss's forward (stages/common/on_policy_is.py):
    plain TRL only (Unsloth computes its own), with the correction on, on-policy runs only."""
    from stages.common.on_policy_is import on_policy

    g = params.grpo
    return (backend == "trl" and generation == "vllm" and g.vllm_importance_sampling_correction
            and g.importance_sampling_from_loss and on_policy(config))


# ------------------------------------------------------------------ the stage
def run(params: Params, prompts_file: Path, base_dir: Path, sft_dir: Path, out_dir: Path, ckpt_dir: Path,
        plots_dir: Path, resume_from: str | None = None, callbacks: list | tuple = (),
        new_prompts: bool = False) -> dict[str, Any]:
    """Train and save; returns the metrics. resume_from: a checkpoint folder to continue from.
    callbacks: extra TrainerCallbacks (benchmark timers), run after the stage's own.
    new_prompts: resume_from was trained on other prompts (continuous training): unseen ones go first."""
    g, m = params.grpo, params.model
    reward_funcs, weights = preflight(params)
    (backend, backend_why), (generation, generation_why) = engines(params)
    print(f"grpo: backend={backend} ({backend_why}); generation={generation} ({generation_why})")
    tracking.tag_active_run({"backend": backend, "backend_reason": backend_why, "generation": generation,
                             "generation_reason": generation_why})
    import_backend(backend, generation, g.vllm_enable_sleep_mode)
    from stages.common import monitoring
    from stages.common.training import (ContinueSchedule, MlflowMetricsCallback, completions_per_step, load_for_training,
                                         save_trained)

    # ---- model: continue from the SFT adapter (or full model) when there is one
    init = sft_dir if sft_dir and ((sft_dir / "adapter_config.json").exists() or (sft_dir / "config.json").exists()) else None
    model, tokenizer = load_for_training(m, base_dir, backend, init_adapter=init,
                                         fast_inference=backend == "unsloth" and generation == "vllm", seed=g.seed,
                                         gradient_checkpointing=g.gradient_checkpointing)

    # ---- data and rewards
    data, dropped, prompt_lengths = load_prompts(prompts_file, tokenizer, g.max_prompt_length)
    trained = checkpoints.consumed(resume_from)
    unseen = None
    if new_prompts:
        data, unseen = unseen_first(data, trained, g.seed)
        print(f"grpo: continuing on new prompts: {unseen} of {len(data)} not trained on yet go first")
    recorder = monitoring.SampleRecorder()
    reward_funcs = [recorder.wrap(f) for f in reward_funcs]
    reward_names = [f.__name__ for f in reward_funcs]

    # ---- trainer
    from trl import GRPOTrainer

    config = grpo_config(params, backend, generation, ckpt_dir, weights, in_given_order=new_prompts)
    if generation == "vllm" and backend == "trl" and g.vllm_mode == "colocate":
        avoid_vllm_dummy_run_overflow(config.per_device_train_batch_size * config.vllm_tensor_parallel_size
                                      * config.steps_per_generation, config.vllm_max_model_length)
        ranks.own_rendezvous_port()
    # Several processes: the main one alone measures KL, on its share of the batch; with sharded weights
    # (ZeRO-3, FSDP) a forward pass needs every rank, so the monitor is off.
    monitor_kl = g.beta == 0 and g.monitor_kl and not ranks.sharded()
    if g.beta == 0 and g.monitor_kl and ranks.sharded():
        print("grpo: the KL monitor is off: the weights are sharded over the processes (launch.config zero3/fsdp2)")
    reference = monitoring.frozen_reference(model) if monitor_kl and ranks.is_main() else None
    monitor = monitoring.MonitorCallback(recorder, params.project.answer_format.build(), monitor_kl=monitor_kl,
                                         kl_every=g.monitor_kl_every, completions_every=g.log_completions_every,
                                         reference=reference)
    metrics_cb = MlflowMetricsCallback(completions_per_step=completions_per_step(g), drop_kl=g.beta == 0)
    trainer_cls = GRPOTrainer
    if g.group_prompts_by_length and not new_prompts:  # unseen-first order wins over length groups
        from stages.common.length_groups import length_grouped_trainer

        trainer_cls = length_grouped_trainer(GRPOTrainer, prompt_lengths)
    is_from_loss = loss_pass_importance_sampling(params, backend, generation, config)
    if is_from_loss:
        from stages.common.on_policy_is import loss_pass_trainer

        trainer_cls = loss_pass_trainer(trainer_cls)
        print("grpo: vLLM's importance-sampling weights from the loss's forward (grpo.importance_sampling_from_loss)")
    trainer = trainer_cls(model=model, reward_funcs=reward_funcs, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[ContinueSchedule(), monitor, metrics_cb,
                                                                 monitoring.ConsumedPromptsCallback(recorder, trained),
                                                                 *callbacks])

    # ---- train
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start

    # ---- save adapter (or full model) + tokenizer, curves: written by the main process alone
    if ranks.is_main() and out_dir.exists():
        shutil.rmtree(out_dir)
    if save_trained(trainer, out_dir):
        models.save_tokenizer(tokenizer, out_dir, [Path(models.base_info(base_dir)["tokenizer"])])
        plots_dir.mkdir(parents=True, exist_ok=True)
        monitoring.write_curves(metrics_cb.history, reward_names, plots_dir / "grpo_rewards.csv", plots_dir / "grpo_rewards.png")
    return {
        "backend": backend, "backend_reason": backend_why, "generation": generation,
        "generation_reason": generation_why, "importance_sampling_from_loss": is_from_loss, "steps": result.global_step,
        "resumed_from_checkpoint": Path(resume_from).name if resume_from else None,
        "prompts": len(data), "prompts_dropped_too_long": dropped, "seconds": round(seconds, 2),
        **({"prompts_not_trained_before": unseen} if unseen is not None else {}),
        **monitoring.summarize(metrics_cb.history, reward_names), **metrics_cb.peak,
    }


def train(params: Params) -> dict:
    """The stage with its edges: checks, resume point, MLflow run, outputs at the declared paths.
    Several processes (stages/launch.py): each computes the lineage and they must agree; the main
    process decides the resume point, tracks and writes (stages/common/ranks.py)."""
    import mlflow

    ranks.join()
    preflight(params)  # a bad reward name or a missing server costs nothing already computed
    ckpt_dir, plots_dir = path("grpo_checkpoints"), path("plots")
    prompts_file = path("prepared") / "grpo.parquet"
    prompts_dep = f"{PATHS['prepared']}/grpo.parquet"  # as dvc.yaml names the dep
    current = checkpoints.lineage("grpo", params, RESUMABLE_KEYS, may_change=(prompts_dep,))
    ranks.same_everywhere(current["digest"], "the lineage digest of grpo's inputs and params")
    last, state = ranks.main_decides(checkpoints.resume_point, ckpt_dir, current,
                                     say=lambda text: print(f"grpo: {text}"),
                                     allow_changed=params.grpo.continue_on_new_prompts)
    new_prompts = bool(last) and state.get("inputs") != current["inputs"]
    links = {}
    if last:
        print(f"grpo: resuming from {last}")
        links = {"resumed_from": Path(last).name, "resumed_from_run_id": state.get("mlflow_run_id", "")}
    run_tags = {**links, "lineage_digest": current["digest"]}
    with ranks.main_only(tracking.stage_run("grpo", params, extra_tags=run_tags)) as active:
        if active is not None:  # the main process
            if last and state.get("mlflow_run_id"):
                tracking.mark_killed(state["mlflow_run_id"], f"resumed by run {active.info.run_id}")
            checkpoints.save_state(ckpt_dir, current, active.info.run_id)
        metrics = run(params, prompts_file, path("base_model"), path("sft"), path("grpo"), ckpt_dir, plots_dir,
                      resume_from=last, new_prompts=new_prompts)
        metrics["lineage"] = current
        if active is not None:
            tracking.log_metrics(metrics, prefix="final/")
            with tracking.tolerate_outage("the reward curves were not logged; they are in plots/"):
                mlflow.log_artifact(str(plots_dir / "grpo_rewards.png"))
                mlflow.log_artifact(str(plots_dir / "grpo_rewards.csv"))
    if ranks.is_main():
        write_metrics("grpo", metrics)
    return metrics


def main() -> None:
    train(load_params())


if __name__ == "__main__":
    main()
