"""What a pipeline run reports: scores on the eval split (named by its dataset), the registry decision,
GGUF files, stage results.

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


def dataset(metrics_dir: Path) -> str | None:
    """The dataset the scores were measured on, as the evaluate stages name it."""
    for name in ("evaluate.json", "eval_base.json"):
        value = (read_json(metrics_dir / name) or {}).get("dataset")
        if isinstance(value, str):
            return value
    return None


def gguf_files(gguf_dir: Path) -> list[tuple[str, float]]:
    """(file name, size in MiB) of the exported GGUF files."""
    if not gguf_dir.is_dir():
        return []
    return [(f.name, f.stat().st_size / 2**20) for f in sorted(gguf_dir.glob("*.gguf"))]


def data_notes(metrics_dir: Path) -> list[str]:
    """What was dropped, cut or warned about on the way: over-long questions (prepare), prepare's
    warnings, prompts lm-eval would left-truncate (evaluate)."""
    notes = []
    prepare = read_json(metrics_dir / "prepare.json") or {}
    long = prepare.get("too_long") or {}
    if long.get("train") or long.get("test"):
        notes.append(f"prepare dropped {long.get('train', 0)} training and {long.get('test', 0)} test questions "
                     f"longer than {long.get('max_question_chars')} characters")
    notes += [f"prepare: {w}" for w in prepare.get("warnings", [])]
    for file in ("eval_base.json", "evaluate.json"):
        for model, section in (read_json(metrics_dir / file) or {}).items():
            if isinstance(section, dict) and section.get("prompts_truncated"):
                notes.append(f"evaluate: {section['prompts_truncated']} {model} prompt(s) longer than the model's context "
                             "were cut by lm-eval (left-truncated)")
    return notes


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
    notes = data_notes(metrics_dir)
    if notes:
        out += ["## Dropped or cut", ""] + [f"- {n}" for n in notes] + [""]
    out += [f"## Scores ({dataset(metrics_dir) or 'dataset not recorded'})", "", "| model | strict-match | flexible-extract |", "|---|---|---|"]
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


# ------------------------------------------------------------------ accuracy with intervals
def wilson(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (sound at 0 and 1, unlike accuracy ± 1.96 stderr)."""
    from scipy.stats import binomtest

    ci = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _pct_ci(value: float | None, n: int | None) -> tuple[str, tuple[float, float] | None]:
    if value is None:
        return NA, None
    if not n:
        return f"{100 * value:.1f}%", None
    low, high = wilson(round(value * n), n)
    return f"{100 * value:.1f}% [{100 * low:.1f}, {100 * high:.1f}]", (low, high)


def accuracy(metrics_dir: Path) -> list[dict[str, Any]]:
    """scores() with the number of questions and 95% Wilson intervals: {'model', 'strict', 'flexible', 'n',
    'strict_ci', 'flexible_ci', 'strict_text', 'flexible_text'}."""
    base_file = read_json(metrics_dir / "eval_base.json") or {}
    evaluate = read_json(metrics_dir / "evaluate.json") or {}
    rows = []
    for row in scores(metrics_dir):
        section = evaluate.get(row["model"])
        if row["model"] == "base" and base_file:
            section = base_file.get("base", base_file)
        n = section.get("n") if isinstance(section, dict) else None
        n = int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0 else None
        out = {**row, "n": n}
        for kind in ("strict", "flexible"):
            out[f"{kind}_text"], out[f"{kind}_ci"] = _pct_ci(row[kind], n)
        rows.append(out)
    return rows


# ------------------------------------------------------------------ one figure per stage
def _mb(size: Any) -> str:
    return f"{size / 1e6:.1f} MB" if isinstance(size, (int, float)) else "?"


