"""The run report: one self-contained HTML file, and the same as Markdown, for every pipeline run.

    python -m flows.report             # (re)build the report of this workspace from its files and MLflow

The flow (flows/pipeline.py) builds it at the end of every run, failed runs included, attaches it
to the MLflow parent run (artifacts `report/`, with the stage logs under `logs/`) and to the
Prefect flow run (a markdown artifact), and prints its path.

What it holds, and where each part is read from:
- the stage table (the flow's results, each stage's key figure from flows.summary);
- base vs SFT vs GRPO GSM8K accuracy with 95% Wilson intervals (metrics/eval_base.json,
  metrics/evaluate.json: the score and the number of questions);
- GRPO curves from plots/grpo_rewards.csv, read by column name, so whatever the grpo stage logged
  is drawn and a curve it did not log says so: per-reward means (`rewards/<name>/mean`), KL (`kl`,
  `kl_monitor`), `entropy`, completion length (`completions/mean_length`) and the zero-std
  fraction (`frac_reward_zero_std`);
- sample completions with their rewards: the last completions table the GRPO stage run logged to
  MLflow (`completions/step_*.json`); the run is this pipeline run's grpo child, or, when grpo was
  up to date, the latest grpo run whose inputs digest is the current one (the run that made the
  model on disk);
- the registry decision and its reason (metrics/register.json);
- GGUF file sizes and quantization loss against the merged model (metrics/gguf.json).

The Markdown is the single source: report.md references its figures in img/, and the HTML is that
Markdown rendered by markdown-it-py (raw HTML off, so no text from a completion can inject markup)
with each figure embedded as a data: URI. A Content-Security-Policy that allows only data: images
and inline style keeps the file from loading anything, online or off.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows import summary
from flows.workspace import declared_path

SAMPLES_SHOWN = 4
COMPLETION_CHARS = 1200  # a sample's completion is cut there (the full table is in MLflow)
CURVES = (  # (file stem, what, title, y label, columns: exact names, or a regex whose group names the line)
    ("rewards", "per-reward means", "Mean reward per reward function", "mean reward",
     ("reward", r"^rewards/(.+)/mean$")),
    ("kl", "KL", "KL to the reference model", "KL", ("kl", "kl_monitor")),
    ("entropy", "entropy", "Policy entropy", "nats per token", ("entropy",)),
    ("completion_length", "completion length", "Completion length", "tokens",
     ("completions/mean_length", "completions/min_length", "completions/max_length")),
    ("zero_std", "zero-std fraction", "Groups whose rewards all tie (zero std: no learning signal)", "fraction",
     ("frac_reward_zero_std",)),
)
CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;max-width:1100px;margin:2em auto;padding:0 1.5em}
h1{font-size:1.7em;border-bottom:1px solid #d0d7de;padding-bottom:.3em}h2{margin-top:1.8em;border-bottom:1px solid #eaeef2}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}th,td{border:1px solid #d0d7de;padding:.35em .7em;text-align:left;vertical-align:top}
th{background:#f6f8fa}tr:nth-child(even) td{background:#fbfcfd}code{background:#f0f2f4;padding:.1em .3em;border-radius:4px;font-size:.9em}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;border-radius:6px;white-space:pre-wrap}pre code{background:none;padding:0}
img{max-width:100%;border:1px solid #eaeef2;border-radius:6px}p>img{display:inline-block;width:49%;margin:0 .5% .5em 0}
"""


@dataclass
class Run:
    """What the flow knows about the run that the metrics files do not."""

    title: str = "GSM8K pipeline"
    status: str = "finished"
    stages: list[dict[str, Any]] = field(default_factory=list)  # {'stage', 'result', 'seconds'[, 'figure', 'log']}
    mlflow_run_id: str | None = None
    mlflow_experiment_id: str | None = None
    mlflow_link: str = ""
    prefect_flow_run: str = ""
    note: str = ""


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    markdown: Path
    images: list[Path]


