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
model, dataset source, params digest, GSM8K strict/flexible scores of the grpo model, what
they were measured on (`eval_set_sha256`, `eval_n`, `eval_limit`, `eval_generation`), and
the ids of the latest grpo/evaluate/merge/gguf runs in the experiment. The run holds the
per-question results (`evaluation/correctness.json`, written by the evaluate stage) and the
model cards (`card/<kind>/`, stage model_card); each version's description is its card.

Aliases, not (deprecated) stages: each new version gets `candidate`. `champion` moves to the
new pair of versions only when the gate says so:
1. no champion yet: promote;
2. the champion was evaluated differently (another eval set: questions, n or limit; another
   decoding, max_new_tokens or prompt; or nothing recorded): with registry.on_incomparable
   `refuse` the champion stays and the reason names each difference; with `reevaluate` the
   champion's merged model is evaluated here on the candidate's set (evaluate.evaluate_model);
3. on the same questions, `decide`: the strict gain must be at least registry.min_improvement
   and beyond noise, an exact one-sided McNemar test on the questions where the two disagree
   (`mcnemar`) with p <= registry.significance_level.
The decision, both scores, the test and the reason go to the run (metrics `gate/*`, tags
`gate.*`), metrics/register.json and reports/eval/register.md.

Deviation: the adapter's champion follows the merged model's gate decision (one decision
for the pair), so `<name>@champion` and `<name>-adapter@champion` are always the same model.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from stages.common import tracking
from stages.common.dataset import dataset_name
from stages.common.models import base_info
from stages.common.params import ROOT, Params, load_params
from stages.common.paths import load_yaml, metrics_file, path, write_metrics
from stages.evaluate import CORRECTNESS_FILE, TUNED_OUT

CANDIDATE, CHAMPION = "candidate", "champion"
STRICT_TAG, FLEXIBLE_TAG = "gsm8k_strict", "gsm8k_flexible"
EVALUATED_MODEL = "grpo"  # the evaluation entry whose scores the registered models carry
LINKED_STAGES = ("grpo", "evaluate", "merge", "gguf")
EVAL_ARTIFACTS = "evaluation"  # run artifact folder of the per-question results
# What must match for two strict scores to be compared; the backend and the sampled pass
# (pass@k, maj@k) are recorded but do not change the greedy strict score.
COMPARED_GENERATION = ("task", "decoding", "max_new_tokens", "prompt_sha256")
# Scores are accuracies over a finite sample; float noise below this is no difference.
TOLERANCE = 1e-9


# --------------------------------------------------------------------------- what a score was measured on
@dataclass(frozen=True)
class EvalRecord:
    """How one model was evaluated (evaluate.eval_record) and its strict result per question."""

    eval_set: dict[str, Any]  # sha256 of the ordered question ids, n, limit
    generation: dict[str, Any]
    strict: tuple[bool, ...] = field(repr=False)  # per question, in eval-set order
    dataset: str = "unknown"  # dataset_source, for the messages

    @classmethod
    def from_file(cls, file: Path, dataset: str) -> "EvalRecord":
        data = json.loads(Path(file).read_text())
        strict = tuple(bool(q["strict"]) for q in data["questions"])
        if len(strict) != data["eval_set"]["n"]:
            raise ValueError(f"{file}: {len(strict)} questions but eval_set.n is {data['eval_set']['n']}")
        return cls(data["eval_set"], data["generation"], strict, dataset)

    @property
    def score(self) -> float:
        return sum(self.strict) / len(self.strict)

    def tags(self) -> dict[str, str]:
        return {"eval_set_sha256": self.eval_set["sha256"], "eval_n": str(self.eval_set["n"]),
                "eval_limit": str(self.eval_set["limit"]), "eval_generation": json.dumps(self.generation, sort_keys=True)}


def differences(candidate: EvalRecord, champion: EvalRecord) -> list[str]:
    """Why the two strict scores cannot be compared; [] when they were measured alike."""
    found = []
    a, b = candidate.eval_set, champion.eval_set
    if a["sha256"] != b["sha256"]:
        found.append(f"eval set: candidate {a['n']} questions (limit {a['limit']}, dataset {candidate.dataset}, "
                     f"sha256 {a['sha256'][:12]}) vs champion {b['n']} (limit {b['limit']}, dataset {champion.dataset}, "
                     f"sha256 {b['sha256'][:12]})")
    for key in COMPARED_GENERATION:
        if candidate.generation.get(key) != champion.generation.get(key):
            found.append(f"generation {key}: candidate {candidate.generation.get(key)!r} vs champion "
                         f"{champion.generation.get(key)!r}")
    return found


