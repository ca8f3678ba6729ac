"""Model and tokenizer builders, and the one place where the backend is chosen.

Builders take plain arguments. `choose_backend` decides Unsloth vs plain TRL and
`choose_generation` decides vLLM vs transformers generation; both return the reason, which
the stages log and write to their metrics.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

BASE_INFO = "base.json"  # written by stages/base_model.py: where the base weights live


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def keep_training_attention_off_cudnn(cuda: bool) -> bool:
    """Turn torch's cuDNN attention off for the Unsloth backend's training. cuDNN builds a plan for every
    new (batch, length) shape, ~150 ms each; Unsloth's padding-free batches split into one attention call per
    run of equal lengths, so nearly every call of every step is a new shape: session 8's 16 x 8 run on the
    H200 sat 65 s in one backward there (Unsloth turns it off itself only on SM100). Flash and
    memory-efficient attention need no plan. UNSLOTH_SDPA_TRAIN_CUDNN=1 (Unsloth's own switch) keeps it.
    Returns whether it turned it off."""
    import os

    import torch

    if not cuda or os.environ.get("UNSLOTH_SDPA_TRAIN_CUDNN", "0") == "1":
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    return True


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def choose_backend(requested: str) -> tuple[str, str]:
    """('unsloth' | 'trl', why)."""
    cuda, unsloth = has_cuda(), _installed("unsloth")
    if requested == "unsloth":
        if not (cuda and unsloth):
            raise RuntimeError(f"model.backend=unsloth needs CUDA and the unsloth package (cuda={cuda}, unsloth installed={unsloth}); "
                               "install the gpu extra on a GPU machine or set model.backend: trl")
        return "unsloth", "requested"
    if requested == "trl":
        return "trl", "requested"
    if cuda and unsloth:
        return "unsloth", "auto: CUDA and unsloth are available"
    return "trl", f"auto: {'no CUDA' if not cuda else 'unsloth not installed'}, using plain TRL + transformers + peft"


def choose_generation(requested: str) -> tuple[str, str]:
    """('vllm' | 'transformers', why)."""
    cuda, vllm = has_cuda(), _installed("vllm")
    if requested == "vllm":
        if not (cuda and vllm):
            raise RuntimeError(f"model.generation=vllm needs CUDA and vllm (cuda={cuda}, vllm installed={vllm}); set model.generation: transformers")
        return "vllm", "requested"
    if requested == "transformers":
        return "transformers", "requested"
    if cuda and vllm:
        return "vllm", "auto: CUDA and vllm are available"
    return "transformers", f"auto: {'no CUDA' if not cuda else 'vllm not installed'}, using transformers generate"


def torch_dtype(name: str):
    """torch dtype for a params dtype name; auto: bf16 on capable GPUs, fp32 on CPU."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def base_info(base_dir: Path) -> dict[str, Any]:
    """What the base_model stage resolved: {'model': path-or-hub-id, 'revision': ..., 'tokenizer': path}."""
    file = Path(base_dir) / BASE_INFO
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: run the base_model stage first (dvc repro base_model)")
    info = json.loads(file.read_text())
    for key in ("model", "tokenizer"):
        if info.get(key) and not str(info[key]).startswith(("hub:",)):
            candidate = Path(base_dir) / info[key]
            if candidate.exists():
                info[key] = str(candidate)
    return info


def load_tokenizer(path: str | Path, **kw: Any):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_chat_tokenizer(path: str | Path):
    """A tokenizer for rendering chat templates: the fast tokenizer straight from tokenizer.json when the
    folder has one, since importing AutoTokenizer pulls in transformers' model registry (about 4 s of a
    2-core machine, most of the model_card stage); else load_tokenizer."""
    if not (Path(path) / "tokenizer.json").exists():
        return load_tokenizer(path)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def save_tokenizer(tokenizer, out: Path, sources: list[Path]) -> None:
    """save_pretrained, plus `tokenizer.model` copied from the first of `sources` holding one:
    transformers 5 no longer writes it, and llama.cpp's converter (among others) reads it."""
    tokenizer.save_pretrained(str(out))
    if (Path(out) / "tokenizer.model").exists():
        return
    for folder in sources:
        if (Path(folder) / "tokenizer.model").exists():
            shutil.copy(Path(folder) / "tokenizer.model", Path(out) / "tokenizer.model")
            return


def load_causal_lm(name_or_path: str | Path, dtype: str = "auto", revision: str | None = None,
                   trust_remote_code: bool = False, device_map: Any = None):
    """A plain transformers causal LM (the trl backend, evaluation, merging)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(name_or_path), dtype=torch_dtype(dtype), revision=revision,
        trust_remote_code=trust_remote_code, device_map=device_map)


def load_base_model(base_dir: Path, dtype: str = "auto", trust_remote_code: bool = False):
    info = base_info(base_dir)
    return load_causal_lm(info["model"], dtype=dtype, revision=info.get("revision"), trust_remote_code=trust_remote_code)


def load_with_adapter(base_dir: Path, adapter_dir: Path | None, dtype: str = "auto", trust_remote_code: bool = False):
    """Base model with a LoRA adapter attached (or a full fine-tuned model folder), eval mode."""
    adapter_dir = Path(adapter_dir) if adapter_dir else None
    if adapter_dir and (adapter_dir / "adapter_config.json").exists():
        from peft import PeftModel

        base = load_base_model(base_dir, dtype, trust_remote_code)
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    if adapter_dir and (adapter_dir / "config.json").exists():
        return load_causal_lm(adapter_dir, dtype=dtype, trust_remote_code=trust_remote_code).eval()
    return load_base_model(base_dir, dtype, trust_remote_code).eval()
