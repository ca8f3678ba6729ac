"""GRPO with vLLM rollouts on the unsloth backend (tests/gpu/grpo_vllm.py says what is checked)."""
import pytest
import torch

from tests.gpu.grpo_vllm import train_and_check

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (tests/gpu/run.sh)")]


def test_grpo_unsloth_vllm_trains_and_logs(tmp_path, prepared_dir, base_dir, mlruns_dir):
    train_and_check("unsloth", tmp_path, prepared_dir, base_dir)
