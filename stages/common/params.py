"""The one typed loader for params.yaml.

Every section of params.yaml is a pydantic model below; each field says what it means,
its unit, allowed values and where its default comes from. Unknown keys, wrong types and
impossible combinations fail here, before any model loads, with the key path named:

    from stages.common.params import load_params
    params = load_params()          # params.yaml at the project root
    params.grpo.num_generations

Defaults are the GPU recipe from the Unsloth/TRL GRPO guides (Qwen3-1.7B-Base, LoRA r=32).
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from stages.common.answer_format import AnswerFormat
from stages.common.paths import PATHS, load_yaml

ROOT = Path(__file__).resolve().parents[2]
# The workspace's params.yaml: the project root, or PIPELINE_WORKDIR when set (see paths.py).
PARAMS_FILE = Path(os.environ.get("PIPELINE_WORKDIR") or ROOT) / "params.yaml"


class ParamsError(ValueError):
    """params.yaml (or an override) is malformed; the message names key, value and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def F(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - `help` reads best here
    return Field(default, description=help, **kw)


# --------------------------------------------------------------------------- project
class AnswerFormatParams(Section):
    reasoning_start: str = F(AnswerFormat.reasoning_start, "Tag opening the reasoning block (seeds: <think>; also e.g. <reasoning>).", min_length=1)
    reasoning_end: str = F(AnswerFormat.reasoning_end, "Tag closing the reasoning block.", min_length=1)
    solution_start: str = F(AnswerFormat.solution_start, "Tag opening the final-answer block (seeds: <SOLUTION>; also e.g. <answer>).", min_length=1)
    solution_end: str = F(AnswerFormat.solution_end, "Tag closing the final-answer block.", min_length=1)
    system_prompt: str | None = F(None, "System prompt given with every question. None: the built-in instructions naming the tags; \"\": no system message.")

    def build(self) -> AnswerFormat:
        """The answer format these params describe (what prepare, rewards, evaluation and export use)."""
        return AnswerFormat(**self.model_dump())


class ProjectParams(Section):
    name: str = F("gsm8k-grpo", "Run/model name: MLflow experiment and registered model names derive from it.", min_length=1)
    seed: int = F(3407, "Global seed for data shuffling and model init (Unsloth's notebooks use 3407).")
    license: str = F("apache-2.0", "License of the trained models, written to their model cards (a Hub license id). Weights derived "
                     "from a base model are bound by its license: Qwen3 apache-2.0, Llama 3.1 llama3.1.", min_length=1)
    answer_format: AnswerFormatParams = F(AnswerFormatParams(), "Tags of the trained answer format.")


# --------------------------------------------------------------------------- prepare
class SyntheticParams(Section):
    operations: list[Literal["+", "-", "*"]] = F(["+"], "Operations drawn from, uniformly.", min_length=1)
    min_operand: int = F(10, "Smallest operand (inclusive).")
    max_operand: int = F(99, "Largest operand (inclusive).")
    train_size: int = F(4000, "Number of training problems generated.", ge=1)
    test_size: int = F(200, "Number of held-out problems generated (disjoint from training).", ge=1)

    @model_validator(mode="after")
    def _range(self) -> "SyntheticParams":
        if self.min_operand > self.max_operand:
            raise ValueError(f"min_operand ({self.min_operand}) must be <= max_operand ({self.max_operand})")
        return self


class ColumnsParams(Section):
    question: str = F("question", "Column holding the problem text.")
    answer: str = F("answer", "Column holding the answer (GSM8K style `... #### N`, or just N).")
    solution: str | None = F(None, "Optional column with a worked solution; by default the text before `####` in `answer`.")


class PrepareParams(Section):
    source: Literal["gsm8k", "hub", "file", "synthetic"] = F(
        "gsm8k", "gsm8k: the copy shipped in data/gsm8k; hub: a Hugging Face dataset id; file: local jsonl/parquet/csv; synthetic: built-in arithmetic.")
    hub_id: str | None = F(None, "Dataset id when source=hub, e.g. openai/gsm8k or open-r1/DAPO-Math-17k-Processed.")
    hub_config: str | None = F(None, "Dataset config when source=hub (openai/gsm8k needs 'main').")
    # Never empty: dvc.yaml lists both files as deps of prepare, by content, whatever the source.
    train_file: str = F(f"{PATHS['gsm8k']}/train.jsonl", "Training file (jsonl/parquet/csv) read when source=file. "
                        "A DVC dependency of prepare by content (edit it in place and `dvc repro` reruns prepare), "
                        "so it always names a file: by default the shipped GSM8K train split.", min_length=1)
    test_file: str = F(f"{PATHS['gsm8k']}/test.jsonl", "Test file read when source=file; a DVC dependency like train_file "
                       "(default: the shipped GSM8K test split).", min_length=1)
    train_split: str = F("train", "Split name for training when source=hub.")
    test_split: str = F("test", "Split name for evaluation when source=hub.")
    columns: ColumnsParams = F(ColumnsParams(), "Column mapping for hub/file sources.")
    synthetic: SyntheticParams = F(SyntheticParams(), "Options for source=synthetic.")
    sft_examples: int = F(
        60, "How many training rows become SFT priming examples (the seeds prime on a small slice); 0 = none. "
        "They are removed from the GRPO prompts.", ge=0)
    sft_max_reasoning_chars: int | None = F(None, "Truncate worked solutions to this many characters (None keeps them whole); short priming leaves room for GRPO to improve.")
    max_train_rows: int | None = F(None, "Cap on GRPO prompts after cleaning (None = all).", ge=1)
    max_test_rows: int | None = F(None, "Cap on evaluation rows (None = all).", ge=1)
    on_bad_rows: Literal["drop", "fail"] = F("drop", "Rows with missing/empty question, missing or non-numeric answer, or duplicates: drop (counted by reason) or fail the stage.")
    on_contamination: Literal["drop", "fail", "warn"] = F("drop", "Training rows whose question also appears in the test split (exact or normalised text).")
    max_question_chars: int | None = F(
        4000, "Longest question in characters (GSM8K's longest is under 1,000); longer ones would be cut by the model's "
        "context (lm-eval keeps only the last tokens, losing the system prompt). None = no limit.", ge=1)
    on_long_questions: Literal["drop", "fail"] = F("drop", "Questions longer than max_question_chars, in either split: drop them (counted in the metrics) or fail the stage.")
    on_small_split: Literal["warn", "fail"] = F(
        "warn", "A split smaller than one batch (GRPO prompts < one generation batch of prompts, SFT examples < one SFT "
        "step), found by `python -m stages.check` before any stage runs: warn or fail.")


# --------------------------------------------------------------------------- model
class TinyModelParams(Section):
    vocab_size: int = F(4096, "SentencePiece vocabulary size (multiple of 256 keeps GGUF k-quants exact).", ge=256)
    hidden_size: int = F(256, "Hidden width. Multiples of 256 keep llama.cpp k-quants exact (the tiny default); smaller "
                         "multiples of 64 are allowed for CPU experiments, and the gguf stage reports any k-quant llama.cpp replaces.",
                         ge=64, multiple_of=64)
    intermediate_size: int = F(512, "MLP width; a multiple of 256.", ge=256, multiple_of=256)
    num_layers: int = F(2, "Decoder layers.", ge=1)
    num_heads: int = F(4, "Attention heads (head dim = hidden_size / num_heads).", ge=1)
    max_position_embeddings: int = F(1024, "Longest sequence the model supports (tokens).", ge=64)
    tokenizer_model: Literal["bpe", "unigram"] = F("bpe", "SentencePiece model type (byte fallback and split digits are always on).")

    @model_validator(mode="after")
    def _heads(self) -> "TinyModelParams":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class LoraParams(Section):
    enabled: bool = F(True, "Train LoRA adapters; false = full fine-tuning (sensible only for the tiny model).")
    r: int = F(32, "LoRA rank (seeds: 8-128; 32 for Qwen3-1.7B).", ge=1)
    alpha: int = F(64, "LoRA alpha; the seeds use 2 x r.", ge=1)
    dropout: float = F(0.0, "LoRA dropout (0 is what Unsloth optimises for).", ge=0.0, lt=1.0)
    target_modules: list[str] = F(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Modules that get adapters: all 7 attention and MLP projections by default.", min_length=1)


class ModelParams(Section):
    name_or_path: str = F("unsloth/Qwen3-1.7B-Base", "Base model: a hub id, a local folder, or `tiny` for the built-in tiny model.")
    tiny: TinyModelParams = F(TinyModelParams(), "Shape of the built-in tiny model (name_or_path: tiny).")
    revision: str | None = F(None, "Hub revision (commit or tag) to pin the base model.")
    chat_template: Literal["auto", "project", "model"] = F(
        "auto", "project: the answer-format template (generation starts inside the reasoning tag), as the seeds do for base models; "
        "model: keep the tokenizer's own; auto: project when the tokenizer has none.")
    trust_remote_code: bool = F(False, "Run model code shipped in the hub repo. Off: only code in installed transformers runs.")
    max_seq_length: int = F(2048, "Longest prompt+completion in tokens (seeds: 2048 for Qwen3-1.7B).", ge=64)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = F(
        "auto", "Training/compute dtype. auto: bfloat16 on GPUs that support it, float32 on CPU. "
        "The seeds report fp16 can be more stable for RL on some models.")
    load_in_4bit: bool = F(False, "QLoRA: load base weights in 4-bit (bitsandbytes, CUDA only).")
    backend: Literal["auto", "unsloth", "trl"] = F("auto", "auto: Unsloth when CUDA and the gpu extra are present, else plain TRL + transformers + peft.")
    generation: Literal["auto", "vllm", "transformers"] = F("auto", "Rollout engine: auto uses vLLM when installed (with CUDA), else transformers generate.")
    gpu_memory_utilization: float = F(
        0.3, "Fraction of GPU memory vLLM may take (its weights and KV cache). Colocated with plain TRL the rest is the "
        "trainer's (0.3 on an H200 leaves ~95 GiB to train 8 x 8 x 512 tokens); Unsloth's fast_inference shares the "
        "weights, and with its Standby (grpo.vllm_enable_sleep_mode) the seeds go to 0.9-0.95.", gt=0.0, le=1.0)
    lora: LoraParams = F(LoraParams(), "LoRA adapter settings (used by sft and grpo).")


# --------------------------------------------------------------------------- sft
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt"]
Optimizer = Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd"]


class SFTParams(Section):
    enabled: bool = F(True, "Run the format-priming SFT stage; false passes the base model through unchanged.")
    num_train_epochs: float = F(2.0, "Epochs over the priming split (seeds: 2). Ignored when max_steps > 0.", gt=0)
    max_steps: int = F(-1, "Stop after this many optimizer steps; -1 = use epochs.", ge=-1)
    learning_rate: float = F(2e-4, "Peak learning rate (seeds: 2e-4 for LoRA priming).", gt=0)
    warmup_steps: int = F(5, "Linear warm-up steps (seeds: 5).", ge=0)
    lr_scheduler_type: Scheduler = F("linear", "Learning-rate schedule.")
    optim: Optimizer = F("adamw_8bit", "Optimizer (seeds: adamw_8bit; needs bitsandbytes/CUDA, the trl backend on CPU uses adamw_torch).")
    weight_decay: float = F(0.01, "Weight decay (seeds: 0.01).", ge=0)
    per_device_train_batch_size: int = F(1, "Examples per device per micro-batch (seeds: 1).", ge=1)
    gradient_accumulation_steps: int = F(1, "Micro-batches per optimizer step.", ge=1)
    max_length: int = F(2048, "Longest SFT example in tokens; longer ones are truncated.", ge=16)
    gradient_checkpointing: bool = F(True, "Recompute activations in the backward pass instead of keeping them: less memory, "
                                     "about one more forward pass of time (TRL's default). Unsloth: its offloaded variant.")
    logging_steps: int = F(5, "Log loss every N steps.", ge=1)
    seed: int = F(3407, "Training seed.")


# --------------------------------------------------------------------------- grpo
class RewardSpec(Section):
    name: str = F(..., "Registered reward name (see stages/common/rewards.py) or `module.path:function`.", min_length=1)
    weight: float = F(1.0, "Multiplier applied by TRL (reward_weights).")
    options: dict[str, Any] = F({}, "Keyword options for a parameterised reward (see its docstring).")


DEFAULT_REWARDS = [
    RewardSpec(name="format_exact"),
    RewardSpec(name="format_approx"),
    RewardSpec(name="answer_check"),
    RewardSpec(name="numeric_match"),
]


class GRPOParams(Section):
    rewards: list[RewardSpec] = F(DEFAULT_REWARDS, "Reward functions, summed with their weights (seeds: exact format, approximate format, answer check, number check).", min_length=1)
    on_reward_error: Literal["zero", "abort"] = F("abort", "A reward that raises or returns NaN: log the sample and score 0 (zero), or stop training (abort).")
    max_reward_error_fraction: float = F(0.1, "With on_reward_error zero: stop training once a reward has failed on more than this share of the samples it scored in the run (0 = the first failure stops it, 1 = never). Each reward's per-batch share is logged as reward_errors/<name>.", ge=0, le=1)
    num_generations: int = F(8, "Completions per prompt: the group size G (seeds: 4-8).", ge=2)
    per_device_train_batch_size: int = F(
        64, "Completions (not prompts) per device per micro-batch, as TRL counts them: 64 = 8 prompts x 8. One micro-batch "
        "per step is the fast layout on a large GPU (H200, vLLM: 5.5 s per step against 8.95 s for 8 micro-batches of 8, "
        "docs/benchmarks.md); on a small GPU lower it and raise gradient_accumulation_steps. The seeds' 1 only works "
        "because Unsloth raises it to num_generations; here it is explicit.", ge=1)
    gradient_accumulation_steps: int = F(1, "Micro-batches per optimizer step (seeds: 1).", ge=1)
    gradient_checkpointing: bool = F(True, "Recompute activations in the backward pass instead of keeping them: less memory, "
                                     "about one more forward pass of time (TRL's default). Off, with two micro-batches of 32, "
                                     "took 3.97 instead of 4.65 s per step at 8 x 8 x 512 on an H200 but peaked at 128 GiB "
                                     "(docs/benchmarks.md, session 7). Unsloth: its offloaded variant.")
    use_liger_kernel: bool = F(
        False, "trl backend: TRL's chunked log-probs (the LM head in slices, never the whole vocabulary's logits at "
        "once), and transformers puts Liger's fused kernels (RMSNorm, SwiGLU, RoPE) into the model. On an H200 at "
        "8 x 8 x 512, no checkpointing, two micro-batches of 32: peak 97 instead of 128.5 GiB, step time the same "
        "within noise (docs/benchmarks.md, session 15). Needs the liger-kernel package (in the gpu extra).")
    generation_batch_size: int | None = F(None, "Completions generated per rollout; must be divisible by num_generations. None: per_device_train_batch_size x gradient_accumulation_steps x steps_per_generation.", ge=2)
    steps_per_generation: int | None = F(None, "Optimizer steps per rollout batch (None = gradient_accumulation_steps). Exclusive with generation_batch_size.", ge=1)
    group_prompts_by_length: bool = F(True, "Generate from batches of prompts of one token length where the data allows: no left padding in transformers generation (Unsloth, 8 prompts x 8 on an H200: 1.44x faster steps, half the reserved memory); batches then correlate with prompt length. Advantages stay per prompt group.")
    num_iterations: int = F(1, "Optimisation passes per rollout batch (mu in the GRPO paper).", ge=1)
    max_prompt_length: int = F(256, "Longest prompt in tokens; longer prompts are dropped before training and counted (seeds filter the same way).", ge=8)
    max_completion_length: int = F(1024, "Longest completion in tokens (seeds: max_seq_length - max_prompt_length).", ge=8)
    temperature: float = F(1.0, "Sampling temperature for rollouts (seeds: 1.0; diversity drives the advantage).", gt=0)
    top_p: float = F(1.0, "Nucleus sampling threshold.", gt=0, le=1)
    top_k: int | None = F(None, "Top-k sampling (None = off).", ge=1)
    min_p: float | None = F(0.1, "Min-p sampling (seeds: 0.1).", ge=0, le=1)
    repetition_penalty: float = F(1.0, "Repetition penalty for rollouts (1.0 = off).", gt=0)
    learning_rate: float = F(5e-6, "Peak learning rate (seeds: 5e-6).", gt=0)
    lr_scheduler_type: Scheduler = F("linear", "Learning-rate schedule (seeds: linear).")
    warmup_ratio: float = F(0.1, "Warm-up as a fraction of steps (seeds: 0.1).", ge=0, le=1)
    weight_decay: float = F(0.01, "Weight decay (seeds: 0.01 or 0.001).", ge=0)
    optim: Optimizer = F("adamw_8bit", "Optimizer (seeds: adamw_8bit).")
    max_grad_norm: float = F(1.0, "Gradient clipping norm (seeds: 1.0 or 0.1).", gt=0)
    beta: float = F(0.0, "KL coefficient; 0.0 means no reference model is loaded (TRL's and the seeds' default).", ge=0)
    monitor_kl: bool = F(True, "When beta is 0, still compute KL to the base model (adapter disabled) for monitoring.")
    monitor_kl_every: int = F(10, "Compute that monitoring KL at step 1 and every N steps after (two batched forward passes over 8 completions; about 0.1-0.7 s on an H200 for Qwen3-1.7B).", ge=1)
    epsilon: float = F(0.2, "Lower clipping range of the ratio (PPO epsilon).", gt=0)
    epsilon_high: float | None = F(None, "Upper clipping range (DAPO clip-higher, e.g. 0.28); None = epsilon.", gt=0)
    delta: float | None = F(None, "Two-sided clipping bound for the ratio (None = off).", gt=1)
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"] = F(
        "dapo", "Loss normalisation (TRL 1.14): grpo (per sequence), bnpo (per batch tokens), dr_grpo (constant), "
        "dapo (global tokens, TRL's default), cispo, sapo, luspo, vespo (vespo needs a token-level vllm_importance_sampling_mode).")
    importance_sampling_level: Literal["token", "sequence"] = F("token", "Where the ratio is taken: token (GRPO) or sequence (GSPO).")
    scale_rewards: Literal["group", "batch", "none"] = F("group", "Advantage scaling by std: per group, per batch, or none (Dr. GRPO).")
    mask_truncated_completions: bool = F(False, "Exclude completions cut off at max_completion_length from the loss (DAPO).")
    vllm_mode: Literal["colocate", "server"] = F(
        "colocate", "With model.generation=vllm: colocate runs vLLM inside the training process on the same GPU "
        "(both backends; Unsloth's fast_inference shares its weights); server sends rollouts to a `trl vllm-serve` "
        "process at vllm_server_host:vllm_server_port (backend trl; the stage checks its health first).")
    vllm_enable_sleep_mode: bool = F(
        False, "Free vLLM's memory while training. trl backend: vLLM sleep mode (weights and KV cache offloaded during "
        "the optimizer step, woken for each rollout). unsloth backend: Unsloth Standby (UNSLOTH_VLLM_STANDBY=1: only the "
        "KV cache is released, weights stay shared), which lets model.gpu_memory_utilization go up to ~0.95.")
    vllm_max_model_length: int | None = F(
        None, "vLLM's context length in tokens (trl backend). None: max_prompt_length + max_completion_length, "
        "the longest sequence a rollout can hold, so vLLM reserves no KV cache beyond it.", ge=16)
    vllm_tensor_parallel_size: int = F(1, "GPUs one colocated vLLM engine is split over (trl backend, colocate).", ge=1)
    vllm_server_base_url: str | None = F(None, "URL of a `trl vllm-serve` server (vllm_mode server); overrides host and port.")
    vllm_server_host: str = F("127.0.0.1", "Host of the `trl vllm-serve` server (vllm_mode server).")
    vllm_server_port: int = F(8000, "Port of the `trl vllm-serve` server (vllm_mode server).", ge=1, le=65535)
    vllm_server_timeout: float = F(240.0, "Seconds to wait for the vLLM server to answer its health check before failing.", gt=0)
    vllm_importance_sampling_correction: bool = F(True, "Correct for the vLLM/trainer log-prob mismatch with importance sampling (vLLM only; needs the trainer's log-probs of every rollout). On the unsloth backend with truncated sampling (min_p/top_k/top_p) it sends the run to plain TRL + vLLM (Unsloth's kept-set scorer compiles for minutes); false keeps Unsloth's path (Unsloth's own default).")
    importance_sampling_from_loss: bool = F(
        True, "trl backend with vLLM and that correction, on-policy runs (num_iterations 1): take the trainer's log-probs "
        "from the loss's own forward instead of TRL's extra no-grad pass over every rollout (stages/common/on_policy_is.py; "
        "the same weights, one forward less per step). false: TRL's extra pass.")
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = F(
        "sequence_mask", "How that correction is applied (TRL's default sequence_mask; loss_type vespo needs a token_* mode).")
    vllm_importance_sampling_clip_max: float | None = F(3.0, "Upper bound of the importance ratio: clipped (truncate) or masked (mask) above it (TRL's default 3.0).", gt=0)
    vllm_importance_sampling_clip_min: float | None = F(None, "Lower bound of the importance ratio (None: none).", gt=0)
    max_steps: int = F(100, "Optimizer steps (seeds: 100 for a demo, more for real runs); -1 = use epochs.", ge=-1)
    num_train_epochs: float = F(1.0, "Epochs over the prompts when max_steps is -1.", gt=0)
    save_steps: int = F(50, "Checkpoint every N steps; the stage resumes from the last one if killed.", ge=1)
    continue_on_new_prompts: bool = F(
        False, "Continuous training (flows/continuous.py turns it on): when only the GRPO prompts changed since the "
        "checkpoints were made (same base model, SFT output, code and other params), resume on the new prompts instead "
        "of starting fresh; prompts not yet trained on come first (tracked by content hash in each checkpoint) and "
        "the learning-rate schedule continues over the longer step budget. Off: any input change starts fresh.")
    logging_steps: int = F(1, "Log metrics every N steps.", ge=1)
    log_completions_every: int = F(10, "Log a table of sample completions every N steps (0 = never).", ge=0)
    seed: int = F(3407, "Training seed (data order, sampling).")

    @model_validator(mode="after")
    def _batches(self) -> "GRPOParams":
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError(f"set only one of generation_batch_size ({self.generation_batch_size}) "
                             f"and steps_per_generation ({self.steps_per_generation})")
        if self.loss_type == "vespo" and not self.vllm_importance_sampling_mode.startswith("token"):
            raise ValueError(f"loss_type vespo needs a token-level vllm_importance_sampling_mode (token_truncate or "
                             f"token_mask), got {self.vllm_importance_sampling_mode!r}")
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"vllm_importance_sampling_clip_min ({lo}) must be below vllm_importance_sampling_clip_max ({hi})")
        gen = self.effective_generation_batch_size
        if gen % self.num_generations:
            raise ValueError(
                f"the generation batch ({gen} completions) must be divisible by num_generations "
                f"({self.num_generations}); adjust per_device_train_batch_size, gradient_accumulation_steps "
                "or generation_batch_size")
        return self

    @property
    def effective_generation_batch_size(self) -> int:
        if self.generation_batch_size is not None:
            return self.generation_batch_size
        steps = self.steps_per_generation or self.gradient_accumulation_steps
        return self.per_device_train_batch_size * steps


