"""What a pipeline run reports: GSM8K scores, the registry decision, GGUF files, stage results.

Pure functions over the metrics files the stages write; a file that does not exist yet (its
stage is not in the pipeline, or did not run) shows as "n/a". Where the scores are read:

- metrics/eval_base.json (stage evaluate_base): `{"base": {"strict": 0.31, "flexible": 0.35, ...}}`;
- metrics/evaluate.json (stage evaluate): the same section for `sft` and `grpo` (and `base`);
- a section without a `strict` / `flexible` key: the first numeric key naming it is used
  (e.g. lm-eval's `exact_match/strict-match`), never a `stderr` one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.common.tracking import flatten

MODELS = ("base", "sft", "grpo")
NA = "n/a"


def read_json(file: Path) -> dict[str, Any] | None:
    """A metrics file's content, or None when it is missing (stage not run yet) or not a JSON object."""
    try:
        data = json.loads(file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _score(section: dict[str, Any] | None, word: str) -> float | None:
    flat = flatten(section or {})
    if word in flat:
        flat = {word: flat[word]}
    for key, value in flat.items():
        name = key.lower()
        if word in name and "stderr" not in name and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def scores(metrics_dir: Path) -> list[dict[str, Any]]:
    """One row per model: {'model', 'strict', 'flexible'}; None where unknown."""
    base_file = read_json(metrics_dir / "eval_base.json")
    evaluate = read_json(metrics_dir / "evaluate.json") or {}
    rows = []
    for model in MODELS:
        section = evaluate.get(model)
        if model == "base" and base_file is not None:
            section = base_file.get("base", base_file)
        section = section if isinstance(section, dict) else None
        rows.append({"model": model, "strict": _score(section, "strict"), "flexible": _score(section, "flexible")})
    return rows


def gguf_files(gguf_dir: Path) -> list[tuple[str, float]]:
    """(file name, size in MiB) of the exported GGUF files."""
    if not gguf_dir.is_dir():
        return []
    return [(f.name, f.stat().st_size / 2**20) for f in sorted(gguf_dir.glob("*.gguf"))]


def _fmt(value: Any) -> str:
    if value is None:
        return NA
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def table_rows(metrics_dir: Path) -> list[dict[str, str]]:
    """The scores as the table artifact shows them."""
    return [{"model": r["model"], "gsm8k_strict": _fmt(r["strict"]), "gsm8k_flexible": _fmt(r["flexible"])}
            for r in scores(metrics_dir)]


def markdown(*, title: str, status: str, metrics_dir: Path, gguf_dir: Path, mlflow_link: str,
             stages: list[dict[str, Any]] | None = None, note: str = "") -> str:
    """The run summary artifact."""
    out = [f"# {title}: {status}", "", f"MLflow parent run: {mlflow_link}", ""]
    if note:
        out += [note, ""]
    if stages:
        out += ["## Stages", "", "| stage | result | seconds |", "|---|---|---|"]
        out += [f"| {s['stage']} | {s['result']} | {_fmt(s.get('seconds'))} |" for s in stages]
        out.append("")
    out += ["## GSM8K", "", "| model | strict-match | flexible-extract |", "|---|---|---|"]
    out += [f"| {r['model']} | {r['gsm8k_strict']} | {r['gsm8k_flexible']} |" for r in table_rows(metrics_dir)]
    out += ["", "## Registry decision", ""]
    register = read_json(metrics_dir / "register.json")
    if register is None:
        out.append(NA)
    else:
        out += [f"- {k}: {_fmt(v)}" for k, v in flatten(register).items()]
    out += ["", "## GGUF files", ""]
    files = gguf_files(gguf_dir)
    out += [f"- `{name}` ({size:.1f} MiB)" for name, size in files] if files else [NA]
    return "\n".join(out) + "\n"
