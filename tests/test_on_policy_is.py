"""grpo.importance_sampling_from_loss (stages/common/on_policy_is.py): TRL's loss, gradients and sampling
metrics for vLLM's importance-sampling correction, with one forward pass less.

Test double: vLLM cannot run on this machine (no GPU), so a stand-in for TRL's vLLM generation returns fixed
completions and sampling log-probs (varied, so that the weights are clipped or masked for some tokens).
Everything else is TRL 1.14's GRPOTrainer on the tiny model: the plain trainer with its extra pass is the
reference the subclass must match."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from stages.common.models import base_info, load_base_model, load_tokenizer
from stages.common.on_policy_is import SAMPLING_METRICS, importance_weights, loss_pass_trainer, on_policy

GENERATIONS = 4


class FakeVLLMGeneration:
    """Stands in for trl.generation.vllm_generation.VLLMGeneration (colocate): one completion per prompt, with
    the model's own log-probs of it, shifted per token by up to +-1.2 (vLLM and the trainer disagree a little),
    so that some weights fall outside [0.5, 3] and are truncated or masked, per token and per sequence."""

    def __init__(self, model, eos: int):
        self.model, self.eos = model, eos

    def sync_weights(self):
        pass

    def generate(self, prompts, images, num_generations, profiler=None):
        completions, logprobs = [], []
        for i, prompt in enumerate(prompts):
            ids = [20 + 7 * i + j for j in range(3 + i % 4)] + ([self.eos] if i % 2 else [])
            with torch.no_grad():
                logits = self.model(input_ids=torch.tensor([list(prompt) + ids])).logits[0, len(prompt) - 1:-1]
            own = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
            shift = [1.2 * (((5 * i + 3 * j) % 9) - 4) / 4 for j in range(len(ids))]
            completions.append(ids)
            logprobs.append([[lp + s] for lp, s in zip(own.tolist(), shift)])
        return prompts, completions, logprobs, None


def length_reward(completions, **_):
    return [float(len(c)) for c in completions]


def trainer(cls, model, tokenizer, tmp_path, mode: str):
    from datasets import Dataset
    from trl import GRPOConfig

    config = GRPOConfig(output_dir=str(tmp_path / mode), use_cpu=True, report_to="none", beta=0.0,
                        per_device_train_batch_size=GENERATIONS, num_generations=GENERATIONS, max_completion_length=8,
                        vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.5,
                        vllm_importance_sampling_clip_max=3.0)
    data = Dataset.from_dict({"prompt": ["What is 2 + 3?"] * GENERATIONS})
    t = cls(model=model, reward_funcs=[length_reward], args=config, train_dataset=data, processing_class=tokenizer)
    t.use_vllm, t.vllm_importance_sampling_correction = True, True  # as with use_vllm=True and a GPU
    t.vllm_generation, t._last_loaded_step = FakeVLLMGeneration(copy.deepcopy(model), tokenizer.eos_token_id), 0  # its own weights, as vLLM
    t.current_gradient_accumulation_steps = 1  # set by the training loop, which this test does not run
    return t


def loss_grads_metrics(t, batch):
    forwards = []
    hook = t.model.register_forward_hook(lambda *_: forwards.append(1))
    t.model.train()
    inputs = t._generate_and_score_completions(batch)
    loss = t.compute_loss(t.model, inputs)
    loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    metrics = {k: t._metrics["train"][k][-1] for k in SAMPLING_METRICS if t._metrics["train"][k]}
    return loss.item(), grads, metrics, len(forwards)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_weights_from_the_loss_pass_give_trls_loss_gradients_and_metrics(base_dir, tmp_path, mode):
    from trl import GRPOTrainer

    tokenizer = load_tokenizer(base_info(base_dir)["tokenizer"])
    model = load_base_model(base_dir)
    batch = [{"prompt": "What is 2 + 3?"}] * GENERATIONS
    torch.manual_seed(0)
    reference = loss_grads_metrics(trainer(GRPOTrainer, copy.deepcopy(model), tokenizer, tmp_path, mode), batch)
    torch.manual_seed(0)
    fused = loss_grads_metrics(trainer(loss_pass_trainer(GRPOTrainer), copy.deepcopy(model), tokenizer, tmp_path, mode), batch)

    uncorrected = trainer(GRPOTrainer, copy.deepcopy(model), tokenizer, tmp_path, mode)
    uncorrected.vllm_importance_sampling_correction = False
    torch.manual_seed(0)
    loss_u = loss_grads_metrics(uncorrected, batch)[0]

    (loss_r, grads_r, metrics_r, forwards_r), (loss_f, grads_f, metrics_f, forwards_f) = reference, fused
    # the weights matter here: they vary, and without them the loss is another
    assert metrics_r["sampling/importance_sampling_ratio/min"] < metrics_r["sampling/importance_sampling_ratio/max"]
    assert not math.isclose(loss_u, loss_r, rel_tol=1e-3)
    assert loss_r != 0.0 and math.isclose(loss_f, loss_r, rel_tol=1e-5, abs_tol=1e-7)
    assert grads_r.keys() == grads_f.keys() and grads_r
    for name in grads_r:
        assert torch.allclose(grads_f[name], grads_r[name], rtol=1e-4, atol=1e-7), name
    assert set(metrics_r) == set(metrics_f) == set(SAMPLING_METRICS)
    for key in SAMPLING_METRICS:
        assert math.isclose(metrics_f[key], metrics_r[key], rel_tol=1e-5, abs_tol=1e-6), (key, metrics_f[key], metrics_r[key])
    assert (forwards_r, forwards_f) == (2, 1), "the loss-pass trainer should skip TRL's extra forward"


def test_weights_are_truncated_or_masked_per_token_or_per_sequence():
    trainer_logps = torch.tensor([[0.0, -1.0, -2.0], [-1.0, -1.0, 0.0]])
    sampling = torch.tensor([[-2.0, -1.0, float("nan")], [0.0, -3.0, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    token = importance_weights(trainer_logps, sampling, mask, "token_truncate", 0.5, 3.0)
    assert torch.allclose(token, torch.tensor([[3.0, 1.0, 1.0], [math.exp(-1), 3.0, 1.0]]).clamp(0.5, 3.0))
    masked = importance_weights(trainer_logps, sampling, mask, "token_mask", 0.5, 3.0)
    assert masked[0, 0] == 0 and masked[1, 0] == 0 and masked[1, 1] == 0 and masked[0, 1] == 1  # e^2 > 3, e^-1 < 0.5
    sequence = importance_weights(trainer_logps, sampling, mask, "sequence_mask", None, None)
    assert sequence.shape == (2, 1) and torch.allclose(sequence, torch.tensor([[math.exp(2.0)], [math.exp(1.0)]]))


def test_only_on_policy_runs_take_the_shortcut():
    from types import SimpleNamespace as Args

    assert on_policy(Args(num_iterations=1, gradient_accumulation_steps=2, steps_per_generation=2))
    assert on_policy(Args(num_iterations=1, gradient_accumulation_steps=4, steps_per_generation=2))
    assert not on_policy(Args(num_iterations=2, gradient_accumulation_steps=2, steps_per_generation=2))
    assert not on_policy(Args(num_iterations=1, gradient_accumulation_steps=1, steps_per_generation=4))


def test_the_stage_uses_it_for_plain_trl_with_vllm_on_policy_and_the_correction_on():
    from types import SimpleNamespace as Args

    from stages.grpo import loss_pass_importance_sampling
    from tests.conftest import tiny

    aligned = Args(num_iterations=1, gradient_accumulation_steps=2, steps_per_generation=2)
    params = tiny()
    assert loss_pass_importance_sampling(params, "trl", "vllm", aligned)
    assert not loss_pass_importance_sampling(params, "unsloth", "vllm", aligned)  # Unsloth scores on its own
    assert not loss_pass_importance_sampling(params, "trl", "transformers", aligned)  # no vLLM, no correction
    assert not loss_pass_importance_sampling(params, "trl", "vllm", Args(num_iterations=2, gradient_accumulation_steps=2,
                                                                         steps_per_generation=2))
    for off in ({"importance_sampling_from_loss": False}, {"vllm_importance_sampling_correction": False}):
        assert not loss_pass_importance_sampling(tiny({"grpo": off}), "trl", "vllm", aligned)
