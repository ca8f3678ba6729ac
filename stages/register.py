"""Stage `register`: put the adapter and the merged model in the MLflow registry, gate `champion`.

    python -m stages.register         # reads params.yaml: project, model, prepare, evaluate, registry

What it registers (one run of this stage, tagged stage=register):
- `<project.name>-adapter`: the GRPO LoRA adapter (with the base model folder, or the base's
  hub id and revision when the base is not local);
- `<project.name>`: the merged 16-bit model. The GGUF files and Ollama Modelfiles are
  artifacts of the same run under `gguf/` (the version's run), not inside the pyfunc model,
  so loading or serving the model does not download the quantized copies; the version's
  `gguf_artifacts` tag holds their URI.
Both are pyfunc models (stages/common/pyfunc_model.py): `predict` takes GSM8K questions and
returns completion and extracted answer. Every version is tagged with the git commit, the
dvc.lock md5 of its folder (or the stage's inputs digest when dvc.lock has no entry), base
model, dataset source, params digest, GSM8K strict/flexible scores of the grpo model, and
the ids of the latest grpo/evaluate/merge/gguf runs in the experiment.

Aliases, not (deprecated) stages: each new version gets `candidate`. `champion` moves to the
new pair of versions only when `decide` says so: the candidate's GSM8K strict score beats
the champion's (its `gsm8k_strict` tag) by at least registry.min_improvement, or there is
no champion. The decision, both scores and the reason go to the run (metrics `gate/*`,
tags `gate.*`), metrics/register.json and reports/eval/register.md.

Deviation: the adapter's champion follows the merged model's gate decision (one decision
for the pair), so `<name>@champion` and `<name>-adapter@champion` are always the same model.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from stages.common import tracking
from stages.common.models import base_info
from stages.common.params import ROOT, Params, PrepareParams, load_params
from stages.common.paths import metrics_file, path, write_metrics

CANDIDATE, CHAMPION = "candidate", "champion"
STRICT_TAG, FLEXIBLE_TAG = "gsm8k_strict", "gsm8k_flexible"
EVALUATED_MODEL = "grpo"  # the evaluation entry whose scores the registered models carry
LINKED_STAGES = ("grpo", "evaluate", "merge", "gguf")
# Scores are accuracies over a finite sample; float noise below this is no difference.
TOLERANCE = 1e-9


# --------------------------------------------------------------------------- gate
def decide(candidate_score: float, champion_score: float | None, min_improvement: float) -> tuple[bool, str]:
    """Should the candidate become champion? Promote only on a strict improvement of at least
    min_improvement over the champion, or when there is no champion (champion_score None)."""
    if not isinstance(candidate_score, (int, float)) or not math.isfinite(candidate_score):
        return False, f"candidate score {candidate_score!r} is not a finite number"
    if champion_score is None:
        return True, f"no champion yet; candidate strict {candidate_score:.4f} becomes champion"
    gain = candidate_score - champion_score
    if gain > TOLERANCE and gain >= min_improvement - TOLERANCE:
        return True, (f"candidate strict {candidate_score:.4f} beats champion {champion_score:.4f} "
                      f"by {gain:+.4f} (>= min_improvement {min_improvement})")
    return False, (f"candidate strict {candidate_score:.4f} vs champion {champion_score:.4f}: {gain:+.4f} "
                   f"is not a gain of at least min_improvement {min_improvement}; champion kept")


# --------------------------------------------------------------------------- tag values
def gsm8k_scores(evaluation: dict[str, Any], model: str = EVALUATED_MODEL) -> dict[str, float]:
    """{'strict', 'flexible'} accuracies (0-1) of one model in metrics/evaluate.json."""
    entry = evaluation.get(model)
    if not isinstance(entry, dict):
        raise KeyError(f"evaluation has no entry for {model!r}; top-level keys: {sorted(evaluation)}")
    if entry.get("evaluated") == 0:
        raise ValueError(f"{model!r} was not evaluated: add it to evaluate.models so the gate has a score")
    scores = {}
    for key in ("strict", "flexible"):
        value = entry.get(key)
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"evaluation[{model!r}][{key!r}] = {value!r}; expected an accuracy between 0 and 1 "
                             f"(keys there: {sorted(entry)})")
        scores[key] = float(value)
    return scores


def params_digest(params: Params) -> str:
    """sha256 of the canonical params JSON (sorted keys, no whitespace)."""
    canonical = json.dumps(params.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def dataset_source(p: PrepareParams) -> str:
    if p.source == "hub":
        return f"hub:{p.hub_id}" + (f"/{p.hub_config}" if p.hub_config else "")
    if p.source == "file":
        return f"file:{p.train_file}"
    return p.source


def dvc_lock_md5(lock_file: Path, folder: Path) -> str | None:
    """The md5 dvc.lock records for a path (a stage's out first, else any dep), or None."""
    if not lock_file.exists():
        return None
    try:
        rel = folder.resolve().relative_to(lock_file.parent.resolve()).as_posix()
    except ValueError:
        return None
    stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
    for kind in ("outs", "deps"):
        for stage in stages.values():
            for entry in stage.get(kind, []):
                if entry.get("path") == rel and entry.get("md5"):
                    return entry["md5"]
    return None


# --------------------------------------------------------------------------- MLflow glue
def latest_stage_runs(experiment_id: str) -> dict[str, str]:
    """Run id of the most recent finished run of each linked stage, where there is one."""
    from mlflow import MlflowClient

    client, found = MlflowClient(), {}
    for stage in LINKED_STAGES:
        runs = client.search_runs([experiment_id], f"tags.stage = '{stage}' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            found[f"{stage}_run_id"] = runs[0].info.run_id
    return found


def adapter_artifacts(base_dir: Path, adapter_dir: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """pyfunc artifacts and model_config for the adapter version."""
    if (adapter_dir / "config.json").exists() and not (adapter_dir / "adapter_config.json").exists():
        return {"model": str(adapter_dir)}, {}  # full fine-tuning (model.lora.enabled false)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir} holds neither a peft adapter nor a model: run the grpo stage first")
    info = base_info(base_dir)
    if Path(info["model"]).exists():
        return {"adapter": str(adapter_dir), "base": info["model"]}, {}
    # A hub base is not copied into the registry; the loader fetches it pinned to its revision.
    return {"adapter": str(adapter_dir)}, {"base_model": info["model"], "base_revision": info.get("revision")}


def log_version(name: str, artifact_name: str, artifacts: dict[str, str], model_config: dict[str, Any],
                tags: dict[str, str]) -> str:
    """Log one pyfunc model in the active run, register it under `name`, tag it, alias it candidate."""
    import mlflow

    from stages.common.pyfunc_model import GSM8KModel, pip_requirements, signature

    info = mlflow.pyfunc.log_model(
        name=artifact_name, python_model=GSM8KModel(), artifacts=artifacts, model_config=model_config,
        signature=signature(model_config["max_new_tokens"]), pip_requirements=pip_requirements(),
        code_paths=[str(ROOT / "stages")], registered_model_name=name)
    version = info.registered_model_version
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))
    client.set_registered_model_alias(name, CANDIDATE, str(version))
    return str(version)


def champion_of(name: str) -> tuple[str | None, float | None, str | None]:
    """(champion version, its strict score, problem) for a registered model."""
    from mlflow import MlflowClient

    client = MlflowClient()
    version = client.get_registered_model(name).aliases.get(CHAMPION)
    if version is None:
        return None, None, None
    version = str(version)
    raw = client.get_model_version(name, version).tags.get(STRICT_TAG)
    try:
        return version, float(raw), None
    except (TypeError, ValueError):
        return version, None, f"champion v{version} has no numeric {STRICT_TAG} tag ({raw!r}); move the alias by hand"


def gate(versions: dict[str, str], candidate_score: float, min_improvement: float
         ) -> tuple[bool, str, str | None, float | None]:
    """Apply `decide` against the champion of the first model in `versions` (the merged one);
    on promotion move `champion` to every new version. Logs the decision to the active run.

    Returns (promoted, reason, previous champion version, its score)."""
    import mlflow

    name = next(iter(versions))
    # The new version holds only `candidate` yet, so the champion read here is the old one.
    champion_version, champion_score, problem = champion_of(name)
    if problem:
        promote, reason = False, problem
    else:
        promote, reason = decide(candidate_score, champion_score, min_improvement)
    if promote:
        client = mlflow.MlflowClient()
        for model, version in versions.items():
            client.set_registered_model_alias(model, CHAMPION, version)
    mlflow.set_tags({"gate.decision": "promoted" if promote else "kept", "gate.reason": reason,
                     **{f"registered.{model}": version for model, version in versions.items()}})
    logged = {"candidate_strict": candidate_score, "promoted": int(promote)}
    if champion_score is not None:
        logged["champion_strict"] = champion_score
    tracking.log_metrics(logged, prefix="gate/")
    return promote, reason, champion_version, champion_score


def run(params: Params, base_dir: Path, adapter_dir: Path, merged_dir: Path, gguf_dir: Path,
        evaluation_file: Path, report_file: Path, lock_file: Path = ROOT / "dvc.lock") -> dict[str, Any]:
    """Register adapter and merged model in the active MLflow run, then apply the champion gate."""
    import mlflow

    report_file.parent.mkdir(parents=True, exist_ok=True)
    if not params.registry.enabled:
        report_file.write_text("- register: skipped (registry.enabled is false)\n")
        return {"enabled": False, "reason": "registry.enabled is false"}
    active = mlflow.active_run()
    if active is None:
        raise RuntimeError("register.run needs an active MLflow run (main opens one with tracking.stage_run)")
    for folder, stage in ((merged_dir, "merge"), (gguf_dir, "gguf"), (adapter_dir, "grpo")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found: run the {stage} stage first")
    if not (merged_dir / "config.json").exists():
        raise FileNotFoundError(f"{merged_dir} has no config.json: not a merged model folder (run the merge stage)")
    if not evaluation_file.exists():
        raise FileNotFoundError(f"{evaluation_file} not found: run the evaluate stage first")
    start = time.perf_counter()
    name, adapter_name = params.project.name, f"{params.project.name}-adapter"
    scores = gsm8k_scores(json.loads(evaluation_file.read_text()))

    # ---- tags shared by both versions
    info = base_info(base_dir)
    m = params.model
    run_digest = active.data.tags.get("inputs_digest") or tracking.inputs_digest("register")
    common = {
        "git_commit": tracking.git_commit(),
        "base_model": m.name_or_path + (f"@{info['revision']}" if info.get("revision") else ""),
        "dataset_source": dataset_source(params.prepare),
        "params_digest": params_digest(params),
        STRICT_TAG: f"{scores['strict']:.6f}",
        FLEXIBLE_TAG: f"{scores['flexible']:.6f}",
        "evaluated_model": EVALUATED_MODEL,
        **latest_stage_runs(active.info.experiment_id),
    }

    def inputs_tags(folder: Path) -> dict[str, str]:
        md5 = dvc_lock_md5(lock_file, folder)
        if md5:
            return {"inputs_hash": md5, "inputs_hash_source": f"dvc.lock md5 of {folder.name}"}
        return {"inputs_hash": run_digest, "inputs_hash_source": "inputs_digest of the register stage"}

    model_config = {
        "answer_format": params.project.answer_format.model_dump(),
        "max_new_tokens": params.evaluate.max_new_tokens,
        "batch_size": params.evaluate.batch_size,
        "dtype": m.dtype,
        "trust_remote_code": m.trust_remote_code,
    }

    # ---- exports: GGUF files and Modelfiles, in this run (the merged version's run)
    mlflow.log_artifacts(str(gguf_dir), artifact_path="gguf")
    gguf_files = sorted(p.relative_to(gguf_dir).as_posix() for p in gguf_dir.rglob("*") if p.is_file())

    # ---- register
    artifacts, extra = adapter_artifacts(base_dir, adapter_dir)
    adapter_version = log_version(adapter_name, "adapter", artifacts, {**model_config, **extra},
                                  {**common, **inputs_tags(adapter_dir)})
    merged_version = log_version(name, "merged", {"model": str(merged_dir)}, model_config, {
        **common, **inputs_tags(merged_dir), "adapter_version": adapter_version,
        "gguf_artifacts": f"runs:/{active.info.run_id}/gguf", "gguf_files": json.dumps(gguf_files)[:5000]})

    # ---- gate
    promote, reason, champion_version, champion_score = gate(
        {name: merged_version, adapter_name: adapter_version}, scores["strict"], params.registry.min_improvement)
    decision = "promoted" if promote else "kept"
    final_champion = merged_version if promote else champion_version
    report_file.write_text(
        f"- register: `{name}` v{merged_version} (adapter v{adapter_version}), GSM8K strict "
        f"{scores['strict']:.3f} / flexible {scores['flexible']:.3f}; previous champion "
        f"{'v' + champion_version if champion_version else 'none'}; **{decision}**: {reason}\n")
    return {
        "enabled": True,
        "models": {name: merged_version, adapter_name: adapter_version},
        "candidate_strict": scores["strict"],
        "candidate_flexible": scores["flexible"],
        "champion_strict_before": champion_score,
        "champion_version_before": champion_version,
        "champion_version": final_champion,
        "promoted": promote,
        "reason": reason,
        "run_id": active.info.run_id,
        "seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    params = load_params()
    with tracking.stage_run("register", params, section="registry"):
        metrics = run(params, path("base_model"), path("grpo"), path("merged"), path("gguf"),
                      metrics_file("evaluate"), path("eval") / "register.md")
    write_metrics("register", metrics)


if __name__ == "__main__":
    main()
