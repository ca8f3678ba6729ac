"""GRPO with vLLM rollouts on the trl backend with TRL's chunked log-probs (grpo.use_liger_kernel, which also
puts Liger's fused kernels into the model): it trains and logs like the default path (tests/gpu/grpo_vllm.py)."""
import pytest
import torch

from tests.gpu.grpo_vllm import train_and_check

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (tests/gpu/run.sh)")]


def test_grpo_trl_vllm_chunked_logps_trains_and_logs(tmp_path, prepared_dir, base_dir, mlruns_dir):
    train_and_check("trl", tmp_path, prepared_dir, base_dir, grpo_values={"use_liger_kernel": True})
