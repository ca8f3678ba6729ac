"""The params loader (stages/common/params.py) and presets (stages/preset.py).

Malformed files must fail at load time with a ParamsError naming the key path and the bad
value (or what is allowed); every shipped preset must validate and survive a render/load
round trip; the typed defaults are the GPU recipe.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from stages.common.params import ROOT, Params, ParamsError, apply_overrides, check_runtime, load_params
from stages.preset import available, render, resolve


def _write(tmp_path: Path, text: str) -> Path:
    file = tmp_path / "params.yaml"
    file.write_text(text)
    return file


def _yaml(data: object) -> str:
    return yaml.safe_dump(data, sort_keys=False)


# Each row: id, file text, phrases the error message must contain (key path, bad value or what is allowed).
MALFORMED = [
    ("unknown top-level key", _yaml({"trainer": {"lr": 1}}), ["trainer", "unknown key", "grpo"]),
    ("unknown nested key (typo)", _yaml({"grpo": {"num_generation": 8}}), ["grpo.num_generation", "num_generations"]),
    ("unknown key in a list item", _yaml({"grpo": {"rewards": [{"name": "format_exact", "wieght": 2}]}}),
     ["grpo.rewards.0.wieght", "'weight'"]),
    ("string for int", _yaml({"grpo": {"max_steps": "ten"}}), ["grpo.max_steps", "'ten'", "integer"]),
    ("list for float", _yaml({"grpo": {"learning_rate": [1e-5, 2e-5]}}), ["grpo.learning_rate", "[1e-05, 2e-05]", "number"]),
    ("float for int", _yaml({"project": {"seed": 1.5}}), ["project.seed", "1.5"]),
    ("string for bool", _yaml({"model": {"load_in_4bit": "maybe"}}), ["model.load_in_4bit", "'maybe'", "boolean"]),
    ("scalar for a section", _yaml({"grpo": "fast"}), ["grpo", "'fast'", "dictionary"]),
    ("invalid enum value", _yaml({"grpo": {"loss_type": "foo"}}), ["grpo.loss_type", "'foo'", "'grpo'", "'dapo'"]),
    ("invalid enum in a list", _yaml({"prepare": {"synthetic": {"operations": ["/"]}}}),
     ["prepare.synthetic.operations.0", "'/'", "'+'"]),
    ("num_generations < 2", _yaml({"grpo": {"num_generations": 1}}), ["grpo.num_generations", "got 1", "greater than or equal to 2"]),
    ("generation batch not divisible", _yaml({"grpo": {"num_generations": 3, "per_device_train_batch_size": 4}}),
     ["grpo", "4 completions", "divisible by num_generations (3)"]),
    ("explicit generation batch not divisible", _yaml({"grpo": {"num_generations": 4, "generation_batch_size": 6}}),
     ["grpo", "6 completions", "divisible by num_generations (4)"]),
    ("generation_batch_size and steps_per_generation", _yaml({"grpo": {"generation_batch_size": 8, "steps_per_generation": 2}}),
     ["grpo", "generation_batch_size (8)", "steps_per_generation (2)", "only one"]),
    ("prompt + completion > max_seq_length",
     _yaml({"model": {"max_seq_length": 1024}, "grpo": {"max_prompt_length": 256, "max_completion_length": 1024}}),
     ["grpo.max_prompt_length", "grpo.max_completion_length", "1280", "model.max_seq_length = 1024"]),
    ("min_operand > max_operand", _yaml({"prepare": {"synthetic": {"min_operand": 50, "max_operand": 10}}}),
     ["prepare.synthetic", "min_operand (50)", "max_operand (10)"]),
    ("tiny model with 4-bit", _yaml({"model": {"name_or_path": "tiny", "load_in_4bit": True}}),
     ["model.load_in_4bit", "tiny"]),
    ("top level is a list", "- grpo\n- sft\n", ["top level must be a mapping", "list"]),
    ("top level is a string", "just text\n", ["top level must be a mapping", "str"]),
    ("invalid YAML", "grpo:\n  beta: [0.1\n", ["params.yaml", "not valid YAML"]),
]


@pytest.mark.parametrize("text, phrases", [pytest.param(t, p, id=i) for i, t, p in MALFORMED])
def test_malformed_params_fail_with_key_path_and_value(tmp_path, text, phrases):
    file = _write(tmp_path, text)
    with pytest.raises(ParamsError) as info:
        load_params(file)
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in error message:\n{message}"


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "params.yaml"
    with pytest.raises(ParamsError, match="file not found") as info:
        load_params(missing)
    assert str(missing) in str(info.value)


def test_every_error_is_reported_at_once(tmp_path):
    file = _write(tmp_path, _yaml({"grpo": {"beta": "high", "top_p": 2}, "sft": {"optim": "adam"}}))
    with pytest.raises(ParamsError) as info:
        load_params(file)
    for path in ("grpo.beta", "grpo.top_p", "sft.optim"):
        assert path in str(info.value)


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_params(_write(tmp_path, "")) == Params()


# ---------------------------------------------------------------------------- check_runtime
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA path")
@pytest.mark.parametrize("section, key", [("model", "load_in_4bit"), ("merge", "merged_4bit")])
def test_cuda_only_options_fail_without_cuda(tmp_path, section, key):
    # A local folder as the model, so only the CUDA check can fire.
    params = load_params(_write(tmp_path, _yaml({"model": {"name_or_path": str(tmp_path)}, section: {key: True}})))
    with pytest.raises(ParamsError) as info:
        check_runtime(params)
    assert f"{section}.{key}: got True" in str(info.value)
    assert "CUDA" in str(info.value)
    assert "python -m stages.preset tiny" in str(info.value)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA path")
def test_unsloth_backend_fails_without_cuda(tmp_path):
    params = load_params(_write(tmp_path, _yaml({"model": {"name_or_path": str(tmp_path), "backend": "unsloth"}})))
    with pytest.raises(ParamsError, match="model.backend: got 'unsloth'"):
        check_runtime(params)


def test_hub_id_while_offline_points_at_the_tiny_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = load_params(_write(tmp_path, _yaml({"model": {"name_or_path": "unsloth/Qwen3-1.7B-Base"}})))
    with pytest.raises(ParamsError) as info:
        check_runtime(params)
    message = str(info.value)
    assert "model.name_or_path" in message and "'unsloth/Qwen3-1.7B-Base'" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert "python -m stages.preset tiny" in message


def test_runtime_accepts_the_tiny_profile_and_local_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_runtime(resolve("tiny"))
    check_runtime(load_params(_write(tmp_path, _yaml({"model": {"name_or_path": str(tmp_path)}}))))


# ---------------------------------------------------------------------------- presets
def test_there_are_presets():
    assert {"tiny", "qwen3-1.7b"} <= set(available())


@pytest.mark.parametrize("name", available())
def test_every_preset_validates_and_round_trips(tmp_path, name):
    params = resolve(name)
    file = _write(tmp_path, render(params, header=f"preset {name}"))
    assert load_params(file) == params


def test_preset_check_command_validates_all_presets():
    out = subprocess.run([sys.executable, "-m", "stages.preset", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in available():
        assert f"ok  {name}" in out.stdout


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ParamsError, match="unknown preset 'gpt5'") as info:
        resolve("gpt5")
    assert "tiny" in str(info.value)


def test_rendered_params_carry_help_text_and_round_trip(tmp_path):
    params = resolve("qwen3-1.7b")
    text = render(params)
    assert "# Completions per prompt: the group size G" in text
    assert load_params(_write(tmp_path, text)) == params


def test_render_round_trips_awkward_strings(tmp_path):
    """Strings YAML would misread unquoted (colons, comments, quotes, 'yes', 'null', unicode)."""
    raw = {
        "project": {"name": "a: b # c 'd\" ✓"},
        "prepare": {"hub_id": "null", "hub_config": "yes", "train_file": "dir/with space/train.jsonl"},
        "grpo": {"rewards": [{"name": "my.module:reward", "weight": 0.5, "options": {"tag": "no", "xs": [1, "2"], "z": None}}]},
    }
    params = load_params(_write(tmp_path, _yaml(raw)))
    again = load_params(_write(tmp_path, render(params)))
    assert again == params
    assert again.prepare.hub_id == "null" and again.prepare.hub_config == "yes"


def test_the_project_params_yaml_is_valid():
    load_params(ROOT / "params.yaml")


# ---------------------------------------------------------------------------- defaults and schema
def test_defaults_are_the_gpu_recipe():
    p = Params()
    assert p.model.name_or_path == "unsloth/Qwen3-1.7B-Base"
    assert (p.model.lora.enabled, p.model.lora.r, p.model.lora.alpha) == (True, 32, 64)
    assert p.model.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert p.prepare.source == "gsm8k"
    assert p.grpo.num_generations >= 2 and p.grpo.beta == 0.0


def test_qwen3_preset_only_differs_from_the_defaults_in_the_chat_template():
    preset = resolve("qwen3-1.7b").model_dump()
    default = Params().model_dump()
    assert preset["model"].pop("chat_template") == "project"
    default["model"].pop("chat_template")
    assert preset == default


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        inner = [t for t in (field.annotation, *get_args(field.annotation))
                 if get_origin(t) is None and isinstance(t, type) and issubclass(t, BaseModel)]
        for sub in inner:
            yield from _fields(sub, f"{prefix}{name}.")


def test_every_field_has_a_description():
    fields = list(_fields(Params))
    assert len(fields) > 100  # the walk reached the nested sections
    missing = [path for path, field in fields if not (field.description or "").strip()]
    assert not missing, f"fields without help text: {missing}"


def test_assignment_is_validated_too():
    p = Params()
    with pytest.raises(ValueError):
        p.grpo.num_generations = "many"


# ---------------------------------------------------------------------------- overrides
def test_apply_overrides_with_dotted_keys():
    raw = {"grpo": {"beta": 0.0, "max_steps": 10}, "model": {"lora": {"r": 8}}}
    out = apply_overrides(raw, {"grpo.beta": 0.04, "model.lora.alpha": 16, "evaluate.limit": 5, "project.seed": 1})
    assert out == {"grpo": {"beta": 0.04, "max_steps": 10}, "model": {"lora": {"r": 8, "alpha": 16}},
                   "evaluate": {"limit": 5}, "project": {"seed": 1}}
    assert raw == {"grpo": {"beta": 0.0, "max_steps": 10}, "model": {"lora": {"r": 8}}}, "the input was modified"


def test_load_params_applies_and_validates_overrides(tmp_path):
    file = _write(tmp_path, _yaml({"grpo": {"beta": 0.0}}))
    assert load_params(file, {"grpo.beta": 0.04, "model.lora.r": 4}).grpo.beta == 0.04
    with pytest.raises(ParamsError, match="grpo.num_generations: got 1"):
        load_params(file, {"grpo.num_generations": 1})
    with pytest.raises(ParamsError, match="grpo.bta: unknown key; did you mean 'beta'"):
        load_params(file, {"grpo.bta": 0.1})


def test_override_through_a_value_is_an_error():
    with pytest.raises(ParamsError, match="override grpo.beta.x: beta is not a section"):
        apply_overrides({"grpo": {"beta": 0.0}}, {"grpo.beta.x": 1})


def test_override_on_a_non_mapping_file_is_a_params_error(tmp_path):
    with pytest.raises(ParamsError, match="top level must be a mapping"):
        load_params(_write(tmp_path, "- a\n"), {"grpo.beta": 0.1})
