"""The run report (flows/report.py): its content from a workspace's files and MLflow, and the HTML
in a real headless Chromium (Debian's package): it renders, every image loads, nothing is fetched.

The workspace is written the way the stages write it: the curves CSV by the grpo stage's own
writer, the completions table by the same mlflow.log_table call into a real MLflow store; the
metrics files are literal JSON in the stages' layout (making them for real is the slow pipeline
test's job).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from flows import report
from flows.browser import CHROMIUM
from flows.report import CURVES, Run, build
from stages.common.params import ROOT

REWARDS = ["format_exact", "answer_check", "tag_count"]


def write_metrics(metrics: Path) -> None:
    metrics.mkdir(parents=True, exist_ok=True)
    files = {
        "prepare": {"rows_grpo": 512, "rows_sft": 256, "rows_eval": 1319},
        "eval_base": {"base": {"evaluated": 1, "strict": 0.0, "flexible": 0.05, "strict_stderr": 0.0, "n": 20}},
        "evaluate": {"base": {"evaluated": 1, "strict": 0.0, "flexible": 0.05, "n": 20},
                     "sft": {"evaluated": 1, "strict": 0.2, "flexible": 0.25, "n": 20},
                     "grpo": {"evaluated": 1, "strict": 0.35, "flexible": 0.4, "n": 20},
                     "delta": {"grpo_minus_sft": {"strict": 0.15, "flexible": 0.15}}},
        "register": {"enabled": True, "models": {"gsm8k-grpo": "2", "gsm8k-grpo-adapter": "2"}, "candidate_strict": 0.35,
                     "candidate_flexible": 0.4, "champion_strict_before": 0.2, "champion_version_before": "1",
                     "champion_version": "2", "promoted": True, "reason": "strict 0.350 beats champion v1 (0.200) by 0.150"},
        "gguf": {"merged": {"accuracy": 0.4, "correct": 2, "questions": 5},
                 "files": {"f16": {"file": "gsm8k-grpo-F16.gguf", "bytes": 7_123_456, "accuracy": 0.4,
                                   "accuracy_delta_vs_merged": 0.0, "same_answers_as_merged": 1.0,
                                   "tokens_per_second": 812.4, "type_mismatch": False},
                           "q4_k_m": {"file": "gsm8k-grpo-Q4_K_M.gguf", "bytes": 2_345_678, "accuracy": 0.2,
                                      "accuracy_delta_vs_merged": -0.2, "same_answers_as_merged": 0.6,
                                      "tokens_per_second": 1203.0, "type_mismatch": True}}},
    }
    for name, data in files.items():
        (metrics / f"{name}.json").write_text(json.dumps(data))


def write_history(plots: Path, steps: int = 6) -> Path:
    """plots/grpo_rewards.csv as the grpo stage writes it, from a TRL-shaped log history."""
    from stages.common.monitoring import write_curves

    history = []
    for step in range(1, steps + 1):
        row = {"step": step, "reward": 0.1 * step, "reward_std": 0.2, "frac_reward_zero_std": 1 / step,
               "kl": 0.01 * step, "completions/mean_length": 40 + step, "entropy": 2.0 - 0.1 * step, "loss": 0.01}
        row |= {f"rewards/{name}/mean": 0.05 * step * (i + 1) for i, name in enumerate(REWARDS)}
        history.append(row)
    plots.mkdir(parents=True, exist_ok=True)
    write_curves(history, REWARDS, plots / "grpo_rewards.csv", plots / "grpo_rewards.png")
    return plots / "grpo_rewards.csv"


def log_grpo_run(experiment: str, completion: str) -> tuple[str, str, str]:
    """A parent run with a grpo child that logged a completions table (as stages/grpo.py does)."""
    import mlflow

    from stages.common import tracking

    exp_id = tracking.setup(experiment)
    client = mlflow.MlflowClient(tracking.tracking_uri())
    parent = client.create_run(exp_id, run_name="pipeline", tags={"pipeline.parent": "true"}).info.run_id
    with mlflow.start_run(run_name="grpo", parent_run_id=parent, tags={"stage": "grpo"}) as child:
        rows = {"step": [6, 6], "prompt": ["What is 2 + 3?", "What is 4 + 4?"], "completion": [completion, "8"],
                "gold": ["5", "8"], "extracted": ["5", None]}
        rows |= {f"reward/{name}": [1.0, 0.0] for name in REWARDS}
        mlflow.log_table(rows, artifact_file="completions/step_00003.json")
        mlflow.log_table({**rows, "step": [3, 3]}, artifact_file="completions/step_00006.json")
    client.set_terminated(parent)
    return exp_id, parent, child.info.run_id


COMPLETION = "<think> 2 + 3 = 5 </think><SOLUTION>5</SOLUTION> <script>alert('x')</script> | pipe"


@pytest.fixture
def workspace(tmp_path, mlruns_dir):
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    write_metrics(root / "metrics")
    csv_file = write_history(root / "plots")
    gguf = root / "models/gguf"
    gguf.mkdir(parents=True)
    (gguf / "gsm8k-grpo-F16.gguf").write_bytes(b"\0" * 1024)
    exp_id, parent, child = log_grpo_run(f"test-report-{tmp_path.name}", COMPLETION)
    run = Run(status="finished", mlflow_run_id=parent, mlflow_experiment_id=exp_id, mlflow_link=f"`{parent}`",
              stages=[{"stage": "prepare", "result": "ran", "seconds": 3.4, "figure": "512 GRPO rows",
                       "log": "reports/pipeline/logs/prepare.log"},
                      {"stage": "grpo", "result": "up to date", "seconds": 1.2, "figure": "6 steps"}])
    return root, run, csv_file, child


def test_report_holds_every_section_from_the_workspace(workspace):
    root, run, csv_file, grpo_run_id = workspace
    files = build(root, run)
    assert files.html == root / "reports/pipeline/report.html" and files.markdown.name == "report.md"
    text = files.markdown.read_text()
    assert "| prepare | ran | 3.4 s | 512 GRPO rows | `reports/pipeline/logs/prepare.log` |" in text
    assert "| grpo | 35.0% [18.1, 56.7] | 40.0% [21.9, 61.3] | 20 |" in text  # Wilson 7/20, 8/20
    assert "| base | 0.0% [0.0, 16.1] |" in text
    assert "| grpo minus sft | +15.0 pts | +15.0 pts |" in text
    # Every curve whose columns the CSV holds is drawn; the others are named as not logged.
    import pandas as pd

    logged = {c for c, v in pd.read_csv(csv_file).items() if v.notna().any()}
    for stem, what, title, _, patterns in CURVES:
        drawn = any(p in logged if not p.startswith("^") else any(re.match(p, c) for c in logged) for p in patterns)
        assert (f"](img/{stem}.png)" in text) == drawn, stem
        assert (root / f"reports/pipeline/img/{stem}.png").exists() == drawn
        if not drawn:
            assert what in text.split("Not logged in this run:")[1]
    # The latest completions table of the grpo child run, rewards beside it.
    assert f"at GRPO step 3 (MLflow run `{grpo_run_id}`" in text
    assert "rewards format_exact 1.00, answer_check 1.00, tag_count 1.00 (sum 3.00)" in text
    assert COMPLETION in text
    assert "**gsm8k-grpo v2, gsm8k-grpo-adapter v2: promoted to champion (strict 0.350 beats champion v1" in text
    assert "| `gsm8k-grpo-Q4_K_M.gguf` | 2.3 MB | 0.200 | -0.200 | 60% | 1203 | no |" in text


def test_html_is_self_contained_and_escapes_completions(workspace):
    root, run, _, _ = workspace
    files = build(root, run)
    page = files.html.read_text()
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == len(files.images) == len(re.findall(r"!\[[^\]]*\]\(img/", files.markdown.read_text()))
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    assert "default-src 'none'; img-src data:" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<script>" not in page and "&lt;script&gt;alert" in page


def test_report_of_an_empty_workspace_says_what_is_missing(tmp_path, mlruns_dir):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    files = build(tmp_path, Run(status="failed at prepare"))
    text = files.markdown.read_text()
    assert "# GSM8K pipeline: failed at prepare" in text
    for missing in ("No stage ran.", "No evaluation in this workspace yet", "No GRPO history",
                    "None: the grpo stage logged no completions table", "The register stage has not run",
                    "The gguf stage has not run"):
        assert missing in text
    assert files.images == [] and "<img" not in files.html.read_text()


def test_prefect_copy_points_at_the_html_instead_of_local_images(workspace):
    root, run, _, _ = workspace
    files = build(root, run)
    text = report.prefect_markdown(files.markdown.read_text(), files.html)
    assert "](img/" not in text and f"figure in `{files.html}`" in text


# ------------------------------------------------------------------ a real browser
def open_in_chromium(page_file: Path, screenshot: Path | None = None) -> dict:
    """Load a file in headless Chromium (flows.browser): what it requested, what it was refused
    (anything not on this machine), how its images loaded."""
    from flows import browser

    with browser.page() as (tab, traffic):
        tab.goto(page_file.as_uri(), wait_until="load")
        images = tab.evaluate("Array.from(document.images).map(i => ({ok: i.complete && i.naturalWidth > 0, "
                              "alt: i.alt, width: i.naturalWidth}))")
        headings = tab.locator("h2").all_inner_texts()
        if screenshot:
            tab.screenshot(path=str(screenshot), full_page=True)
    return {"requested": traffic.requested, "blocked": traffic.blocked, "images": images, "headings": headings}


needs_chromium = pytest.mark.skipif(not CHROMIUM.exists() and not os.environ.get("CI"),
                                    reason="Debian's chromium is not installed (apt-get install chromium); CI installs it")


@pytest.mark.slow
@needs_chromium
def test_report_renders_offline_in_chromium_with_every_image(workspace, tmp_path):
    root, run, _, _ = workspace
    files = build(root, run)
    seen = open_in_chromium(files.html, screenshot=tmp_path / "report.png")
    assert seen["headings"][:3] == ["Stages", "GSM8K accuracy: base, SFT, GRPO", "GRPO training curves"]
    assert len(seen["images"]) == len(files.images) >= 4
    assert all(image["ok"] for image in seen["images"]), seen["images"]
    assert seen["blocked"] == []
    assert [u for u in seen["requested"] if not u.startswith("data:")] == [files.html.as_uri()]
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@needs_chromium
def test_the_browser_check_catches_an_external_image(workspace, tmp_path):
    """The same check on a page that does load something from outside: it must see it."""
    root, run, _, _ = workspace
    files = build(root, run)
    leaky = tmp_path / "leaky.html"
    page = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", files.html.read_text())
    leaky.write_text(page.replace("<body>", '<body><img src="http://cdn.example.invalid/logo.png" alt="external">'))
    seen = open_in_chromium(leaky)
    assert seen["blocked"] == ["http://cdn.example.invalid/logo.png"]
    assert [i["ok"] for i in seen["images"] if i["alt"] == "external"] == [False]
