"""One-line fixes for the errors a newcomer meets first, matched on a failed stage's output.

    fix_for(error_text, root) -> "run `make pipeline` ..." or None

Each rule reads the error as the stage, DVC or the hub library words it (the texts are in the
tests), so the message the user sees is the real error plus what to do about it. The stage's own
message stays the source of truth: a rule only adds the command that fixes it.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from stages.common.paths import declared_paths, dvc_spec

TINY = "run the CPU profile instead: `make pipeline` (preset tiny)"


def fix_for(text: str, root: Path) -> str | None:
    """The fix for the first rule that matches the error text, or None."""
    for rule in (_missing_input, _no_gpu, _hub_unreachable, _tracking_server):
        fix = rule(text, root)
        if fix:
            return fix
    return None


def _no_gpu(text: str, root: Path) -> str | None:
    if re.search(r"needs CUDA and this machine has none|CUDA (is )?not available|no CUDA GPU", text):
        return f"this preset needs an NVIDIA GPU (CUDA) and this machine has none: {TINY}"
    return None


# What huggingface_hub, transformers and datasets say when the hub cannot be reached (or is switched off).
_HUB = re.compile(r"HF_HUB_OFFLINE=1|OfflineModeIsEnabled|outgoing traffic has been disabled|LocalEntryNotFoundError|"
                  r"couldn't connect to 'https://huggingface\.co'|Max retries exceeded with url: /api/models|"
                  r"Failed to resolve 'huggingface\.co'|cannot find the requested files in the (local )?cache|"
                  r"Couldn't reach '[^']+' on the Hub")
_DATASET = re.compile(r"Couldn't reach '[^']+' on the Hub|load_dataset|prepare\.hub_id")


def _hub_unreachable(text: str, root: Path) -> str | None:
    if not _HUB.search(text):
        return None
    if _DATASET.search(text):
        return ("the Hugging Face Hub cannot be reached from here: use local data (`--set prepare.source=file` with "
                f"prepare.train_file and prepare.test_file, or prepare.source=gsm8k: the copy shipped in data/gsm8k), or {TINY}")
    return ("the Hugging Face Hub cannot be reached from here: set model.name_or_path to a model folder on disk "
            f"(`--set model.name_or_path=/path/to/model`), or {TINY}")


def _tracking_server(text: str, root: Path) -> str | None:
    if "the MLflow tracking server" in text and "cannot be used" in text:
        return "start the tracking server, or `unset MLFLOW_TRACKING_URI` to log to the local store under mlruns/"
    return None


# DVC: "failed to reproduce 'sft': [Errno 2] No such file or directory: '/repo/models/base'", or a
# declared dep that is gone: "dependency 'data/gsm8k' does not exist".
_MISSING = re.compile(r"failed to reproduce '(?P<stage>[^']+)': \[Errno 2\] No such file or directory: '(?P<path>[^']+)'"
                      r"|dependency '(?P<dep>[^']+)' does not exist")


def _missing_input(text: str, root: Path) -> str | None:
    match = _MISSING.search(text)
    if not match:
        return None
    missing = Path(match["path"] or match["dep"])
    relative = missing.relative_to(root) if missing.is_absolute() and missing.is_relative_to(root) else missing
    maker = _stage_making(root, relative)
    if maker:
        return f"`{relative}` is made by stage {maker}: run `dvc repro {maker}` (or the whole pipeline: `make pipeline`)"
    return (f"`{relative}` is a source input (no stage makes it): restore it with `git checkout -- {relative}`, "
            "or `dvc pull` when a DVC remote holds it")


def _stage_making(root: Path, relative: Path) -> str | None:
    """The dvc.yaml stage whose outs hold `relative` (paths from its `vars: - paths:` block resolved)."""
    try:
        spec, paths = dvc_spec(root), declared_paths(root)
    except (OSError, KeyError, yaml.YAMLError):
        return None
    for name, stage in (spec.get("stages") or {}).items():
        for out in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            declared = next(iter(out)) if isinstance(out, dict) else str(out)
            declared = re.sub(r"\$\{paths\.(\w+)\}", lambda m: str(paths.get(m[1], m[0])), declared)
            if relative == Path(declared) or Path(declared) in relative.parents:
                return name
    return None
