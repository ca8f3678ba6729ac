"""Stage evaluate: the task's filters on literal completions, agreement with the rewards, the
shipped task YAML, bad inputs, and the real stage (lm-eval on the tiny model with a random
LoRA adapter) writing metrics, samples, reports and MLflow child runs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest

from stages import evaluate
from stages.common.answer_format import AnswerFormat
from stages.eval_task.utils import AnswerFilter, SplitError, read_split

FMT = AnswerFormat()

# (completion as generated after the prompt's reasoning tag, gold, strict, flexible)
PLANTED = [
    ("6 + 12 = 18</think><SOLUTION>18</SOLUTION>", "18", "18", "18"),
    ("<think>3 * 4</think><SOLUTION> 1,234.50 </SOLUTION>", "1234.5", "1234.5", "1234.5"),
    ("it costs $5</think><SOLUTION>$5</SOLUTION>", "5", "5", "5"),
    ("first 7</think><SOLUTION>7</SOLUTION> then <SOLUTION>9</SOLUTION>", "9", "9", "9"),
    ("the answer is 42</think>", "42", None, "42"),  # no answer block: only flexible finds it
    ("</think><SOLUTION>forty-two</SOLUTION>", "42", None, None),
    ("</think><SOLUTION>42", "42", None, "42"),  # unclosed block is no block
    ("2 + 2</think><SOLUTION>4</SOLUTION> so maybe 5", "4", "4", "5"),
    ("loss of 3</think><SOLUTION>-3</SOLUTION>", "-3", "-3", "-3"),
    ("", "1", None, None),
]


def _filter(extraction: str, completions: list[str]) -> list[str]:
    docs = [{"answer_format": asdict(FMT)}] * len(completions)
    return [r[0] for r in AnswerFilter(extraction=extraction).apply([[c] for c in completions], docs)]


def test_filters_on_planted_completions():
    completions = [c for c, *_ in PLANTED]
    strict = _filter("strict", completions)
    flexible = _filter("lenient", completions)
    assert strict == [s or "" for _, _, s, _ in PLANTED]
    assert flexible == [f or "" for _, _, _, f in PLANTED]


def test_filters_use_the_docs_answer_format():
    fmt = AnswerFormat("<reasoning>", "</reasoning>", "<answer>", "</answer>")
    docs = [{"answer_format": asdict(fmt)}]
    resps = [["x</reasoning><answer>12</answer> 13"]]
    assert AnswerFilter(extraction="strict").apply(resps, docs) == [["12"]]
    assert AnswerFilter(extraction="lenient").apply(resps, docs) == [["13"]]
    with pytest.raises(ValueError, match="extraction must be one of"):
        AnswerFilter(extraction="regex")


def test_eval_strict_agrees_with_correctness_reward():
    from stages.common import rewards

    completions = [[{"role": "assistant", "content": c}] for c, *_ in PLANTED]
    golds = [g for _, g, _, _ in PLANTED]
    correctness = rewards.REWARDS["correctness"](FMT)  # as the GRPO stage builds it
    got = correctness(prompts=[[{"role": "user", "content": "q"}]] * len(PLANTED),
                              completions=completions, answer=golds)
    strict = _filter("strict", [c for c, *_ in PLANTED])
    assert [float(r) for r in got] == [1.0 if s == g else 0.0 for s, g in zip(strict, golds)]
    assert 0 < sum(got) < len(PLANTED)  # the table holds both right and wrong answers


# ------------------------------------------------------------------ bad inputs
def test_split_errors_name_the_file(tmp_path):
    with pytest.raises(SplitError, match="not found"):
        read_split(tmp_path / "missing.parquet")
    empty = tmp_path / "empty.parquet"
    pd.DataFrame({"question": pd.Series([], dtype=str), "answer": pd.Series([], dtype=str)}).to_parquet(empty)
    with pytest.raises(SplitError, match=f"{empty}.*no rows"):
        read_split(empty)
    nocol = tmp_path / "nocol.parquet"
    pd.DataFrame({"question": ["q"]}).to_parquet(nocol)
    with pytest.raises(SplitError, match=r"lacks column\(s\) \['answer'\]"):
        read_split(nocol)
    notnum = tmp_path / "notnum.parquet"
    pd.DataFrame({"question": ["q", "r"], "answer": ["3", "three"]}).to_parquet(notnum)
    with pytest.raises(SplitError, match=r"not a number in row\(s\) \[1\]"):
        read_split(notnum)


def test_empty_split_fails_before_any_model_loads(tiny_params, base_dir, tmp_path):
    empty = tmp_path / "eval.parquet"
    pd.DataFrame({"question": pd.Series([], dtype=str), "answer": pd.Series([], dtype=str)}).to_parquet(empty)
    with pytest.raises(SplitError, match="no rows"):
        evaluate.run_base(tiny_params, base_dir, empty, tmp_path / "out")


def test_missing_model_folder_is_named(base_dir, tmp_path):
    (tmp_path / "grpo").mkdir()
    with pytest.raises(evaluate.EvalError, match=f"{tmp_path / 'grpo'} holds no model for 'grpo'"):
        evaluate.resolve_model("grpo", base_dir, tmp_path / "grpo")


def test_resolve_model_kinds(base_dir, tmp_path):
    assert evaluate.resolve_model("base", base_dir, None).kind == "base"
    skipped = tmp_path / "sft"
    skipped.mkdir()
    (skipped / "skipped.json").write_text("{}")
    assert evaluate.resolve_model("sft", base_dir, skipped).kind == "skipped"
    full = tmp_path / "full"
    shutil.copytree(base_dir / "model", full)
    spec = evaluate.resolve_model("grpo", base_dir, full)
    assert (spec.kind, spec.pretrained, spec.tokenizer, spec.adapter) == ("full", str(full), str(full), None)


def _lora_adapter(model, out: Path, seed: int = 0) -> Path:
    """A random LoRA adapter (B not zero, so it changes the model) saved like the training stages do."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(out)
    return out


