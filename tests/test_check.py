"""stages/check.py: what `make repro` and the flows check before DVC runs a stage (DVC deletes a
stage's outputs before running it). Real params loader, real reward registry, real prepare code."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from stages.check import check, split_size_problems
from stages.common.params import ROOT, ParamsError
from stages.common.rewards import RewardConfigError
from stages.prepare import DataError
from stages.preset import render
from tests.conftest import tiny


@pytest.fixture
def repo(tmp_path):
    """A workspace: this project's dvc.yaml, nothing else."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    return tmp_path


def _rewards(*names: str) -> dict:
    return {"grpo": {"rewards": [{"name": n} for n in names]}}


def test_tiny_preset_passes(repo):
    assert check(tiny(), repo) == []


@pytest.mark.parametrize("name, message", [
    ("format_exactt", "unknown reward 'format_exactt'; available: "),
    ("no_such_module.rewards:score", "custom reward 'no_such_module.rewards:score': cannot import module 'no_such_module.rewards'"),
    ("tests.test_check:no_such_function", "module 'tests.test_check' has no function 'no_such_function'"),
])
def test_reward_names_and_custom_imports_are_resolved(repo, name, message):
    with pytest.raises(RewardConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check(tiny(_rewards("format_exact", name)), repo, ["grpo"])


def test_custom_reward_modules_are_imported_from_the_workspace(repo):
    (repo / "my_rewards.py").write_text("def score(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    check(tiny(_rewards("my_rewards:score")), repo, ["grpo"])
    assert "my_rewards" in sys.modules and str(repo) not in sys.path


def test_only_the_stages_to_run_are_checked(repo):
    params = tiny(_rewards("nope"))
    check(params, repo, ["prepare", "base_model"])  # no grpo: its rewards are not its business
    with pytest.raises(RewardConfigError):
        check(params, repo, ["prepare", "grpo"])


def test_the_machine_is_checked_for_model_stages(repo):
    hub = tiny({"model": {"name_or_path": "unsloth/Qwen3-1.7B-Base"}})  # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(ParamsError, match="it is a hub id but HF_HUB_OFFLINE=1"):
        check(hub, repo, ["base_model"])
    assert check(hub, repo, ["prepare"]) == []


def test_data_files_are_read_relative_to_the_workspace(repo):
    (repo / "data").mkdir()
    (repo / "data" / "train.jsonl").write_text("")
    params = tiny({"prepare": {"source": "file", "train_file": "data/train.jsonl", "test_file": "data/test.jsonl"}})
    with pytest.raises(DataError, match="data/train.jsonl: the file is empty"):
        check(params, repo, ["prepare"])


def test_small_splits_warn_or_fail(repo):
    small = {"prepare": {"max_train_rows": 1}, "grpo": {"num_generations": 4, "per_device_train_batch_size": 8}}
    warnings = check(tiny(small), repo, ["prepare"])
    assert warnings == ["the GRPO split has 1 prompt(s), fewer than one generation batch needs (8 completions / "
                        "grpo.num_generations 4 = 2 prompts); add data or lower prepare.sft_examples"]
    with pytest.raises(DataError, match=r"the GRPO split has 1 prompt\(s\).*prepare.on_small_split=fail"):
        check(tiny({**small, "prepare": {"max_train_rows": 1, "on_small_split": "fail"}}), repo, ["prepare"])


def test_split_sizes_against_the_sft_batch():
    params = tiny({"sft": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2}})
    assert split_size_problems(params, rows_grpo=100, rows_sft=16) == []
    (problem,) = split_size_problems(params, rows_grpo=100, rows_sft=15)
    assert problem.startswith("the SFT split has 15 example(s), fewer than one SFT step takes (16")
    assert split_size_problems(tiny({"sft": {"enabled": False}}), rows_grpo=100, rows_sft=0) == []


def test_cli_exits_with_the_message(repo):
    (repo / "params.yaml").write_text(render(tiny(_rewards("format_exactt"))))
    env = {**os.environ, "PIPELINE_WORKDIR": str(repo)}
    proc = subprocess.run([sys.executable, "-m", "stages.check"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "check: RewardConfigError: unknown reward 'format_exactt'" in proc.stderr
    assert "Nothing was run; no output was touched." in proc.stderr
    (repo / "params.yaml").write_text(render(tiny()))
    ok = subprocess.run([sys.executable, "-m", "stages.check", "--stages", "grpo"], env=env, capture_output=True,
                        text=True, timeout=120)  # this workspace has no data/gsm8k: leave prepare out
    assert ok.returncode == 0 and "check: params are fine" in ok.stdout, ok.stderr
