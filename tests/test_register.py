"""The register stage against a real MLflow store (sqlite under PIPELINE_MLRUNS_DIR).

The tiny model from `base_dir` plays the merged model, a real LoRA adapter is made on it,
and a small real GGUF file plus a Modelfile play the exports. The GSM8K scores are PLANTED
inputs to the promotion gate (written as evaluate.json): what is tested is how the gate and
the registry react to them, not the scores themselves.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from stages import register
from stages.common.answer_format import AnswerFormat
from stages.register import CANDIDATE, CHAMPION, decide
from tests.conftest import tiny

NAME = "register-test"
OVERRIDES = {"project": {"name": NAME}, "registry": {"min_improvement": 0.05}}


# --------------------------------------------------------------------------- the pure gate
@pytest.mark.parametrize("candidate, champion, min_improvement, promote", [
    (0.30, None, 0.0, True),    # no champion: the first candidate is promoted
    (0.00, None, 0.5, True),    # ... whatever its score
    (0.45, 0.30, 0.0, True),    # better
    (0.45, 0.30, 0.15, True),   # better by exactly min_improvement (float noise tolerated)
    (0.45, 0.30, 0.16, False),  # better, but not by enough
    (0.30, 0.30, 0.0, False),   # a tie does not beat the champion
    (0.29, 0.30, 0.0, False),   # worse never becomes champion
    (float("nan"), None, 0.0, False),  # an unusable score is never promoted
])
def test_decide_table(candidate, champion, min_improvement, promote):
    decision, reason = decide(candidate, champion, min_improvement)
    assert decision is promote
    assert reason


def test_gsm8k_scores_names_the_problem():
    scores = register.gsm8k_scores({"grpo": {"evaluated": 1, "strict": 0.5, "flexible": 0.75, "n": 20}})
    assert scores == {"strict": 0.5, "flexible": 0.75}
    with pytest.raises(KeyError, match="no entry for 'grpo'"):
        register.gsm8k_scores({"sft": {"strict": 0.5, "flexible": 0.5}})
    with pytest.raises(ValueError, match="not evaluated"):
        register.gsm8k_scores({"grpo": {"evaluated": 0}})
    with pytest.raises(ValueError, match="between 0 and 1"):
        register.gsm8k_scores({"grpo": {"strict": 42, "flexible": 0.5}})


def test_dvc_lock_md5(tmp_path):
    (tmp_path / "models" / "merged").mkdir(parents=True)
    lock = tmp_path / "dvc.lock"
    lock.write_text("schema: '2.0'\nstages:\n  merge:\n    cmd: python -m stages.merge\n"
                    "    outs:\n    - path: models/merged\n      hash: md5\n      md5: abc123.dir\n")
    assert register.dvc_lock_md5(lock, tmp_path / "models" / "merged") == "abc123.dir"
    assert register.dvc_lock_md5(lock, tmp_path / "models" / "grpo") is None
    assert register.dvc_lock_md5(tmp_path / "missing.lock", tmp_path / "models" / "merged") is None


def test_disabled_registry_only_writes_the_report(tmp_path):
    params = tiny({"registry": {"enabled": False}})
    missing = tmp_path / "missing"
    result = register.run(params, missing, missing, missing, missing, missing, tmp_path / "register.md")
    assert result == {"enabled": False, "reason": "registry.enabled is false"}
    assert "skipped" in (tmp_path / "register.md").read_text()


# --------------------------------------------------------------------------- fixtures
def make_adapter(base_dir: Path, out: Path) -> Path:
    """A real (untrained) LoRA adapter on the tiny model, saved with the tokenizer."""
    from peft import LoraConfig, get_peft_model

    from stages.common.models import base_info, load_base_model, load_tokenizer

    model = get_peft_model(load_base_model(base_dir, dtype="float32"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(out)
    load_tokenizer(base_info(base_dir)["tokenizer"]).save_pretrained(out)
    return out


def make_exports(out: Path) -> Path:
    """A small valid GGUF file and an Ollama Modelfile, standing in for the gguf stage's output."""
    import gguf
    import numpy as np

    out.mkdir(parents=True)
    writer = gguf.GGUFWriter(out / "model-q8_0.gguf", "llama")
    writer.add_name("register-test")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (out / "Modelfile.q8_0").write_text("FROM ./model-q8_0.gguf\n")
    return out


@pytest.fixture(scope="module")
def registered(tmp_path_factory, base_dir, mlruns_dir):
    """Three register runs with planted scores: 0.30 (first), 0.45 (better), 0.40 (worse)."""
    import mlflow

    from stages.common import tracking
    from stages.common.models import base_info

    tmp = tmp_path_factory.mktemp("register")
    params = tiny(OVERRIDES)
    adapter = make_adapter(base_dir, tmp / "grpo")
    gguf_dir = make_exports(tmp / "gguf")
    merged = Path(base_info(base_dir)["model"])  # the tiny model plays the merged model

    # A finished grpo run in the experiment, so the versions can link to it.
    tracking.setup(NAME)
    with mlflow.start_run(run_name="grpo", tags={"stage": "grpo"}) as grpo_run:
        pass

    results = []
    for strict in (0.30, 0.45, 0.40):
        evaluation = tmp / "evaluate.json"  # planted scores: the input under test is the gate
        evaluation.write_text(json.dumps({"grpo": {"evaluated": 1, "strict": strict, "flexible": strict + 0.1}}))
        with tracking.stage_run("register", params):
            results.append(register.run(params, base_dir, adapter, merged, gguf_dir, evaluation,
                                        tmp / "reports" / "register.md", lock_file=tmp / "dvc.lock"))
    return {"results": results, "grpo_run_id": grpo_run.info.run_id, "report": tmp / "reports" / "register.md"}


