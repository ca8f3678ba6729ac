"""GPU benchmark of the project's `grpo` stage: its backends (Unsloth, plain TRL) and rollout engines (vLLM, generate).

    python bench/gpu_grpo.py --backend unsloth --completion-length 512 --steps 8 --out bench/results/unsloth_512.json
    python bench/gpu_grpo.py --backend trl --completion-length 512 --steps 4 --out bench/results/trl_512.json
    python bench/gpu_grpo.py --backend unsloth --prompts-per-step 8 --completion-length 512 --steps 4 --out ...
    python bench/gpu_grpo.py --backend trl --generation vllm --prompts-per-step 8 --micro-batches 1 ...   # TRL + vLLM colocate
    bash bench/gpu_grpo_device.sh SPEC ...              # on the GPU machine: installs the carried wheels, runs specs

Runs `stages.grpo.run(...)` unchanged, on a randomly initialised model with the real
Qwen3-1.7B shapes (no weights exist on the GPU machine), built once into --base-dir by a
child process (`--build-only`) so that this process imports Unsloth the way the stage does.

- Tokenizer: a WordLevel fast tokenizer of exactly 151,936 entries (the model's vocabulary):
  special tokens, the answer-format tags, the words of data/gsm8k/train.jsonl, then filler
  tokens. Prompts are the GSM8K questions in the project's chat template.
- Completions are forced to full length: the eos row of the (tied) embedding is zeroed, so
  its logit is exactly 0 while the best of 151,936 random logits is about 4 (std ~0.9); with
  the recipe's min_p 0.1 a token more than ln(10) below the best is never sampled. The JSON
  records completions/mean_length to show it held.
- Params: presets/qwen3-1.7b.yaml (Unsloth's differing defaults are set explicitly there and
  the stage passes them to both backends: adamw_8bit, lr 5e-6, weight decay 0.01, warmup
  ratio 0.1, seed 3407, bf16), with the overrides in `bench_params` below.
- Measurement only, no behaviour change: the per-step logs come through the stage's own
  `callbacks=` hook (what it logged, including its KL monitor's cost, `kl_monitor_seconds`);
  TRL's ProfilingContext (its `profiling/Time taken` timers) is made to synchronise CUDA and
  record instead of reporting nowhere. Steps before --warmup are left out of the medians.
  bench/plain_trl_vllm.py is the baseline measured beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN3_1_7B = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                  max_position_embeddings=40960, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
LLAMA3_1_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                   max_position_embeddings=131072, rms_norm_eps=1e-5,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
# For a CPU check of the scripts only: same vocabulary, two small layers.
SMALL = dict(QWEN3_1_7B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64)
SHAPES = {"qwen3-1.7b": ("qwen3", QWEN3_1_7B), "llama3.1-8b": ("llama", LLAMA3_1_8B), "small": ("qwen3", SMALL)}
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|unk|>"]
EOS, PAD, UNK = SPECIALS


# ------------------------------------------------------------------ model, tokenizer, prompts
def build_tokenizer(vocab_size: int, out: Path):
    """WordLevel tokenizer with exactly vocab_size entries (see the module docstring)."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from stages.common.answer_format import AnswerFormat

    fmt = AnswerFormat()
    tags = [fmt.reasoning_start, fmt.reasoning_end, fmt.solution_start, fmt.solution_end]
    words: dict[str, None] = {}
    for line in (ROOT / "data/gsm8k/train.jsonl").read_text().splitlines():
        for w in re.findall(r"\w+|[^\w\s]+", line):
            words.setdefault(w)
    words_list = [w for w in [*re.findall(r"\w+|[^\w\s]+", fmt.system_prompt), *words, "Question", "Answer"]
                  if w not in SPECIALS and w not in tags]
    vocab: dict[str, int] = {}
    for token in [*SPECIALS, *tags, *words_list]:
        vocab.setdefault(token, len(vocab))
    if len(vocab) > vocab_size:
        raise ValueError(f"{len(vocab)} distinct tokens exceed the vocabulary of {vocab_size}")
    filler = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"~{filler}", len(vocab))
        filler += 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    fast.add_tokens(tags)  # already in the vocabulary: kept whole inside text, no new ids
    fast.chat_template = fmt.chat_template(EOS)
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    fast.save_pretrained(str(out))
    return fast


