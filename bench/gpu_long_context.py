"""Training-side GPU memory at long context: the project's `grpo` stage on Unsloth vs plain TRL.

    python bench/gpu_long_context.py --backend unsloth --lengths 4096 8192 16384 --out bench/results/long_unsloth.json
    python bench/gpu_long_context.py --backend trl --lengths 4096 8192 16384 --out bench/results/long_trl.json
    python bench/gpu_long_context.py --backend unsloth --shapes qwen3-1.7b --lengths 16384 32768 40704 --out ...
    python bench/gpu_long_context.py --backend trl --shapes small --lengths 32 64 --out /tmp/long.json   # CPU check

Runs `stages.grpo.run(...)` unchanged on a randomly initialised model with the Llama-3.1-8B
shapes (or Qwen3-1.7B's with its preset; bf16, LoRA r 32 on all 7 projections, gradient
checkpointing as each backend sets it),
1 prompt x 8 completions per step. Generation is excluded: the trainer's `_generate_single_turn`
(which both backends call for their completions) is replaced by fixed synthetic completions of
exactly the step's length (random vocabulary ids, no eos), so a step is reward scoring, the
policy forward and backward and the optimizer: the training side.

Step i uses the i-th length, in ascending order, in one process. Peak allocated and reserved
memory are reset after the model is loaded and after every step, so each step's peak is that
step's (weights, adapter and optimizer state included). A length that runs out of memory ends
the run: the JSON, written after every step, keeps the lengths that fit and names the one that
did not. Model and tokenizer come from bench/gpu_grpo.py (built once into --base-dir).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_grpo  # noqa: E402  (model/tokenizer builder, prompts, timers, versions)

FIRST_WORD_ID = 64  # above the special tokens and the answer-format tags of gpu_grpo.build_tokenizer


def bench_params(args, base_model: Path):
    from stages.common.params import validate
    from stages.preset import resolve

    longest = max(args.lengths)
    raw = resolve("qwen3-1.7b" if args.shapes == "qwen3-1.7b" else "llama3.1-8b").model_dump()
    raw["model"].update(name_or_path=str(base_model), backend=args.backend, generation="transformers",
                        dtype="bfloat16" if args.shapes != "small" else "auto", load_in_4bit=args.load_in_4bit,
                        max_seq_length=256 + longest)
    raw["model"]["lora"].update(enabled=True, r=32, alpha=32, dropout=0.0)
    raw["grpo"].update(num_generations=8, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                       max_prompt_length=256, max_completion_length=longest, beta=0.0, monitor_kl=False,
                       mask_truncated_completions=False, max_steps=len(args.lengths), save_steps=100_000,
                       logging_steps=1, log_completions_every=0)
    return validate(raw, origin="bench/gpu_long_context.py")


def cuda_peaks_and_reset() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        return {}
    torch.cuda.synchronize()
    out = {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
           "allocated_after_gib": torch.cuda.memory_allocated() / 2**30}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def fix_completions(lengths: list[int], seen: dict) -> None:
    """Once the stage has loaded the model (and Unsloth, on that path, has patched trl), replace
    generation on the trainer class the stage is about to build with fixed completions."""
    from stages.common import training

    original_load = training.load_for_training

    def load_then_patch(*a, **kw):
        result = original_load(*a, **kw)
        import torch
        import trl

        def fixed_completions(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            length = lengths[min(seen["calls"], len(lengths) - 1)]
            seen["calls"] += 1
            seen["trainer_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
            vocab = len(self.processing_class)
            ids = torch.randint(FIRST_WORD_ID, vocab, (len(prompt_ids), length),
                                generator=torch.Generator().manual_seed(seen["calls"]))
            return ids.tolist(), None

        trl.GRPOTrainer._generate_single_turn = fixed_completions
        seen["after_load"] = cuda_peaks_and_reset()
        return result

    training.load_for_training = load_then_patch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["unsloth", "trl"], required=True, help="model.backend for the stage")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384], help="completion tokens per step, ascending")
    ap.add_argument("--load-in-4bit", action="store_true", help="QLoRA, as presets/llama3.1-8b.yaml (default: bf16 LoRA on both)")
    ap.add_argument("--shapes", choices=["llama3.1-8b", "qwen3-1.7b", "small"], default="llama3.1-8b",
                    help="model shapes (qwen3-1.7b: with presets/qwen3-1.7b.yaml; small: CPU check)")
    ap.add_argument("--base-dir", type=Path, default=Path("/tmp/bench_grpo/base"), help="where the random model is built (reused)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_grpo/long"), help="scratch: stage outputs, Unsloth's cache")
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    args = ap.parse_args()
    args.lengths = sorted(args.lengths)
    gpu_grpo.set_offline_env()

    args.base_dir, args.work_dir, args.out = args.base_dir.resolve(), args.work_dir.resolve(), args.out.resolve()
    base_dir = gpu_grpo.ensure_base(args.base_dir, args.shapes)
    work = args.work_dir / f"{args.backend}{'_4bit' if args.load_in_4bit else ''}"
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # Unsloth writes ./unsloth_compiled_cache
    prompts = work / "grpo.parquet"
    gpu_grpo.write_prompts(prompts, count=64)
    params = bench_params(args, base_dir / "model")
    host = {"machine": gpu_grpo.machine(), "versions": gpu_grpo.versions()}

    import stages.grpo as grpo

    probe, seen, steps = gpu_grpo.Probe(), {"calls": 0}, []
    started = time.perf_counter()

    def write_result(status: str, error: str | None = None) -> None:
        fits = [s["length"] for s in steps]
        result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv), "status": status,
                  "error": error, "backend": args.backend, "shapes": args.shapes, "load_in_4bit": args.load_in_4bit,
                  "lengths_asked": args.lengths, "longest_length_that_fits": max(fits) if fits else None,
                  "completions_per_step": 8, "trainer_class": seen.get("trainer_class"),
                  "memory_after_model_load": seen.get("after_load"), "wall_seconds_run": round(time.perf_counter() - started, 1),
                  **host, "lora": params.model.lora.model_dump(),
                  "steps": steps, "per_step_history": probe.rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    def on_step() -> None:
        row = probe.rows[-1]
        if "completions/mean_length" not in row:  # the trainer's closing summary log, not a step
            return
        length = args.lengths[len(steps)]
        steps.append({"length": length, "completion_mean_length": row.get("completions/mean_length"),
                      "step_seconds": row.get("step_seconds"), "train_tokens_per_s": row.get("throughput/train_tokens_per_s"),
                      "phases_s": dict(probe.phases.get(probe.step, {})), **cuda_peaks_and_reset()})
        print(f"length {length}: {json.dumps(steps[-1])}", flush=True)
        write_result("running")

    probe.on_step = on_step
    grpo.import_backend(args.backend, "transformers", standby=False)  # as the stage does
    probe.time_trl_phases()
    fix_completions(args.lengths, seen)
    try:
        grpo.run(params, prompts, base_dir, work / "no_sft", work / "grpo_out", work / "ckpt", work / "plots",
                 callbacks=[probe.callback()])
    except Exception as err:  # noqa: BLE001  out of memory at a length: keep the lengths that fit
        import torch

        oom = isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()
        failed = args.lengths[len(steps)] if len(steps) < len(args.lengths) else None
        where = " <- ".join(f"{fr.name} ({Path(fr.filename).name}:{fr.lineno})"
                            for fr in reversed(traceback.extract_tb(err.__traceback__)[-4:]))
        write_result("out_of_memory" if oom else "error",
                     f"length {failed}: {type(err).__name__}: {str(err)[:600]} [in {where}]")
        print(f"length {failed}: {'OUT OF MEMORY' if oom else 'ERROR'}: {type(err).__name__}: {str(err)[:300]}", flush=True)
        sys.exit(0 if oom else 1)
    write_result("complete")
    print(json.dumps({"out": str(args.out), "steps": steps}, indent=2, default=str))


if __name__ == "__main__":
    main()
