"""GRPO with vLLM rollouts on the trl backend, full fine-tuning (no LoRA), KL monitor on (tests/gpu/grpo_vllm.py)."""
import pytest
import torch

from tests.gpu.grpo_vllm import train_and_check

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (tests/gpu/run.sh)")]


def test_grpo_trl_vllm_full_fine_tuning_trains_and_logs_kl(tmp_path, prepared_dir, base_dir, mlruns_dir):
    train_and_check("trl", tmp_path, prepared_dir, base_dir, lora=False)