# --------------------------------------------------------------------------- evaluate
class EvaluateParams(Section):
    limit: int | None = F(None, "Evaluate only the first N test rows (None = all 1,319).", ge=1)
    batch_size: int = F(8, "Generation batch size for lm-eval.", ge=1)
    max_new_tokens: int = F(1024, "Longest generated answer in tokens.", ge=1)
    backend: Literal["auto", "vllm", "hf"] = F("auto", "lm-eval model backend: vLLM when installed, else HF transformers.")
    num_samples: int = F(0, "Optional sampled evaluation: k samples per question for pass@k and maj@k (0 = off).", ge=0)
    sample_temperature: float = F(0.7, "Temperature for sampled evaluation.", gt=0)
    models: list[Literal["base", "sft", "grpo"]] = F(["base", "sft", "grpo"], "Which models to evaluate.", min_length=1)


# --------------------------------------------------------------------------- export
class MergeParams(Section):
    merged_4bit: bool = F(False, "Also save a 4-bit (bitsandbytes) merged model; CUDA only.")
    check_prompts: int = F(3, "Prompts on which merged and base+adapter greedy outputs must agree.", ge=1)
    check_tokens: int = F(16, "Greedy tokens compared per prompt.", ge=1)
    atol: float = F(0.25, "Max absolute logit difference between merged and base+adapter along the check continuation (plus rtol x |logit|). "
                    "bf16 storage alone moves logits by ~1e-2 on real models, hence the loose default; greedy-token equality is what catches a dropped adapter.", gt=0)
    rtol: float = F(0.0, "Relative part of that bound: a logit may also move by rtol x its size (16-bit storage rounds each weight "
                    "relative to its size: about 1e-3 for float16, 8e-3 for bfloat16).", ge=0)


