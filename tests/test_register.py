"""The register stage against a real MLflow store (sqlite under PIPELINE_MLRUNS_DIR).

The tiny model from `base_dir` plays the merged model, a real LoRA adapter is made on it,
a small real GGUF file plus a Modelfile play the exports, and the cards come from the real
model_card stage. The evaluation results are PLANTED inputs to the promotion gate: which of
the first questions of the real eval split each candidate got right (written with the
evaluate stage's own record functions, as metrics/evaluate.json and correctness.json). What
is tested is how the gate and the registry react to them, not the scores themselves; the
re-evaluation of a champion runs the real lm-eval evaluation of the tiny model.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from stages import evaluate, model_card, register
from stages.common.answer_format import AnswerFormat
from stages.common.ranks import free_port
from stages.register import CANDIDATE, CHAMPION, EvalRecord, decide, differences, mcnemar
from tests.conftest import tiny

NAME = "register-test"
OVERRIDES = {"project": {"name": NAME}, "registry": {"min_improvement": 0.05}, "evaluate": {"limit": 20}}


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


def test_mcnemar_counts_only_disagreements():
    champion = [True] * 6 + [False] * 14
    assert mcnemar([True] * 12 + [False] * 8, champion) == {
        "test": "mcnemar_exact_one_sided", "wins": 6, "losses": 0, "ties": 14, "p_value": pytest.approx(1 / 64)}
    # 3 wins and 1 loss: P(X >= 3 | X ~ Bin(4, 1/2)) = 5/16, a gain within noise.
    three_one = mcnemar([True, True, True, False, True], [False, False, False, True, True])
    assert (three_one["wins"], three_one["losses"], three_one["p_value"]) == (3, 1, pytest.approx(5 / 16))
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0  # no disagreement, no evidence
    with pytest.raises(ValueError, match="same questions"):
        mcnemar([True] * 19, [True] * 20)


@pytest.mark.parametrize("wins, losses, promote, words", [
    (6, 0, True, "McNemar p = 0.0156 <= 0.05"),
    (3, 1, False, "within noise: McNemar p = 0.3125 > significance_level 0.05"),
])
def test_decide_needs_a_gain_beyond_noise(wins, losses, promote, words):
    test = {"wins": wins, "losses": losses, "p_value": mcnemar([True] * wins + [False] * losses,
                                                             [False] * wins + [True] * losses)["p_value"]}
    decision, reason = decide(0.6, 0.3, 0.05, test, significance_level=0.05)
    assert decision is promote and words in reason
    assert decide(0.6, 0.3, 0.05, None, significance_level=0.05)[0] is False  # no paired results: no promotion


def record(ids: list[str], **generation) -> EvalRecord:
    eval_set = {"sha256": "|".join(ids), "n": len(ids), "limit": len(ids)}
    return EvalRecord(eval_set, {"task": "t", "decoding": "greedy", "max_new_tokens": 48, "prompt_sha256": "p",
                                 "backend": "hf", **generation}, (True,) * len(ids), "gsm8k")


def test_differences_name_what_was_evaluated_differently():
    twenty = [str(i) for i in range(20)]
    assert differences(record(twenty), record(twenty, backend="vllm")) == []  # the engine is not the protocol
    (fewer,) = differences(record(twenty[:19]), record(twenty))
    assert "candidate 19 questions (limit 19" in fewer and "champion 20 (limit 20" in fewer
    other = EvalRecord(record(twenty).eval_set | {"sha256": "other"}, record(twenty).generation, (True,) * 20, "file:x.jsonl")
    assert "dataset file:x.jsonl" in differences(other, record(twenty))[0]
    assert differences(record(twenty, max_new_tokens=1024), record(twenty)) == [
        "generation max_new_tokens: candidate 1024 vs champion 48"]


def test_eval_record_identifies_the_questions(tiny_params):
    fmt = AnswerFormat()
    records = [{"doc_id": i, "question": f"What is {i} + 1?", "gold": str(i + 1)} for i in range(5)]
    full = evaluate.eval_record(records, tiny_params, fmt, "hf")
    assert full["eval_set"]["n"] == 5 and full["eval_set"]["limit"] == tiny_params.evaluate.limit
    assert evaluate.eval_record(records[:4], tiny_params, fmt, "hf")["eval_set"]["sha256"] != full["eval_set"]["sha256"]
    other_gold = [dict(records[0], gold="7"), *records[1:]]
    assert evaluate.eval_record(other_gold, tiny_params, fmt, "hf")["eval_set"]["sha256"] != full["eval_set"]["sha256"]
    tagged = evaluate.eval_record(records, tiny_params, AnswerFormat(solution_start="<answer>"), "vllm")
    assert tagged["eval_set"] == full["eval_set"]
    assert tagged["generation"]["prompt_sha256"] != full["generation"]["prompt_sha256"]


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
    result = register.run(params, missing, missing, missing, missing, missing, tmp_path / "register.md",
                          correctness_file=missing, cards_dir=missing, eval_file=missing)
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


def plant_evaluation(out: Path, params, eval_file: Path, right: set[int], n: int, first: int = 0) -> dict[str, Path]:
    """evaluate.json and correctness.json for n questions of the real eval split (from `first`),
    of which those in `right` were answered right: the evaluate stage's own record format."""
    from stages.eval_task.utils import read_split

    split = read_split(eval_file).iloc[first:first + n]
    records = [{"doc_id": i, "question": q, "gold": g, "strict_correct": i in right, "flexible_correct": i in right}
               for i, (q, g) in enumerate(zip(split["question"], split["answer"]))]
    strict = len(right) / n
    scores = {"strict": strict, "flexible": strict, "n": n,
              **evaluate.eval_record(records, params, params.project.answer_format.build(), "hf")}
    out.mkdir(parents=True, exist_ok=True)
    evaluate.write_correctness(out / "correctness.json", scores, records)
    (out / "evaluate.json").write_text(json.dumps({"grpo": {"evaluated": 1, **scores}}))
    return {"evaluation": out / "evaluate.json", "correctness": out / "correctness.json"}


