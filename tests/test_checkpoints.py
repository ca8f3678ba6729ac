"""Resume only across identical inputs (stages/common/checkpoints.py): the lineage digest moves
with every kind of input DVC gives the grpo stage, stale checkpoints are set aside (never deleted),
and a damaged latest checkpoint falls back to the one before it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stages.common import checkpoints, tracking
from stages.grpo import RESUMABLE_KEYS
from tests.conftest import tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def workspace(tmp_path, monkeypatch, prepared_dir, base_dir):
    """A workspace holding the grpo stage's data and model deps, and a copy of one code dep."""
    work = tmp_path / "work"
    shutil.copytree(prepared_dir, work / "data" / "prepared")
    shutil.copytree(base_dir, work / "models" / "base")
    (work / "models" / "sft").mkdir(parents=True)
    (work / "models" / "sft" / "skipped.json").write_text("{}\n")
    (work / "stages" / "common").mkdir(parents=True)
    shutil.copy(ROOT / "stages" / "common" / "rewards.py", work / "stages" / "common" / "rewards.py")
    monkeypatch.setattr(tracking, "WORKSPACE", work)  # deps are read from here first, then the code root
    return work


def digest(params=None):
    return checkpoints.lineage("grpo", params or tiny(), RESUMABLE_KEYS)["digest"]


def test_every_kind_of_input_moves_the_lineage(workspace):
    before = digest()
    assert digest() == before, "the digest must be stable"
    changes = {
        "data": lambda: (workspace / "data/prepared/grpo.parquet").write_bytes(
            (workspace / "data/prepared/grpo.parquet").read_bytes() + b"\0"),
        "sft output": lambda: (workspace / "models/sft/skipped.json").write_text('{"other": 1}\n'),
        "base model": lambda: (workspace / "models/base/base.json").write_text(
            (workspace / "models/base/base.json").read_text() + " "),
        "code": lambda: (workspace / "stages/common/rewards.py").write_text(
            (workspace / "stages/common/rewards.py").read_text() + "\n# changed\n"),
    }
    seen = {before}
    for kind, change in changes.items():
        change()
        now = digest()
        assert now not in seen, f"a change of the {kind} did not change the lineage"
        seen.add(now)
    assert digest(tiny({"grpo": {"learning_rate": 3e-4}})) not in seen, "a params change did not change the lineage"
    assert digest(tiny({"model": {"dtype": "bfloat16"}})) not in seen, "a model params change did not change the lineage"
    # A longer budget or other logging is a resume, not a new lineage.
    assert digest(tiny({"grpo": {"max_steps": 60, "save_steps": 7, "logging_steps": 2}})) == digest()


def fake_checkpoint(folder: Path, step: int, weights: bytes | None = None) -> Path:
    from safetensors.torch import save_file
    import torch

    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    save_file({"w": torch.full((4,), float(step))}, str(ckpt / "model.safetensors"))
    if weights is not None:
        (ckpt / "model.safetensors").write_bytes(weights)
    return ckpt


CURRENT = {"inputs": "aaaa", "params": "bbbb", "digest": "1111"}


def test_same_lineage_resumes_from_the_last_checkpoint(tmp_path):
    ckpt = tmp_path / "grpo"
    fake_checkpoint(ckpt, 2), fake_checkpoint(ckpt, 4)
    checkpoints.save_state(ckpt, CURRENT, "run-1")
    last, state = checkpoints.resume_point(ckpt, CURRENT)
    assert Path(last).name == "checkpoint-4" and state["mlflow_run_id"] == "run-1"


def test_other_lineage_sets_the_checkpoints_aside(tmp_path):
    ckpt = tmp_path / "grpo"
    fake_checkpoint(ckpt, 2)
    checkpoints.save_state(ckpt, CURRENT, "run-1")
    said = []
    last, state = checkpoints.resume_point(ckpt, {**CURRENT, "inputs": "cccc", "digest": "2222"}, say=said.append)
    assert last is None and state == {}
    assert ckpt.is_dir() and not list(ckpt.iterdir()), "the fresh run needs an empty checkpoint folder"
    kept = list((tmp_path / "grpo.stale").iterdir())
    assert len(kept) == 1 and (kept[0] / "checkpoint-2" / "model.safetensors").exists(), "old checkpoints were not kept"
    assert "inputs changed" in (kept[0] / checkpoints.STALE_NOTE).read_text()
    assert "inputs changed" in said[0] and str(kept[0]) in said[0]


def test_truncated_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    ckpt = tmp_path / "grpo"
    fake_checkpoint(ckpt, 2)
    good = (ckpt / "checkpoint-2" / "model.safetensors").read_bytes()
    fake_checkpoint(ckpt, 4, weights=good[: len(good) // 2])  # a save cut short (kill, full disk)
    checkpoints.save_state(ckpt, CURRENT, "run-1")
    said = []
    last, _ = checkpoints.resume_point(ckpt, CURRENT, say=said.append)
    assert Path(last).name == "checkpoint-2"
    assert any("checkpoint-4 cannot be resumed from" in s for s in said)
    assert not (ckpt / "checkpoint-4").exists(), "the damaged checkpoint must be out of the trainer's way"
    assert [p.name.split("-damaged-")[1] for p in (tmp_path / "grpo.stale").iterdir()] == ["checkpoint-4"]
