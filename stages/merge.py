"""Stage `merge`: fold the GRPO adapter into the base weights and save a 16-bit HF model.

    python -m stages.merge            # reads params.yaml: project, model, merge

The merged folder is a plain Hugging Face model (safetensors, config, generation config,
tokenizer files, chat template): what the gguf stage converts and the registry stores.
transformers 5 leaves out what llama.cpp's converter reads, so `tokenizer.model` is copied
from the base and `added_tokens_decoder`, `add_bos_token` and `add_eos_token` are written
back into tokenizer_config.json. Merging is Unsloth's `save_pretrained_merged` on the GPU
path (it also dequantizes a QLoRA base) and peft's `merge_and_unload` otherwise; a GRPO
output that is already a full model (full fine-tuning) is simply re-saved in 16 bits.

The check: for `merge.check_prompts` chat-templated eval questions, base + adapter continues
greedily for up to `merge.check_tokens` tokens, stopping at EOS as it would in use; along that
continuation (teacher-forced) the saved merged model must choose the token base + adapter's own
logits choose at every position (a near-tie excepted), and each of its logits must lie within
`merge.atol + merge.rtol x |reference logit|` (16-bit storage rounds every weight relative to its
size, so larger logits move more; the same bound defines a near-tie). Both sides are read from the same forward passes over the same tokens, so
a model that answers in fewer tokens is compared like with like (no minimum length forced on
one side). It catches a merge that silently drops the adapter. Deviation: both sides run in
float32, so the check measures the merge and the 16-bit storage, not the compute precision.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from stages.common import models, tracking
from stages.common.answer_format import AnswerFormat
from stages.common.params import Params, check_runtime, load_params
from stages.common.paths import path, write_metrics

CHECK_DTYPE = "float32"
FOUR_BIT_DIR = "bnb-4bit"  # inside the merged folder, so the stage keeps one declared output


class MergeCheckError(RuntimeError):
    """The merged model does not reproduce base + adapter."""


# ------------------------------------------------------------------ inputs
def is_adapter(grpo_dir: Path) -> bool:
    """True for a peft LoRA folder, False for a full model folder; anything else is an error."""
    if (grpo_dir / "adapter_config.json").exists():
        return True
    if (grpo_dir / "config.json").exists():
        return False
    raise FileNotFoundError(f"{grpo_dir} holds neither a LoRA adapter (adapter_config.json) nor a full model "
                            "(config.json): run the grpo stage first (dvc repro grpo)")


def tokenizer_source(base_dir: Path, grpo_dir: Path) -> Path:
    """The GRPO output's tokenizer when it saved one (it may carry the chat template), else the base's."""
    if (grpo_dir / "tokenizer_config.json").exists():
        return grpo_dir
    return Path(models.base_info(base_dir)["tokenizer"])


def save_tokenizer(tokenizer, base_dir: Path, grpo_dir: Path, out: Path) -> None:
    models.save_tokenizer(tokenizer, out, [grpo_dir, Path(models.base_info(base_dir)["tokenizer"])])
    write_converter_hints(tokenizer, out / "tokenizer_config.json")


def write_converter_hints(tokenizer, config_file: Path) -> None:
    """Put back into tokenizer_config.json what transformers 5 leaves out and llama.cpp reads.

    Without `added_tokens_decoder` the converter stores SentencePiece added tokens (the answer
    tags) as normal pieces, which llama.cpp then splits into characters; without
    `add_bos_token` llama.cpp prepends BOS to SentencePiece prompts where HF does not.
    Keys the tokenizer already wrote are kept.
    """
    config = json.loads(config_file.read_text())
    config.setdefault("added_tokens_decoder", {
        str(i): {"content": t.content, "special": t.special, "lstrip": t.lstrip, "rstrip": t.rstrip,
                 "normalized": t.normalized, "single_word": t.single_word}
        for i, t in sorted(tokenizer.added_tokens_decoder.items())})
    probe = tokenizer("1").input_ids  # what the tokenizer adds around plain text on its own
    config.setdefault("add_bos_token", tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    config.setdefault("add_eos_token", tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def save_dtype(compute_dtype: str):
    """bfloat16 where training computes in it, else float16 (what llama.cpp's f16 output keeps)."""
    import torch

    return torch.bfloat16 if models.torch_dtype(compute_dtype) == torch.bfloat16 else torch.float16


# ------------------------------------------------------------------ merging
def merge_peft(base_dir: Path, grpo_dir: Path, dtype, out: Path, trust_remote_code: bool = False) -> None:
    """Merge in float32 with peft (or load a full model), cast to the 16-bit dtype, save."""
    model = models.load_with_adapter(base_dir, grpo_dir, dtype=CHECK_DTYPE, trust_remote_code=trust_remote_code)
    if is_adapter(grpo_dir):
        model = model.merge_and_unload()
    model.to(dtype).save_pretrained(str(out))


def merge_unsloth(params: Params, grpo_dir: Path, out: Path) -> None:  # pragma: no cover - needs CUDA + unsloth
    """Unsloth's merged save: loads base + adapter (a 4-bit base is dequantized) and writes 16-bit weights."""
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(grpo_dir), max_seq_length=params.model.max_seq_length, dtype=None,
        load_in_4bit=params.model.load_in_4bit)
    model.save_pretrained_merged(str(out), tokenizer, save_method="merged_16bit")