class GGUFParams(Section):
    outtype: Literal["f16", "q8_0", "f32", "bf16"] = F("f16", "Type written by llama.cpp's converter before quantizing.")
    quantizations: list[Literal["q8_0", "q4_k_m", "q4_0", "q5_k_m", "q6_k", "q4_k_s", "q5_0"]] = F(
        ["q8_0", "q4_k_m"], "Quantized files made with llama.cpp's quantizer.", min_length=1)
    eval_questions: int = F(10, "GSM8K test questions answered by each GGUF and the merged model to measure quantization loss.", ge=1)
    max_new_tokens: int = F(256, "Tokens generated per verification question.", ge=1)
    n_ctx: int = F(2048, "llama.cpp context window for verification.", ge=128)
    identical_answers: list[Literal["f16", "q8_0", "f32", "bf16", "q4_k_m", "q4_0", "q5_k_m", "q6_k", "q4_k_s", "q5_0"]] = F(
        ["q8_0"], "Files whose extracted answers must equal the merged model's on every verification question, "
        "or the stage fails (8-bit keeps greedy answers; quantization noise shows up as a changed answer).")
    max_accuracy_drop: float = F(
        0.1, "Any file whose accuracy on the verification questions falls more than this below the merged model's "
        "fails the stage (absolute accuracy, 0-1; 1 = never).", ge=0, le=1)