def test_mismatched_adapter_is_named(tiny_params, base_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4))
    adapter = _lora_adapter(other, tmp_path / "wrong")
    spec = evaluate.ModelSpec("grpo", str(base_dir / "model"), str(base_dir / "model"), str(adapter), kind="adapter")
    with pytest.raises(evaluate.EvalError, match=f"adapter {adapter} does not match base model .*in_features=128, base 256"):
        evaluate.check_adapter(spec)


def test_broken_task_yaml_is_named(tmp_path, prepared_dir, monkeypatch):
    broken = tmp_path / "eval_task"
    shutil.copytree(evaluate.TASK_DIR, broken)
    yaml_file = broken / "gsm8k_answer_format.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("utils.load_split", "utils.no_such_function"))
    monkeypatch.setattr(evaluate, "TASK_DIR", broken)
    with pytest.raises(evaluate.EvalError, match=f"task gsm8k_answer_format in {broken} does not load"):
        evaluate.load_task(prepared_dir / "eval.parquet", FMT)


def test_shipped_task_yaml_loads(prepared_dir):
    _, task = evaluate.load_task(prepared_dir / "eval.parquet", FMT)
    assert [f.name for f in task._filters] == list(evaluate.FILTERS)
    doc = task.test_docs()[0]
    assert doc["answer_format"] == asdict(FMT)
    assert task.config.generation_kwargs["do_sample"] is False
    assert task.config.generation_kwargs["until"] == []  # the solution end tag must not be a stop string


