"""Stage `model_card`: a Hugging Face model card for every model the pipeline makes.

    python -m stages.model_card       # reads params.yaml; writes models/cards/{adapter,merged,gguf}/

One card per model folder: `adapter` (models/grpo: the GRPO LoRA adapter, or the full model
when model.lora is off), `merged` (models/merged) and `gguf` (models/gguf). Each is a
README.md written with huggingface_hub's ModelCard/ModelCardData from the template
stages/model_card.md, with the images it links next to it (the reward curves from the grpo
stage, an accuracy chart drawn here).

- Front matter: base_model (a hub id; a local or tiny base has none), datasets (a hub
  dataset), library_name (peft / transformers / gguf), license (project.license), tags
  (grpo, trl, sft; unsloth and vllm when the run used them) and a model-index: the dataset
  actually evaluated, strict and flexible exact match with n, for the GRPO model and, named
  as references, the base and SFT models; the GGUF card adds each file's score.
- Body: the recipe (SFT priming, then GRPO) with its hyperparameters, the rewards and their
  weights, the answer format with a real prompt and completion, the curves, how to load the
  model (transformers, peft, llama.cpp, Ollama, MLflow), limitations and the lineage (git
  commit, the dvc.lock md5 of the folder, a hash of the prepared data, the eval-set hash).
  No digest of all params: the stage declares only the params it reads, so such a digest
  could go stale without DVC rerunning it.

Where the numbers come from: metrics/{eval_base,evaluate,sft,grpo,gguf}.json and
reports/eval/tuned/grpo/samples.jsonl; nothing is measured here. The cards live in their
own DVC output (models/cards) rather than inside the model folders, which belong to the
stages that made them; `publish` uploads each model folder with its card, and `register`
makes each card the description of its registered version.

`model_id` in the load snippets is the Hub repo from publish.<kind>_repo when set (so the
cards name where the models are published), else the local folder.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common import tracking
from stages.common.answer_format import AnswerFormat
from stages.common.params import Params, load_params
from stages.common.paths import ROOT, metrics_file, path

CARD_FILE = "README.md"  # what the Hub shows
TEMPLATE = Path(__file__).with_name("model_card.md")
KINDS = ("adapter", "merged", "gguf")
REWARD_IMAGE, ACCURACY_IMAGE = "grpo_rewards.png", "accuracy.png"
MLFLOW_DESCRIPTION_LIMIT = 5000  # characters: MLflow's SQL stores hold a model version description in VARCHAR(5000)
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"


@dataclass(frozen=True)
class CardInputs:
    """Everything a card is made from (the stage's DVC deps)."""

    base_dir: Path
    adapter_dir: Path
    merged_dir: Path
    gguf_dir: Path
    prepared_dir: Path
    metrics_dir: Path
    reward_curves: Path  # plots/grpo_rewards.png
    samples_file: Path  # reports/eval/tuned/grpo/samples.jsonl
    lock_file: Path
    root: Path  # the workspace: local folders are named relative to it


# --------------------------------------------------------------------------- reading the run
def read_metrics(metrics_dir: Path, name: str) -> dict[str, Any]:
    file = metrics_dir / f"{name}.json"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: run the stage that writes it (dvc repro)")
    return json.loads(file.read_text())


def data_hash(prepared_dir: Path) -> str:
    """sha256 over the prepared split files (names and bytes), short form."""
    h = hashlib.sha256()
    for file in sorted(p for p in prepared_dir.rglob("*") if p.is_file()):
        h.update(file.relative_to(prepared_dir).as_posix().encode())
        h.update(file.read_bytes())
    return h.hexdigest()[:16]


def dataset_id(params: Params) -> tuple[str, str, str | None]:
    """(model-index dataset type, readable name, hub dataset id or None) of the data actually used."""
    p = params.prepare
    if p.source == "gsm8k":
        return "openai/gsm8k", "GSM8K", "openai/gsm8k"
    if p.source == "hub":
        return p.hub_id, p.hub_id + (f" ({p.hub_config})" if p.hub_config else ""), p.hub_id
    if p.source == "file":
        return f"local:{Path(p.test_file or p.train_file).name}", f"local file {Path(p.test_file or p.train_file).name}", None
    ops = " ".join(p.synthetic.operations)
    return "synthetic", f"synthetic arithmetic ({ops}, operands {p.synthetic.min_operand}-{p.synthetic.max_operand})", None


def base_model_id(params: Params) -> str | None:
    """The base's hub id (with no revision), or None for the tiny model and local folders."""
    name = params.model.name_or_path
    return None if name == "tiny" or Path(name).exists() else name


def example(samples_file: Path) -> dict[str, Any] | None:
    """The first test question the GRPO model got right (strict), else the first one."""
    if not samples_file.exists():
        return None
    records = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    right = [r for r in records if r.get("strict_correct")]
    return (right or records or [None])[0]


# --------------------------------------------------------------------------- markdown helpers
def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def fence(text: str, lang: str = "") -> str:
    """A code block the text itself cannot close."""
    ticks = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{ticks}{lang}\n{text}\n{ticks}"


def cell(text: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def messages_code(fmt: AnswerFormat, question: str) -> str:
    """The chat messages as a Python literal, for the load snippets."""
    lines = [f"    {json.dumps(m, ensure_ascii=False)}," for m in fmt.messages(question)]
    return "[\n" + "\n".join(lines) + "\n]"


# --------------------------------------------------------------------------- the facts
def results(evaluation: dict[str, Any], base_eval: dict[str, Any]) -> list[dict[str, Any]]:
    """Evaluated models, base first: name, label, scores entry."""
    entries = {"base": evaluation.get("base") or base_eval.get("base") or {}, "sft": evaluation.get("sft") or {},
               "grpo": evaluation.get("grpo") or {}}
    labels = {"base": "base model", "sft": "after SFT priming", "grpo": "after GRPO (this model)"}
    return [{"name": k, "label": labels[k], "entry": e} for k, e in entries.items() if e.get("evaluated")]


def eval_results(kind: str, rows: list[dict[str, Any]], gguf: dict[str, Any], ds_type: str, ds_name: str):
    """model-index entries: this model's strict/flexible, the base and SFT as references, GGUF files."""
    from huggingface_hub import EvalResult

    def result(name: str, value: float, n: int, limit: int | None) -> EvalResult:
        # The split names the questions (`test[:20]`: the first 20), so the model-index groups
        # results by the questions they were measured on; `n` is how many were scored.
        return EvalResult(task_type="text-generation", task_name="Math word problems (answer format)",
                          dataset_type=ds_type, dataset_name=ds_name, dataset_split="test" if limit is None else f"test[:{limit}]",
                          dataset_args={"n": n}, metric_type="exact_match", metric_name=name, metric_value=value)

    out = []
    for row in rows:
        e = row["entry"]
        suffix = "" if row["name"] == "grpo" else f", {row['label']} (reference)"
        limit = (e.get("eval_set") or {}).get("limit")
        out += [result(f"strict-match{suffix}", e["strict"], e["n"], limit),
                result(f"flexible-extract{suffix}", e["flexible"], e["n"], limit)]
    if kind == "gguf":
        for record in gguf["files"].values():
            out.append(result(f"strict-match, {record['file']} in llama.cpp", record["accuracy"], record["questions"], record["questions"]))
    return out


def hyperparameters(params: Params) -> list[dict[str, Any]]:
    s, g = params.sft, params.grpo
    steps = lambda max_steps, epochs: f"{max_steps}" if max_steps > 0 else f"{epochs} epochs"  # noqa: E731
    rows = [
        ("optimizer steps", steps(s.max_steps, s.num_train_epochs), steps(g.max_steps, g.num_train_epochs)),
        ("learning rate", s.learning_rate, g.learning_rate),
        ("schedule", f"{s.lr_scheduler_type}, {s.warmup_steps} warm-up steps", f"{g.lr_scheduler_type}, warm-up ratio {g.warmup_ratio}"),
        ("optimizer", s.optim, g.optim),
        ("weight decay", s.weight_decay, g.weight_decay),
        ("batch (per device x accumulation)", f"{s.per_device_train_batch_size} x {s.gradient_accumulation_steps}",
         f"{g.per_device_train_batch_size} x {g.gradient_accumulation_steps} completions"),
        ("completions per prompt (G)", "-", g.num_generations),
        ("max length (tokens)", s.max_length, f"prompt {g.max_prompt_length}, completion {g.max_completion_length}"),
        ("sampling", "-", f"temperature {g.temperature}, top_p {g.top_p}, top_k {g.top_k}, min_p {g.min_p}"),
        ("loss", "cross-entropy on completions", f"{g.loss_type}, {g.importance_sampling_level}-level ratio, "
                                                 f"epsilon {g.epsilon}/{g.epsilon_high or g.epsilon}, scale_rewards {g.scale_rewards}"),
        ("KL coefficient (beta)", "-", g.beta),
        ("gradient clipping", "-", g.max_grad_norm),
        ("seed", s.seed, g.seed),
    ]
    return [{"name": n, "sft": cell(a), "grpo": cell(b)} for n, a, b in rows]


def reward_rows(params: Params) -> list[dict[str, Any]]:
    from stages.common.rewards import REWARDS

    rows = []
    for spec in params.grpo.rewards:
        factory = REWARDS.get(spec.name)
        if factory is None:
            doc = f"custom reward `{spec.name}`" + (f"; options {json.dumps(spec.options)}" if spec.options else "")
        else:
            # The docstring names the options; their values are the factory's defaults unless params set them.
            values = {name: p.default for name, p in inspect.signature(factory).parameters.items()
                      if p.kind is inspect.Parameter.KEYWORD_ONLY} | spec.options
            doc = " ".join((factory.__doc__ or "").split())
            if values:
                doc += " With " + ", ".join(f"`{k}` = {v}" for k, v in values.items()) + "."
        rows.append({"name": spec.name, "weight": spec.weight, "doc": cell(doc)})
    return rows


def limitations(params: Params, rows: list[dict[str, Any]], kind: str, ds_name: str) -> list[str]:
    n = next((r["entry"]["n"] for r in rows if r["name"] == "grpo"), None)
    items = [
        f"Trained and evaluated on {ds_name} only: short arithmetic word problems in English with a numeric answer. "
        "It is not a general assistant and was not tuned for safety.",
        f"The answer counts only inside `{params.project.answer_format.solution_start}...`: without the system prompt and "
        "chat template shown above the model may not use the format, and its score drops.",
        "The scores are for greedy decoding; answers sampled at a temperature were not scored the same way.",
    ]
    if n is not None and n < 500:
        items.append(f"The scores come from {n} questions: a difference of a few points between models is within noise "
                     "(the registry promotes a model only past a paired test on the same questions).")
    if params.model.name_or_path == "tiny":
        items.append("The base model is the pipeline's tiny random model (a plumbing check): its scores are near zero by design.")
    if kind == "gguf":
        items.append("Quantized files answer slightly differently from the 16-bit model; the table above measures how "
                     "often on a few questions only.")
    return items


def accuracy_chart(rows: list[dict[str, Any]], out: Path) -> None:
    """Bar chart of strict and flexible accuracy per evaluated model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["name"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for i, (key, offset) in enumerate((("strict", -width / 2), ("flexible", width / 2))):
        values = [100 * r["entry"][key] for r in rows]
        bars = ax.bar([x + offset for x in range(len(rows))], values, width, label=key)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    n = rows[-1]["entry"]["n"] if rows else 0
    ax.set(xticks=range(len(rows)), xticklabels=labels, ylabel="accuracy (%)", ylim=(0, 105),
           title=f"exact match on {n} test questions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- one card
def build(kind: str, params: Params, inputs: CardInputs) -> tuple[Any, dict[str, Any]]:
    """The ModelCard of one model folder, and the facts it was rendered from."""
    from huggingface_hub import ModelCard, ModelCardData

    from stages.common.models import base_info, load_chat_tokenizer
    from stages.register import dvc_lock_md5

    m, fmt = params.model, params.project.answer_format.build()
    metrics = inputs.metrics_dir
    evaluation, base_eval = read_metrics(metrics, "evaluate"), read_metrics(metrics, "eval_base")
    sft, grpo, gguf = read_metrics(metrics, "sft"), read_metrics(metrics, "grpo"), read_metrics(metrics, "gguf")
    ds_type, ds_name, hub_dataset = dataset_id(params)
    rows = results(evaluation, base_eval)
    grpo_entry = evaluation.get("grpo") or {}
    eval_set, generation = grpo_entry.get("eval_set") or {}, grpo_entry.get("generation") or {}
    base_id = base_model_id(params)
    lora = (inputs.adapter_dir / "adapter_config.json").exists()
    folder = {"adapter": inputs.adapter_dir, "merged": inputs.merged_dir, "gguf": inputs.gguf_dir}[kind]
    repo = getattr(params.publish, f"{kind}_repo")
    try:
        local = folder.resolve().relative_to(inputs.root.resolve()).as_posix()
    except ValueError:
        local = str(folder)
    name = params.project.name
    registered = {"adapter": f"{name}-adapter", "merged": name, "gguf": name}[kind]
    title = {"adapter": f"{name}-adapter" if lora else f"{name}-full", "merged": name, "gguf": f"{name}-GGUF"}[kind]
    library = {"adapter": "peft" if lora else "transformers", "merged": "transformers", "gguf": "gguf"}[kind]

    # ---- front matter
    tags = ["grpo", "trl", "sft", "reasoning", "math"]
    if "unsloth" in (sft.get("backend"), grpo.get("backend")):
        tags.append("unsloth")
    if grpo.get("generation") == "vllm" or generation.get("backend") == "vllm":
        tags.append("vllm")
    tags += {"adapter": ["lora"] if lora else [], "merged": [], "gguf": ["gguf", "llama.cpp", "ollama"]}[kind]
    # The GGUF files quantize the merged model: that is their base when it is on the Hub, else
    # they are (like the merged model) a fine-tune of the original base.
    quantized = kind == "gguf" and params.publish.merged_repo is not None
    relation = "quantized" if quantized else "adapter" if kind == "adapter" and lora else "finetune"
    card_base = params.publish.merged_repo if quantized else base_id
    data = ModelCardData(
        model_name=title, base_model=card_base, base_model_relation=relation if card_base else None,
        datasets=[hub_dataset] if hub_dataset else None, library_name=library, license=params.project.license,
        language=["en"], pipeline_tag="text-generation", tags=tags,
        eval_results=eval_results(kind, rows, gguf, ds_type, ds_name) or None)

    # ---- body facts
    deltas = [{"label": key.replace("_minus_", " minus "), "strict": f"{100 * d['strict']:+.1f} points",
               "flexible": f"{100 * d['flexible']:+.1f} points"} for key, d in evaluation.get("delta", {}).items()]
    gguf_rows = []
    if kind == "gguf":
        for q, record in gguf["files"].items():
            gguf_rows.append({"file": record["file"], "kind": q.upper() + (" (replaced)" if record.get("type_mismatch") else ""),
                              "size": f"{record['bytes'] / 2**20:.1f} MiB", "accuracy": pct(record["accuracy"]),
                              "same": pct(record.get("same_answers_as_merged")), "tps": record.get("tokens_per_second", "-")})
    gguf_file = next(iter(gguf["files"].values()))["file"] if kind == "gguf" else None
    tokenizer = load_chat_tokenizer(inputs.merged_dir)
    sample = example(inputs.samples_file)
    if sample is None:
        example_facts = {"doc_id": "-", "prompt": fence(tokenizer.apply_chat_template(
            fmt.messages(QUESTION), tokenize=False, add_generation_prompt=True)), "completion": "(the GRPO model was not evaluated)",
            "strict": "-", "gold": "-", "verdict": "not evaluated"}
    else:
        example_facts = {
            "doc_id": sample["doc_id"],
            "prompt": fence(tokenizer.apply_chat_template(fmt.messages(sample["question"]), tokenize=False, add_generation_prompt=True)),
            "completion": fence(sample["completion"]), "strict": f"`{sample.get('strict')}`", "gold": f"`{sample['gold']}`",
            "verdict": "right" if sample.get("strict_correct") else "wrong"}
    revision = base_info(inputs.base_dir).get("revision")  # the commit a hub id resolved to
    lock_md5 = dvc_lock_md5(inputs.lock_file, folder)
    data_md5 = dvc_lock_md5(inputs.lock_file, inputs.prepared_dir)
    lineage = [
        {"name": "git commit", "value": f"`{tracking.git_commit()}`"},
        {"name": f"dvc.lock md5 of `{local}`", "value": f"`{lock_md5}`" if lock_md5 else "not in dvc.lock (stage run outside DVC)"},
        {"name": "prepared data (sha256 of the split files)", "value": f"`{data_hash(inputs.prepared_dir)}`"
                                                                       + (f", dvc.lock md5 `{data_md5}`" if data_md5 else "")},
        {"name": "base model", "value": f"`{m.name_or_path}`" + (f" at revision `{revision}`" if revision else "")},
        {"name": "eval set (sha256 of the question ids)", "value": f"`{eval_set.get('sha256', '-')}`"},
    ]
    lora_text = (f"LoRA adapters (r {m.lora.r}, alpha {m.lora.alpha}, dropout {m.lora.dropout}) on "
                 f"{', '.join(f'`{t}`' for t in m.lora.target_modules)}" + (", base weights in 4-bit (QLoRA)" if m.load_in_4bit else "")
                 + "." if m.lora.enabled else "Full fine-tuning (no LoRA).")
    facts = {
        "kind": kind, "title": title, "library": library, "base_id": base_id or m.name_or_path, "registered_name": registered,
        "base_text": (f"[`{base_id}`](https://huggingface.co/{base_id})" if base_id else
                      "The pipeline's tiny random Llama (built locally)" if m.name_or_path == "tiny" else f"The local model `{m.name_or_path}`"),
        "what": {"adapter": ("This repository holds the LoRA adapter; load it on top of the base model." if lora else
                             "This repository holds the fully fine-tuned weights."),
                 "merged": "This repository holds the merged 16-bit model (the adapter folded into the base weights).",
                 "gguf": f"This repository holds GGUF files for llama.cpp and Ollama: {', '.join(f'`{q}`' for q in gguf['files'])}."}[kind],
        "dataset_name": ds_name, "reward_count": len(params.grpo.rewards), "fmt": fmt,
        "eval": {"n": eval_set.get("n", "-"), "limit_text": "all of the split" if eval_set.get("limit") is None else f"evaluate.limit {eval_set['limit']}",
                 "max_new_tokens": generation.get("max_new_tokens", params.evaluate.max_new_tokens), "sha256": eval_set.get("sha256", "-")},
        "results": [{"label": r["label"], "strict": pct(r["entry"]["strict"]), "flexible": pct(r["entry"]["flexible"]),
                     "answer_block": pct(r["entry"].get("answer_block_rate")), "n": r["entry"]["n"]} for r in rows],
        "deltas": deltas, "gguf_rows": gguf_rows, "gguf_questions": params.gguf.eval_questions,
        "gguf_merged": pct(gguf.get("merged", {}).get("accuracy")),
        "accuracy_image": ACCURACY_IMAGE, "reward_image": REWARD_IMAGE,
        "sft": {"examples": sft.get("examples", params.prepare.sft_examples),
                "summary": "skipped: sft.enabled is false" if sft.get("skipped") else
                f"{sft.get('steps')} steps, final loss {sft.get('final_loss', float('nan')):.3f}, backend {sft.get('backend')}"},
        "grpo": {"prompts": grpo.get("prompts", "-"),
                 "summary": f"{grpo.get('steps')} steps, backend {grpo.get('backend')}, generation with {grpo.get('generation')}"},
        "hyperparameters": hyperparameters(params), "adapter_text": lora_text, "rewards": reward_rows(params),
        "target_example": fence(fmt.completion("3 + 4 = 7", "7")), "example": example_facts,
        "location": repo or local,
        "location_text": f"the Hub repo `{repo}`" if repo else f"the local folder `{local}` (set publish.{kind}_repo to name the Hub repo here)",
        "messages_code": messages_code(fmt, QUESTION), "max_new_tokens": params.evaluate.max_new_tokens,
        "gguf_file": gguf_file, "modelfile": Path(gguf_file).with_suffix(".Modelfile").name if gguf_file else None,
        "ollama_tag": f"{name}:{next(iter(gguf['files']))}".lower() if kind == "gguf" else None, "n_ctx": params.gguf.n_ctx,
        "limitations": limitations(params, rows, kind, ds_name), "lineage": lineage,
    }
    return ModelCard.from_template(data, template_path=str(TEMPLATE), **facts), facts


def mlflow_description(card_text: str, full_card_uri: str, limit: int = MLFLOW_DESCRIPTION_LIMIT) -> str:
    """The card as an MLflow model version description: no front matter, images named instead of
    linked (MLflow cannot resolve them), whole sections while they fit in `limit` characters,
    then where the full card is."""
    from huggingface_hub import ModelCard

    body = ModelCard(card_text).text.strip()
    body = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r"*(\1: `\2` beside the full card)*", body)
    footer = f"\n\n---\nFull card, with its images: `{full_card_uri}`"
    sections = re.split(r"(?m)^(?=## )", body)
    kept = ""
    for section in sections:
        if len(kept) + len(section) + len(footer) > limit:
            break
        kept += section
    if not kept:  # a first section longer than the limit: cut it
        kept = body[: limit - len(footer)]
    return kept.rstrip() + footer


# --------------------------------------------------------------------------- stage
def run(params: Params, inputs: CardInputs, out: Path) -> dict[str, Any]:
    """Write out/<kind>/README.md and its images for each model folder; returns what was written."""
    for folder, stage in ((inputs.adapter_dir, "grpo"), (inputs.merged_dir, "merge"), (inputs.gguf_dir, "gguf")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found: run the {stage} stage first")
    if not inputs.reward_curves.exists():
        raise FileNotFoundError(f"{inputs.reward_curves} not found: the grpo stage draws it (dvc repro grpo)")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    chart = out / ACCURACY_IMAGE
    accuracy_chart(results(read_metrics(inputs.metrics_dir, "evaluate"), read_metrics(inputs.metrics_dir, "eval_base")), chart)
    written = {}
    for kind in KINDS:
        card, facts = build(kind, params, inputs)
        folder = out / kind
        folder.mkdir()
        shutil.copy2(inputs.reward_curves, folder / REWARD_IMAGE)
        shutil.copy2(chart, folder / ACCURACY_IMAGE)
        card.save(folder / CARD_FILE)
        written[kind] = {"card": (folder / CARD_FILE).relative_to(out).as_posix(), "title": facts["title"],
                         "bytes": (folder / CARD_FILE).stat().st_size}
        print(f"model_card: {folder / CARD_FILE} ({facts['title']})")
    chart.unlink()  # each card folder holds its own copy
    return written


def main() -> None:
    from stages.evaluate import TUNED_OUT

    params = load_params()
    inputs = CardInputs(
        base_dir=path("base_model"), adapter_dir=path("grpo"), merged_dir=path("merged"), gguf_dir=path("gguf"),
        prepared_dir=path("prepared"), metrics_dir=metrics_file("evaluate").parent,
        reward_curves=path("plots") / REWARD_IMAGE, samples_file=path("eval") / TUNED_OUT / "grpo" / "samples.jsonl",
        lock_file=ROOT / "dvc.lock", root=ROOT)
    with tracking.stage_run("model_card", params):
        written = run(params, inputs, path("cards"))
    print(json.dumps(written, indent=2))


if __name__ == "__main__":
    main()