class RegistryParams(Section):
    enabled: bool = F(True, "Register adapter and merged model in the MLflow model registry.")
    min_improvement: float = F(0.0, "A candidate becomes champion only if its GSM8K strict score beats the champion's by at least this (absolute accuracy, 0-1).", ge=0)
    significance_level: float = F(
        0.05, "Promotion also needs a gain beyond noise: on the questions where candidate and champion disagree, the one-sided "
        "p-value of an exact McNemar test (candidate right, champion wrong vs the reverse) must be at most this. 1.0 turns the test off.",
        gt=0, le=1)
    on_incomparable: Literal["refuse", "reevaluate"] = F(
        "refuse", "Candidate and champion evaluated differently (other questions, n, limit, decoding or prompt): refuse to compare "
        "(the champion stays; the reason is in metrics/register.json), or reevaluate the champion's merged model on the "
        "candidate's eval set inside the register stage (lm-eval, as the evaluate stage runs it).")


HubRepo = Annotated[str, StringConstraints(pattern=r"^[\w.-]+/[\w.-]+$")]


class PublishParams(Section):
    enabled: bool = F(False, "Push the models and their cards to the Hugging Face Hub (stage publish). The token comes from "
                      "HF_TOKEN in the environment only; without it the stage stops at once.")
    push: list[Literal["adapter", "merged", "gguf"]] = F(
        ["adapter", "merged", "gguf"], "What to push, each with its model card: the GRPO adapter (models/grpo; the full model "
        "when model.lora is off), the merged 16-bit model (models/merged), the GGUF files and Modelfiles (models/gguf).")
    adapter_repo: HubRepo | None = F(None, "Hub repo id (namespace/name) for the adapter, e.g. alice/gsm8k-grpo-lora.")
    merged_repo: HubRepo | None = F(None, "Hub repo id for the merged model, e.g. alice/gsm8k-grpo.")
    gguf_repo: HubRepo | None = F(None, "Hub repo id for the GGUF files, e.g. alice/gsm8k-grpo-GGUF.")
    private: bool = F(True, "Create missing repos as private (an existing repo keeps its visibility).")

    @model_validator(mode="after")
    def _repos(self) -> "PublishParams":
        missing = [kind for kind in self.push if self.enabled and getattr(self, f"{kind}_repo") is None]
        if missing:
            raise ValueError(f"publish.enabled is true and push lists {missing}: set "
                             + ", ".join(f"publish.{kind}_repo" for kind in missing))
        return self

    def repos(self) -> dict[str, str]:
        """{kind: repo id} of what is pushed."""
        return {kind: getattr(self, f"{kind}_repo") for kind in self.push}