# ------------------------------------------------------------------ data
def read_curves(csv_file: Path):
    """The per-step history as a DataFrame of numeric columns (empty ones dropped), or None."""
    import pandas as pd

    if not csv_file.is_file():
        return None
    try:
        frame = pd.read_csv(csv_file)
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return None
    if "step" not in frame.columns or frame.empty:
        return None
    frame = frame.apply(pd.to_numeric, errors="coerce").dropna(axis=1, how="all")
    return frame.sort_values("step") if "step" in frame.columns else None


def curve_lines(frame, patterns: tuple[str, ...]) -> dict[str, Any]:
    """{line label: column} for the columns a curve draws; a regex pattern's group names the line."""
    lines: dict[str, Any] = {}
    for pattern in patterns:
        if pattern.startswith("^"):
            for column in frame.columns:
                match = re.match(pattern, column)
                if match:
                    lines[match.group(1)] = frame[column]
        elif pattern in frame.columns and pattern != "step":
            lines[pattern] = frame[pattern]
    return lines


def grpo_run(parent_run_id: str | None, experiment_id: str | None):
    """The MLflow run of the grpo stage behind the model on disk (see the module docstring), or None."""
    if not experiment_id:
        return None
    import mlflow

    from stages.common import tracking

    client = mlflow.MlflowClient(tracking.tracking_uri())
    if parent_run_id:
        found = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.stage = 'grpo'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            return found[0]
    digest = tracking.inputs_digest("grpo")
    found = client.search_runs([experiment_id], f"tags.stage = 'grpo' and tags.inputs_digest = '{digest}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def completions(run) -> tuple[int | None, list[dict[str, Any]]]:
    """(step, rows) of the last completions table a grpo run logged; (None, []) when it logged none."""
    if run is None:
        return None, []
    import mlflow

    from stages.common import tracking

    client = mlflow.MlflowClient(tracking.tracking_uri())
    tables = sorted((a.path for a in client.list_artifacts(run.info.run_id, "completions") if a.path.endswith(".json")),
                    key=lambda p: int(re.sub(r"\D", "", Path(p).stem) or 0))
    if not tables:
        return None, []
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=tables[-1], dst_path=tmp,
                                                    tracking_uri=tracking.tracking_uri())
        table = json.loads(Path(local).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table.get("data", [])]
    step = rows[0].get("step") if rows else None
    return (int(step) if isinstance(step, (int, float)) else None), rows


# ------------------------------------------------------------------ figures
def _figure(path: Path, draw) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4), layout="constrained")
    draw(ax)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def accuracy_figure(rows: list[dict[str, Any]], out: Path) -> Path | None:
    scored = [r for r in rows if r["strict"] is not None]
    if not scored:
        return None

    def draw(ax):
        width = 0.38
        for offset, kind in ((-width / 2, "strict"), (width / 2, "flexible")):
            xs, ys, errors = [], [], [[], []]
            for i, r in enumerate(scored):
                if r[kind] is None:
                    continue
                xs.append(i + offset)
                ys.append(100 * r[kind])
                low, high = r[f"{kind}_ci"] or (r[kind], r[kind])
                errors[0].append(100 * (r[kind] - low))
                errors[1].append(100 * (high - r[kind]))
            ax.bar(xs, ys, width, yerr=errors, capsize=4, label=kind)
        ax.set_xticks(range(len(scored)), [r["model"] for r in scored])
        ax.set(ylabel="GSM8K exact match (%)", title="Accuracy with 95% Wilson intervals", ylim=(0, 100))
        ax.legend()

    return _figure(out, draw)


def curve_figure(frame, title: str, ylabel: str, lines: dict[str, Any], out: Path) -> Path:
    def draw(ax):
        for label, values in lines.items():
            mask = values.notna()
            ax.plot(frame["step"][mask], values[mask], marker="o" if mask.sum() < 12 else None, markersize=3,
                    label=label, linewidth=2 if label == "reward" else 1.4)
        ax.set(title=title, xlabel="GRPO step", ylabel=ylabel)
        if len(lines) > 1:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))

    return _figure(out, draw)


