"""The pipeline's console: tqdm lines read back as progress, stage logs, errors without the
traceback wall, one-line fixes for a newcomer's first errors, the stage key figures, and the
UIs' port check.

The inputs are the real producers' output: tqdm writing to a buffer, a Python process that
raises, DVC failing on a missing input, huggingface_hub refusing a hub id offline.
"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import summary
from flows.console import PipelineConsole, StageLog, error_of, parse_bar
from flows.hints import fix_for
from flows.ui import PortInUse, check_port
from stages.common.params import ROOT

PY = sys.executable


def tqdm_lines(total: int, desc: str | None = None, **kwargs) -> list[str]:
    """What a real tqdm bar writes, split the way the flow reads a pipe (universal newlines)."""
    from tqdm import tqdm

    buffer = io.StringIO()
    for _ in tqdm(range(total), desc=desc, file=buffer, mininterval=0, miniters=1, **kwargs):
        pass
    return [line for line in io.StringIO(buffer.getvalue(), newline=None).read().splitlines() if line.strip()]


def test_tqdm_lines_are_read_back_as_counts():
    lines = tqdm_lines(5, desc="Running generate_until requests")
    bars = [parse_bar(line) for line in lines]
    assert all(bars), lines
    assert sorted(set(b.n for b in bars)) == [0, 1, 2, 3, 4, 5] and bars[-1].n == 5
    assert {(b.desc, b.total) for b in bars} == {("Running generate_until requests", 5)}
    assert parse_bar(tqdm_lines(3)[-1]) is not None and parse_bar(tqdm_lines(3)[-1]).desc == ""
    scaled = parse_bar(tqdm_lines(2048, unit="B", unit_scale=True)[-1])
    assert scaled.total == pytest.approx(2048, rel=0.01) and scaled.n == scaled.total
    for ordinary in ("{'loss': 2.3, 'epoch': 0.5}", "Running stage 'sft':", "step 5/20 done", "100% sure"):
        assert parse_bar(ordinary) is None


def test_stage_log_keeps_every_line_but_only_the_last_redraw_of_each_bar(tmp_path):
    seen = []
    log = StageLog(tmp_path / "logs" / "sft.log", on_bar=seen.append)
    bar_lines = [*tqdm_lines(4, desc="Map"), *tqdm_lines(3)]
    fed = {line: log.feed(line) for line in ["Running stage 'sft':", *bar_lines, "{'train_loss': 1.5}"]}
    log.close()
    text = (tmp_path / "logs" / "sft.log").read_text().splitlines()
    assert text[0] == "Running stage 'sft':" and text[-1] == "{'train_loss': 1.5}"
    assert [parse_bar(line).n for line in text[1:-1]] == [4, 3]  # one final state per bar
    assert len(seen) == len(bar_lines) and fed["Running stage 'sft':"] and not fed[bar_lines[-1]]
    assert list(log.tail) == ["Running stage 'sft':", "{'train_loss': 1.5}"]


def test_error_of_a_failed_stage_is_its_exception_line_not_the_traceback(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text("def load():\n    raise ValueError('all 512 prompts are longer than grpo.max_prompt_length=10')\n"
                      "print('grpo: loading')\nload()\n")
    out = subprocess.run([PY, str(script)], capture_output=True, text=True)
    lines = (out.stdout + out.stderr).splitlines() + [
        "ERROR: failed to reproduce 'grpo': failed to run: python -m stages.grpo, exited with 1"]
    assert lines[1].startswith("Traceback")
    assert error_of(lines) == "ValueError: all 512 prompts are longer than grpo.max_prompt_length=10"
    assert error_of(["boom: it broke", "ERROR: failed to reproduce 'x': exited with 3"]).startswith("ERROR: failed")
    assert error_of(["only a line"]) == "only a line"


def test_failure_prints_stage_error_log_and_fix_in_a_few_lines(tmp_path):
    console = PipelineConsole()
    console.console.file = buffer = io.StringIO()
    console.failure("grpo", "ValueError: bad prompts", tmp_path / "grpo.log", "lower grpo.max_prompt_length")
    text = buffer.getvalue()
    assert text.strip().splitlines() == ["error: stage grpo failed: ValueError: bad prompts",
                                         f"  log: {tmp_path / 'grpo.log'}", "  fix: lower grpo.max_prompt_length"]


# ------------------------------------------------------------------ newcomer errors
def test_missing_dvc_input_gets_the_command_that_makes_it(tmp_path):
    """A real DVC repository whose stage input is gone: made by a stage, or a source file."""
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([PY, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"vars": [{"paths": {"made": "out/a.txt"}}], "stages": {
        "make_a": {"cmd": "cp src.txt out/a.txt", "deps": ["src.txt"], "outs": ["${paths.made}"]},
        "use_a": {"cmd": "cp out/a.txt b.txt", "deps": ["${paths.made}"], "outs": ["b.txt"]}}}))
    (root / "src.txt").write_text("data\n")
    (root / "out").mkdir()
    subprocess.run([PY, "-m", "dvc", "repro", "-q"], cwd=root, check=True)
    (root / "out/a.txt").unlink()
    (root / "src.txt").unlink()
    errors = {stage: subprocess.run([PY, "-m", "dvc", "repro", "--single-item", stage], cwd=root,
                                    capture_output=True, text=True).stderr for stage in ("use_a", "make_a")}
    assert fix_for(errors["use_a"], root) == \
        "`out/a.txt` is made by stage make_a: run `dvc repro make_a` (or the whole pipeline: `make pipeline`)"
    assert fix_for(errors["make_a"], root).startswith("`src.txt` is a source input (no stage makes it): "
                                                      "restore it with `git checkout -- src.txt`")


def test_hub_unreachable_gets_a_local_folder_or_the_tiny_profile(monkeypatch):
    """huggingface_hub's own error for a hub id it may not fetch (HF_HUB_OFFLINE=1: no network used)."""
    out = subprocess.run([PY, "-c", "from huggingface_hub import snapshot_download; snapshot_download('org/some-model')"],
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-hf-home"},
                         capture_output=True, text=True)
    assert out.returncode != 0
    fix = fix_for(out.stderr, ROOT)
    assert fix is not None and "model.name_or_path" in fix and "make pipeline" in fix


