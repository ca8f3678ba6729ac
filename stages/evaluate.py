"""Stages `evaluate_base` and `evaluate`: GSM8K accuracy in the trained answer format, with lm-eval.

    python -m stages.evaluate base     # stage evaluate_base: the base model, the reference number
    python -m stages.evaluate tuned    # stage evaluate: the SFT and GRPO models, and the deltas

Reads params.yaml: project (answer format, seed), model (dtype, trust_remote_code,
gpu_memory_utilization) and evaluate (limit, batch_size, max_new_tokens, backend,
num_samples, sample_temperature, models).

How: lm-eval runs the task shipped in stages/eval_task/ (`gsm8k_answer_format`), which
reads the prepared split through TaskManager metadata, so nothing touches the hub. The
prompt is the training prompt: the answer format's system prompt and the tokenizer's chat
template, whose generation prompt ends inside the reasoning tag. Decoding is greedy and
stops only at eos or max_new_tokens (a stop string would be cut out of the completion, and
the solution end tag must stay in it). Two filters score every completion with the parser
the rewards use: `strict` (the last answer block) and `flexible` (the last number).
Adapters go through lm-eval's `peft=` (HF) or `lora_local_path=` (vLLM); a full fine-tuned
model folder is passed as `pretrained`.

The base model is its own DVC stage so its number is computed once and reused by every
SFT/GRPO experiment; `evaluate` reads it from metrics/eval_base.json for the deltas.

Deviations and choices:
- models/sft holding skipped.json (sft.enabled: false) means the SFT model *is* the base
  model: its scores are the base scores (`same_as_base: 1`), not a second identical run.
- A model left out of evaluate.models gets `evaluated: 0` and no scores; deltas that need
  it are omitted.
- Sampled evaluation (evaluate.num_samples = k > 0) is a second lm-eval pass with
  `repeats: k` at evaluate.sample_temperature; pass@k (any of the k strict answers is right)
  and maj@k (the most common strict answer, ties to the first seen, is right) are computed
  here from the logged samples.
- lm-eval's HF backend resizes the embedding to the tokenizer's length before attaching an
  adapter; for models whose embedding is padded (Qwen) that drops only the unused rows.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from stages.common.answer_format import AnswerFormat, parse
from stages.common.dataset import dataset_name
from stages.common.models import base_info, choose_generation, has_cuda, torch_dtype
from stages.common.params import Params, load_params
from stages.eval_task.utils import extract, read_split

TASK_DIR = Path(__file__).resolve().parent / "eval_task"
TASK_NAME = "gsm8k_answer_format"
FILTERS = ("strict", "flexible")  # filter names in the task YAML (parse().strict, parse().lenient)
TUNED = ("sft", "grpo")
DELTAS = (("grpo", "base"), ("grpo", "sft"), ("sft", "base"))
BASE_OUT, TUNED_OUT = "base", "tuned"  # sub-folders of the `eval` path (dvc.yaml outs name them too)
CORRECTNESS_FILE = "correctness.json"  # per model folder: the eval record and per-question results (the register gate reads it)
FAILURES_SHOWN = 10


class EvalError(RuntimeError):
    """A model, adapter or task cannot be evaluated; the message names the file and the problem."""


# --------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """What lm-eval loads for one evaluated model."""

    name: str  # base | sft | grpo
    pretrained: str  # model weights: the base model, or a full fine-tuned folder
    tokenizer: str
    adapter: str | None = None  # LoRA adapter folder attached to `pretrained`
    revision: str | None = None
    kind: str = "base"  # base | adapter | full | skipped (sft disabled: the base model)


def resolve_model(name: str, base_dir: Path, model_dir: Path | None) -> ModelSpec:
    """The base model, or what the sft/grpo stage left in model_dir."""
    info = base_info(base_dir)
    base = ModelSpec(name, str(info["model"]), str(info["tokenizer"]), revision=info.get("revision"))
    if model_dir is None:
        return base
    model_dir = Path(model_dir)
    if (model_dir / "adapter_config.json").exists():
        tokenizer = str(model_dir) if _has_tokenizer(model_dir) else base.tokenizer
        return ModelSpec(name, base.pretrained, tokenizer, str(model_dir), base.revision, "adapter")
    if (model_dir / "config.json").exists():
        tokenizer = str(model_dir) if _has_tokenizer(model_dir) else base.tokenizer
        return ModelSpec(name, str(model_dir), tokenizer, kind="full")
    if (model_dir / "skipped.json").exists():
        return ModelSpec(name, base.pretrained, base.tokenizer, revision=base.revision, kind="skipped")
    raise EvalError(f"{model_dir} holds no model for {name!r}: expected adapter_config.json (LoRA), "
                    f"config.json (full model) or skipped.json; run the {name} stage (dvc repro {name})")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def check_adapter(spec: ModelSpec, trust_remote_code: bool = False) -> None:
    """Fail with a clear message when a LoRA adapter's shapes do not fit the base model.

    The base is built on the meta device (no weights read), so this costs milliseconds even
    for large models; without it the mismatch surfaces as a state-dict error deep in peft.
    """
    if spec.adapter is None:
        return
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = Path(spec.adapter) / "adapter_model.safetensors"
    if not weights.exists():
        raise EvalError(f"{spec.adapter}: adapter_model.safetensors not found (peft adapters are saved with safe_serialization)")
    config = AutoConfig.from_pretrained(spec.pretrained, revision=spec.revision, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    problems = []
    with safe_open(str(weights), framework="pt") as tensors:
        for key in tensors.keys():
            for part, axis, attr in ((".lora_A.", 1, "in_features"), (".lora_B.", 0, "out_features")):
                if part not in key:
                    continue
                module_name = key.split(part)[0].removeprefix("base_model.model.")
                try:
                    module = base.get_submodule(module_name)
                except AttributeError:
                    problems.append(f"{module_name} does not exist in the base model")
                    continue
                want, got = getattr(module, attr, None), tensors.get_slice(key).get_shape()[axis]
                if want is not None and want != got:
                    problems.append(f"{module_name}: adapter {attr}={got}, base {want}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; ... ({len(problems)} in all)" if len(problems) > 3 else "")
        raise EvalError(f"adapter {spec.adapter} does not match base model {spec.pretrained}: {shown}. "
                        "Was it trained on a different base? Re-run the training stage on this base model.")


def choose_backend(requested: str) -> tuple[str, str]:
    """('vllm' | 'hf', why): evaluate.backend mapped onto the project's one generation choice."""
    wanted = {"auto": "auto", "vllm": "vllm", "hf": "transformers"}[requested]
    engine, why = choose_generation(wanted)
    return ("vllm" if engine == "vllm" else "hf"), why