def build_base(base_dir: Path, shapes: str) -> dict:
    """Random model + tokenizer in base_dir/model and base.json, as the base_model stage writes."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    start = time.perf_counter()
    model_dir = base_dir / "model"
    family, dims = SHAPES[shapes]
    config_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if family == "qwen3" else (LlamaConfig, LlamaForCausalLM)
    tok = build_tokenizer(dims["vocab_size"], model_dir)
    config = config_cls(**dims, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls._from_config(config, dtype=torch.bfloat16)  # built in bf16: an 8B model in fp32 is 32 GB
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.eos_token_id].zero_()
        if dims["tie_word_embeddings"]:  # eos logit 0: never sampled (see the module docstring)
            assert model.get_output_embeddings().weight[tok.eos_token_id].abs().sum() == 0
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(model_dir))
    info = {"model": "model", "tokenizer": "model", "revision": None}
    (base_dir / "base.json").write_text(json.dumps(info) + "\n")
    return {"parameters": sum(p.numel() for p in model.parameters()), "seconds": round(time.perf_counter() - start, 1)}


def ensure_base(base_root: Path, shapes: str) -> Path:
    """base_root/shapes holding the random model, built when missing by a child process, so the
    calling process imports transformers/unsloth only in the stage's order."""
    base_dir = base_root / shapes
    if not (base_dir / "base.json").exists():
        subprocess.run([sys.executable, __file__, "--build-only", "--shapes", shapes, "--base-dir", str(base_root)], check=True)
    return base_dir


def set_offline_env() -> None:
    """No hub, no telemetry: the GPU machine has no network."""
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "UNSLOTH_DISABLE_STATISTICS": "1", "UNSLOTH_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)


def write_prompts(file: Path, count: int = 256, same: bool = False) -> None:
    """GSM8K questions as the prepare stage writes them (prompt messages + gold answer);
    same=True repeats the first question (every prompt of a batch the same length: no padding)."""
    import pandas as pd

    from stages.common.answer_format import AnswerFormat, extract_gold

    fmt = AnswerFormat()
    rows = [json.loads(line) for line in (ROOT / "data/gsm8k/train.jsonl").read_text().splitlines()[:count]]
    rows = [rows[0]] * count if same else rows
    pd.DataFrame({"prompt": [fmt.messages(r["question"]) for r in rows],
                  "answer": [extract_gold(r["answer"]) for r in rows],
                  "question": [r["question"] for r in rows]}).to_parquet(file)


def bench_params(args, base_model: Path):
    """presets/qwen3-1.7b.yaml on the random model, at the shapes under test: 8 generations per
    prompt, --prompts-per-step prompts per optimizer step in --micro-batches micro-batches."""
    from stages.common.params import apply_overrides, parse_overrides, validate
    from stages.preset import resolve

    completions = 8 * args.prompts_per_step
    if completions % args.micro_batches:
        raise SystemExit(f"--micro-batches {args.micro_batches} does not divide {completions} completions")
    raw = resolve("qwen3-1.7b").model_dump()
    raw["model"].update(name_or_path=str(base_model), backend=args.backend, generation=args.generation,
                        dtype="bfloat16" if args.shapes != "small" else "auto",
                        max_seq_length=max(2048, 256 + args.completion_length))
    raw["model"]["lora"].update(enabled=True, r=32, alpha=64, dropout=0.0)
    raw["grpo"].update(num_generations=8, per_device_train_batch_size=completions // args.micro_batches,
                       gradient_accumulation_steps=args.micro_batches, steps_per_generation=None, generation_batch_size=None,
                       max_prompt_length=256, max_completion_length=args.completion_length, beta=0.0,
                       max_steps=args.steps, save_steps=100_000, logging_steps=1, monitor_kl=not args.no_monitor_kl)
    return validate(apply_overrides(raw, parse_overrides(args.overrides)), origin="bench/gpu_grpo.py")