class FlowParams(Section):
    retries: int = F(2, "Retries of a stage that fails (GRPO resumes from its last checkpoint).", ge=0)
    retry_delay_seconds: float = F(10.0, "First retry delay; doubles each retry.", ge=0)
    continuous_steps: int = F(20, "GRPO steps added per continuous-training tick that finds work.", ge=1)


# --------------------------------------------------------------------------- launch
class VLLMServerParams(Section):
    enabled: bool = F(False, "Start a `trl vllm-serve` server for the grpo stage (`python -m stages.launch grpo`, dvc.yaml's cmd), "
                      "wait for its /health endpoint, stop it when training ends. Needs grpo.vllm_mode: server; the trainer "
                      "reaches it at grpo.vllm_server_host/port. Off: start it yourself, e.g. on a separate inference node.")
    gpus: list[int] = F([0], "GPU indices of this machine the server runs on; tensor_parallel_size x data_parallel_size of them. "
                        "Training never uses them.", min_length=1)
    tensor_parallel_size: int = F(1, "GPUs one vLLM engine is split over (for a model too large for one GPU).", ge=1)
    data_parallel_size: int = F(1, "vLLM engines serving side by side, each on tensor_parallel_size GPUs (more rollout throughput).", ge=1)
    startup_timeout: float = F(600.0, "Seconds to wait for the server's /health (a fresh engine compiles and captures CUDA graphs: "
                               "60-110 s measured on an H200).", gt=0)

    @model_validator(mode="after")
    def _gpus(self) -> "VLLMServerParams":
        wanted = self.tensor_parallel_size * self.data_parallel_size
        if len(self.gpus) != wanted or len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"gpus {self.gpus} must name {wanted} different GPUs "
                             f"(tensor_parallel_size {self.tensor_parallel_size} x data_parallel_size {self.data_parallel_size})")
        return self