def register_once(params, run_dir: Path, exports, planted: dict[str, Path], prepared_dir: Path) -> dict:
    from stages.common import tracking

    with tracking.stage_run("register", params):
        return register.run(params, exports.base_dir, exports.adapter_dir, exports.merged_dir, exports.gguf_dir,
                            planted["evaluation"], run_dir / "register.md", correctness_file=planted["correctness"],
                            cards_dir=run_dir.parent / "cards", eval_file=prepared_dir / "eval.parquet",
                            lock_file=run_dir / "dvc.lock")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, base_dir, prepared_dir):
    """Real model folders and their cards (model_card over planted metrics, tests/test_model_card.py)."""
    from tests.test_model_card import plant_run

    root = tmp_path_factory.mktemp("register")
    inputs = plant_run(root, base_dir, prepared_dir)
    model_card.run(tiny(OVERRIDES), inputs, root / "cards")
    return inputs


# (label, questions right among the first n, n): the gate's answer to each, in order, is asserted below.
PLANS = [("first", set(range(6)), 20),          # 0.30, no champion: promoted
         ("better", set(range(12)), 20),        # 0.60: 6 wins, 0 losses, McNemar p = 1/64: promoted
         ("noise", set(range(13)), 20),         # 0.65: +0.05 >= min_improvement, but 1 win: p = 0.5, kept
         ("worse", set(range(8)), 20),          # 0.40: kept
         ("fewer", set(range(13)), 19)]         # 0.68 on 19 questions: another eval set, refused


