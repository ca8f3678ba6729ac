"""vLLM's importance-sampling correction without TRL's extra forward pass (grpo.importance_sampling_from_loss).

With vLLM rollouts, TRL 1.14 corrects for the gap between vLLM's sampling log-probs and the trainer's by
weighting each token's loss with exp(trainer log-prob - vLLM log-prob), truncated or masked. To get the
trainer's log-probs it runs one more no-grad forward over every rollout before training on them: on the
H200 that pass took 2.5 s of a 10.2-s step at 16 x 8 x 512 tokens (docs/benchmarks.md, session 5).

When a run is on-policy (num_iterations 1, and every micro-batch of a generation batch is trained before
the next optimizer step), those log-probs are exactly the detached log-probs of the loss's own forward,
which TRL then computes again. This trainer skips the extra pass and takes the weights from the loss's
forward instead, with TRL's four modes and bounds, and logs the same `sampling/*` metrics (per
micro-batch rather than per generation batch).
"""
from __future__ import annotations

import math

SAMPLING_METRICS = ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
                    "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                    "sampling/importance_sampling_ratio/max")


def on_policy(args) -> bool:
    """True when every rollout is trained on by the weights that sampled it (TRL's own condition for
    skipping old log-probs without vLLM): one iteration per generation batch, whole batches per step."""
    return args.num_iterations == 1 and args.gradient_accumulation_steps % args.steps_per_generation == 0


def importance_weights(trainer_logps, sampling_logps, mask, mode: str, clip_min: float | None,
                       clip_max: float | None):
    """Per-token (token_* modes, shape B x T) or per-sequence (sequence_*, B x 1) weights exp(trainer - vLLM),
    truncated into [clip_min, clip_max] or set to 0 outside it (mask modes). Tokens vLLM could not score
    (NaN) weigh 1."""
    import torch

    diff = torch.nan_to_num((trainer_logps - sampling_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def loss_pass_trainer(base_cls):
    """A subclass of base_cls (a GRPOTrainer) that takes the correction's trainer log-probs from the loss."""
    import torch

    class LossPassImportanceSampling(base_cls):
        _skip_next_logps = False  # set while TRL's extra pass is the next log-prob call
        _loss_inputs = None  # the micro-batch whose loss forward is running

        def _generate_and_score_completions(self, inputs):
            mode = "train" if self.model.training else "eval"
            logged = {key: len(self._metrics[mode][key]) for key in SAMPLING_METRICS}
            # With vLLM's correction on, TRL's first log-prob call in here is the extra pass (its reference
            # model's comes after): answer it with a placeholder, and drop what TRL derives from it.
            self._skip_next_logps = True
            try:
                output = super()._generate_and_score_completions(inputs)
            finally:
                self._skip_next_logps = False
            for key, count in logged.items():
                del self._metrics[mode][key][count:]
            output.pop("old_per_token_logps", None)  # so the loss uses its own detached log-probs, as on-policy TRL does
            output.pop("importance_sampling_ratio", None)  # computed in the loss's forward
            return output

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
            if self._skip_next_logps:
                self._skip_next_logps = False
                return torch.zeros(input_ids.size(0), logits_to_keep, device=input_ids.device), None, None
            logps, entropies, *rest = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
            if self._loss_inputs is not None:
                inputs, self._loss_inputs = self._loss_inputs, None
                self._correct(inputs, logps.detach())
            return (logps, entropies, *rest)

        def _compute_loss(self, model, inputs):
            self._loss_inputs = inputs
            try:
                return super()._compute_loss(model, inputs)
            finally:
                self._loss_inputs = None

        def _correct(self, inputs, trainer_logps):
            """Put the weights where TRL's loss reads them, and log TRL's sampling metrics."""
            sampling = inputs["sampling_per_token_logps"]
            mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
            weights = importance_weights(trainer_logps, sampling, mask, self.vllm_importance_sampling_mode,
                                         self.vllm_importance_sampling_clip_min,
                                         self.vllm_importance_sampling_clip_max)
            inputs["importance_sampling_ratio"] = weights

            mode = "train" if self.model.training else "eval"
            kept = mask.bool()
            delta = torch.abs(trainer_logps - sampling)
            delta = delta[kept & ~torch.isnan(delta)]
            flat = weights.flatten() if weights.size(-1) == 1 else weights[kept]
            zero = torch.tensor(0.0, device=trainer_logps.device)
            gather = self.accelerator.gather
            metrics = self._metrics[mode]
            metrics[SAMPLING_METRICS[0]].append(gather(delta.mean() if delta.numel() else zero).mean().item())
            metrics[SAMPLING_METRICS[1]].append(gather(delta.max() if delta.numel() else zero).max().item())
            metrics[SAMPLING_METRICS[2]].append(gather(flat.min() if flat.numel() else zero).min().item())
            metrics[SAMPLING_METRICS[3]].append(gather(flat.mean() if flat.numel() else zero).mean().item())
            metrics[SAMPLING_METRICS[4]].append(gather(flat.max() if flat.numel() else zero).max().item())

    return LossPassImportanceSampling