# --------------------------------------------------------------------------- registry behaviour
def test_gate_moves_champion_only_on_improvement(registered):
    from mlflow import MlflowClient

    first, better, worse = registered["results"]
    assert (first["promoted"], better["promoted"], worse["promoted"]) == (True, True, False)
    assert first["champion_version_before"] is None and "no champion" in first["reason"]
    assert better["champion_strict_before"] == pytest.approx(0.30)
    assert worse["champion_strict_before"] == pytest.approx(0.45) and "champion kept" in worse["reason"]

    client = MlflowClient()
    for name in (NAME, f"{NAME}-adapter"):
        champion = client.get_model_version_by_alias(name, CHAMPION)
        candidate = client.get_model_version_by_alias(name, CANDIDATE)
        assert str(champion.version) == better["models"][name] == "2"
        assert str(candidate.version) == worse["models"][name] == "3"
        assert champion.tags["gsm8k_strict"] == "0.450000"

    gate_run = client.get_run(worse["run_id"])
    assert gate_run.data.tags["gate.decision"] == "kept"
    assert gate_run.data.metrics["gate/promoted"] == 0
    assert gate_run.data.metrics["gate/champion_strict"] == pytest.approx(0.45)
    assert "**kept**" in registered["report"].read_text()


def test_versions_carry_tags_and_exports(registered):
    from mlflow import MlflowClient

    from stages.register import params_digest

    client = MlflowClient()
    result = registered["results"][1]
    version = client.get_model_version(NAME, result["models"][NAME])
    tags = version.tags
    assert tags["git_commit"] and tags["inputs_hash"] and tags["inputs_hash_source"]
    assert tags["base_model"] == "tiny" and tags["dataset_source"] == "gsm8k"
    assert tags["params_digest"] == params_digest(tiny(OVERRIDES))
    assert float(tags["gsm8k_flexible"]) == pytest.approx(0.55)
    assert tags["grpo_run_id"] == registered["grpo_run_id"]
    assert version.run_id == result["run_id"]  # linked to the register run that logged it
    exported = {f.path for f in client.list_artifacts(result["run_id"], "gguf")}
    assert exported == {"gguf/model-q8_0.gguf", "gguf/Modelfile.q8_0"}
    assert json.loads(tags["gguf_files"]) == ["Modelfile.q8_0", "model-q8_0.gguf"]
    adapter = client.get_model_version(f"{NAME}-adapter", result["models"][f"{NAME}-adapter"])
    assert adapter.tags["gsm8k_strict"] == tags["gsm8k_strict"]


def test_champion_answers_questions(registered):
    import mlflow.pyfunc

    questions = ["Tom has 3 apples and buys 4 more. How many apples does he have?", "What is 12 + 30?"]
    for name in (NAME, f"{NAME}-adapter"):
        model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
        out = model.predict(pd.DataFrame({"question": questions}), params={"max_new_tokens": 8})
        assert list(out.columns) == ["question", "completion", "answer"]
        assert out["question"].tolist() == questions
        # The tiny random model rarely closes an answer tag, so the answer may be None.
        assert all(isinstance(c, str) and c for c in out["completion"])
        assert all(a is None or isinstance(a, str) for a in out["answer"])
        # The prompt is the trained one: system prompt, question, generation inside the reasoning tag.
        prompt = model.unwrap_python_model().prompt(questions[1])
        assert AnswerFormat().system_prompt in prompt and questions[1] in prompt
        assert prompt.endswith(AnswerFormat().reasoning_start)
    assert len(model.predict(["What is 2 + 2?"], params={"max_new_tokens": 4})) == 1
    with pytest.raises(ValueError, match="'question' column"):
        model.predict(pd.DataFrame({"prompt": ["What is 2 + 2?"]}))


# --------------------------------------------------------------------------- serving
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.servers
@pytest.mark.slow  # 13 s on an idle machine, 45 s with the CPU shared; a fresh process pays the imports
def test_champion_serves_over_http(registered, tmp_path):
    from stages.common import tracking

    port = free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    # `mlflow models serve` runs `exec uvicorn` through a shell: the venv's bin must be on PATH,
    # as it is for a user who activated the venv (the README says so).
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
           "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (tmp_path / "serve.log").open("w")
    # A session of its own, so the server and its uvicorn worker are stopped together.
    server = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", f"models:/{NAME}@{CHAMPION}", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"server exited: {(tmp_path / 'serve.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no /ping in 180 s: {(tmp_path / 'serve.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        body = json.dumps({"dataframe_records": [{"question": "What is 12 + 30?"}],
                           "params": {"max_new_tokens": 8}}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as resp:
            assert resp.status == 200
            predictions = json.loads(resp.read())["predictions"]
        assert len(predictions) == 1
        assert set(predictions[0]) == {"question", "completion", "answer"}
        assert isinstance(predictions[0]["completion"], str) and predictions[0]["completion"]
    finally:
        stop(server)
        log.close()


def stop(server: subprocess.Popen) -> None:
    """Terminate the server's process group (the server and its worker), then make sure."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