# ------------------------------------------------------------------ markdown
def _cell(value: Any) -> str:
    """A value as a Markdown table cell: one line, pipes escaped."""
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _fence(text: str) -> str:
    ticks = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{ticks}text\n{text}\n{ticks}"


def _number(value: Any, fmt: str = ".3f") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return format(value, fmt)


def _headline(rows: list[dict[str, Any]], metrics_dir: Path) -> list[str]:
    """The run in one line: accuracies, the registry's verdict, the exported files."""
    parts = [f"{r['model'].upper() if r['model'] != 'base' else 'base'} {100 * r['strict']:.1f}%"
             for r in reversed(rows) if r["strict"] is not None]
    out = [f"GSM8K strict: {', '.join(parts)}"] if parts else []
    register = summary.read_json(metrics_dir / "register.json")
    if register is not None and register.get("enabled", True):
        out.append("registry: " + ("promoted to champion" if register.get("promoted") else "champion kept"))
    files = (summary.read_json(metrics_dir / "gguf.json") or {}).get("files") or {}
    if files:
        out.append(f"GGUF: {', '.join(files)}")
    return [f"**{' · '.join(out)}**", ""] if out else []


def _stages_section(run: Run) -> list[str]:
    out = ["## Stages", ""]
    if not run.stages:
        return out + ["No stage ran.", ""]
    out += ["| stage | result | time | key figure | log |", "|---|---|---|---|---|"]
    for s in run.stages:
        seconds = f"{s['seconds']:.1f} s" if isinstance(s.get("seconds"), (int, float)) else "-"
        log = f"`{s['log']}`" if s.get("log") else ""
        out.append(f"| {_cell(s['stage'])} | {_cell(s['result'])} | {seconds} | {_cell(s.get('figure'))} | {log} |")
    return out + [""]


def _accuracy_section(rows: list[dict[str, Any]], image: Path | None, metrics_dir: Path) -> list[str]:
    out = ["## GSM8K accuracy: base, SFT, GRPO", ""]
    if all(r["strict"] is None for r in rows):
        return out + ["No evaluation in this workspace yet (stages evaluate_base, evaluate).", ""]
    out += ["Exact match with 95% Wilson score intervals over the evaluated questions. *strict*: the number in the "
            "last answer block of the trained format; *flexible*: the last number in the completion.", "",
            "| model | strict | flexible | questions |", "|---|---|---|---|"]
    out += [f"| {r['model']} | {r['strict_text']} | {r['flexible_text']} | {r['n'] or 'n/a'} |" for r in rows]
    deltas = (summary.read_json(metrics_dir / "evaluate.json") or {}).get("delta") or {}
    if deltas:
        out += ["", "| difference | strict | flexible |", "|---|---|---|"]
        for key, d in deltas.items():
            out.append(f"| {_cell(key.replace('_', ' '))} | {100 * d.get('strict', math.nan):+.1f} pts | "
                       f"{100 * d.get('flexible', math.nan):+.1f} pts |")
    if image:
        out += ["", f"![Accuracy with 95% intervals](img/{image.name})"]
    return out + [""]


def _curves_section(frame, images: dict[str, Path], missing: list[str]) -> list[str]:
    out = ["## GRPO training curves", ""]
    if frame is None:
        return out + ["No GRPO history in this workspace (plots/grpo_rewards.csv is missing or empty).", ""]
    out += [f"{len(frame)} logged steps, from plots/grpo_rewards.csv.", ""]
    out += [" ".join(f"![{title}](img/{path.name})" for title, path in images.items())] if images else []
    if missing:
        out += ["", "Not logged in this run: " + ", ".join(missing) + "."]
    return out + [""]