def model_args(spec: ModelSpec, backend: str, params: Params) -> dict[str, Any]:
    """lm-eval model_args for one model on one backend."""
    dtype = str(torch_dtype(params.model.dtype)).removeprefix("torch.")
    args: dict[str, Any] = {"pretrained": spec.pretrained, "tokenizer": spec.tokenizer, "dtype": dtype,
                            "trust_remote_code": params.model.trust_remote_code}
    if spec.revision:
        args["revision"] = spec.revision
    if backend == "vllm":
        # max_model_len: the longest prompt plus answer, so vLLM reserves no KV cache beyond what a question needs.
        args |= {"gpu_memory_utilization": params.model.gpu_memory_utilization, "seed": params.project.seed,
                 "max_model_len": params.model.max_seq_length}
        if spec.adapter:
            rank = json.loads((Path(spec.adapter) / "adapter_config.json").read_text()).get("r", 16)
            args |= {"lora_local_path": spec.adapter, "max_lora_rank": max(8, 2 ** math.ceil(math.log2(rank)))}
    else:
        args["device"] = "cuda" if has_cuda() else "cpu"
        if spec.adapter:
            args["peft"] = spec.adapter
    return args


def load_lm(spec: ModelSpec, backend: str, params: Params):
    from lm_eval.api.registry import get_model

    args = model_args(spec, backend, params)
    try:
        # vLLM schedules its own batches: lm-eval hands it every question at once ("auto").
        batch = "auto" if backend == "vllm" else params.evaluate.batch_size
        return get_model(backend).create_from_arg_obj(args, {"batch_size": batch})
    except Exception as err:  # lm-eval/transformers raise many types; add which model failed
        raise EvalError(f"lm-eval could not load {spec.name} ({backend}, {args}): {type(err).__name__}: {err}") from err