def mcnemar(candidate: Sequence[bool], champion: Sequence[bool]) -> dict[str, Any]:
    """Exact one-sided McNemar test on paired per-question results (same questions, same order).

    Only the questions where the two disagree carry information: `wins` (candidate right,
    champion wrong) and `losses` (the reverse). Under "no difference" each of them is a fair
    coin, so p = P(X >= wins) for X ~ Binomial(wins + losses, 1/2).
    """
    from scipy.stats import binomtest

    if len(candidate) != len(champion):
        raise ValueError(f"paired test needs the same questions: {len(candidate)} vs {len(champion)} results")
    wins = sum(1 for a, b in zip(candidate, champion) if a and not b)
    losses = sum(1 for a, b in zip(candidate, champion) if b and not a)
    p_value = binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue if wins + losses else 1.0
    return {"test": "mcnemar_exact_one_sided", "wins": wins, "losses": losses,
            "ties": len(candidate) - wins - losses, "p_value": float(p_value)}


# --------------------------------------------------------------------------- gate
def decide(candidate_score: float, champion_score: float | None, min_improvement: float,
           test: dict[str, Any] | None = None, significance_level: float = 1.0) -> tuple[bool, str]:
    """Should the candidate become champion? Promote when there is no champion (champion_score
    None), else only on a strict gain of at least min_improvement that the paired `test`
    (mcnemar) puts beyond noise: p <= significance_level (1.0: no test needed)."""
    if not isinstance(candidate_score, (int, float)) or not math.isfinite(candidate_score):
        return False, f"candidate score {candidate_score!r} is not a finite number"
    if champion_score is None:
        return True, f"no champion yet; candidate strict {candidate_score:.4f} becomes champion"
    gain = candidate_score - champion_score
    versus = f"candidate strict {candidate_score:.4f} vs champion {champion_score:.4f}: {gain:+.4f}"
    if not (gain > TOLERANCE and gain >= min_improvement - TOLERANCE):
        return False, f"{versus} is not a gain of at least min_improvement {min_improvement}; champion kept"
    if significance_level < 1.0:
        if test is None:
            return False, f"{versus}, but there are no paired per-question results to test it; champion kept"
        odds = f"{test['wins']} questions only the candidate got right, {test['losses']} only the champion"
        if test["p_value"] > significance_level:
            return False, (f"{versus} is within noise: McNemar p = {test['p_value']:.4f} > significance_level "
                           f"{significance_level} ({odds}); champion kept")
        return True, (f"candidate strict {candidate_score:.4f} beats champion {champion_score:.4f} by {gain:+.4f} "
                      f"(>= min_improvement {min_improvement}; McNemar p = {test['p_value']:.4f} <= {significance_level}, {odds})")
    return True, (f"candidate strict {candidate_score:.4f} beats champion {champion_score:.4f} "
                  f"by {gain:+.4f} (>= min_improvement {min_improvement})")


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
    """sha256 of the canonical JSON (sorted keys, no whitespace) of the params this stage declares in
    dvc.yaml: what DVC reruns it for, so the tag never covers a value the stage did not see change."""
    from stages.common.checkpoints import params_for
    from stages.common.paths import stage_spec

    declared = [p if isinstance(p, str) else next(iter(p)) for p in stage_spec("register").get("params", [])]
    canonical = json.dumps(params_for(declared, params, set()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def dvc_lock_md5(lock_file: Path, folder: Path) -> str | None:
    """The md5 dvc.lock records for a path (a stage's out first, else any dep), or None."""
    if not lock_file.exists():
        return None
    try:
        rel = folder.resolve().relative_to(lock_file.parent.resolve()).as_posix()
    except ValueError:
        return None
    stages = (load_yaml(lock_file.read_text()) or {}).get("stages", {})
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
                tags: dict[str, str], description: str) -> str:
    """Log one pyfunc model in the active run, register it under `name`, tag and describe it,
    alias it candidate."""
    import mlflow

    from stages.common.pyfunc_model import GSM8KModel, pip_requirements, signature

    info = mlflow.pyfunc.log_model(
        name=artifact_name, python_model=GSM8KModel(), artifacts=artifacts, model_config=model_config,
        signature=signature(model_config["max_new_tokens"]), pip_requirements=pip_requirements(),
        code_paths=[str(ROOT / "stages")], registered_model_name=name)
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.update_model_version(name, version, description=description)
    client.set_registered_model_alias(name, CANDIDATE, version)
    return version


@dataclass(frozen=True)
class Champion:
    """The version holding `champion`, as the gate reads it."""

    version: str
    run_id: str
    strict: float | None  # its gsm8k_strict tag
    dataset: str
    problem: str | None = None


def champion_of(name: str) -> Champion | None:
    """The champion version of a registered model, or None when there is none."""
    from mlflow import MlflowClient

    client = MlflowClient()
    version = client.get_registered_model(name).aliases.get(CHAMPION)
    if version is None:
        return None
    mv = client.get_model_version(name, str(version))
    raw = mv.tags.get(STRICT_TAG)
    try:
        strict, problem = float(raw), None
    except (TypeError, ValueError):
        strict, problem = None, f"champion v{version} has no numeric {STRICT_TAG} tag ({raw!r}); move the alias by hand"
    return Champion(str(version), mv.run_id, strict, mv.tags.get("dataset_source", "unknown"), problem)


def recorded_evaluation(champion: Champion) -> EvalRecord | None:
    """The champion's per-question results, from its run's artifacts; None when it has none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=champion.run_id, artifact_path=f"{EVAL_ARTIFACTS}/{CORRECTNESS_FILE}", dst_path=tmp)
        except (MlflowException, OSError):
            return None
        return EvalRecord.from_file(Path(local), champion.dataset)


def reevaluate_champion(params: Params, name: str, champion: Champion, eval_file: Path) -> EvalRecord:
    """Evaluate the champion's merged model here, as the evaluate stage evaluates the candidate
    (same eval file and params); its reports are logged under `evaluation/champion/`."""
    import mlflow
    from mlflow.models import Model

    from stages import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{champion.version}", dst_path=tmp))
        relative = Model.load(str(local)).flavors["python_function"]["artifacts"]["model"]["path"]
        model_dir = str(local / relative)
        print(f"register: re-evaluating champion v{champion.version} ({model_dir}) on the candidate's eval set")
        out = Path(tmp) / "champion"
        evaluate.evaluate_model(params, evaluate.ModelSpec("champion", model_dir, model_dir, kind="full"), eval_file, out)
        mlflow.log_artifacts(str(out), artifact_path=f"{EVAL_ARTIFACTS}/champion")
        return EvalRecord.from_file(out / CORRECTNESS_FILE, champion.dataset)


def gate(versions: dict[str, str], candidate: EvalRecord, candidate_score: float, params: Params,
         reevaluate: Callable[[Champion], EvalRecord]) -> dict[str, Any]:
    """Apply the gate (module docstring) against the champion of the first model in `versions`
    (the merged one); on promotion move `champion` to every new version. Logs the decision to
    the active run and returns it."""
    import mlflow

    r = params.registry
    name = next(iter(versions))
    # The new version holds only `candidate` yet, so the champion read here is the old one.
    champion = champion_of(name)
    out: dict[str, Any] = {"champion_version_before": None, "champion_strict_before": None, "comparable": None,
                           "differences": [], "champion_reevaluated": False, "paired_test": None}
    champion_score = None
    if champion is None:
        promote, reason = decide(candidate_score, None, r.min_improvement)
    elif champion.problem:
        promote, reason = False, champion.problem
        out["champion_version_before"] = champion.version
    else:
        out |= {"champion_version_before": champion.version, "champion_strict_before": champion.strict}
        recorded = recorded_evaluation(champion)
        found = differences(candidate, recorded) if recorded else [
            f"champion v{champion.version} has no recorded evaluation ({EVAL_ARTIFACTS}/{CORRECTNESS_FILE} in run "
            f"{champion.run_id}): it was registered before eval sets were recorded"]
        if found and r.on_incomparable == "reevaluate":
            recorded = reevaluate(champion)
            out["champion_reevaluated"] = True
            still = differences(candidate, recorded)
            if still:
                raise RuntimeError(f"re-evaluating champion v{champion.version} did not reproduce the candidate's "
                                   f"evaluation ({'; '.join(still)}); is metrics/evaluate.json stale? dvc repro evaluate")
            found = []
        out |= {"comparable": not found, "differences": found}
        if found:
            promote, reason = False, ("not comparable, champion kept: " + "; ".join(found)
                                      + ". Evaluate both the same way, or set registry.on_incomparable: reevaluate")
        else:
            champion_score = recorded.score
            test = mcnemar(candidate.strict, recorded.strict)
            out["paired_test"] = {**test, "significance_level": r.significance_level}
            promote, reason = decide(candidate_score, champion_score, r.min_improvement, test, r.significance_level)
    if promote:
        client = mlflow.MlflowClient()
        for model, version in versions.items():
            client.set_registered_model_alias(model, CHAMPION, version)
    mlflow.set_tags({"gate.decision": "promoted" if promote else "kept", "gate.reason": reason[:5000],
                     "gate.comparable": str(out["comparable"]),
                     **{f"registered.{model}": version for model, version in versions.items()}})
    logged = {"candidate_strict": candidate_score, "promoted": int(promote), "champion_strict": champion_score,
              "champion_reevaluated": int(out["champion_reevaluated"])}
    if out["paired_test"]:
        logged |= {k: out["paired_test"][k] for k in ("p_value", "wins", "losses")}
    tracking.log_metrics({k: v for k, v in logged.items() if v is not None}, prefix="gate/")
    return {"promoted": promote, "reason": reason, "champion_strict_compared": champion_score, **out}


def candidate_record(evaluation: dict[str, Any], correctness_file: Path, dataset: str) -> EvalRecord:
    """The candidate's per-question results, checked against metrics/evaluate.json (one evaluate run made both)."""
    if not correctness_file.exists():
        raise FileNotFoundError(f"{correctness_file} not found: the evaluate stage writes it (dvc repro evaluate)")
    record = EvalRecord.from_file(correctness_file, dataset)
    entry = evaluation.get(EVALUATED_MODEL, {})
    if entry.get("eval_set") != record.eval_set or abs(entry.get("strict", -1) - record.score) > TOLERANCE:
        raise ValueError(f"{correctness_file} does not belong to metrics/evaluate.json (eval set {record.eval_set} vs "
                         f"{entry.get('eval_set')}, strict {record.score} vs {entry.get('strict')}): dvc repro evaluate")
    return record


def run(params: Params, base_dir: Path, adapter_dir: Path, merged_dir: Path, gguf_dir: Path,
        evaluation_file: Path, report_file: Path, *, correctness_file: Path, cards_dir: Path, eval_file: Path,
        lock_file: Path = ROOT / "dvc.lock") -> dict[str, Any]:
    """Register adapter and merged model in the active MLflow run, then apply the champion gate."""
    import mlflow

    from stages.model_card import CARD_FILE, mlflow_description

    report_file.parent.mkdir(parents=True, exist_ok=True)
    if not params.registry.enabled:
        report_file.write_text("- register: skipped (registry.enabled is false)\n")
        return {"enabled": False, "reason": "registry.enabled is false"}
    active = mlflow.active_run()
    if active is None:
        raise RuntimeError("register.run needs an active MLflow run (main opens one with tracking.stage_run)")
    for folder, stage in ((merged_dir, "merge"), (gguf_dir, "gguf"), (adapter_dir, "grpo"), (cards_dir, "model_card")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found: run the {stage} stage first")
    if not (merged_dir / "config.json").exists():
        raise FileNotFoundError(f"{merged_dir} has no config.json: not a merged model folder (run the merge stage)")
    cards = {kind: cards_dir / kind / CARD_FILE for kind in ("adapter", "merged", "gguf")}
    for card in cards.values():
        if not card.exists():
            raise FileNotFoundError(f"{card} not found: run the model_card stage first (dvc repro model_card)")
    if not evaluation_file.exists():
        raise FileNotFoundError(f"{evaluation_file} not found: run the evaluate stage first")
    start = time.perf_counter()
    name, adapter_name = params.project.name, f"{params.project.name}-adapter"
    evaluation = json.loads(evaluation_file.read_text())
    scores = gsm8k_scores(evaluation)
    dataset = dataset_name(params.prepare)
    candidate = candidate_record(evaluation, correctness_file, dataset)

    # ---- tags shared by both versions
    info = base_info(base_dir)
    m = params.model
    run_digest = active.data.tags.get("inputs_digest") or tracking.inputs_digest("register")
    common = {
        "git_commit": tracking.git_commit(),
        "base_model": m.name_or_path + (f"@{info['revision']}" if info.get("revision") else ""),
        "dataset_source": dataset,
        "params_digest": params_digest(params),
        STRICT_TAG: f"{scores['strict']:.6f}",
        FLEXIBLE_TAG: f"{scores['flexible']:.6f}",
        "evaluated_model": EVALUATED_MODEL,
        **candidate.tags(),
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

    # ---- exports, per-question results and cards, in this run (the versions' run)
    mlflow.log_artifacts(str(gguf_dir), artifact_path="gguf")
    gguf_files = sorted(p.relative_to(gguf_dir).as_posix() for p in gguf_dir.rglob("*") if p.is_file())
    mlflow.log_artifact(str(correctness_file), artifact_path=EVAL_ARTIFACTS)
    mlflow.log_artifacts(str(cards_dir), artifact_path="card")

    def description(kind: str) -> str:
        return mlflow_description(cards[kind].read_text(), f"runs:/{active.info.run_id}/card/{kind}/{CARD_FILE}")

    # ---- register
    artifacts, extra = adapter_artifacts(base_dir, adapter_dir)
    adapter_version = log_version(adapter_name, "adapter", artifacts, {**model_config, **extra},
                                  {**common, **inputs_tags(adapter_dir)}, description("adapter"))
    merged_version = log_version(name, "merged", {"model": str(merged_dir)}, model_config, {
        **common, **inputs_tags(merged_dir), "adapter_version": adapter_version,
        "gguf_artifacts": f"runs:/{active.info.run_id}/gguf", "gguf_files": json.dumps(gguf_files)[:5000],
        "gguf_card": f"runs:/{active.info.run_id}/card/gguf/{CARD_FILE}"}, description("merged"))

    # ---- gate
    decision = gate({name: merged_version, adapter_name: adapter_version}, candidate, scores["strict"], params,
                    reevaluate=lambda champion: reevaluate_champion(params, name, champion, eval_file))
    promote, champion_version = decision["promoted"], decision["champion_version_before"]
    test = decision["paired_test"]
    report_file.write_text(
        f"- register: `{name}` v{merged_version} (adapter v{adapter_version}), {dataset} strict "
        f"{scores['strict']:.3f} / flexible {scores['flexible']:.3f} on {candidate.eval_set['n']} questions "
        f"(eval set {candidate.eval_set['sha256'][:12]}); previous champion "
        f"{'v' + champion_version if champion_version else 'none'}"
        + (f"; McNemar p = {test['p_value']:.4f} ({test['wins']} wins, {test['losses']} losses)" if test else "")
        + f"; **{'promoted' if promote else 'kept'}**: {decision['reason']}\n")
    return {
        "enabled": True,
        "models": {name: merged_version, adapter_name: adapter_version},
        "candidate_strict": scores["strict"],
        "candidate_flexible": scores["flexible"],
        "eval_set": candidate.eval_set,
        "generation": candidate.generation,
        **decision,
        "champion_version": merged_version if promote else champion_version,
        "run_id": active.info.run_id,
        "seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    params = load_params()
    with tracking.stage_run("register", params, section="registry"):
        metrics = run(params, path("base_model"), path("grpo"), path("merged"), path("gguf"),
                      metrics_file("evaluate"), path("eval") / "register.md",
                      correctness_file=path("eval") / TUNED_OUT / EVALUATED_MODEL / CORRECTNESS_FILE,
                      cards_dir=path("cards"), eval_file=path("prepared") / "eval.parquet")
    write_metrics("register", metrics)


if __name__ == "__main__":
    main()