def _samples_section(step: int | None, rows: list[dict[str, Any]], run_id: str | None) -> list[str]:
    out = ["## Sample completions with their rewards", ""]
    if not rows:
        why = "the grpo stage logged no completions table (grpo.log_completions_every is 0, or no MLflow run was found)"
        return out + [f"None: {why}.", ""]
    out += [f"The first {min(SAMPLES_SHOWN, len(rows))} of {len(rows)} completions logged at GRPO step {step} "
            f"(MLflow run `{run_id}`, artifact `completions/`).", ""]
    for i, row in enumerate(rows[:SAMPLES_SHOWN], 1):
        rewards = {k.removeprefix("reward/"): v for k, v in row.items() if k.startswith("reward/")}
        total = sum(v for v in rewards.values() if isinstance(v, (int, float)))
        out += [f"**Sample {i}**: gold `{row.get('gold')}`, extracted `{row.get('extracted')}`; rewards "
                + ", ".join(f"{name} {_number(v, '.2f')}" for name, v in rewards.items()) + f" (sum {total:.2f})", ""]
        completion = str(row.get("completion", ""))
        if len(completion) > COMPLETION_CHARS:
            completion = completion[:COMPLETION_CHARS] + " [...]"
        out += [_fence(completion), ""]
    return out


def _registry_section(metrics_dir: Path) -> list[str]:
    out = ["## Registry decision", ""]
    m = summary.read_json(metrics_dir / "register.json")
    if m is None:
        return out + ["The register stage has not run in this workspace.", ""]
    out.append(f"**{summary.decision(metrics_dir)}**")
    if m.get("enabled", True):
        out += ["", f"- candidate GSM8K strict / flexible: {_number(m.get('candidate_strict'))} / "
                    f"{_number(m.get('candidate_flexible'))}",
                f"- champion before: {m.get('champion_version_before') or 'none'} "
                f"(strict {_number(m.get('champion_strict_compared', m.get('champion_strict_before')))})",
                f"- champion now: {m.get('champion_version') or 'none'}"]
        test = m.get("paired_test")
        if isinstance(test, dict):
            out.append(f"- paired test ({test.get('test', '?')}): {test.get('wins', '?')} questions only the candidate "
                       f"got right, {test.get('losses', '?')} only the champion, p = {_number(test.get('p_value'), '.4f')}")
    return out + [""]


def _gguf_section(metrics_dir: Path) -> list[str]:
    out = ["## GGUF files", ""]
    m = summary.read_json(metrics_dir / "gguf.json")
    if m is None or not m.get("files"):
        return out + ["The gguf stage has not run in this workspace.", ""]
    merged = m.get("merged") or {}
    out += [f"Quantization loss: accuracy on {merged.get('questions', '?')} GSM8K questions next to the merged 16-bit "
            f"model ({_number(merged.get('accuracy'))}), and how many greedy answers stayed identical.", "",
            "| file | size | accuracy | vs merged | same answers | tokens/s | requested type delivered |",
            "|---|---|---|---|---|---|---|"]
    for kind, f in m["files"].items():
        size = f"{f['bytes'] / 1e6:.1f} MB" if isinstance(f.get("bytes"), (int, float)) else "n/a"
        delta = f.get("accuracy_delta_vs_merged")
        out.append(f"| `{_cell(f.get('file', kind))}` | {size} | {_number(f.get('accuracy'))} | "
                   f"{_number(delta, '+.3f')} | {_number(f.get('same_answers_as_merged'), '.0%')} | "
                   f"{_number(f.get('tokens_per_second'), '.0f')} | {'no' if f.get('type_mismatch') else 'yes'} |")
    return out + [""]


