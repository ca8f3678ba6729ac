"""Every params field reaches TRL or is listed as project-only (stages/common/trl_args.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from stages.common import trl_args
from stages.common.params import GRPOParams, SFTParams
from tests.conftest import tiny


def test_every_grpo_field_is_mapped():
    from trl import GRPOConfig

    assert trl_args.unmapped(GRPOParams, GRPOConfig, trl_args.GRPO_PROJECT_ONLY, trl_args.GRPO_CONVERTED) == []
    # The lists name real fields only (a stale entry would hide a dropped one).
    listed = set(trl_args.GRPO_PROJECT_ONLY) | set(trl_args.GRPO_CONVERTED)
    assert listed <= set(GRPOParams.model_fields)


def test_every_sft_field_is_mapped():
    from trl import SFTConfig

    assert trl_args.unmapped(SFTParams, SFTConfig, trl_args.SFT_PROJECT_ONLY, trl_args.SFT_CONVERTED) == []
    assert set(trl_args.SFT_PROJECT_ONLY) | set(trl_args.SFT_CONVERTED) <= set(SFTParams.model_fields)


def test_values_arrive_in_the_config():
    from trl import GRPOConfig

    g = tiny({"grpo": {"vllm_importance_sampling_mode": "token_truncate", "epsilon_high": None, "epsilon": 0.25,
                       "top_k": None, "beta": 0.04, "vllm_max_model_length": 640, "seed": 11,
                       "gradient_checkpointing": False, "use_liger_kernel": True}}).grpo
    kwargs = trl_args.grpo_kwargs(g, GRPOConfig, backend="trl")
    assert kwargs["vllm_importance_sampling_mode"] == "token_truncate" and kwargs["beta"] == 0.04
    assert kwargs["epsilon_high"] == 0.25 and kwargs["top_k"] == 0
    assert kwargs["seed"] == kwargs["data_seed"] == 11 and kwargs["vllm_max_model_length"] == 640
    assert "rewards" not in kwargs and "monitor_kl" not in kwargs
    config = GRPOConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to="none", **kwargs)
    assert config.vllm_importance_sampling_mode == "token_truncate"
    assert config.gradient_checkpointing is False  # TRL's default is True
    assert config.use_liger_kernel is True


def test_chunked_logps_without_liger_kernel_fail_before_any_model_loads():
    """TRL needs the liger-kernel package for its chunked log-probs but checks only in the trainer,
    after the model is loaded; the stage's preflight says so first. (The CPU environment has no
    liger-kernel; where it is installed the check passes and this test is skipped.)"""
    from stages.common import models
    from stages.common.engines import preflight

    if models._installed("liger_kernel"):
        pytest.skip("liger-kernel is installed here")
    preflight(tiny({"grpo": {"use_liger_kernel": False}}))  # the default passes
    with pytest.raises(ValueError, match="grpo.use_liger_kernel is true but the liger-kernel package"):
        preflight(tiny({"grpo": {"use_liger_kernel": True}}))


def _installed_package(root: Path, name: str, dist: str, version: str) -> None:
    """A package directory and its dist-info under root: what pip leaves, found by find_spec and importlib.metadata."""
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("")
    info = root / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")


@pytest.mark.parametrize("version, problem", [("0.8.1", "liger-kernel 0.8.1 is installed, TRL needs >= 0.8.2"),
                                              ("0.8.5", None)])
def test_liger_kernel_older_than_trls_minimum_fails_in_preflight(tmp_path, monkeypatch, version, problem):
    from stages.common import models
    from stages.common.engines import check_liger_kernel

    if models._installed("liger_kernel"):
        pytest.skip("a real liger-kernel is installed here")
    _installed_package(tmp_path, "liger_kernel", "liger-kernel", version)
    monkeypatch.syspath_prepend(str(tmp_path))
    if problem is None:
        check_liger_kernel()
    else:
        with pytest.raises(ValueError, match=problem):
            check_liger_kernel()


def test_liger_minimum_is_trls():
    from trl.import_utils import LIGER_KERNEL_MIN_VERSION

    from stages.common.engines import LIGER_KERNEL_MIN_VERSION as ours

    assert ours == LIGER_KERNEL_MIN_VERSION


def test_a_field_nobody_maps_fails_loudly():
    from trl import GRPOConfig

    with pytest.raises(RuntimeError, match="reaches neither GRPOConfig nor project code"):
        trl_args.translate({"no_such_knob": 1}, GRPOConfig, {}, {}, {})


@pytest.mark.parametrize("generation, mode, expected", [
    ("vllm", "colocate", {"detokenize": False, "flat_logprobs": True}),
    ("vllm", "server", None),          # `trl vllm-serve` builds its own SamplingParams
    ("transformers", "colocate", None),  # GenerationConfig has no such fields
])
def test_colocated_vllm_makes_no_text(tmp_path, generation, mode, expected):
    from stages.grpo import grpo_config

    params = tiny({"grpo": {"vllm_mode": mode}})
    config = grpo_config(params, "trl", generation, tmp_path, [1.0])
    assert (config.generation_kwargs or None) == expected
