"""SFT on the Unsloth backend, then the merge stage on a GPU: Unsloth's merged 16-bit save with
the merge check, and the bitsandbytes 4-bit copy with its measured distance from the 16-bit model.
Run with tests/gpu/run.sh."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (tests/gpu/run.sh)")]

RUN = {"model": {"dtype": "bfloat16", "backend": "unsloth", "lora": {"enabled": True, "r": 16, "alpha": 32},
                 "max_seq_length": 384},
       "sft": {"max_steps": 5, "per_device_train_batch_size": 8, "learning_rate": 5e-3, "optim": "adamw_8bit"},
       "merge": {"merged_4bit": True, "atol": 0.25}}


def test_unsloth_sft_then_gpu_merge_16_and_4_bit(tmp_path, prepared_dir, base_dir):
    import math

    from safetensors.torch import load_file

    from stages import merge, sft

    params = tiny(RUN)
    metrics = sft.run(params, prepared_dir / "sft.parquet", base_dir, tmp_path / "sft")
    assert metrics["backend"] == "unsloth" and metrics["steps"] == 5 and math.isfinite(metrics["final_loss"])
    adapter = load_file(tmp_path / "sft" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.float().abs().sum() > 0 for k, v in adapter.items()), "SFT did not train the adapter"

    out = tmp_path / "merged"
    result = merge.run(params, base_dir, tmp_path / "sft", prepared_dir / "eval.parquet", out)
    assert result["backend"] == "unsloth"
    assert result["check"]["passed"], result["check"]
    assert (out / "config.json").exists() and result["bytes"] > 0
    assert result["bytes_4bit"] > 0 and (out / merge.FOUR_BIT_DIR / "config.json").exists()
    four = result["check_4bit"]
    # NF4 moves logits; it must still be the same model, not noise.
    assert four["logit_correlation_min"] > 0.9 and four["top1_agreement"] > 0.5, four
