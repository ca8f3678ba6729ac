"""Packaging: pyproject.toml, the Dockerfile and dvc.yaml agree with the code.

The Docker image cannot be built here (no engine), so its Dockerfile is checked as text.
"""
from __future__ import annotations

import re
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from stages.common.params import ROOT, Params
from stages.common.paths import PATHS

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())

CORE = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "mlflow", "prefect", "dvc",
        "lm-eval", "gguf", "sentencepiece", "llama-cpp-python"]
GPU = ["unsloth", "unsloth_zoo", "vllm", "bitsandbytes"]


def _names(requirements: list[str]) -> dict[str, Requirement]:
    parsed = [Requirement(r) for r in requirements]
    return {canonicalize_name(r.name): r for r in parsed}


# ------------------------------------------------------------------ pyproject.toml
def test_pyproject_declares_the_core_dependencies():
    deps = _names(PYPROJECT["project"]["dependencies"])
    missing = [name for name in CORE if canonicalize_name(name) not in deps]
    assert not missing, f"core dependencies missing from pyproject.toml: {missing}"


def test_core_dependencies_are_bounded():
    """Each core dependency has a version constraint: these libraries break between minor releases."""
    deps = _names(PYPROJECT["project"]["dependencies"])
    loose = [name for name in CORE if not str(deps[canonicalize_name(name)].specifier)]
    assert not loose, f"unpinned: {loose}"


def test_gpu_extra_holds_the_cuda_only_packages():
    extras = PYPROJECT["project"]["optional-dependencies"]
    gpu = _names(extras["gpu"])
    assert [name for name in GPU if canonicalize_name(name) not in gpu] == []
    core = _names(PYPROJECT["project"]["dependencies"])
    assert not {canonicalize_name(n) for n in GPU} & set(core), "CUDA-only packages must stay out of the core install"


def test_dev_extra_has_the_test_tools():
    dev = _names(PYPROJECT["project"]["optional-dependencies"]["dev"])
    assert {"pytest", "hypothesis"} <= set(dev)


def test_pytest_markers_are_declared():
    markers = " ".join(PYPROJECT["tool"]["pytest"]["ini_options"]["markers"])
    for marker in ("slow", "gpu"):
        assert f"{marker}:" in markers


# ------------------------------------------------------------------ Dockerfile
def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_base_image_is_pinned():
    froms = [args for word, args in _instructions() if word == "FROM"]
    assert froms, "no FROM line"
    image = froms[0].split()[0]
    if "@sha256:" in image:
        return
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest", f"base image {image!r} is not pinned to a tag"
    assert re.search(r"\d+\.\d+", tag), f"base image tag {tag!r} carries no version"


def test_dockerfile_installs_the_project_with_the_gpu_extra():
    runs = [args for word, args in _instructions() if word == "RUN"]
    installs = [r for r in runs if re.search(r"pip\s+install", r)]
    assert any(re.search(r"""["']?\.\[(?:[\w-]+,)*gpu(?:,[\w-]+)*\]["']?""", r) for r in installs), installs


def test_dockerfile_base_torch_matches_the_pins():
    """The base image's torch must satisfy the project's torch range (else pip pulls another build)."""
    image = next(args for word, args in _instructions() if word == "FROM").split()[0]
    match = re.search(r"pytorch:(\d+\.\d+\.\d+)", image)
    if not match:
        pytest.skip(f"base image {image} is not a pytorch/pytorch image")
    torch = _names(PYPROJECT["project"]["dependencies"])["torch"]
    assert torch.specifier.contains(match.group(1)), f"torch {match.group(1)} outside {torch.specifier}"
    gpu_torch = _names(PYPROJECT["project"]["optional-dependencies"]["gpu"])["torch"]
    assert gpu_torch.specifier.contains(match.group(1)), f"the image's torch {match.group(1)} is not the gpu extra's {gpu_torch}"


def _recorded_gpu_environment() -> dict[str, str]:
    """Package versions of the last GPU run (bench/gpu_env.sh writes machine.txt on the H200)."""
    text = (ROOT / "bench" / "results" / "session3" / "machine.txt").read_text()
    found = dict(line.split()[:2] for line in text.splitlines() if len(line.split()) >= 2 and not line.startswith("name"))
    found["torch"] = found["torch"].split("+")[0]
    found["cuda"] = re.search(r"^torch \S+ cuda (\d+\.\d+)", text, re.M).group(1)
    return found