@pytest.fixture(scope="module")
def registered(exports, prepared_dir, mlruns_dir):
    """Five register runs against one registry, one per PLANS entry."""
    import mlflow

    from stages.common import tracking

    params = tiny(OVERRIDES)
    # A finished grpo run in the experiment, so the versions can link to it.
    tracking.setup(NAME)
    with mlflow.start_run(run_name="grpo", tags={"stage": "grpo"}) as grpo_run:
        pass

    results, root = {}, exports.root
    for label, right, n in PLANS:
        run_params = tiny(OVERRIDES | {"evaluate": {"limit": n}})
        planted = plant_evaluation(root / label, run_params, prepared_dir / "eval.parquet", right, n)
        results[label] = register_once(run_params, root / label, exports, planted, prepared_dir)
    return {"results": results, "grpo_run_id": grpo_run.info.run_id, "report": root / "fewer" / "register.md",
            "cards": root / "cards"}


# --------------------------------------------------------------------------- registry behaviour
def test_gate_promotes_only_a_gain_beyond_noise_on_the_same_questions(registered):
    from mlflow import MlflowClient

    r = registered["results"]
    assert [r[label]["promoted"] for label, _, _ in PLANS] == [True, True, False, False, False]
    assert r["first"]["champion_version_before"] is None and "no champion" in r["first"]["reason"]
    assert r["better"]["champion_strict_before"] == pytest.approx(0.30)
    assert r["better"]["paired_test"] | {"p_value": 0} == {"test": "mcnemar_exact_one_sided", "wins": 6, "losses": 0,
                                                           "ties": 14, "p_value": 0, "significance_level": 0.05}
    assert "within noise" in r["noise"]["reason"] and r["noise"]["paired_test"]["p_value"] == pytest.approx(0.5)
    assert "not a gain" in r["worse"]["reason"] and r["worse"]["comparable"] is True

    client = MlflowClient()
    for name in (NAME, f"{NAME}-adapter"):
        champion = client.get_model_version_by_alias(name, CHAMPION)
        candidate = client.get_model_version_by_alias(name, CANDIDATE)
        assert str(champion.version) == r["better"]["models"][name] == "2"
        assert str(candidate.version) == r["fewer"]["models"][name] == "5"
        assert champion.tags["gsm8k_strict"] == "0.600000"

    gate_run = client.get_run(r["worse"]["run_id"])
    assert gate_run.data.tags["gate.decision"] == "kept"
    assert gate_run.data.metrics["gate/promoted"] == 0
    assert gate_run.data.metrics["gate/champion_strict"] == pytest.approx(0.60)
    assert gate_run.data.metrics["gate/losses"] == 4


def test_gate_refuses_to_compare_other_eval_sets(registered):
    """The issue's case: the same kind of model re-evaluated on 19 questions must not beat a champion scored on 20."""
    fewer = registered["results"]["fewer"]
    assert fewer["candidate_strict"] > fewer["champion_strict_before"] + 0.05  # the raw scores would have promoted it
    assert fewer["promoted"] is False and fewer["comparable"] is False and fewer["paired_test"] is None
    (difference,) = fewer["differences"]
    assert "candidate 19 questions (limit 19" in difference and "champion 20 (limit 20" in difference
    assert fewer["reason"].startswith("not comparable, champion kept") and "on_incomparable" in fewer["reason"]
    assert fewer["champion_version"] == "2"
    report = registered["report"].read_text()
    assert "**kept**" in report and "not comparable" in report