# ------------------------------------------------------------------ build
def build(root: Path, run: Run, out_dir: Path | None = None) -> ReportFiles:
    """Write report.md, report.html and img/*.png for the workspace at root; returns their paths."""
    metrics_dir = declared_path(root, "metrics")
    out_dir = out_dir or declared_path(root, "run_report")
    img = out_dir / "img"
    img.mkdir(parents=True, exist_ok=True)
    for old in img.glob("*.png"):
        old.unlink()

    rows = summary.accuracy(metrics_dir)
    accuracy_png = accuracy_figure(rows, img / "accuracy.png")
    frame = read_curves(declared_path(root, "plots") / "grpo_rewards.csv")
    curve_images: dict[str, Path] = {}
    missing: list[str] = []
    for stem, what, title, ylabel, patterns in CURVES if frame is not None else ():
        lines = curve_lines(frame, patterns)
        if lines:
            curve_images[title] = curve_figure(frame, title, ylabel, lines, img / f"{stem}.png")
        else:
            missing.append(f"{what} (column {' / '.join(f'`{p}`' for p in patterns)})")
    grpo = grpo_run(run.mlflow_run_id, run.mlflow_experiment_id)
    step, samples = completions(grpo)

    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [f"# {run.title}: {run.status}", "",
             f"Generated {when}. MLflow parent run: {run.mlflow_link or 'n/a'}"
             + (f"; Prefect flow run `{run.prefect_flow_run}`" if run.prefect_flow_run else "") + ".", ""]
    lines += _headline(rows, metrics_dir)
    if run.note:
        lines += [run.note, ""]
    lines += _stages_section(run)
    lines += _accuracy_section(rows, accuracy_png, metrics_dir)
    lines += _curves_section(frame, curve_images, missing)
    lines += _samples_section(step, samples, grpo.info.run_id if grpo else None)
    lines += _registry_section(metrics_dir)
    lines += _gguf_section(metrics_dir)
    text = "\n".join(lines)

    markdown_file = out_dir / "report.md"
    markdown_file.write_text(text)
    html_file = out_dir / "report.html"
    html_file.write_text(to_html(text, out_dir, title=f"{run.title}: {run.status}"))
    images = sorted(img.glob("*.png"))
    return ReportFiles(html_file, markdown_file, images)


def to_html(markdown: str, base: Path, title: str) -> str:
    """The Markdown as one self-contained page: figures inlined as data: URIs, nothing fetched."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    default_image = md.renderer.rules["image"]

    def image(renderer, tokens, idx, options, env):
        file = (base / (tokens[idx].attrGet("src") or "")).resolve()
        if file.is_file() and file.is_relative_to(base.resolve()):
            tokens[idx].attrSet("src", "data:image/png;base64," + base64.b64encode(file.read_bytes()).decode())
        return default_image(tokens, idx, options, env)

    md.add_render_rule("image", image)
    body = md.render(markdown)
    return ("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")


def prefect_markdown(markdown: str, html_file: Path) -> str:
    """The report for a Prefect markdown artifact: figures (files on this machine) replaced by a pointer."""
    return re.sub(r"!\[([^\]]*)\]\([^)]*\)", lambda m: f"*({m.group(1)}: figure in `{html_file}`)*", markdown)


def latest_parent(experiment: str):
    """The latest pipeline parent run of an experiment (None when there is none)."""
    import mlflow

    from stages.common import tracking

    client = mlflow.MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], "tags.`pipeline.parent` = 'true'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def main() -> None:
    """Rebuild the report from the workspace and its latest pipeline run in MLflow (no stage table:
    that is what the run itself knew)."""
    from stages.common.params import ROOT, load_params

    parent = latest_parent(load_params().project.name)
    run = Run(title="GSM8K pipeline (rebuilt from the workspace)", status="as on disk")
    if parent is not None:
        run.mlflow_run_id, run.mlflow_experiment_id = parent.info.run_id, parent.info.experiment_id
        run.mlflow_link = f"`{parent.info.run_id}`"
    print(build(ROOT, run).html)


if __name__ == "__main__":
    main()