# ------------------------------------------------------------------ instrumentation
class Probe:
    """Per-step logs and phase timings. The step logs come through the stage's `callbacks=` hook
    (what the stage logged to MLflow, after its own callbacks); the phases from TRL's own
    profiling timers (`profiling/Time taken: ...`), made to synchronise CUDA and record here
    instead of reporting nowhere. Nothing in the stage is patched."""

    def __init__(self) -> None:
        self.step = 0
        self.rows: list[dict] = []
        self.phases: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.on_step = lambda: None

    def add(self, name: str, seconds: float) -> None:
        self.phases[self.step + 1][name] += seconds

    def callback(self):
        from transformers import TrainerCallback

        probe = self

        class StepLogs(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "reward" in logs:
                    probe.rows.append({"step": float(state.global_step), **{k: v for k, v in logs.items()
                                                                          if isinstance(v, (int, float))}})
                    probe.step = state.global_step
                    probe.on_step()

        return StepLogs()

    def time_trl_phases(self) -> None:
        """After the stage's backend import (Unsloth first on that path), TRL's timers report here."""
        from trl.extras.profiling import ProfilingContext

        def enter(ctx):
            ctx._start_time = _sync_time()
            return ctx

        def exit_(ctx, *exc):
            self.add(ctx.name.split(".", 1)[-1], _sync_time() - ctx._start_time)
            return False

        ProfilingContext.__enter__, ProfilingContext.__exit__ = enter, exit_


def _sync_time() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


# ------------------------------------------------------------------ summary
def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(rows: list[dict], phases: dict[int, dict[str, float]], completions_per_step: int, warmup: int) -> dict:
    steps = [r for r in rows if "reward" in r]
    kept = steps[warmup:] or steps[-1:]
    kept_steps = {int(r["step"]) for r in kept}
    out = {"steps_measured": sorted(kept_steps), "step_seconds_median": median([r.get("step_seconds") for r in kept]),
           "trl_step_time_median": median([r.get("step_time") for r in kept]),
           "completion_length_mean": median([r.get("completions/mean_length") for r in kept]),
           "completion_clipped_ratio": median([r.get("completions/clipped_ratio") for r in kept]),
           "generated_tokens_per_s_median": median([r.get("throughput/generated_tokens_per_s") for r in kept]),
           "train_tokens_per_s_median": median([r.get("throughput/train_tokens_per_s") for r in kept])}
    names = sorted({n for s in kept_steps for n in phases.get(s, {})})
    out["phases_median_s"] = {n: median([phases.get(s, {}).get(n) for s in kept_steps]) for n in names}
    out["kl_monitor_seconds"] = [r["kl_monitor_seconds"] for r in steps if "kl_monitor_seconds" in r]
    gen = out["phases_median_s"].get("transformers.generate") or out["phases_median_s"].get("vllm.generate")
    if gen and out["completion_length_mean"]:
        out["generate_only_tokens_per_s"] = out["completion_length_mean"] * completions_per_step / gen
    return out


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "unsloth", "unsloth_zoo",
                 "bitsandbytes", "triton", "tokenizers", "mlflow-skinny", "pydantic"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    import torch

    out = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError) as err:
            out["driver"] = f"unknown ({err})"
    return out


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["unsloth", "trl"], help="model.backend for the stage")
    ap.add_argument("--completion-length", type=int, default=512, help="grpo.max_completion_length (tokens; forced full length)")
    ap.add_argument("--prompts-per-step", type=int, default=1, help="prompts per optimizer step, 8 generations each (gradient accumulation steps)")
    ap.add_argument("--steps", type=int, default=6, help="grpo.max_steps")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a params override after the benchmark's own (e.g. grpo.min_p=null)")
    ap.add_argument("--prompts", type=int, default=256, help="GSM8K training questions in the prompt set (7473: all)")
    ap.add_argument("--same-prompt", action="store_true", help="every prompt the same question (no left padding in generation)")
    ap.add_argument("--no-monitor-kl", action="store_true", help="set grpo.monitor_kl false (the preset has it on)")
    ap.add_argument("--generation", choices=["transformers", "vllm"], default="transformers", help="model.generation for the stage")
    ap.add_argument("--micro-batches", type=int, default=1,
                    help="micro-batches per optimizer step (gradient_accumulation_steps); 1 = one micro-batch of 8 x prompts")
    ap.add_argument("--shapes", choices=list(SHAPES), default="qwen3-1.7b", help="model shapes (small: CPU check of this script)")
    ap.add_argument("--base-dir", type=Path, default=Path("/tmp/bench_grpo/base"), help="where the random model is built (reused if present)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_grpo/work"), help="scratch dir: stage outputs, Unsloth's compiled cache")
    ap.add_argument("--vllm-text", action="store_true",
                    help="let the colocated vLLM detokenize (TRL's default): the A/B of stages.grpo.COLOCATED_SAMPLING")
    ap.add_argument("--out", type=Path, help="result JSON")
    ap.add_argument("--build-only", action="store_true", help="build the model into --base-dir and exit")
    args = ap.parse_args()

    set_offline_env()

    args.base_dir, args.work_dir = args.base_dir.resolve(), args.work_dir.resolve()
    args.out = args.out.resolve() if args.out else None
    base_dir = args.base_dir / args.shapes
    if args.build_only:
        base_dir.mkdir(parents=True, exist_ok=True)
        print(json.dumps(build_base(base_dir, args.shapes)))
        return
    if not args.backend or not args.out:
        ap.error("--backend and --out are required (unless --build-only)")
    ensure_base(args.base_dir, args.shapes)

    work = args.work_dir / f"{args.backend}_{args.generation}_{args.completion_length}_{args.prompts_per_step}"
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # Unsloth writes ./unsloth_compiled_cache
    prompts = work / "grpo.parquet"
    write_prompts(prompts, count=args.prompts, same=args.same_prompt)
    params = bench_params(args, base_dir / "model")

    import stages.grpo as grpo

    if args.vllm_text:
        grpo.COLOCATED_SAMPLING = {}
    completions = params.grpo.effective_generation_batch_size
    config = {"backend": args.backend, "completion_length": args.completion_length,
              "prompts_per_step": args.prompts_per_step, "same_prompt": args.same_prompt, "prompt_set_size": args.prompts, "generations_per_prompt": 8,
              "completions_per_step": completions, "steps": args.steps, "warmup": args.warmup,
              "shapes": args.shapes, "monitor_kl": params.grpo.monitor_kl,
              "generation": args.generation, "micro_batches": args.micro_batches,
              "vllm_sampling_extra": grpo.COLOCATED_SAMPLING if args.generation == "vllm" else None, "lora": params.model.lora.model_dump(),
              "grpo": {k: v for k, v in params.grpo.model_dump().items() if k != "rewards"},
              "model": {k: v for k, v in params.model.model_dump().items() if k not in ("tiny", "lora")}}
    probe = Probe()
    started = time.perf_counter()
    host = {"machine": machine(), "versions": versions()}  # once: nvidia-smi must not run inside a timed step

    def write_result(metrics: dict | None) -> dict:
        """Written after every step too, so a run stopped by a time limit still leaves its steps."""
        import torch

        history = probe.rows
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv), "complete": metrics is not None,
            "config": config, **host,
            "wall_seconds_run": round(time.perf_counter() - started, 2), "stage_metrics": metrics,
            "summary": summarize(history, probe.phases, completions, args.warmup),
            "peak_memory_gib": {"allocated": torch.cuda.max_memory_allocated() / 2**30,
                                "reserved": torch.cuda.max_memory_reserved() / 2**30,
                                # the caching allocator freed its cache and retried (a slow, synchronising path)
                                "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries")}
            if torch.cuda.is_available() else None,
            "per_step": history, "phases_per_step": {str(k): dict(v) for k, v in sorted(probe.phases.items())},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        return result

    probe.on_step = lambda: write_result(None)
    grpo.import_backend(args.backend, args.generation, params.grpo.vllm_enable_sleep_mode)  # as the stage does
    probe.time_trl_phases()
    metrics = grpo.run(params, prompts, base_dir, work / "no_sft", work / "grpo_out", work / "ckpt", work / "plots",
                       callbacks=[probe.callback()])
    result = write_result(metrics)
    print(json.dumps({"out": str(args.out), "summary": result["summary"], "peak_memory_gib": result["peak_memory_gib"],
                      "stage_step_seconds_mean": metrics.get("step_seconds"),
                      "stage_memory": {k: v for k, v in metrics.items() if k.startswith("memory/")}}, indent=2, default=str))


if __name__ == "__main__":
    main()
