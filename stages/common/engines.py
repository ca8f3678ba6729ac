"""Which engines a GRPO run uses, and what is checked before anything is touched.

- engines: the backend (Unsloth or plain TRL) and the rollout engine (vLLM or transformers
  generate), with the combinations that cannot run replaced (loudly) or refused.
- preflight: runtime, engines, reward functions and a vLLM server, checked without loading a
  model (the grpo stage and stages/check.py both call it).
- import_backend: Unsloth imported first, with its Standby switch set.
- avoid_vllm_dummy_run_overflow: the vLLM model runner for a colocated engine whose warm-up would overrun.
"""
from __future__ import annotations

import os
import sys

from stages.common import models
from stages.common.params import Params, check_runtime

# Measured on the H200 (docs/benchmarks.md, sessions 3, 15, 16): with rollouts truncated by min_p, top_k or top_p
# *and* vLLM's importance-sampling correction on, Unsloth 2026.10.9 scores TRL's old-log-prob pass over the
# rollouts' kept set through a chunked scorer that torch.compile took minutes over without finishing step 1 (the
# stage: 5 of 5 runs; bench/repro_unsloth_truncated_support.py reproduces it without project code). With the
# correction off (Unsloth's own default) there is no such pass: the stage ran min_p 0.1 at 5.2 s a step.
# Plain TRL + vLLM runs truncated sampling with the correction at the plain script's speed or better.
UNSLOTH_TRUNCATED = ("Unsloth's vLLM path cannot take truncated sampling (grpo.min_p/top_k/top_p) with "
                     "grpo.vllm_importance_sampling_correction on: its kept-set scorer compiles for minutes "
                     "(docs/benchmarks.md); using plain TRL + vLLM. For Unsloth's path set "
                     "grpo.vllm_importance_sampling_correction: false (Unsloth's default), or grpo.min_p: null, "
                     "grpo.top_k: null, grpo.top_p: 1.0")


def engines(params: Params) -> tuple[tuple[str, str], tuple[str, str]]:
    """((backend, why), (generation, why)), refusing or replacing combinations that cannot run."""
    m, g = params.model, params.grpo
    backend, generation = models.choose_backend(m.backend), models.choose_generation(m.generation)
    truncated = bool(g.min_p) or bool(g.top_k) or g.top_p < 1.0
    if generation[0] == "vllm" and backend[0] == "unsloth" and truncated and g.vllm_importance_sampling_correction:
        if m.backend == "unsloth":
            print(f"grpo: WARNING: model.backend is unsloth, but {UNSLOTH_TRUNCATED}")
        backend = ("trl", ("fallback: " if m.backend == "unsloth" else "auto: ") + UNSLOTH_TRUNCATED)
    if generation[0] == "vllm" and g.vllm_mode == "server" and backend[0] == "unsloth":
        raise ValueError("grpo.vllm_mode: server needs model.backend: trl (Unsloth's vLLM is the colocated "
                         "fast_inference engine); set model.backend: trl or grpo.vllm_mode: colocate")
    return backend, generation


# TRL 1.14's trl.import_utils.LIGER_KERNEL_MIN_VERSION (tests/test_trl_args.py keeps the two in step). Not imported
# from TRL: preflight runs before Unsloth, which must be imported before trl to patch it.
LIGER_KERNEL_MIN_VERSION = "0.8.2"


def check_liger_kernel() -> None:
    """grpo.use_liger_kernel needs liger-kernel >= TRL's minimum; TRL checks only once the model is loaded,
    minutes in on a large one."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        installed = version("liger-kernel")
    except PackageNotFoundError:
        installed = None
    if installed is None or not models._installed("liger_kernel"):
        problem = "the liger-kernel package is not installed"
    elif Version(installed) < Version(LIGER_KERNEL_MIN_VERSION):
        problem = f"liger-kernel {installed} is installed, TRL needs >= {LIGER_KERNEL_MIN_VERSION}"
    else:
        return
    raise ValueError(f"grpo.use_liger_kernel is true but {problem}: "
                     f"pip install 'liger-kernel>={LIGER_KERNEL_MIN_VERSION}', or set grpo.use_liger_kernel: false")


def preflight(params: Params):
    """Everything the run needs that can be checked without loading a model: runtime, engines,
    reward functions (names, custom imports, options), a vLLM server. Returns the reward specs built."""
    from stages.common.rewards import build_reward_funcs

    check_runtime(params)
    g = params.grpo
    (backend, _), (generation, _) = engines(params)
    rewards = build_reward_funcs(g.rewards, params.project.answer_format.build(), g.on_reward_error,
                                 max_completion_length=g.max_completion_length,
                                 max_error_fraction=g.max_reward_error_fraction)
    if g.use_liger_kernel:
        check_liger_kernel()
    if generation == "vllm" and g.vllm_mode == "server":
        from stages.common.vllm_server import base_url, check_health

        check_health(base_url(g), g.vllm_server_timeout)
    return rewards


def import_backend(backend: str, generation: str, standby: bool) -> None:
    """Unsloth must be imported before transformers/peft/trl, with its Standby switch already set."""
    if backend != "unsloth":
        return
    wanted = "1" if generation == "vllm" and standby else "0"
    if "unsloth" in sys.modules and os.environ.get("UNSLOTH_VLLM_STANDBY", "0") != wanted:
        print(f"grpo: warning: unsloth was imported before the stage; UNSLOTH_VLLM_STANDBY={wanted} may not take effect")
    os.environ["UNSLOTH_VLLM_STANDBY"] = wanted
    import unsloth  # noqa: F401


# TRL 1.14 starts its colocated engine with max_num_batched_tokens=4096 and max_num_seqs = the rollouts of
# one generation batch. vLLM 0.26's V2 model runner warms up on 4096 tokens split over max_num_seqs dummy
# requests without capping each at max_model_len; when 4096 / max_num_seqs > max_model_len the dummy
# requests overrun their KV block tables: CUDA illegal memory access in FlashAttention at engine start
# (bench/repro_trl_vllm_tiny.py reproduces it without TRL; the V1 runner, or max_num_seqs 64, runs).
TRL_VLLM_BATCHED_TOKENS = 4096


def avoid_vllm_dummy_run_overflow(max_num_seqs: int, max_model_len: int) -> bool:
    """Select vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0) when TRL's colocated engine would crash
    in its warm-up; True when it did. A user's own VLLM_USE_V2_MODEL_RUNNER is left alone."""
    if -(-TRL_VLLM_BATCHED_TOKENS // max_num_seqs) <= max_model_len or "VLLM_USE_V2_MODEL_RUNNER" in os.environ:
        return False
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    print(f"grpo: vLLM's V1 model runner: {max_num_seqs} rollouts per generation batch x {max_model_len} tokens is "
          f"under TRL's {TRL_VLLM_BATCHED_TOKENS} warm-up tokens, which crash vLLM 0.26's V2 runner "
          "(bench/repro_trl_vllm_tiny.py)")
    return True