# ------------------------------------------------------------------ scoring, with a planted model
class PlantedLM:
    """Test double for a model: answers from a table instead of generating, so the task's
    scoring (filters, metric, stderr, repeats) can be checked against known values. The real
    model path is covered by the stage test below."""

    def __new__(cls, tokenizer, answers: dict[str, list[str]]):
        from lm_eval.api.model import LM

        class _Planted(LM):
            def __init__(self):
                super().__init__()
                self.prompts: list[str] = []

            @property
            def tokenizer_name(self) -> str:
                return "planted"

            def chat_template(self, chat_template=False):
                return tokenizer.chat_template

            def apply_chat_template(self, chat_history, add_generation_prompt=True):
                return tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)

            def generate_until(self, requests, disable_tqdm=False):
                out, seen = [], {}
                for req in requests:
                    prompt = req.args[0]
                    self.prompts.append(prompt)
                    i = seen[prompt] = seen.get(prompt, -1) + 1
                    choices = answers[req.doc["question"]]
                    out.append(choices[i % len(choices)])
                return out

            def loglikelihood(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return _Planted()


def test_task_scores_planted_completions(tiny_params, base_dir, prepared_dir):
    from stages.common.models import load_tokenizer

    eval_file = prepared_dir / "eval.parquet"
    split = read_split(eval_file).head(4)
    q, g = list(split["question"]), list(split["answer"])
    answers = {
        q[0]: [f"ok</think><SOLUTION>{g[0]}</SOLUTION>"],  # strict and flexible right
        q[1]: [f"so {g[1]}</think>"],  # no block: flexible only
        q[2]: ["</think><SOLUTION>-1</SOLUTION>"],  # wrong
        q[3]: [f"</think><SOLUTION>{g[3]}</SOLUTION> and 0"],  # strict right, flexible wrong
    }
    params = tiny_params.model_copy(deep=True)
    params.evaluate.limit = 4
    lm = PlantedLM(load_tokenizer(base_dir / "model"), answers)
    results = evaluate.run_lm_eval(lm, eval_file, params, FMT)
    records = evaluate.sample_records(results["samples"][evaluate.TASK_NAME], FMT)
    s = evaluate.scores(results, records)
    assert (s["strict"], s["flexible"], s["n"]) == (0.5, 0.5, 4)
    assert s["strict_stderr"] == pytest.approx(0.2886751, abs=1e-6)  # sqrt(p(1-p)/(n-1))
    assert [r["strict_correct"] for r in records] == [True, False, False, True]
    assert [r["flexible"] for r in records] == [g[0], g[1], "-1", "0"]
    assert s["answer_block_rate"] == 0.75
    # The prompt is the training prompt: system prompt, question, generation inside the reasoning tag.
    assert lm.prompts[0].startswith(FMT.system_prompt) and lm.prompts[0].endswith(FMT.reasoning_start)
    assert q[0] in lm.prompts[0]


def test_sampled_pass_and_majority(tiny_params, base_dir, prepared_dir):
    from stages.common.models import load_tokenizer

    eval_file = prepared_dir / "eval.parquet"
    split = read_split(eval_file).head(2)
    q, g = list(split["question"]), list(split["answer"])
    block = "</think><SOLUTION>{}</SOLUTION>".format
    answers = {q[0]: [block(g[0]), block("-1"), block("-1")],  # pass, not majority
               q[1]: [block(g[1]), block(g[1]), "nothing"]}  # pass and majority
    params = tiny_params.model_copy(deep=True)
    params.evaluate.limit = 2
    lm = PlantedLM(load_tokenizer(base_dir / "model"), answers)
    results = evaluate.run_lm_eval(lm, eval_file, params, FMT, repeats=3)
    records = evaluate.sample_records(results["samples"][evaluate.TASK_NAME], FMT, sampled=True)
    assert [r["sample_strict"] for r in records] == [[g[0], "-1", "-1"], [g[1], g[1], None]]
    s = evaluate.sampled_scores(records, 3, 0.7)
    assert (s["pass_at_k"], s["maj_at_k"], s["sample_accuracy"]) == (1.0, 0.5, 0.5)


def test_prompts_lm_eval_would_cut_are_counted(tiny_params, base_dir):
    """The tiny model's context is 1024 tokens: with 48 new tokens lm-eval keeps the last 976 of a prompt."""
    lm = evaluate.load_lm(evaluate.resolve_model("base", base_dir, None), "hf", tiny_params)
    assert lm.max_length == tiny_params.model.tiny.max_position_embeddings
    short, huge = "What is 2 + 3?", "How many? " + "7 apples and " * 5000
    assert evaluate.prompts_truncated(lm, [short, huge, short], FMT, max_new_tokens=48) == 1
    assert evaluate.prompts_truncated(lm, [short], FMT, max_new_tokens=lm.max_length - 5) == 1


@pytest.mark.slow
def test_sampled_evaluation_on_the_tiny_model(base_dir, prepared_dir, tmp_path):
    from tests.conftest import tiny

    params = tiny({"evaluate": {"limit": 4, "num_samples": 2, "sample_temperature": 1.0}})
    metrics = evaluate.run_base(params, base_dir, prepared_dir / "eval.parquet", tmp_path)
    sampled = metrics["base"]["sampled"]
    assert (sampled["k"], sampled["temperature"]) == (2, 1.0)
    assert 0.0 <= sampled["maj_at_k"] <= sampled["pass_at_k"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["samples"]) == 2 for r in rows)
    assert "Sampled (2 per question, temperature 1.0)" in (tmp_path / "report.md").read_text()


# ------------------------------------------------------------------ the stage, end to end
@pytest.fixture(scope="module")
def stage_outputs(tiny_params, base_dir, prepared_dir, mlruns_dir, tmp_path_factory):
    """evaluate_base and evaluate on the tiny model: sft skipped, grpo a random LoRA adapter."""
    import mlflow

    from stages.common import tracking
    from stages.common.models import load_base_model

    root = tmp_path_factory.mktemp("evaluate")
    sft = root / "models" / "sft"
    sft.mkdir(parents=True)
    (sft / "skipped.json").write_text(json.dumps({"reason": "sft.enabled is false"}))
    grpo = _lora_adapter(load_base_model(base_dir, "float32"), root / "models" / "grpo")
    eval_file = prepared_dir / "eval.parquet"
    with tracking.stage_run("evaluate_base", tiny_params) as base_run:
        base = evaluate.run_base(tiny_params, base_dir, eval_file, root / "reports" / "base", evaluate.log_child_run)
    with tracking.stage_run("evaluate", tiny_params) as tuned_run:
        tuned = evaluate.run(tiny_params, base_dir, eval_file, {"sft": sft, "grpo": grpo}, base,
                             root / "reports" / "tuned", evaluate.log_child_run)
    metrics = root / "metrics"
    metrics.mkdir()
    (metrics / "eval_base.json").write_text(json.dumps(base))
    (metrics / "evaluate.json").write_text(json.dumps(tuned))
    client = mlflow.MlflowClient(tracking.tracking_uri())
    return {"root": root, "base": base, "tuned": tuned, "client": client,
            "runs": {"base": base_run.info.run_id, "tuned": tuned_run.info.run_id}}