def save_4bit(merged: Path, out: Path) -> None:  # pragma: no cover - needs CUDA + bitsandbytes
    """A bitsandbytes NF4 copy of the merged model, for GPU serving without a 16-bit footprint."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not models.has_cuda():
        raise RuntimeError("merge.merged_4bit needs CUDA (bitsandbytes); set merge.merged_4bit: false")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(merged), quantization_config=quant, device_map="auto")
    model.save_pretrained(str(out))


def check_4bit(merged: Path, four_bit: Path, tokenizer, prompts: list[str]) -> dict[str, Any]:  # pragma: no cover - CUDA
    """How far the saved 4-bit model is from the 16-bit one it was made from, on the check prompts:
    the correlation of their next-token logits and how often their greedy tokens agree. 4-bit
    weights move logits by design, so this measures the loss (reported), it does not gate."""
    import torch

    reference = models.load_causal_lm(merged, dtype="bfloat16", device_map="cuda").eval()
    quantized = models.load_causal_lm(four_bit, dtype="bfloat16", device_map="cuda").eval()
    agree, total, correlations = 0, 0, []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to("cuda")
            a, b = reference(ids).logits[0].float(), quantized(ids).logits[0].float()
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
            correlations.append(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item())
    return {"top1_agreement": agree / total, "logit_correlation_min": min(correlations), "positions": total}


# ------------------------------------------------------------------ the check
def check_prompts(eval_file: Path, n: int, tokenizer, fmt: AnswerFormat) -> list[str]:
    """The first n eval questions, rendered with the chat template as the model sees them."""
    questions = pd.read_parquet(eval_file)["question"].head(n).tolist()
    if len(questions) < n:
        raise ValueError(f"{eval_file} has {len(questions)} questions; merge.check_prompts wants {n}")
    return [tokenizer.apply_chat_template(fmt.messages(q), tokenize=False, add_generation_prompt=True)
            for q in questions]


def _greedy(model, tokenizer, prompt: str, tokens: int):
    """(number of generated tokens, the whole sequence): up to `tokens` greedy tokens after the
    prompt, ending early at EOS as generation in use does."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    return out.shape[1] - ids.shape[1], out


def compare(reference, candidate, tokenizer, prompts: list[str], tokens: int, atol: float,
            rtol: float = 0.0) -> dict[str, Any]:
    """Both models score the reference's greedy continuation (teacher-forced), EOS included: every
    logit must lie within atol + rtol x |reference logit|, and at every position the candidate must
    choose the token the reference's logits choose there, unless the two are a tie within that
    bound (16-bit storage can flip a near-tie). The reference's choice is read from the same logits,
    not from generate(), so no generation setting can make the two sides differ."""
    import torch

    same, within, max_diff, compared, ties = True, True, 0.0, 0, 0
    for prompt in prompts:
        generated, seq = _greedy(reference, tokenizer, prompt, tokens)
        first = seq.shape[1] - generated - 1  # the position whose logits pick the first new token
        with torch.no_grad():
            ref_logits = reference(seq).logits[0, first:-1].float()
            cand_logits = candidate(seq.to(candidate.device)).logits[0, first:-1].float().to(ref_logits.device)
        diff = (ref_logits - cand_logits).abs()
        max_diff = max(max_diff, diff.max().item())
        within &= bool((diff <= atol + rtol * ref_logits.abs()).all())
        target = ref_logits.argmax(-1)[:, None].to(cand_logits.device)
        best = cand_logits.max(-1).values
        gap, tie = best - cand_logits.gather(-1, target)[:, 0], atol + rtol * best.abs()
        same &= bool((gap <= tie).all())
        ties += int(((gap > 0) & (gap <= tie)).sum())
        compared += generated
    return {"passed": bool(same and within), "tokens_equal": bool(same), "logits_within": bool(within),
            "near_ties": ties, "max_logit_diff": max_diff, "atol": atol, "rtol": rtol, "tokens_compared": compared,
            "prompts": len(prompts)}


