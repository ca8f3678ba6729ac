"""params.yaml -> TRL configs, derived rather than copied field by field.

A params field whose name is a field of TRL's config is passed as is. The few that differ are
listed in CONVERTED (how they are turned into TRL's fields); the ones TRL has no field for are
listed in PROJECT_ONLY with what uses them. A field in none of these is an error, at run time
and in tests/test_trl_args.py, so a knob added to params can never be silently dropped.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from stages.common.params import GRPOParams, SFTParams

# GRPO fields TRL's GRPOConfig has no field for, and what uses them instead.
GRPO_PROJECT_ONLY = {
    "rewards": "built into reward functions; their weights become reward_weights",
    "on_reward_error": "the reward guard in stages/common/rewards.py",
    "max_reward_error_fraction": "the reward guard in stages/common/rewards.py",
    "group_prompts_by_length": "stages/common/length_groups.py (the sampler)",
    "importance_sampling_from_loss": "stages/common/on_policy_is.py (the trainer class)",
    "max_prompt_length": "TRL 1.14 has none: longer prompts are dropped by the grpo stage",
    "monitor_kl": "stages/common/monitoring.py",
    "monitor_kl_every": "stages/common/monitoring.py",
    "log_completions_every": "stages/common/monitoring.py",
    "seed": "seed and data_seed (see CONVERTED)",
    "continue_on_new_prompts": "the grpo stage's resume (stages/common/checkpoints.py)",
}
SFT_PROJECT_ONLY = {
    "enabled": "the sft stage writes skipped.json instead of training",
    "seed": "seed and data_seed (see CONVERTED)",
}

Converter = Callable[[Any, dict[str, Any]], dict[str, Any]]


def _seed(value, _ctx):
    return {"seed": value, "data_seed": value}


def _optim(value, ctx):
    from stages.common.training import optimizer

    return {"optim": optimizer(value, ctx["backend"])}


# name in params -> function(value, context) -> TRL fields.
GRPO_CONVERTED: dict[str, Converter] = {
    "seed": _seed,
    "optim": _optim,
    # transformers 5: warmup_steps takes a ratio when below 1 (warmup_ratio is deprecated).
    "warmup_ratio": lambda v, _: {"warmup_steps": v},
    "top_k": lambda v, _: {"top_k": v or 0},  # TRL: 0 disables top-k
    # Resolved here: left None, Unsloth sets 0.28 for dapo (5.0 for cispo) while TRL uses epsilon.
    "epsilon_high": lambda v, ctx: {"epsilon_high": v if v is not None else ctx["epsilon"]},
}
SFT_CONVERTED: dict[str, Converter] = {"seed": _seed, "optim": _optim}


def config_fields(config_cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls)}


def unmapped(section: type, config_cls: type, project_only: dict, converted: dict) -> list[str]:
    """Fields of a params section that reach neither the TRL config nor project code."""
    trl = config_fields(config_cls)
    return sorted(set(section.model_fields) - trl - set(project_only) - set(converted))


def translate(values: dict[str, Any], config_cls: type, project_only: dict, converted: dict,
              context: dict[str, Any]) -> dict[str, Any]:
    """TRL config kwargs for a params section dumped to `values`."""
    trl = config_fields(config_cls)
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name in converted:
            out.update(converted[name](value, {**values, **context}))
        elif name in trl:
            out[name] = value
        elif name not in project_only:
            raise RuntimeError(f"params field {name!r} reaches neither {config_cls.__name__} nor project code; "
                               "map it in stages/common/trl_args.py")
    return out


def grpo_kwargs(g: GRPOParams, config_cls: type, backend: str) -> dict[str, Any]:
    return translate(g.model_dump(), config_cls, GRPO_PROJECT_ONLY, GRPO_CONVERTED, {"backend": backend})


def sft_kwargs(s: SFTParams, config_cls: type, backend: str) -> dict[str, Any]:
    return translate(s.model_dump(), config_cls, SFT_PROJECT_ONLY, SFT_CONVERTED, {"backend": backend})