@pytest.mark.slow
def test_stage_writes_scores_samples_and_reports(stage_outputs, tiny_params):
    root, base, tuned = stage_outputs["root"], stage_outputs["base"], stage_outputs["tuned"]
    n = tiny_params.evaluate.limit
    assert base["base"]["evaluated"] == 1 and base["base"]["n"] == n
    # A random model never writes an answer block: strict is 0, and the report says why.
    assert base["base"]["strict"] == 0.0 and base["base"]["answer_block_rate"] == 0.0
    assert base["base"]["prompts_truncated"] == 0  # GSM8K questions fit the tiny model's context
    assert "No completion contained an answer block" in (root / "reports" / "base" / "report.md").read_text()
    assert tuned["sft"]["same_as_base"] == 1 and tuned["sft"]["strict"] == base["base"]["strict"]
    assert tuned["grpo"]["evaluated"] == 1 and tuned["grpo"]["n"] == n
    assert set(tuned["delta"]) == {"grpo_minus_base", "grpo_minus_sft", "sft_minus_base"}
    assert tuned["delta"]["grpo_minus_base"]["flexible"] == pytest.approx(tuned["grpo"]["flexible"] - base["base"]["flexible"])
    rows = [json.loads(line) for line in (root / "reports" / "tuned" / "grpo" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == n
    assert {"question", "gold", "completion", "strict", "flexible", "strict_correct", "flexible_correct",
            "answer_block", "well_formed"} <= set(rows[0])
    assert all(r["completion"] for r in rows)
    # What the register gate compares: the eval set and, per question, strict correctness.
    correctness = json.loads((root / "reports" / "tuned" / "grpo" / "correctness.json").read_text())
    assert correctness["eval_set"] == tuned["grpo"]["eval_set"] and correctness["eval_set"]["n"] == n
    assert [q["strict"] for q in correctness["questions"]] == [r["strict_correct"] for r in rows]
    report = (root / "reports" / "tuned" / "grpo" / "report.md").read_text()
    assert "| strict |" in report and "strict failures" in report and "adapter" in report
    summary = (root / "reports" / "tuned" / "report.md").read_text()
    assert "grpo minus base" in summary and "sft skipped" in summary
    # The dataset is named, not assumed: GSM8K here (the tiny preset's source).
    assert base["dataset"] == tuned["dataset"] == "gsm8k"
    assert summary.startswith("# gsm8k evaluation") and report.startswith("# gsm8k evaluation: grpo")


@pytest.mark.slow
def test_stage_logs_mlflow_child_runs(stage_outputs):
    client = stage_outputs["client"]
    tuned_run = client.get_run(stage_outputs["runs"]["tuned"])
    children = client.search_runs([tuned_run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{tuned_run.info.run_id}'")
    assert [c.data.tags["eval.model"] for c in children] == ["grpo"]  # sft reused the base scores
    child = children[0]
    assert child.data.params["adapter"].endswith("grpo") and child.data.params["backend"] == "hf"
    assert {"strict", "flexible", "exact_match/strict", "exact_match_stderr/flexible"} <= set(child.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"samples.jsonl", "report.md", "eval_grpo_samples.json"} <= artifacts


@pytest.mark.slow
def test_dvc_metrics_show_lists_the_scores(stage_outputs, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(stage_outputs["root"] / "metrics", repo / "metrics")
    (repo / "dvc.yaml").write_text("metrics:\n  - metrics/eval_base.json\n  - metrics/evaluate.json\n")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=repo, check=True)
    shown = subprocess.run([*dvc, "metrics", "show", "--json"], cwd=repo, check=True,
                           capture_output=True, text=True).stdout
    data = json.loads(shown)
    files = next(iter(data.values()))["data"]
    base = files["metrics/eval_base.json"]["data"]["base"]
    tuned = files["metrics/evaluate.json"]["data"]
    assert isinstance(base["strict"], float) and isinstance(tuned["grpo"]["flexible"], float)
    assert isinstance(tuned["delta"]["grpo_minus_sft"]["strict"], float)
    table = subprocess.run([*dvc, "metrics", "show"], cwd=repo, check=True, capture_output=True, text=True).stdout
    assert "delta.grpo_minus_base.strict" in table and "grpo.strict_stderr" in table
