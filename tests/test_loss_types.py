"""Every GRPO loss the params offer trains for real on CPU, and TRL scales the token-summed losses right.

- One real GRPO step of the grpo stage (`stages.grpo.run`, TRL's GRPOTrainer) on the tiny model
  for each loss type, and for GSPO (importance_sampling_level: sequence): the step must finish
  with a finite loss and move the weights. Weight decay is 0, so only the loss can move them.
- TRL's dapo/cispo/vespo losses divide by the completion tokens of the whole generation batch,
  which spans steps_per_generation micro-steps, while one optimizer step accumulates only
  gradient_accumulation_steps of them. TRL rescales by gradient_accumulation_steps /
  steps_per_generation since huggingface/trl#5890 (issue #5619; in the pinned 1.14.2, and in
  unsloth_zoo 2026.10.9's own loss). The test measures the normalizer TRL used on each
  micro-step, so a TRL without the fix fails it.
"""
from __future__ import annotations

import json
import math

import pytest

from tests.conftest import tiny
from tests.test_training import distinct_chars

pytestmark = pytest.mark.slow  # each test trains for real: seconds each on an idle 2-core machine

LOSSES = [
    ("grpo", "token"), ("dr_grpo", "token"), ("dapo", "token"), ("bnpo", "token"),
    ("cispo", "token"), ("sapo", "token"), ("grpo", "sequence"),  # the last: GSPO
]


def one_step(loss_type: str, level: str) -> dict:
    return {"grpo": {
        "loss_type": loss_type, "importance_sampling_level": level, "max_steps": 1, "save_steps": 100,
        "rewards": [{"name": "tests.test_training:distinct_chars"}], "num_generations": 4,
        "per_device_train_batch_size": 8, "max_completion_length": 16, "log_completions_every": 0,
        "weight_decay": 0.0, "warmup_ratio": 0.0, "learning_rate": 1e-3, "monitor_kl": False}}


@pytest.mark.parametrize("loss_type, level", LOSSES, ids=[f"{t}-{lvl}" for t, lvl in LOSSES])
def test_each_loss_type_trains_one_real_step(loss_type, level, tmp_path, prepared_dir, base_dir, mlruns_dir):
    import torch
    from safetensors.torch import load_file

    from stages import grpo
    from stages.common import models, tracking

    params = tiny(one_step(loss_type, level))
    out = tmp_path / "grpo"
    with tracking.stage_run("grpo", params):
        metrics = grpo.run(params, prepared_dir / "grpo.parquet", base_dir, None, out, tmp_path / "ckpt",
                           tmp_path / "plots")
    assert metrics["steps"] == 1
    history = (tmp_path / "plots" / "grpo_rewards.csv").read_text().splitlines()
    row = dict(zip(history[0].split(","), history[1].split(",")))
    assert math.isfinite(float(row["loss"])), row
    before = load_file(f"{models.base_info(base_dir)['model']}/model.safetensors")
    after = load_file(out / "model.safetensors")
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved, f"{loss_type}/{level}: one GRPO step changed no weight"


def test_token_summed_loss_is_normalized_per_accumulation_window(prepared_dir, base_dir, tmp_path):
    """dapo with steps_per_generation 4 and gradient_accumulation_steps 2: each micro-step must
    divide its token sum by (generation-batch tokens) x 2 / 4, not by the generation-batch tokens.

    With beta 0, one iteration, no vLLM and a learning rate of 0 the ratio is 1, so a micro-step's
    loss is -sum(advantage x completion tokens) / normalizer, and the normalizer can be read back."""
    import datasets
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from stages.common import models

    model = models.load_base_model(base_dir, dtype="float32")
    tokenizer = models.load_tokenizer(models.base_info(base_dir)["tokenizer"])
    data = datasets.Dataset.from_parquet(str(prepared_dir / "grpo.parquet")).select(range(32))
    config = GRPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, seed=0, loss_type="dapo", beta=0.0,
        num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=4,
        max_completion_length=16, learning_rate=0.0, max_steps=2, logging_steps=1, save_strategy="no")
    trainer = GRPOTrainer(model=model, reward_funcs=[distinct_chars], args=config, train_dataset=data,
                          processing_class=tokenizer)
    seen = []
    compute = trainer._compute_loss

    def spy(model, inputs):
        loss = compute(model, inputs)
        token_sum = -(inputs["advantages"][:, None] * inputs["completion_mask"]).sum()
        seen.append((token_sum.item(), loss.item(), inputs["num_items_in_batch"].item()))
        return loss

    trainer._compute_loss = spy
    trainer.train()
    assert len(seen) == 4  # 2 optimizer steps x 2 accumulated micro-steps, from one generation batch
    checked = 0
    for token_sum, loss, generation_tokens in seen:
        if abs(token_sum) > 1e-3:
            assert token_sum / loss == pytest.approx(generation_tokens * 2 / 4, rel=1e-3), json.dumps(seen)
            checked += 1
    assert checked, f"every micro-step had a zero advantage sum; nothing was measured: {seen}"