class LaunchParams(Section):
    num_processes: int = F(1, "Training processes over all machines, one per GPU (accelerate's --num_processes). With 1, "
                           "config ddp and no gpus, `python -m stages.launch` runs the stage as plain `python -m stages.<name>`. "
                           "Each process trains per_device_train_batch_size completions per micro-batch.", ge=1)
    num_machines: int = F(1, "Machines taking part; each runs num_processes / num_machines processes.", ge=1)
    machine_rank: int = F(0, "This machine's rank (0: the main machine, which writes every output). The others pass theirs "
                          "on the command line: python -m stages.launch grpo --set launch.machine_rank=1", ge=0)
    main_process_ip: str | None = F(None, "Address of machine 0 that the other machines connect to (needed when num_machines > 1).")
    main_process_port: int = F(29500, "Port on machine 0 for the process group's rendezvous.", ge=1, le=65535)
    config: Literal["ddp", "zero2", "zero3", "fsdp2"] = F(
        "ddp", "Engine: an accelerate config file in recipes/accelerate/. ddp: a full copy of the model per process; zero2: "
        "DeepSpeed ZeRO-2 (optimizer states and gradients sharded); zero3: ZeRO-3 (weights sharded too); fsdp2: PyTorch FSDP2 "
        "(weights sharded). zero2/zero3 need `pip install deepspeed`; zero2, zero3 and fsdp2 need CUDA.")
    gpus: list[int] | None = F(None, "GPU indices of this machine the training processes use (accelerate's --gpu_ids), "
                               "num_processes / num_machines of them. None: all, minus vllm_server.gpus when it is enabled.")
    vllm_server: VLLMServerParams = F(VLLMServerParams(), "A `trl vllm-serve` rollout server started around the grpo stage.")

    @model_validator(mode="after")
    def _layout(self) -> "LaunchParams":
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank ({self.machine_rank}) must be below num_machines ({self.num_machines})")
        if self.num_processes % self.num_machines:
            raise ValueError(f"num_processes ({self.num_processes}) must be a multiple of num_machines ({self.num_machines}): "
                             "every machine runs the same number of processes")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError(f"num_machines is {self.num_machines}: set main_process_ip to machine 0's address")
        if self.gpus is not None and len(self.gpus) != self.num_processes // self.num_machines:
            raise ValueError(f"gpus {self.gpus} must name num_processes / num_machines = "
                             f"{self.num_processes // self.num_machines} GPUs, one per process")
        if self.vllm_server.enabled and set(self.gpus or []) & set(self.vllm_server.gpus):
            raise ValueError(f"gpus {self.gpus} and vllm_server.gpus {self.vllm_server.gpus} overlap: training and the "
                             "rollout server need GPUs of their own")
        return self

    @property
    def one_process(self) -> bool:
        """One DDP process in all: nothing for accelerate to launch (it may still be pinned to a GPU)."""
        return self.num_processes == 1 and self.num_machines == 1 and self.config == "ddp"

    @property
    def plain(self) -> bool:
        """Nothing asked of accelerate: the stage runs as one plain process."""
        return self.one_process and self.gpus is None and not self.vllm_server.enabled


