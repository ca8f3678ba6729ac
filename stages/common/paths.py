"""Output paths, declared once: in dvc.yaml's `vars`, read here so code and DVC agree."""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _declared() -> dict[str, str]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
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