def verify(base_dir: Path, grpo_dir: Path, merged_dir: Path, eval_file: Path, params: Params) -> dict[str, Any]:
    """Load base + adapter and the saved merged model (both float32) and compare them."""
    device = "cuda" if models.has_cuda() else "cpu"
    fmt = params.project.answer_format.build()
    tokenizer = models.load_tokenizer(merged_dir)
    trust = params.model.trust_remote_code
    reference = models.load_with_adapter(base_dir, grpo_dir, dtype=CHECK_DTYPE, trust_remote_code=trust).to(device)
    candidate = models.load_causal_lm(merged_dir, dtype=CHECK_DTYPE, trust_remote_code=trust).eval().to(device)
    prompts = check_prompts(eval_file, params.merge.check_prompts, tokenizer, fmt)
    return compare(reference, candidate, tokenizer, prompts, params.merge.check_tokens, params.merge.atol,
                   params.merge.rtol)


# ------------------------------------------------------------------ stage
def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run(params: Params, base_dir: Path, grpo_dir: Path, eval_file: Path, out: Path) -> dict[str, Any]:
    check_runtime(params)
    start = time.perf_counter()
    adapter = is_adapter(grpo_dir)
    backend, why = models.choose_backend(params.model.backend)
    backend = backend if adapter else "trl"  # a full model needs no merge, only a re-save
    print(f"merge: backend={backend} ({why}); input is {'a LoRA adapter' if adapter else 'a full model'}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    dtype = save_dtype(params.model.dtype)
    tokenizer = models.load_tokenizer(tokenizer_source(base_dir, grpo_dir))
    if backend == "unsloth":
        merge_unsloth(params, grpo_dir, out)
    else:
        merge_peft(base_dir, grpo_dir, dtype, out, params.model.trust_remote_code)
    save_tokenizer(tokenizer, base_dir, grpo_dir, out)
    merge_seconds = time.perf_counter() - start

    check = verify(base_dir, grpo_dir, out, eval_file, params)
    metrics = {
        "backend": backend, "backend_reason": why, "input": "adapter" if adapter else "full_model",
        "dtype": str(dtype).removeprefix("torch."), "check": check, "bytes": folder_bytes(out),
        "merge_seconds": round(merge_seconds, 2),
    }
    if params.merge.merged_4bit:
        save_4bit(out, out / FOUR_BIT_DIR)
        metrics["check_4bit"] = check_4bit(out, out / FOUR_BIT_DIR, models.load_tokenizer(out),
                                           check_prompts(eval_file, params.merge.check_prompts, models.load_tokenizer(out),
                                                         params.project.answer_format.build()))
        metrics["bytes_4bit"] = folder_bytes(out / FOUR_BIT_DIR)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    if not check["passed"]:
        raise MergeCheckError(
            f"the merged model in {out} does not reproduce base + adapter from {grpo_dir}: "
            f"greedy tokens equal={check['tokens_equal']}, logits within bounds={check['logits_within']}, max logit "
            f"diff {check['max_logit_diff']:.3g} (merge.atol {check['atol']}, merge.rtol {check['rtol']}). "
            "A merge that dropped the adapter looks like this.")
    return metrics


def main() -> None:
    params = load_params()
    with tracking.stage_run("merge", params):
        metrics = run(params, path("base_model"), path("grpo"), path("prepared") / "eval.parquet", path("merged"))
        tracking.log_metrics(metrics)
    write_metrics("merge", metrics)


if __name__ == "__main__":
    main()
