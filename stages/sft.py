"""Stage `sft`: format priming with TRL's SFTTrainer.

    python -m stages.sft              # reads params.yaml: project, model, sft

Trains on the SFT priming split (prompt = system + question as chat messages, completion =
the worked solution in the answer format), so the loss covers only the assistant part.
LoRA by default (model.lora), full fine-tuning when model.lora.enabled is false. With
sft.enabled false the stage writes a `skipped.json` marker and GRPO starts from the base.
Deviation from the seeds: the seeds prime in the same process as GRPO; here the adapter is
saved and the grpo stage continues training that same adapter.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from stages.common import models, ranks, tracking
from stages.common.params import Params, check_runtime, load_params
from stages.common.paths import path, write_metrics

SKIPPED = "skipped.json"


def run(params: Params, sft_file: Path, base_dir: Path, out_dir: Path, callbacks: list | tuple = ()) -> dict:
    """Train and save; returns the metrics. Several processes: the main one alone writes out_dir.
    callbacks: extra TrainerCallbacks, run after the stage's own."""
    if ranks.is_main():
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
    s, m = params.sft, params.model
    if not s.enabled:
        if ranks.is_main():
            (out_dir / SKIPPED).write_text(json.dumps({"reason": "sft.enabled is false"}) + "\n")
        return {"skipped": True}

    check_runtime(params)
    backend, why = models.choose_backend(m.backend)
    print(f"sft: backend={backend} ({why})")
    tracking.tag_active_run({"backend": backend, "backend_reason": why})
    if backend == "unsloth":
        # Before stages.common.training imports transformers and peft: Unsloth patches them on import.
        import unsloth  # noqa: F401
    from stages.common.training import MlflowMetricsCallback, load_for_training, precision_flags, save_trained

    model, tokenizer = load_for_training(m, base_dir, backend, seed=s.seed,
                                         gradient_checkpointing=s.gradient_checkpointing)

    import datasets
    from trl import SFTConfig, SFTTrainer

    data = datasets.Dataset.from_parquet(str(sft_file)).select_columns(["prompt", "completion"])
    if len(data) == 0:
        raise ValueError(f"{sft_file} has no rows: set prepare.sft_examples > 0 or sft.enabled: false")
    from stages.common.trl_args import sft_kwargs

    config = SFTConfig(output_dir=str(out_dir / "trainer"), save_strategy="no", report_to="none",
                       completion_only_loss=True, disable_tqdm=False, use_cpu=not models.has_cuda(),
                       **sft_kwargs(s, SFTConfig, backend), **precision_flags(m.dtype))
    # Outside trainer/ (deleted below): metrics a vanished tracking server did not take.
    callback = MlflowMetricsCallback(unlogged_file=out_dir / "unlogged_metrics.jsonl")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[callback, *callbacks])
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start

    if save_trained(trainer, out_dir):
        shutil.rmtree(out_dir / "trainer", ignore_errors=True)
        models.save_tokenizer(tokenizer, out_dir, [Path(models.base_info(base_dir)["tokenizer"])])
    losses = [h["loss"] for h in callback.history if "loss" in h]
    return {
        "backend": backend, "backend_reason": why, "steps": result.global_step,
        "final_loss": losses[-1] if losses else result.training_loss, "train_loss": result.training_loss,
        "examples": len(data), "seconds": round(seconds, 2), "lora": m.lora.enabled, **callback.peak,
    }


def main() -> None:
    params = load_params()
    ranks.join()
    with ranks.main_only(tracking.stage_run("sft", params)) as active:  # None on all but the main process
        metrics = run(params, path("prepared") / "sft.parquet", path("base_model"), path("sft"))
        if active is not None:
            tracking.log_metrics({k: v for k, v in metrics.items() if k != "steps"}, prefix="final/")
    if ranks.is_main():
        write_metrics("sft", metrics)


if __name__ == "__main__":
    main()