def prompts_truncated(lm, questions: list[str], fmt: AnswerFormat, max_new_tokens: int) -> int:
    """How many prompts are longer than the context lm-eval leaves them (its max_length minus
    max_new_tokens). lm-eval keeps only the last tokens of such a prompt, which drops the system
    prompt without a word, so they are counted here (scores: prompts_truncated) and warned about."""
    room, tok = lm.max_length - max_new_tokens, lm.tokenizer
    system = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    count = 0
    for question in questions:
        text = tok.apply_chat_template(system + [{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
        count += len(tok(text, add_special_tokens=False).input_ids) > room
    return count


# --------------------------------------------------------------------------- task
def load_task(eval_file: Path, fmt: AnswerFormat):
    """The shipped task, reading eval_file; (TaskManager, Task)."""
    from lm_eval.tasks import TaskManager

    try:
        manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                              metadata={"eval_file": str(eval_file), "answer_format": asdict(fmt)})
        return manager, manager.load([TASK_NAME])["tasks"][TASK_NAME]
    except Exception as err:  # YAML, import or config errors from lm-eval; say which file
        raise EvalError(f"lm-eval task {TASK_NAME} in {TASK_DIR} does not load: {type(err).__name__}: {err}") from err


def run_lm_eval(lm, eval_file: Path, params: Params, fmt: AnswerFormat, repeats: int = 1) -> dict:
    """One lm-eval pass: greedy when repeats is 1, else `repeats` samples per question."""
    from lm_eval import simple_evaluate

    e = params.evaluate
    manager, task = load_task(eval_file, fmt)
    gen = {"max_gen_toks": e.max_new_tokens}
    if repeats > 1:
        task.set_config(key="repeats", value=repeats)
        gen |= {"do_sample": True, "temperature": e.sample_temperature}
    task.set_config(key="generation_kwargs", value=gen, update=True)
    seed = params.project.seed
    try:
        return simple_evaluate(
            model=lm, tasks=[task], task_manager=manager, limit=e.limit, log_samples=True,
            system_instruction=fmt.system_prompt or None, apply_chat_template=True, bootstrap_iters=1000,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except Exception as err:  # a failure inside lm-eval: name the task and data it was running
        raise EvalError(f"lm-eval failed on task {TASK_NAME} ({eval_file}): {type(err).__name__}: {err}") from err


# --------------------------------------------------------------------------- scoring
def sample_records(samples: list[dict], fmt: AnswerFormat, sampled: bool = False) -> list[dict]:
    """One record per question from lm-eval's logged samples (one entry per question and filter).

    sampled: the pass had `repeats` > 1; every completion is kept and voted on (strict).
    """
    by_doc: dict[int, dict] = {}
    for s in samples:
        completions = s["resps"][0]
        rec = by_doc.setdefault(s["doc_id"], {
            "doc_id": s["doc_id"], "question": s["doc"]["question"], "gold": s["target"],
            "completion": completions[0]})
        answer = s["filtered_resps"][0]
        rec[s["filter"]] = answer or None
        rec[f"{s['filter']}_correct"] = bool(s["exact_match"])
        if sampled:
            rec["samples"] = list(completions)
    for rec in by_doc.values():
        parsed = parse(rec["completion"], fmt)
        rec["answer_block"] = bool(parsed.answer_blocks)
        rec["well_formed"] = parsed.well_formed
        if sampled:
            answers = [extract(c, fmt, "strict") for c in rec["samples"]]
            votes = Counter(a for a in answers if a is not None).most_common(1)
            rec["sample_strict"] = answers
            rec["pass"] = rec["gold"] in answers
            rec["majority"] = votes[0][0] if votes else None
            rec["maj_correct"] = rec["majority"] == rec["gold"]
    return [by_doc[k] for k in sorted(by_doc)]


def scores(results: dict, records: list[dict]) -> dict[str, float]:
    """Accuracy per filter with lm-eval's stderr, and how often the format was used."""
    task = results["results"][TASK_NAME]
    out: dict[str, float] = {}
    for name in FILTERS:
        out[name] = float(task[f"exact_match,{name}"])
        stderr = task.get(f"exact_match_stderr,{name}")
        if isinstance(stderr, (int, float)) and math.isfinite(stderr):
            out[f"{name}_stderr"] = float(stderr)
    n = len(records)
    out["n"] = n
    out["answer_block_rate"] = sum(r["answer_block"] for r in records) / n
    out["well_formed_rate"] = sum(r["well_formed"] for r in records) / n
    return out


def sampled_scores(records: list[dict], k: int, temperature: float) -> dict[str, float]:
    n = len(records)
    return {
        "k": k, "temperature": temperature,
        "pass_at_k": sum(r["pass"] for r in records) / n,
        "maj_at_k": sum(r["maj_correct"] for r in records) / n,
        "sample_accuracy": sum(a == r["gold"] for r in records for a in r["sample_strict"]) / (n * k),
    }


# --------------------------------------------------------------------------- what was evaluated, how
def question_id(question: str, gold: str) -> str:
    """Content id of one eval question (text and gold answer), independent of its row number."""
    return hashlib.sha256(json.dumps([question, gold], ensure_ascii=False).encode()).hexdigest()[:16]


def eval_record(records: list[dict], params: Params, fmt: AnswerFormat, backend: str) -> dict[str, Any]:
    """What two scores must share to be compared (the register gate checks it):

    - eval_set: sha256 over the ordered question ids, n and evaluate.limit;
    - generation: the decoding of the scored (greedy) pass, the prompt (answer-format tags and
      system prompt, hashed) and the task; the sampled pass (num_samples, temperature) is
      recorded too, though only pass@k and maj@k depend on it. The backend is recorded, not
      compared: both engines decode greedily.
    """
    e = params.evaluate
    ids = [question_id(r["question"], r["gold"]) for r in records]
    prompt = json.dumps(asdict(fmt), sort_keys=True)
    return {
        "eval_set": {"sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(), "n": len(ids), "limit": e.limit},
        "generation": {"task": TASK_NAME, "decoding": "greedy", "max_new_tokens": e.max_new_tokens,
                       "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest()[:16],
                       "num_samples": e.num_samples,
                       "sample_temperature": e.sample_temperature if e.num_samples else None,
                       "backend": backend},
    }


def write_correctness(file: Path, result_scores: dict[str, Any], records: list[dict]) -> None:
    """The eval record and, per question in eval-set order, whether strict and flexible were right."""
    questions = [{"id": question_id(r["question"], r["gold"]), "doc_id": r["doc_id"],
                  "strict": r["strict_correct"], "flexible": r["flexible_correct"]} for r in records]
    file.write_text(json.dumps({"eval_set": result_scores["eval_set"], "generation": result_scores["generation"],
                                "strict": result_scores["strict"], "flexible": result_scores["flexible"],
                                "questions": questions}, indent=1) + "\n")


# --------------------------------------------------------------------------- one model
@dataclass
class ModelResult:
    spec: ModelSpec
    backend: str
    backend_reason: str
    scores: dict[str, Any]
    raw: dict[str, Any] = field(default_factory=dict)  # lm-eval's result keys, e.g. 'exact_match,strict'
    samples_file: Path | None = None
    report_file: Path | None = None
    records: list[dict] = field(default_factory=list)


def evaluate_model(params: Params, spec: ModelSpec, eval_file: Path, out_dir: Path) -> ModelResult:
    """Run lm-eval on one model; write samples.jsonl and report.md into out_dir."""
    e = params.evaluate
    fmt = params.project.answer_format.build()
    split = read_split(eval_file)  # a missing, empty or malformed split fails before any model loads
    check_adapter(spec, params.model.trust_remote_code)
    backend, why = choose_backend(e.backend)
    start = time.perf_counter()
    lm = load_lm(spec, backend, params)
    truncated = prompts_truncated(lm, list(split["question"][:e.limit]), fmt, e.max_new_tokens)
    if truncated:
        print(f"evaluate: warning: {truncated} {spec.name} prompt(s) are longer than the {lm.max_length - e.max_new_tokens} "
              f"tokens lm-eval leaves them (max length {lm.max_length} - evaluate.max_new_tokens {e.max_new_tokens}); "
              "lm-eval keeps only their last tokens, without the system prompt (lower prepare.max_question_chars to drop them)")
    results = run_lm_eval(lm, eval_file, params, fmt)
    records = sample_records(results["samples"][TASK_NAME], fmt)
    result_scores = scores(results, records) | {"prompts_truncated": truncated}
    raw = {k: v for k, v in results["results"][TASK_NAME].items() if isinstance(v, (int, float))}
    if e.num_samples > 0:
        sampled_run = run_lm_eval(lm, eval_file, params, fmt, repeats=e.num_samples)
        for rec, srec in zip(records, sample_records(sampled_run["samples"][TASK_NAME], fmt, sampled=True)):
            rec.update({k: srec[k] for k in ("samples", "sample_strict", "pass", "majority", "maj_correct")})
        result_scores["sampled"] = sampled_scores(records, e.num_samples, e.sample_temperature)
    result_scores["seconds"] = round(time.perf_counter() - start, 2)
    result_scores |= eval_record(records, params, fmt, backend)
    result = ModelResult(spec, backend, why, result_scores, raw, records=records)
    out_dir.mkdir(parents=True, exist_ok=True)
    result.samples_file = out_dir / "samples.jsonl"
    result.samples_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_correctness(out_dir / CORRECTNESS_FILE, result_scores, records)
    result.report_file = out_dir / "report.md"
    result.report_file.write_text(model_report(result, params, fmt))
    return result


# --------------------------------------------------------------------------- reports
def _fence(text: str) -> str:
    """A markdown code block that the text itself cannot close."""
    ticks = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{ticks}\n{text}\n{ticks}"


def _pct(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


def model_report(result: ModelResult, params: Params, fmt: AnswerFormat) -> str:
    s, spec, records = result.scores, result.spec, result.records
    n = len(records)
    blocks = sum(r["answer_block"] for r in records)
    well = sum(r["well_formed"] for r in records)
    lines = [
        f"# {dataset_name(params.prepare)} evaluation: {spec.name}", "",
        f"- dataset: {dataset_name(params.prepare)} (prepare.source: {params.prepare.source})",
        f"- model: `{spec.pretrained}`" + (f" + adapter `{spec.adapter}`" if spec.adapter else ""),
        f"- backend: {result.backend} ({result.backend_reason})",
        f"- questions: {n} (limit {params.evaluate.limit}), greedy, max {params.evaluate.max_new_tokens} new tokens",
        "", "| filter | exact match | what it reads |", "|---|---|---|",
        f"| strict | {_pct(s['strict'], s.get('strict_stderr'))} | number in the last `{fmt.solution_start}...{fmt.solution_end}` block |",
        f"| flexible | {_pct(s['flexible'], s.get('flexible_stderr'))} | last number in the completion |",
    ]
    if "sampled" in s:
        k = s["sampled"]
        lines += ["", f"Sampled ({k['k']} per question, temperature {k['temperature']}): "
                  f"pass@{k['k']} {_pct(k['pass_at_k'])}, maj@{k['k']} {_pct(k['maj_at_k'])}, "
                  f"per-sample accuracy {_pct(k['sample_accuracy'])}."]
    lines += ["", f"Answer format: {blocks} of {n} completions had a complete answer block, {well} were well formed "
              "(reasoning, then exactly one answer block, nothing after)."]
    if blocks == 0:
        lines += ["", f"**No completion contained an answer block** (`{fmt.solution_start}...{fmt.solution_end}`): "
                  "the strict score is 0 because the model never used the answer format, not because of the parser."]
    failures = [r for r in records if not r["strict_correct"]]
    lines += ["", f"## First {min(FAILURES_SHOWN, len(failures))} of {len(failures)} strict failures", ""]
    for r in failures[:FAILURES_SHOWN]:
        lines += [f"### Question {r['doc_id']}: gold {r['gold']}, strict {r['strict']}, flexible {r['flexible']}", "",
                  r["question"], "", _fence(r["completion"]), ""]
    return "\n".join(lines) + "\n"


def summary_report(metrics: dict[str, Any]) -> str:
    lines = [f"# {metrics['dataset']} evaluation: base, SFT, GRPO", "", "| model | strict | flexible | answer block | n |", "|---|---|---|---|---|"]
    for name in ("base", *TUNED):
        m = metrics.get(name, {})
        if not m.get("evaluated"):
            lines.append(f"| {name} | not evaluated | | | |")
            continue
        note = " (sft skipped: the base model)" if m.get("same_as_base") else ""
        lines.append(f"| {name}{note} | {_pct(m['strict'], m.get('strict_stderr'))} | "
                     f"{_pct(m['flexible'], m.get('flexible_stderr'))} | {_pct(m['answer_block_rate'])} | {m['n']} |")
    if metrics.get("delta"):
        lines += ["", "| delta | strict | flexible |", "|---|---|---|"]
        for key, d in metrics["delta"].items():
            lines.append(f"| {key.replace('_', ' ')} | {100 * d['strict']:+.1f} pts | {100 * d['flexible']:+.1f} pts |")
    lines += ["", "Per-model reports and every sample: `<model>/report.md`, `<model>/samples.jsonl`."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- stage runs
LogResult = Callable[[ModelResult, Params], None]


def _fresh(out_dir: Path) -> None:
    """Start from an empty output folder, so no report of an earlier run survives."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)


def _entry(result: ModelResult) -> dict[str, Any]:
    return {"evaluated": 1, **result.scores}


def run_base(params: Params, base_dir: Path, eval_file: Path, out_dir: Path,
             log_result: LogResult | None = None) -> dict[str, Any]:
    """Stage evaluate_base: {'base': scores}; writes out_dir/{samples.jsonl, report.md, correctness.json}."""
    _fresh(out_dir)
    dataset = dataset_name(params.prepare)
    if "base" not in params.evaluate.models:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.md").write_text(f"# {dataset} evaluation: base\n\nNot evaluated: `base` is not in evaluate.models.\n")
        return {"dataset": dataset, "base": {"evaluated": 0}}
    result = evaluate_model(params, resolve_model("base", base_dir, None), eval_file, out_dir)
    if log_result:
        log_result(result, params)
    return {"dataset": dataset, "base": _entry(result)}


def run(params: Params, base_dir: Path, eval_file: Path, model_dirs: dict[str, Path], base_metrics: dict[str, Any],
        out_dir: Path, log_result: LogResult | None = None) -> dict[str, Any]:
    """Stage evaluate: SFT and GRPO scores and the deltas; base_metrics is run_base's output.

    Writes out_dir/<model>/{samples.jsonl, report.md, correctness.json} and out_dir/report.md.
    """
    _fresh(out_dir)
    base = base_metrics.get("base", {"evaluated": 0})
    metrics: dict[str, Any] = {"dataset": dataset_name(params.prepare), "base": base}
    for name in TUNED:
        if name not in params.evaluate.models:
            metrics[name] = {"evaluated": 0}
            continue
        spec = resolve_model(name, base_dir, model_dirs[name])
        if spec.kind == "skipped" and base.get("evaluated"):
            metrics[name] = {**base, "same_as_base": 1}
            continue
        result = evaluate_model(params, spec, eval_file, out_dir / name)
        if log_result:
            log_result(result, params)
        metrics[name] = _entry(result) | ({"same_as_base": 1} if spec.kind == "skipped" else {})
    metrics["delta"] = {
        f"{a}_minus_{b}": {f: metrics[a][f] - metrics[b][f] for f in FILTERS}
        for a, b in DELTAS if metrics[a].get("evaluated") and metrics[b].get("evaluated")}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(summary_report(metrics))
    return metrics


def log_child_run(result: ModelResult, params: Params) -> None:
    """A nested MLflow run for one evaluated model: params, metrics, samples and report."""
    import mlflow
    import pandas as pd

    from stages.common import tracking

    e, spec = params.evaluate, result.spec
    decoding = f"greedy, max_new_tokens={e.max_new_tokens}"
    if e.num_samples:
        decoding += f"; sampled k={e.num_samples} at T={e.sample_temperature}"
    with mlflow.start_run(run_name=f"eval-{spec.name}", nested=True, tags={"eval.model": spec.name}):
        mlflow.log_params({
            "model": spec.name, "pretrained": spec.pretrained, "adapter": spec.adapter or "none", "kind": spec.kind,
            "backend": result.backend, "backend_reason": result.backend_reason[:500], "limit": e.limit,
            "batch_size": e.batch_size, "decoding": decoding, "task": TASK_NAME, "dataset": dataset_name(params.prepare),
            "eval_set_sha256": result.scores["eval_set"]["sha256"]})
        tracking.log_metrics(result.raw)
        tracking.log_metrics(result.scores)
        for file in (result.samples_file, result.report_file):
            if file is not None:
                mlflow.log_artifact(str(file))
        table = pd.DataFrame([{k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()}
                              for r in result.records])
        mlflow.log_table(data=table, artifact_file=f"eval_{spec.name}_samples.json")


def main() -> None:
    from stages.common import tracking
    from stages.common.paths import metrics_file, path, write_metrics

    parser = argparse.ArgumentParser(description="GSM8K evaluation with lm-eval (stages evaluate_base / evaluate).")
    parser.add_argument("target", choices=["base", "tuned"], default="tuned", nargs="?",
                        help="base: stage evaluate_base (the base model); tuned: stage evaluate (sft and grpo, deltas)")
    target = parser.parse_args().target
    params = load_params()
    eval_file = path("prepared") / "eval.parquet"
    stage = "evaluate_base" if target == "base" else "evaluate"
    with tracking.stage_run(stage, params, section="evaluate"):
        if target == "base":
            metrics = run_base(params, path("base_model"), eval_file, path("eval") / BASE_OUT, log_child_run)
            stage_file = "eval_base"
        else:
            base_file = metrics_file("eval_base")
            if not base_file.exists():
                raise EvalError(f"{base_file} not found: run the base evaluation first (dvc repro evaluate_base)")
            metrics = run(params, path("base_model"), eval_file, {n: path(n) for n in TUNED},
                          json.loads(base_file.read_text()), path("eval") / TUNED_OUT, log_child_run)
            stage_file = "evaluate"
        tracking.log_metrics(metrics)
    write_metrics(stage_file, metrics)


if __name__ == "__main__":
    main()