class Params(Section):
    project: ProjectParams = F(ProjectParams(), "Names, seed and answer format shared by all stages.")
    prepare: PrepareParams = F(PrepareParams(), "Stage prepare: data source and cleaning.")
    model: ModelParams = F(ModelParams(), "Stage base_model and model loading for all training stages.")
    sft: SFTParams = F(SFTParams(), "Stage sft: format priming.")
    grpo: GRPOParams = F(GRPOParams(), "Stage grpo.")
    evaluate: EvaluateParams = F(EvaluateParams(), "Stage evaluate: GSM8K with lm-eval.")
    merge: MergeParams = F(MergeParams(), "Stage merge.")
    gguf: GGUFParams = F(GGUFParams(), "Stage gguf.")
    registry: RegistryParams = F(RegistryParams(), "Stage register: MLflow model registry and promotion gate.")
    publish: PublishParams = F(PublishParams(), "Stage publish: opt-in push of the models and cards to the Hugging Face Hub.")
    flow: FlowParams = F(FlowParams(), "Prefect orchestration.")
    launch: LaunchParams = F(LaunchParams(), "How sft and grpo are launched: processes, machines, engine, rollout server.")

    @model_validator(mode="after")
    def _cross(self) -> "Params":
        g, m = self.grpo, self.model
        if g.max_prompt_length + g.max_completion_length > m.max_seq_length:
            raise ValueError(
                f"grpo.max_prompt_length + grpo.max_completion_length = "
                f"{g.max_prompt_length + g.max_completion_length} exceeds model.max_seq_length = {m.max_seq_length}")
        if m.name_or_path == "tiny" and m.load_in_4bit:
            raise ValueError("model.load_in_4bit is not supported for the tiny model (bitsandbytes needs CUDA and a real checkpoint)")
        if self.launch.vllm_server.enabled and (g.vllm_mode != "server" or m.generation == "transformers"):
            raise ValueError(f"launch.vllm_server.enabled starts a rollout server, but grpo.vllm_mode is {g.vllm_mode!r} and "
                             f"model.generation is {m.generation!r}: set grpo.vllm_mode: server (and model.generation: vllm or auto)")
        if self.launch.config == "fsdp2":
            # seen on 2x H200: bitsandbytes' 8-bit update gets FSDP2's sharded DTensors and raises at the first optimizer step
            optimizers = {**({"sft": self.sft.optim} if self.sft.enabled else {}), "grpo": g.optim}
            eight_bit = [f"{name}.optim is {optim!r}" for name, optim in optimizers.items() if "8bit" in optim]
            if eight_bit:
                raise ValueError(f"launch.config fsdp2 shards the weights, and bitsandbytes' 8-bit optimizers cannot update "
                                 f"sharded tensors; {', '.join(eight_bit)}: use adamw_torch or adamw_torch_fused")
        return self


