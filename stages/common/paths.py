"""Output paths, declared once: in dvc.yaml's `vars`, read here so code and DVC agree.

Paths are relative to the workspace: the project root, or PIPELINE_WORKDIR when set (tests
run stages in a temporary workspace that way).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

CODE_ROOT = Path(__file__).resolve().parents[2]
ROOT = Path(os.environ.get("PIPELINE_WORKDIR") or CODE_ROOT)


def load_yaml(text: str):
    """yaml.safe_load through libyaml's parser where PyYAML has it: the same values, ~10x faster. dvc.yaml,
    dvc.lock (40 KB) and params.yaml are read several times by each stage and each flow run, ~0.1 s per
    read of dvc.lock in pure Python."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def dvc_spec(root: Path = CODE_ROOT) -> dict:
    """root's dvc.yaml, parsed: the one reader of that file in the project."""
    return load_yaml((Path(root) / "dvc.yaml").read_text()) or {}


def declared_paths(root: Path = CODE_ROOT) -> dict[str, str]:
    """The `vars: - paths: {...}` block of root's dvc.yaml (output paths, relative to root)."""
    for entry in dvc_spec(root).get("vars", []):
        if isinstance(entry, dict) and "paths" in entry:
            return entry["paths"]
    raise KeyError(f"{Path(root) / 'dvc.yaml'} has no `vars: - paths: {{...}}` block")


def stage_spec(stage: str, root: Path = CODE_ROOT) -> dict:
    """One stage's entry in dvc.yaml (cmd, deps, params, outs), with the templates in deps resolved
    as DVC resolves them: ${paths.*} from `vars`, any other ${key.path} from the workspace's
    params.yaml (prepare's data files, `${prepare.train_file}`, are deps that way)."""
    spec = dict(dvc_spec(root).get("stages", {}).get(stage) or {})
    params_file = ROOT / "params.yaml"
    values = {**((load_yaml(params_file.read_text()) if params_file.exists() else None) or {}),
              "paths": declared_paths(root)}

    def value(match: re.Match) -> str:
        node = values
        for key in match.group(1).split("."):
            node = node[key]
        return str(node)

    spec["deps"] = [re.sub(r"\$\{([^}]+)\}", value, str(d)) for d in spec.get("deps", [])]
    return spec


PATHS: dict[str, str] = declared_paths()


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
