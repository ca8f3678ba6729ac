"""The publish stage, run as a user runs it (`python -m stages.publish`), against a Hub TEST DOUBLE.

The Hugging Face Hub cannot be reached from here: tests/hub_double.py is a small stand-in for
its HTTP API on loopback, reached through HF_ENDPOINT (its docstring lists what it serves and
how it differs from the Hub). The model folders are real (a LoRA adapter on the tiny model,
the tiny model as the merged one, a small GGUF file) and the cards come from the real
model_card stage over planted metrics (tests/test_model_card.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from stages import model_card
from stages.common.params import ParamsError
from stages.common.ranks import free_port
from tests.conftest import tiny
from tests.hub_double import USER, serve
from tests.test_model_card import plant_run

REPOS = {"adapter": f"{USER}/gsm8k-grpo-tiny-lora", "merged": f"{USER}/gsm8k-grpo-tiny", "gguf": f"{USER}/gsm8k-grpo-tiny-GGUF"}
PUBLISH = {"enabled": True, **{f"{kind}_repo": repo for kind, repo in REPOS.items()}}


def workspace(root: Path, base_dir: Path, prepared_dir: Path, publish: dict) -> Path:
    """Model folders, cards and a params.yaml with `publish` set: what the stages before publish leave."""
    from stages.preset import render

    params = tiny({"model": {"lora": {"enabled": True}}, "publish": publish})
    inputs = plant_run(root, base_dir, prepared_dir)
    model_card.run(params, inputs, root / "models" / "cards")
    (root / "params.yaml").write_text(render(params))
    return root


def publish_env(root: Path, endpoint: str, token: str | None) -> dict[str, str]:
    env = {**os.environ, "PIPELINE_WORKDIR": str(root), "PIPELINE_MLRUNS_DIR": str(root / "mlruns"),
           "HF_ENDPOINT": endpoint, "HF_HOME": str(root / "hf-home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    # huggingface_hub reads TRANSFORMERS_OFFLINE as HF_HUB_OFFLINE too (CI sets both).
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "MLFLOW_TRACKING_URI", "PIPELINE_PARENT_RUN_ID"):
        env.pop(name, None)
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run_publish(root: Path, env: dict[str, str], check: bool = False) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "stages.publish"], env=env, capture_output=True, text=True, timeout=300)
    assert not check or done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def repo_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def published(tmp_path_factory, base_dir, prepared_dir):
    """Three runs against one Hub double: the first upload, the same files again, one card changed.
    Slow: each run opens its MLflow stage run in a fresh process (10-20 s of imports here)."""
    token = f"hf_{uuid.uuid4().hex}"
    root = workspace(tmp_path_factory.mktemp("publish"), base_dir, prepared_dir, PUBLISH)
    with serve(token) as hub:
        env = publish_env(root, hub.url, token)
        runs = [run_publish(root, env, check=True)]
        commits_after_first = {repo: len(r.commits) for repo, r in hub.repos.items()}
        metrics_first = json.loads((root / "metrics" / "publish.json").read_text())
        runs.append(run_publish(root, env, check=True))
        commits_after_second = {repo: len(r.commits) for repo, r in hub.repos.items()}
        metrics_second = json.loads((root / "metrics" / "publish.json").read_text())
        card = root / "models" / "cards" / "merged" / "README.md"
        card.write_text(card.read_text() + "\nOne more line.\n")
        runs.append(run_publish(root, env, check=True))
        yield {"hub": hub, "root": root, "token": token, "runs": runs, "metrics": [metrics_first, metrics_second],
               "commits": [commits_after_first, commits_after_second]}


# --------------------------------------------------------------------------- uploads
@pytest.mark.slow
def test_each_model_folder_is_uploaded_with_its_card(published):
    hub, root = published["hub"], published["root"]
    assert set(hub.repos) == set(REPOS.values())
    folders = {"adapter": "grpo", "merged": "merged", "gguf": "gguf"}
    for kind, repo_id in REPOS.items():
        repo = hub.repos[repo_id]
        assert repo.private  # publish.private defaults to true
        expected = repo_files(root / "models" / folders[kind]) | repo_files(root / "models" / "cards" / kind)
        assert set(repo.files) == expected | {".gitattributes"}
        card = (root / "models" / "cards" / kind / "README.md").read_bytes()
        assert repo.files["README.md"] == card  # the card, not the README peft wrote into the adapter folder
        for rel in expected - {"README.md"}:
            source = root / "models" / ("cards/" + kind if (root / "models" / "cards" / kind / rel).exists() else folders[kind])
            assert repo.files[rel] == (source / rel).read_bytes(), rel
    assert "adapter_model.safetensors" in hub.repos[REPOS["adapter"]].files
    assert "model-q8_0.gguf" in hub.repos[REPOS["gguf"]].files
    first = published["metrics"][0]
    assert all(r["committed"] for r in first["repos"].values())
    assert {kind: r["repo_id"] for kind, r in first["repos"].items()} == REPOS


@pytest.mark.slow
def test_a_second_run_with_the_same_files_uploads_nothing(published):
    hub = published["hub"]
    assert published["commits"][1] == published["commits"][0]  # no new commit anywhere
    second = published["metrics"][1]
    assert not any(r["committed"] for r in second["repos"].values())
    assert "unchanged, nothing uploaded" in published["runs"][1].stdout
    # The third run changed one card: only that file went up, in one commit.
    merged = hub.repos[REPOS["merged"]]
    assert merged.commits[-1]["files"] == ["README.md"]
    for repo_id in REPOS.values():
        sent = hub.uploaded(repo_id)
        resent = {f for f in sent if sent.count(f) > 1}
        assert resent <= ({"README.md"} if repo_id == REPOS["merged"] else set()), (repo_id, resent)


@pytest.mark.slow
def test_every_request_carries_the_token_and_no_output_shows_it(published):
    """tests/test_secrets.py searches every file and store for it as well."""
    hub, token = published["hub"], published["token"]
    assert hub.requests and all(r["authorized"] for r in hub.requests)
    for run in published["runs"]:
        assert token not in run.stdout and token not in run.stderr


# --------------------------------------------------------------------------- refusals

@pytest.fixture(scope="module")
def ready(tmp_path_factory, base_dir, prepared_dir):
    return workspace(tmp_path_factory.mktemp("refusals"), base_dir, prepared_dir, PUBLISH)


def outputs_snapshot(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in (root / "models").rglob("*") if p.is_file()}


def test_without_a_token_it_stops_before_any_request(ready):
    before = outputs_snapshot(ready)
    with serve("hf_right") as hub:
        run = run_publish(ready, publish_env(ready, hub.url, token=None))
    assert run.returncode != 0 and "HF_TOKEN is not set" in run.stderr
    assert hub.requests == [] and outputs_snapshot(ready) == before


def test_an_unreachable_hub_stops_it_at_once(ready):
    before, start = outputs_snapshot(ready), time.perf_counter()
    run = run_publish(ready, publish_env(ready, f"http://127.0.0.1:{free_port()}", "hf_any"))
    assert run.returncode != 0 and "cannot be reached" in run.stderr
    assert time.perf_counter() - start < 60 and outputs_snapshot(ready) == before


def test_a_rejected_token_is_named_not_shown(ready):
    with serve("hf_right") as hub:
        run = run_publish(ready, publish_env(ready, hub.url, "hf_wrong_token_value"))
    assert run.returncode != 0 and "rejected the token in HF_TOKEN (HTTP 401)" in run.stderr
    assert "hf_wrong_token_value" not in run.stdout + run.stderr
    assert [r["path"] for r in hub.requests] == ["/api/whoami-v2"]


def test_disabled_by_default_sends_nothing(tmp_path):
    from stages.preset import render

    (tmp_path / "params.yaml").write_text(render(tiny()))
    with serve("hf_right") as hub:
        run = run_publish(tmp_path, publish_env(tmp_path, hub.url, "hf_right"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert hub.requests == []
    assert json.loads((tmp_path / "metrics" / "publish.json").read_text())["enabled"] is False


def test_params_name_the_missing_repo_ids():
    with pytest.raises(ParamsError, match="set publish.merged_repo, publish.gguf_repo"):
        tiny({"publish": {"enabled": True, "adapter_repo": "alice/x"}})
    with pytest.raises(ParamsError, match="publish.adapter_repo"):
        tiny({"publish": {"adapter_repo": "not a repo id"}})
