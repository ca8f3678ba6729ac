"""Evaluation through lm-eval's vLLM backend (the GPU path) against its HF backend (the CPU path)
on the same model and questions: greedy completions must be the same, and where they part, the
HF model's top two logits at the first differing token must be a near-tie (bf16 kernels differ
between the engines, so a near-tie can flip; anything else would be a real difference).
Run with tests/gpu/run.sh."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (tests/gpu/run.sh)")]

NEAR_TIE = 0.25  # logits; bf16 resolution at |logit| ~ 4 is ~0.03, kernels add a few of those
PARAMS = {"model": {"dtype": "bfloat16", "gpu_memory_utilization": 0.15, "max_seq_length": 256},
          "evaluate": {"limit": 24, "max_new_tokens": 24}}


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def test_vllm_backend_agrees_with_hf(tmp_path, prepared_dir, base_dir):
    from stages import evaluate
    from stages.common import models

    spec = evaluate.resolve_model("base", base_dir, None)
    runs = {}
    for backend in ("vllm", "hf"):
        params = tiny({**PARAMS, "evaluate": {**PARAMS["evaluate"], "backend": backend}})
        runs[backend] = evaluate.evaluate_model(params, spec, prepared_dir / "eval.parquet", tmp_path / backend)
        assert runs[backend].backend == backend
    fast, ref = runs["vllm"].records, runs["hf"].records
    assert len(fast) == len(ref) == 24

    tokenizer = models.load_tokenizer(spec.tokenizer)
    model = models.load_causal_lm(spec.pretrained, dtype="bfloat16", device_map="cuda").eval()
    fmt = tiny().project.answer_format.build()
    same, explained = 0, []
    for f, r in zip(fast, ref):
        a = tokenizer(f["completion"], add_special_tokens=False).input_ids
        b = tokenizer(r["completion"], add_special_tokens=False).input_ids
        at = first_difference(a, b)
        if at is None:
            same += 1
            continue
        prompt = tokenizer.apply_chat_template(fmt.messages(r["question"]), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False).input_ids + b[:at]
        with torch.no_grad():
            logits = model(torch.tensor([ids], device="cuda")).logits[0, -1].float()
        top = logits.topk(2).values
        explained.append(float(top[0] - top[1]))
    assert all(gap <= NEAR_TIE for gap in explained), f"differences not explained by near-ties: gaps {explained}"
    print(f"vLLM vs HF greedy: {same}/{len(ref)} identical; differing ones part at near-ties (gaps {explained})")