def _num(value: Any, fmt: str = ".3f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def _evaluated(section: Any) -> str:
    if not isinstance(section, dict) or not section.get("evaluated"):
        return "not evaluated"
    return f"strict {100 * section['strict']:.1f}%" if isinstance(section.get("strict"), (int, float)) else "?"


def _figure_prepare(m: dict) -> str:
    return f"{m.get('rows_grpo', '?')} GRPO / {m.get('rows_sft', '?')} SFT / {m.get('rows_eval', '?')} eval rows"


def _figure_base_model(m: dict) -> str:
    if m.get("kind") == "tiny":
        return f"tiny model, {m.get('parameters', 0) / 1e6:.1f}M parameters"
    return f"{m.get('model', '?')}" + (f"@{m['revision'][:12]}" if m.get("revision") else "")


def _figure_sft(m: dict) -> str:
    if m.get("skipped"):
        return "skipped (sft.enabled false)"
    return f"{m.get('steps', '?')} steps, final loss {_num(m.get('final_loss'))}"


def _figure_grpo(m: dict) -> str:
    return (f"{m.get('steps', '?')} steps, mean reward {_num(m.get('reward_first'))} → {_num(m.get('reward_final'))}"
            + (f" (resumed from {m['resumed_from_checkpoint']})" if m.get("resumed_from_checkpoint") else ""))


def _figure_evaluate_base(m: dict) -> str:
    return f"base {_evaluated(m.get('base'))}"


def _figure_evaluate(m: dict) -> str:
    return f"SFT {_evaluated(m.get('sft'))}, GRPO {_evaluated(m.get('grpo'))}"


def _figure_merge(m: dict) -> str:
    check = m.get("check") or {}
    return f"check {'passed' if check.get('passed') else 'FAILED'}, {_mb(m.get('bytes'))}"


def _figure_gguf(m: dict) -> str:
    files = m.get("files") or {}
    return ", ".join(f"{kind} {_mb(f.get('bytes'))}" for kind, f in files.items())


def _figure_register(m: dict) -> str:
    if not m.get("enabled", True):
        return "skipped (registry.enabled false)"
    versions = m.get("models") or {}
    version = next(iter(versions.values()), "?")
    return f"v{version} {'promoted to champion' if m.get('promoted') else 'kept as candidate'}"


def _figure_publish(m: dict) -> str:
    if not m.get("enabled", True):
        return "skipped (publish.enabled false)"
    return ", ".join(f"{kind} {'committed' if r.get('committed') else 'unchanged'}" for kind, r in m["repos"].items())


def _figure_cards(cards_dir: Path) -> str:
    kinds = sorted(d.name for d in cards_dir.iterdir() if (d / "README.md").is_file()) if cards_dir.is_dir() else []
    return f"{len(kinds)} cards: {', '.join(kinds)}" if kinds else ""


FIGURES = {"prepare": ("prepare", _figure_prepare), "base_model": ("base_model", _figure_base_model),
           "sft": ("sft", _figure_sft), "grpo": ("grpo", _figure_grpo),
           "evaluate_base": ("eval_base", _figure_evaluate_base), "evaluate": ("evaluate", _figure_evaluate),
           "merge": ("merge", _figure_merge), "gguf": ("gguf", _figure_gguf), "register": ("register", _figure_register),
           "publish": ("publish", _figure_publish)}


def key_figure(stage: str, metrics_dir: Path, cards_dir: Path | None = None) -> str:
    """The stage's key figure (rows, loss, reward, accuracy, sizes, decision) from its metrics
    file (model_card, which writes none: the cards in cards_dir); "" for a stage without one or
    whose file is missing or not in the expected shape."""
    if stage == "model_card" and cards_dir is not None:
        return _figure_cards(cards_dir)
    if stage not in FIGURES:
        return ""
    file, figure = FIGURES[stage]
    metrics = read_json(metrics_dir / f"{file}.json")
    if metrics is None:
        return ""
    try:
        return figure(metrics)
    except (KeyError, TypeError, ValueError, AttributeError):
        return ""


def decision(metrics_dir: Path) -> str:
    """The registry decision and its reason in one line ("" when register has not run)."""
    m = read_json(metrics_dir / "register.json")
    if m is None:
        return ""
    if not m.get("enabled", True):
        return f"skipped: {m.get('reason', 'registry disabled')}"
    verdict = "promoted to champion" if m.get("promoted") else f"kept champion v{m.get('champion_version') or '-'}"
    versions = ", ".join(f"{name} v{v}" for name, v in (m.get("models") or {}).items())
    return f"{versions}: {verdict} ({m.get('reason', 'no reason recorded')})"
