"""The baseline a user would write instead of this project: plain TRL GRPOTrainer + vLLM colocate.

    python bench/plain_trl_vllm.py --prompts-per-step 8 --completion-length 512 --steps 6 --out plain.json

About forty lines of TRL's documented usage (model -> LoRA -> dataset -> reward -> GRPOConfig ->
train) on the same random Qwen3-1.7B-shaped model and GSM8K prompts as bench/gpu_grpo.py, so both
are measured side by side. TRL's defaults throughout, except the shapes under test: LoRA r32 on the
7 projections, 8 generations per prompt, one micro-batch holding the whole generation batch,
vLLM colocated at 30% of the GPU. Timing: a callback notes the wall time and peak memory of every
optimizer step; the first --warmup steps (engine compile, CUDA graphs) are left out of the medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts-per-step", type=int, default=8, help="prompts per optimizer step (8 generations each)")
    ap.add_argument("--completion-length", type=int, default=512, help="max_completion_length (forced full length)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    ap.add_argument("--micro-batches", type=int, default=1,
                    help="gradient accumulation steps the step's completions are split over (16x8 needs 2 on one H200)")
    ap.add_argument("--vllm-memory", type=float, default=0.3, help="vllm_gpu_memory_utilization")
    ap.add_argument("--base-dir", type=Path, default=Path("/tmp/bench_grpo/base"), help="where the random model is built")
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    args = ap.parse_args()

    from bench import gpu_grpo  # the same random model, tokenizer and prompts as the stage benchmark

    gpu_grpo.set_offline_env()
    base = gpu_grpo.ensure_base(args.base_dir.resolve(), "qwen3-1.7b") / "model"
    prompts = args.out.resolve().with_suffix(".prompts.parquet")
    gpu_grpo.write_prompts(prompts)

    # ---- the plain script
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    lora = LoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], task_type="CAUSAL_LM")
    data = Dataset.from_parquet(str(prompts)).select_columns(["prompt", "answer"])

    def length_reward(completions, **kwargs):  # varies, so advantages are not all zero
        return [len(c[0]["content"]) / 1000 for c in completions]

    batch = 8 * args.prompts_per_step
    config = GRPOConfig(output_dir=str(args.out.resolve().parent / "plain_ckpt"), max_steps=args.steps,
                        num_generations=8, per_device_train_batch_size=batch // args.micro_batches,
                        gradient_accumulation_steps=args.micro_batches, max_completion_length=args.completion_length,
                        use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=args.vllm_memory,
                        logging_steps=1, save_strategy="no", report_to="none")

    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args_, state, *a, **kw):
            torch.cuda.synchronize()
            steps.append({"step": state.global_step, "seconds": time.perf_counter() - self.start,
                          "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30})

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs and steps and "completions/mean_length" in logs:
                steps[-1]["completion_length"] = logs["completions/mean_length"]

    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=config, train_dataset=data,
                          processing_class=tokenizer, peft_config=lora, callbacks=[StepTimer()])
    trainer.train()

    # ---- the record
    kept = steps[args.warmup:] or steps[-1:]
    seconds = statistics.median(s["seconds"] for s in kept)
    length = statistics.median(s.get("completion_length", args.completion_length) for s in kept)
    result = {"path": "plain TRL + vLLM colocate", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": " ".join(sys.argv), "prompts_per_step": args.prompts_per_step, "completions_per_step": batch,
              "micro_batches": args.micro_batches,
              "completion_length": args.completion_length, "step_seconds_median": seconds,
              "generated_tokens_per_s": length * batch / seconds, "completion_length_median": length,
              "peak_allocated_gib": max(s["peak_allocated_gib"] for s in steps),
              "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "per_step": steps,
              "versions": gpu_grpo.versions(), "machine": gpu_grpo.machine()}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_step", "versions")}, indent=2))


if __name__ == "__main__":
    main()
