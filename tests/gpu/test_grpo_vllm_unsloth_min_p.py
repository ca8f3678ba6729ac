"""GRPO on Unsloth + vLLM with min_p rollouts and vLLM's importance-sampling correction off: the one way the
stage keeps Unsloth's fast_inference with truncated sampling (stages/common/engines.py says why the correction
must be off). tests/gpu/grpo_vllm.py says what is checked; here also that the stage did not fall back to TRL."""
import pytest
import torch

from tests.gpu.grpo_vllm import train_and_check

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (tests/gpu/run.sh)")]


def test_grpo_unsloth_vllm_min_p_without_the_correction_trains(tmp_path, prepared_dir, base_dir, mlruns_dir):
    train_and_check("unsloth", tmp_path, prepared_dir, base_dir,
                    grpo_values={"min_p": 0.1, "vllm_importance_sampling_correction": False})
