"""Resuming a training stage only from checkpoints made of the same inputs.

A checkpoint folder (e.g. checkpoints/grpo, a DVC `persist` output) holds `run_state.json`:
the lineage digest of what the checkpoints were made from and the MLflow run that made them.
The lineage covers everything DVC gives the stage: the content of every dep in dvc.yaml (data,
upstream models, code) and the params sections the stage declares, minus the keys that may
change between a checkpoint and its resume (a longer step budget, other logging).

- Same lineage: resume from the last complete checkpoint. A checkpoint whose files are missing
  or unreadable (a kill or a full disk during the save) is moved aside with a warning, and the
  one before it is used.
- Other lineage: the old checkpoints are moved aside, whole, to `<dir>.stale/<time>-<digest>/`
  with a note saying why; never deleted. Training starts fresh.
- Continuous training (grpo.continue_on_new_prompts) may resume across a change of the prompts
  alone: the digest it compares then leaves that dep out (`digest_fixed`), and the stage records,
  by content hash, which prompts each checkpoint has trained on (CONSUMED, inside the checkpoint),
  so new prompts come first.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from stages.common.params import Params

RUN_STATE = "run_state.json"
CONSUMED = "consumed_prompts.json"  # in each checkpoint folder: hashes of the prompts trained on so far
STALE_NOTE = "WHY_SET_ASIDE.txt"
log = logging.getLogger(__name__)


def params_for(stage_params: list[str], params: Params, resumable: set[str]) -> dict[str, Any]:
    """The params a stage declares in dvc.yaml (`grpo`, `model.dtype`, ...), minus `resumable` keys
    of the stage's own section."""
    dumped = params.model_dump(mode="json")
    out: dict[str, Any] = {}
    for dotted in stage_params:
        node: Any = dumped
        for key in dotted.split("."):
            node = node[key]
        out[dotted] = {k: v for k, v in node.items() if k not in resumable} if isinstance(node, dict) else node
    return out


def lineage(stage: str, params: Params, resumable: set[str], may_change: tuple[str, ...] = ()) -> dict[str, str]:
    """{'inputs': content digest of the stage's deps, 'params': digest of its params, 'digest': both,
    'digest_fixed': the same without the deps in `may_change` (a resume may allow those to differ)}."""
    from stages.common.paths import stage_spec
    from stages.common.tracking import inputs_digest

    declared = [p if isinstance(p, str) else next(iter(p)) for p in stage_spec(stage).get("params", [])]
    blob = json.dumps(params_for(declared, params, resumable), sort_keys=True, default=str)
    params_hash = hashlib.sha256(blob.encode()).hexdigest()[:16]
    inputs, fixed = inputs_digest(stage), inputs_digest(stage, exclude=may_change)

    def both(a: str) -> str:
        return hashlib.sha256(f"{a}:{params_hash}".encode()).hexdigest()[:16]

    return {"inputs": inputs, "params": params_hash, "digest": both(inputs), "digest_fixed": both(fixed)}


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None when it looks complete)."""
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError) as err:
        return f"trainer_state.json unreadable ({err})"
    weights = [f for f in folder.glob("*.safetensors")]
    if not weights:
        return "no *.safetensors weights"
    from safetensors import safe_open

    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as tensors:
                for key in list(tensors.keys())[:1]:
                    tensors.get_slice(key)
        except Exception as err:  # safetensors raises its own error types for truncated files
            return f"{file.name} unreadable ({type(err).__name__}: {err})"
    return None


def _step(folder: Path) -> int:
    return int(folder.name.split("-")[-1])


def set_aside(ckpt_dir: Path, reason: str) -> Path | None:
    """Move the checkpoint folder to <dir>.stale/<time>-<digest>/ with a note; returns the new place."""
    if not ckpt_dir.exists() or not any(ckpt_dir.iterdir()):
        return None
    old = {}
    if (ckpt_dir / RUN_STATE).exists():
        old = json.loads((ckpt_dir / RUN_STATE).read_text())
    target = ckpt_dir.parent / f"{ckpt_dir.name}.stale" / f"{time.strftime('%Y%m%d-%H%M%S')}-{old.get('digest', 'unknown')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(ckpt_dir), str(target))
    (target / STALE_NOTE).write_text(reason + "\n")
    return target


def resume_point(ckpt_dir: Path, current: dict[str, str], say=print,
                 allow_changed: bool = False) -> tuple[str | None, dict[str, Any]]:
    """(checkpoint to resume from or None, the saved run state). Prepares ckpt_dir for the run:
    checkpoints of another lineage are set aside, incomplete ones newer than the resume point removed.
    allow_changed: the lineage may differ in the deps lineage() was told `may_change` (continuous training)."""
    state_file = ckpt_dir / RUN_STATE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    found = sorted(ckpt_dir.glob("checkpoint-*"), key=_step) if ckpt_dir.exists() else []
    key = "digest_fixed" if allow_changed else "digest"
    if found and state.get(key) != current[key]:
        changed = [k for k in ("inputs", "params") if state.get(k) != current[k]] or ["run state missing"]
        reason = (f"{ckpt_dir} was made from other inputs ({' and '.join(changed)} changed: "
                  f"{state.get('digest')} -> {current['digest']}); starting fresh")
        where = set_aside(ckpt_dir, reason)
        say(f"{reason}. The old checkpoints are kept in {where}")
        found, state = [], {}
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for folder in reversed(found):
        problem = checkpoint_problem(folder)
        if problem is None:
            for newer in found[found.index(folder) + 1:]:  # damaged: kept aside, out of the trainer's way
                target = ckpt_dir.parent / f"{ckpt_dir.name}.stale" / f"{time.strftime('%Y%m%d-%H%M%S')}-damaged-{newer.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(newer), str(target))
            return str(folder), state
        say(f"warning: {folder.name} cannot be resumed from ({problem}); trying the one before it")
    if found:
        say(f"warning: no complete checkpoint in {ckpt_dir}; starting fresh")
        set_aside(ckpt_dir, "no complete checkpoint to resume from")
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    return None, {}


def save_state(ckpt_dir: Path, current: dict[str, str], run_id: str) -> None:
    (ckpt_dir / RUN_STATE).write_text(json.dumps({**current, "mlflow_run_id": run_id}) + "\n")


def prompt_hash(prompt: Any) -> str:
    """Content hash of one prompt (chat messages or text), the identity continuous training tracks."""
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, default=str).encode()).hexdigest()[:20]


def consumed(checkpoint: str | Path | None) -> set[str]:
    """The prompt hashes a checkpoint had trained on (empty for none, or one saved without the record)."""
    file = Path(checkpoint) / CONSUMED if checkpoint else None
    return set(json.loads(file.read_text())) if file and file.exists() else set()