def test_gpu_only_settings_without_a_gpu_fail_before_the_flow_starts(tmp_path):
    """The CLI checks the params against this machine (no CUDA here) before Prefect starts a server."""
    out = subprocess.run([PY, "-m", "flows.pipeline", "--preset", "tiny", "--set", "model.backend=unsloth"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")})
    assert out.returncode == 1
    assert out.stdout == "" and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("error: model.backend: got 'unsloth'; Unsloth needs CUDA")
    assert lines[1] == "  fix: this preset needs an NVIDIA GPU (CUDA) and this machine has none: " \
                       "run the CPU profile instead: `make pipeline` (preset tiny)"
    assert "temporary server" not in out.stderr  # Prefect never started one


def test_an_unknown_error_gets_no_invented_fix():
    assert fix_for("RuntimeError: the merged model does not reproduce base + adapter", ROOT) is None


# ------------------------------------------------------------------ key figures
def test_key_figures_read_the_stage_metrics(tmp_path):
    m = tmp_path
    files = {
        "prepare": {"rows_grpo": 512, "rows_sft": 256, "rows_eval": 1319},
        "sft": {"steps": 40, "final_loss": 1.23456},
        "grpo": {"steps": 6, "reward_first": 0.1, "reward_final": 0.25},
        "eval_base": {"base": {"evaluated": 1, "strict": 0.05, "n": 20}},
        "evaluate": {"sft": {"evaluated": 1, "strict": 0.1}, "grpo": {"evaluated": 0}},
        "gguf": {"files": {"f16": {"bytes": 7_100_000}, "q8_0": {"bytes": 3_900_000}}},
        "register": {"enabled": True, "models": {"gsm8k-grpo": "3"}, "promoted": False, "reason": "no gain",
                     "champion_version": "2"},
    }
    for name, data in files.items():
        (m / f"{name}.json").write_text(json.dumps(data))
    assert summary.key_figure("prepare", m) == "512 GRPO / 256 SFT / 1319 eval rows"
    assert summary.key_figure("sft", m) == "40 steps, final loss 1.235"
    assert summary.key_figure("grpo", m) == "6 steps, mean reward 0.100 → 0.250"
    assert summary.key_figure("evaluate_base", m) == "base strict 5.0%"
    assert summary.key_figure("evaluate", m) == "SFT strict 10.0%, GRPO not evaluated"
    assert summary.key_figure("gguf", m) == "f16 7.1 MB, q8_0 3.9 MB"
    assert summary.key_figure("register", m) == "v3 kept as candidate"
    assert summary.decision(m) == "gsm8k-grpo v3: kept champion v2 (no gain)"
    assert summary.key_figure("merge", m) == ""  # no metrics file yet
    (m / "merge.json").write_text("[1, 2]")
    assert summary.key_figure("merge", m) == ""  # not the expected shape: no figure, no crash
    (m / "publish.json").write_text(json.dumps({"enabled": False, "reason": "publish.enabled is false"}))
    assert summary.key_figure("publish", m) == "skipped (publish.enabled false)"
    (m / "publish.json").write_text(json.dumps({"enabled": True, "repos": {"adapter": {"committed": True},
                                                                           "gguf": {"committed": False}}}))
    assert summary.key_figure("publish", m) == "adapter committed, gguf unchanged"
    cards = tmp_path / "cards"
    assert summary.key_figure("model_card", m, cards) == ""  # not made yet
    for kind in ("merged", "adapter"):
        (cards / kind).mkdir(parents=True)
        (cards / kind / "README.md").write_text("card")
    (cards / "gguf").mkdir()  # no card in it: not counted
    assert summary.key_figure("model_card", m, cards) == "2 cards: adapter, merged"


def test_accuracy_intervals_are_wilson_intervals(tmp_path):
    (tmp_path / "evaluate.json").write_text(json.dumps({
        "base": {"evaluated": 1, "strict": 0.0, "flexible": 0.05, "n": 20},
        "grpo": {"evaluated": 1, "strict": 0.5, "flexible": 0.5, "n": 100}}))
    rows = {r["model"]: r for r in summary.accuracy(tmp_path)}
    low, high = rows["base"]["strict_ci"]
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-3)  # 0/20: not the 0-width interval of ±1.96 stderr
    assert rows["grpo"]["strict_ci"] == pytest.approx((0.4038, 0.5962), abs=1e-3)
    assert rows["grpo"]["strict_text"] == "50.0% [40.4, 59.6]"
    assert rows["sft"]["strict_text"] == "n/a" and rows["sft"]["n"] is None


# ------------------------------------------------------------------ UIs
def test_a_port_in_use_gets_a_one_line_fix():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse) as err:
            check_port("127.0.0.1", port, "mlflow")
        out = subprocess.run([PY, "-m", "flows.ui", "mlflow", "--port", str(port)], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert str(err.value) == (f"port {port} on 127.0.0.1 is in use (another `make ui` still running?): "
                              f"stop it, or pick another port: `make ui PORT={port + 1}`")
    assert out.returncode == 1 and out.stderr.strip() == f"error: {err.value}"
    check_port("127.0.0.1", port, "mlflow")  # free again: no error


@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.parametrize("ui, health", [("mlflow", "/health"), ("prefect", "/api/health")])
def test_make_ui_prints_its_url_and_serves_it(ui, health, tmp_path):
    """`python -m flows.ui <ui>` (what `make ui` / `make prefect-ui` run) on a free loopback port."""
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PIPELINE_MLRUNS_DIR": str(tmp_path / "mlruns"), "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.Popen([PY, "-m", "flows.ui", ui, "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith(f"{'MLflow' if ui == 'mlflow' else 'Prefect'} UI: http://127.0.0.1:{port}")
        deadline, status = time.monotonic() + 300, None
        while time.monotonic() < deadline and status != 200:
            assert proc.poll() is None, f"{ui} exited with {proc.returncode}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{health}", timeout=5) as response:
                    status = response.status
            except OSError:
                time.sleep(1)
        assert status == 200
        if ui == "mlflow":
            assert (tmp_path / "mlruns/mlflow.db").exists()  # the project's store, not ./mlflow.db
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.slow
def test_cli_failure_prints_stage_error_log_and_fix_not_a_traceback(tmp_path):
    """The real flow in a copy of the repository, its prepare stage pointed at a hub dataset with the
    hub switched off: the console says which stage, what error, where the log is, and the fix."""
    from tests.test_flows import copy_repo

    repo = copy_repo(tmp_path / "repo")
    env = {**os.environ, "PIPELINE_MLRUNS_DIR": str(tmp_path / "mlruns"), "PREFECT_HOME": str(tmp_path / "prefect"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([PY, "-m", "flows.pipeline", "--stages", "prepare", "--set", "flow.retries=0",
                          "--set", "prepare.source=hub", "--set", "prepare.hub_id=openai/gsm8k",
                          "--set", "prepare.hub_config=main"], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("pipeline: prepare  (stage logs: reports/pipeline/logs)")
    assert lines[1].startswith("▶ prepare") and lines[2].startswith("✗ prepare") and "failed" in lines[2]
    tail = out.stdout[out.stdout.index("error: stage prepare failed"):].splitlines()
    assert tail[0] == "error: stage prepare failed: ConnectionError: Couldn't reach 'openai/gsm8k' on the Hub " \
                      "(OfflineModeIsEnabled)"
    assert tail[1:] == ["  log: reports/pipeline/logs/prepare.log",
                        "  fix: the Hugging Face Hub cannot be reached from here: use local data (`--set "
                        "prepare.source=file` with prepare.train_file and prepare.test_file, or prepare.source=gsm8k: "
                        "the copy shipped in data/gsm8k), or run the CPU profile instead: `make pipeline` (preset tiny)"]
    assert "OfflineModeIsEnabled" in (repo / "reports/pipeline/logs/prepare.log").read_text()
    assert "# GSM8K pipeline: failed at prepare" in (repo / "reports/pipeline/report.md").read_text()
    assert "report: reports/pipeline/report.html" in out.stdout
