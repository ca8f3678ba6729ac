"""Minimal reproduction: Unsloth + vLLM GRPO whose first step sits in torch.compile for minutes when rollouts use
min_p and vLLM's importance-sampling correction is on.

    python bench/repro_unsloth_truncated_support.py --min-p 0.1 --limit 600                  # stalls
    python bench/repro_unsloth_truncated_support.py --min-p 0.1 --no-is-correction           # control: runs
    python bench/repro_unsloth_truncated_support.py --min-p 0 --limit 600                    # control

No project code: Unsloth 2026.10.9 `FastLanguageModel(fast_inference=True)` + LoRA r32 + TRL 1.14.2
GRPOTrainer, 8 prompts x 8 generations x 512 tokens in one micro-batch, on the random Qwen3-1.7B-shaped
model of bench/gpu_grpo.py. With min_p (or top_k, or top_p < 1) the rollouts are truncated; when the
correction is on, TRL runs an old-log-prob pass, and Unsloth scores it over the kept set
(UNSLOTH_GRPO_TRUNCATED_SUPPORT, automatic) through a chunked scorer that torch.compile unrolls
(64 rows x 4 chunks each; --chunk-multiplier sets the 4).
--limit counts from the start of training, not of the process (the model build and vLLM's engine start
take about 3 minutes more): steps not done by then print every thread's stack (faulthandler) and exit 1.

Measured on the H200 (bench/results/session15/R01.log, session16/R1*.log): correction off, min_p 0.1: step 1
68.8 s, steps 2-3 8.6 and 9.1 s. Correction on: still in dynamo's trace at the 100-s limit; with
--chunk-multiplier 1, still compiling grpo_chunked_hidden_states_logprobs (the old-log-prob pass) at 180 s
(the two ran side by side on one GPU, vLLM at 30% each).
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--min-p", type=float, default=0.1, help="rollout min_p (0: full-vocabulary sampling)")
    ap.add_argument("--no-is-correction", action="store_true",
                    help="vllm_importance_sampling_correction off (Unsloth's default; the stage has it on)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--limit", type=float, default=600,
                    help="seconds of training before the stacks are dumped and the run stops")
    ap.add_argument("--chunk-multiplier", type=int, default=None,
                    help="Unsloth's unsloth_logit_chunk_multiplier (chunks = rows x this; default: Unsloth's autotune, 4 here)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="vLLM's share of the GPU")
    ap.add_argument("--base-dir", type=Path, default=Path("/tmp/bench_grpo/base"))
    args = ap.parse_args()

    from bench import gpu_grpo

    gpu_grpo.set_offline_env()
    base = gpu_grpo.ensure_base(args.base_dir.resolve(), "qwen3-1.7b") / "model"
    prompts = Path("/tmp/repro_prompts.parquet")
    gpu_grpo.write_prompts(prompts)
    os.environ["UNSLOTH_VLLM_STANDBY"] = "0"
    started = time.perf_counter()

    from unsloth import FastLanguageModel  # before trl and transformers

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = FastLanguageModel.from_pretrained(str(base), max_seq_length=1024, load_in_4bit=False,
                                                         fast_inference=True, max_lora_rank=32,
                                                         gpu_memory_utilization=args.gpu_memory_utilization)
    model = FastLanguageModel.get_peft_model(model, r=32, lora_alpha=64, use_gradient_checkpointing="unsloth",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"])
    data = Dataset.from_parquet(str(prompts)).select_columns(["prompt", "answer"])

    def length_reward(completions, **kwargs):
        return [len(c[0]["content"]) / 1000 for c in completions]

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            print(f"model and vLLM engine ready after {time.perf_counter() - started:.1f} s", flush=True)
            faulthandler.dump_traceback_later(args.limit, exit=True)

        def on_step_begin(self, *a, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args_, state, *a, **kw):
            print(f"step {state.global_step}: {time.perf_counter() - self.start:.1f} s", flush=True)

    config = GRPOConfig(output_dir="/tmp/repro_ckpt", max_steps=args.steps, num_generations=8,
                        per_device_train_batch_size=64, gradient_accumulation_steps=1,
                        max_completion_length=512, use_vllm=True,
                        # Unsloth's GRPOConfig defaults this to False; TRL's default and the stage's is True.
                        vllm_importance_sampling_correction=not args.no_is_correction,
                        unsloth_logit_chunk_multiplier=args.chunk_multiplier,
                        min_p=args.min_p or None, logging_steps=1, save_strategy="no", report_to="none")
    GRPOTrainer(model=model, reward_funcs=length_reward, args=config, train_dataset=data, processing_class=tokenizer,
                callbacks=[Clock()]).train()
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