# --------------------------------------------------------------------------- loading
def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The section class a key path leads to (list indices skipped); None if it leads to no section."""
    model: type[BaseModel] = Params
    for key in loc:
        if isinstance(key, int):
            continue
        field = model.model_fields.get(key)
        if field is None:
            return None
        inner = [t for t in (field.annotation, *get_args(field.annotation))
                 if get_origin(t) is None and isinstance(t, type) and issubclass(t, BaseModel)]
        if not inner:
            return None
        model = inner[0]
    return model


def _unknown_key_hint(loc: tuple) -> str:
    """'did you mean ...' for a misspelt key, else the keys its section allows."""
    section = _section_at(loc[:-1])
    if section is None:
        return "see stages/common/params.py for the allowed keys"
    allowed = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    return f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key; {_unknown_key_hint(e['loc'])}")
            continue
        value = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        # A whole section failing a cross-field rule: the message itself names the keys and values.
        shown = "" if isinstance(value, dict) else f"got {value!r}; "
        lines.append(f"{path or '<top level>'}: {shown}{msg}")
    return "invalid params:\n  " + "\n  ".join(lines)


def validate(raw: Any, origin: str = "params") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{origin}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(f"{origin}: " + _format_errors(err)) from None


def read_yaml(path: Path) -> Any:
    try:
        return load_yaml(Path(path).read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None


def apply_overrides(raw: dict, overrides: dict[str, Any] | None) -> dict:
    """Apply dotted-key overrides (`{"grpo.beta": 0.04}`) to a raw params mapping, in a copy."""
    import copy

    out = copy.deepcopy(raw or {})
    if overrides and not isinstance(out, dict):
        raise ParamsError(f"cannot apply overrides: the top level must be a mapping of sections, got {type(out).__name__}")
    for dotted, value in (overrides or {}).items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {dotted}: {key} is not a section")
        node[leaf] = value
    return out


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """['grpo.beta=0.04', 'evaluate.models=[base]'] -> {'grpo.beta': 0.04, ...}; values are YAML, as in `dvc exp run -S`."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"override {pair!r}: expected key.path=value, e.g. grpo.beta=0.04")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def load_params(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Params:
    """Read, override and validate params.yaml (default: the project's)."""
    path = Path(path) if path else PARAMS_FILE
    raw = apply_overrides(read_yaml(path), overrides)
    return validate(raw, origin=str(path))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_runtime(params: Params) -> None:
    """Fail fast on settings this machine cannot run: CUDA-only options, hub ids while offline.

    Called by each stage before loading anything heavy.
    """
    import importlib.util

    tiny_hint = "Use the tiny CPU profile instead: python -m stages.preset tiny"
    needs_cuda = params.model.load_in_4bit or params.merge.merged_4bit or params.model.backend == "unsloth"
    # torch is imported only to answer a question that matters (1.5-2 s of a CPU process's start:
    # the flow and `python -m stages.check` need no torch otherwise).
    if needs_cuda and not (importlib.util.find_spec("torch") is not None and _cuda_available()):
        if params.model.load_in_4bit:
            raise ParamsError(f"model.load_in_4bit: got True; 4-bit loading needs CUDA and this machine has none. {tiny_hint}")
        if params.merge.merged_4bit:
            raise ParamsError(f"merge.merged_4bit: got True; bitsandbytes 4-bit needs CUDA and this machine has none. {tiny_hint}")
        if params.model.backend == "unsloth":
            raise ParamsError(f"model.backend: got 'unsloth'; Unsloth needs CUDA and this machine has none. {tiny_hint}")
    name = params.model.name_or_path
    if name != "tiny" and not Path(name).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ParamsError(
            f"model.name_or_path: got {name!r}; it is a hub id but HF_HUB_OFFLINE=1 (no hub access here). {tiny_hint}")