def test_versions_carry_tags_evaluation_cards_and_exports(registered):
    from mlflow import MlflowClient

    from stages.register import params_digest

    client = MlflowClient()
    result = registered["results"]["better"]
    version = client.get_model_version(NAME, result["models"][NAME])
    tags = version.tags
    assert tags["git_commit"] and tags["inputs_hash"] and tags["inputs_hash_source"]
    assert tags["base_model"] == "tiny" and tags["dataset_source"] == "gsm8k"
    assert tags["params_digest"] == params_digest(tiny(OVERRIDES))
    assert float(tags["gsm8k_flexible"]) == pytest.approx(0.60)
    assert tags["grpo_run_id"] == registered["grpo_run_id"]
    assert (tags["eval_set_sha256"], tags["eval_n"], tags["eval_limit"]) == (
        result["eval_set"]["sha256"], "20", "20")
    assert json.loads(tags["eval_generation"]) == result["generation"]
    assert version.run_id == result["run_id"]  # linked to the register run that logged it
    exported = {f.path for f in client.list_artifacts(result["run_id"], "gguf")}
    assert exported == {"gguf/model-q8_0.gguf", "gguf/Modelfile.q8_0"}
    assert json.loads(tags["gguf_files"]) == ["Modelfile.q8_0", "model-q8_0.gguf"]
    assert {f.path for f in client.list_artifacts(result["run_id"], "evaluation")} == {"evaluation/correctness.json"}
    cards = {f.path for f in client.list_artifacts(result["run_id"], "card/merged")}
    assert cards == {"card/merged/README.md", "card/merged/accuracy.png", "card/merged/grpo_rewards.png"}
    # The description of each version is its card, as MLflow can show it.
    for kind, name in (("merged", NAME), ("adapter", f"{NAME}-adapter")):
        described = client.get_model_version(name, result["models"][name]).description
        assert described == model_card.mlflow_description(
            (registered["cards"] / kind / "README.md").read_text(), f"runs:/{result['run_id']}/card/{kind}/README.md")
    adapter = client.get_model_version(f"{NAME}-adapter", result["models"][f"{NAME}-adapter"])
    assert adapter.tags["gsm8k_strict"] == tags["gsm8k_strict"]


def test_a_stale_correctness_file_is_refused(tmp_path, exports, prepared_dir):
    params = tiny(OVERRIDES)
    planted = plant_evaluation(tmp_path, params, prepared_dir / "eval.parquet", set(range(3)), 20)
    evaluation = json.loads(planted["evaluation"].read_text())
    evaluation["grpo"]["strict"] = 0.5  # evaluate.json from another run than correctness.json
    planted["evaluation"].write_text(json.dumps(evaluation))
    with pytest.raises(ValueError, match="does not belong to metrics/evaluate.json"):
        register.candidate_record(evaluation, planted["correctness"], "gsm8k")


@pytest.mark.slow
def test_reevaluating_the_champion_makes_other_eval_sets_comparable(exports, prepared_dir, mlruns_dir):
    """registry.on_incomparable: reevaluate runs lm-eval on the champion's registered merged model."""
    name = "register-reeval"
    base = {"project": {"name": name}, "registry": {"on_incomparable": "reevaluate"}}
    first = tiny(base | {"evaluate": {"limit": 20}})
    planted = plant_evaluation(exports.root / "reeval-first", first, prepared_dir / "eval.parquet", set(range(6)), 20)
    assert register_once(first, exports.root / "reeval-first", exports, planted, prepared_dir)["promoted"]

    second = tiny(base | {"evaluate": {"limit": 19}})
    planted = plant_evaluation(exports.root / "reeval-second", second, prepared_dir / "eval.parquet", set(range(13)), 19)
    result = register_once(second, exports.root / "reeval-second", exports, planted, prepared_dir)
    assert result["champion_reevaluated"] is True and result["comparable"] is True
    # The champion (the random tiny model) re-scored on the candidate's 19 questions, by lm-eval.
    import mlflow

    local = mlflow.artifacts.download_artifacts(run_id=result["run_id"], artifact_path="evaluation/champion/correctness.json")
    rescored = json.loads(Path(local).read_text())
    assert rescored["eval_set"] == result["eval_set"]
    assert result["champion_strict_compared"] == pytest.approx(rescored["strict"])
    test = result["paired_test"]
    assert test["wins"] + test["losses"] + test["ties"] == 19
    assert test["wins"] - test["losses"] == 13 - round(rescored["strict"] * 19)
    # A random model answers next to none of the 19 right: the planted 13 are a gain far beyond noise.
    assert result["promoted"] is True and test["p_value"] < 0.01
    assert mlflow.MlflowClient().get_run(result["run_id"]).data.metrics["gate/champion_reevaluated"] == 1


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