def test_gpu_extra_dockerfile_and_benchmark_environment_agree():
    """The `gpu` extra pins exactly what ran on the H200, and the Dockerfile's base carries that torch."""
    ran = _recorded_gpu_environment()
    pins = {**_names(PYPROJECT["project"]["dependencies"]), **_names(PYPROJECT["project"]["optional-dependencies"]["gpu"])}
    for name in ("vllm", "unsloth", "unsloth_zoo", "trl", "transformers", "torch", "bitsandbytes", "datasets", "accelerate"):
        assert pins[canonicalize_name(name)].specifier.contains(ran[name]), \
            f"{name}: {ran[name]} ran on the GPU but pyproject pins {pins[canonicalize_name(name)]}"
    image = next(args for word, args in _instructions() if word == "FROM").split()[0]
    assert f"pytorch:{ran['torch']}-cuda{ran['cuda']}" in image, f"{image} is not the torch {ran['torch']} / CUDA {ran['cuda']} that ran"


def test_dockerfile_runs_the_pipeline_and_disables_telemetry():
    instructions = _instructions()
    assert instructions[-1] == ("CMD", '["dvc", "repro"]')
    env = " ".join(args for word, args in instructions if word == "ENV")
    for var in ("HF_HUB_DISABLE_TELEMETRY=1", "MLFLOW_DISABLE_TELEMETRY=true", "DVC_NO_ANALYTICS=1",
                "PREFECT_SERVER_ANALYTICS_ENABLED=false"):
        assert var in env


def test_dockerfile_copies_only_what_exists():
    for word, args in _instructions():
        if word == "COPY":
            *sources, _dest = args.split()
            for source in sources:
                if source != ".":
                    assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


# ------------------------------------------------------------------ dvc.yaml
def _stage(name: str) -> dict:
    """A stage's definition; for foreach/matrix stages, the template under `do`."""
    stage = DVC["stages"][name]
    return stage.get("do", stage)


def _stage_paths(stage: dict) -> list[str]:
    entries = []
    for key in ("deps", "outs", "metrics", "plots"):
        for entry in stage.get(key, []):
            entries += list(entry) if isinstance(entry, dict) else [entry]
    return entries


@pytest.mark.parametrize("name", sorted(DVC["stages"]))
def test_dvc_stage_paths_use_only_declared_vars(name):
    loop_vars = {"item", "key"} if {"foreach", "matrix"} & set(DVC["stages"][name]) else set()
    for entry in _stage_paths(_stage(name)):
        for var in re.findall(r"\$\{([^}]*)\}", entry):
            group, _, key = var.strip().partition(".")
            if group in loop_vars:
                continue
            # A path is declared in params.yaml's paths section, or is a file a stage's params name
            # (prepare.train_file: the user's data file is a DVC dependency of prepare).
            declared = key in PATHS if group == "paths" else isinstance(PARAMS.get(group, {}).get(key), str)
            assert declared, f"stage {name}: {entry!r} uses ${{{var}}}, not a declared path"


@pytest.mark.parametrize("name", sorted(DVC["stages"]))
def test_dvc_stage_params_are_params_sections(name):
    keys = _stage(name).get("params", [])
    assert keys, f"stage {name} declares no params"
    for key in keys:
        assert isinstance(key, str), f"stage {name}: params entry {key!r} (only sections of params.yaml are expected)"
        assert key.split(".")[0] in Params.model_fields, f"stage {name}: params key {key!r} is not a section of Params"


@pytest.mark.parametrize("name", sorted(DVC["stages"]))
def test_dvc_stage_runs_a_stage_module_it_depends_on(name):
    """`python -m stages.<module>`, with stages/<module>.py in deps so a code change reruns it."""
    stage = _stage(name)
    match = re.match(r"python -m stages\.(\w+)", stage["cmd"])
    assert match, f"stage {name}: cmd {stage['cmd']!r} does not run a stages module"
    assert f"stages/{match.group(1)}.py" in stage["deps"], f"stage {name} must depend on its own script"


def test_paths_module_reads_dvc_vars():
    declared = next(v["paths"] for v in DVC["vars"] if isinstance(v, dict) and "paths" in v)
    assert PATHS == declared
    assert not [p for p in PATHS.values() if p.startswith("/")], "declared paths must be relative to the repo"
