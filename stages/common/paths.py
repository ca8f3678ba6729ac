"""Output paths, declared once: in dvc.yaml's `vars`, read here so code and DVC agree.

Paths are relative to the workspace: the project root, or PIPELINE_WORKDIR when set (tests
run stages in a temporary workspace that way).
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

CODE_ROOT = Path(__file__).resolve().parents[2]
ROOT = Path(os.environ.get("PIPELINE_WORKDIR") or CODE_ROOT)


def _declared() -> dict[str, str]:
    spec = yaml.safe_load((CODE_ROOT / "dvc.yaml").read_text())
    for entry in spec.get("vars", []):
        if isinstance(entry, dict) and "paths" in entry:
            return entry["paths"]
    raise KeyError("dvc.yaml has no `vars: - paths: {...}` block")


PATHS: dict[str, str] = _declared()


def path(key: str) -> Path:
    """Absolute path of a declared output, e.g. path('prepared')."""
    try:
        return ROOT / PATHS[key]
    except KeyError:
        raise KeyError(f"no path {key!r} in dvc.yaml vars; declared: {sorted(PATHS)}") from None


def metrics_file(stage: str) -> Path:
    return path("metrics") / f"{stage}.json"


def write_metrics(stage: str, metrics: dict) -> Path:
    """Write a stage's metrics JSON (the file dvc.yaml declares) and echo it."""
    import json

    out = metrics_file(stage)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(metrics, indent=2) + "\n"
    out.write_text(text)
    print(text, end="")
    return out
