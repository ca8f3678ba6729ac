"""What a GRPO run is watched with, beside TRL's own metrics: sample completions, a KL estimate
when no reference model is loaded (beta = 0), and the reward curves (CSV for `dvc plots`, PNG).

- SampleRecorder wraps the reward functions to keep the latest batch (prompts, completions,
  per-reward scores) without changing what TRL sees.
- KL monitor: mean per-token KL(policy || reference) on sampled completions (k3 estimator).
  The reference is what TRL itself would use with beta > 0: the base model with the LoRA adapter
  disabled, or for full fine-tuning a frozen copy of the starting weights. It runs on the first
  logged step, every grpo.monitor_kl_every steps after, and on the last step, so every run logs it.
- write_curves / summarize turn the per-step history into plots and the stage's final metrics.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from stages.common import checkpoints, tracking
from stages.common.answer_format import AnswerFormat, completion_text, parse

CURVE_COLUMNS = ["step", "reward", "reward_std", "frac_reward_zero_std", "kl", "kl_monitor", "entropy",
                 "completions/mean_length", "completions/clipped_ratio", "loss", "learning_rate", "step_seconds"]


class SampleRecorder:
    """Wraps the reward functions to keep the latest batch (prompts, completions, scores)."""

    def __init__(self) -> None:
        self.batch: dict[str, Any] = {}

    def wrap(self, func):
        def recorded(prompts, completions, **kwargs):
            scores = func(prompts, completions, **kwargs)
            if self.batch.get("completions") is not completions:
                self.batch = {"prompts": prompts, "completions": completions, "answer": kwargs.get("answer"),
                              "completion_ids": kwargs.get("completion_ids"), "scores": {}}
            self.batch["scores"][func.__name__] = scores
            return scores

        recorded.__name__ = func.__name__
        return recorded


def frozen_reference(model):
    """The KL reference for a model without a LoRA adapter: a frozen copy of its starting weights
    (LoRA models need none: their reference is the model with the adapter disabled)."""
    if hasattr(model, "disable_adapter"):
        return None
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def kl_to_reference(model, tokenizer, prompts, completion_ids, reference=None, limit: int = 8,
                    rows_per_pass: int = 2) -> float | None:
    """Mean per-token KL(policy || reference) over up to `limit` sampled completions (k3 estimator).
    reference None: the model with its adapter disabled. rows_per_pass bounds the logits tensor."""
    import torch

    if (reference is None and not hasattr(model, "disable_adapter")) or not completion_ids:
        return None
    rows = []
    for prompt, comp in list(zip(prompts, completion_ids))[:limit]:
        if not len(comp):
            continue
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) \
            if isinstance(prompt, list) else str(prompt)
        rows.append((tokenizer(text, add_special_tokens=False).input_ids, list(comp)))
    if not rows:
        return None
    if reference is not None:
        # Copied while the model was still on the CPU; the trainer has moved the model since.
        reference.to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for first in range(0, len(rows), rows_per_pass):
            chunk = rows[first:first + rows_per_pass]
            width_p, width_c = max(len(p) for p, _ in chunk), max(len(c) for _, c in chunk)
            ids = torch.full((len(chunk), width_p + width_c), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (p, c) in enumerate(chunk):
                ids[i, width_p - len(p):width_p + len(c)] = torch.tensor(p + c)
                mask[i, width_p - len(p):width_p + len(c)] = 1
            ids, mask = ids.to(model.device), mask.to(model.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            targets, target_mask = ids[:, width_p:], mask[:, width_p:].bool()

            def logprobs(net):
                logits = net(input_ids=ids, attention_mask=mask, position_ids=positions,
                             logits_to_keep=width_c + 1).logits[:, :-1]
                # One row at a time in float32: the full-vocabulary softmax is the large tensor.
                return torch.stack([torch.log_softmax(logits[i].float(), -1).gather(-1, targets[i, :, None])[:, 0]
                                    for i in range(len(chunk))])

            policy = logprobs(model)
            if reference is None:
                with model.disable_adapter():
                    base = logprobs(model)
            else:
                base = logprobs(reference)
            delta = (base - policy)[target_mask]
            total += (torch.exp(delta) - delta - 1).sum().item()
            count += delta.numel()
    model.train(was_training)
    return total / count if count else None


class MonitorCallback(TrainerCallback):
    """Adds `kl_monitor` to the logs (beta 0) and logs a table of sample completions to MLflow.

    Put it before the metrics callback: that one logs what this one adds."""

    def __init__(self, recorder: SampleRecorder, fmt: AnswerFormat, *, monitor_kl: bool, kl_every: int,
                 completions_every: int, reference=None):
        self.recorder, self.fmt, self.reference = recorder, fmt, reference
        self.monitor_kl, self.kl_every, self.completions_every = monitor_kl, kl_every, completions_every
        self._last_kl_step: int | None = None

    def _kl_due(self, state) -> bool:
        step = state.global_step
        return (self._last_kl_step is None or step - self._last_kl_step >= self.kl_every
                or (state.max_steps > 0 and step >= state.max_steps))

    def on_log(self, args, state, control, logs=None, model=None, processing_class=None, **kw):
        batch = self.recorder.batch
        if logs is None or not batch or "reward" not in logs:
            return
        if not state.is_world_process_zero:  # several processes: the main one monitors its share of the batch
            return
        if self.monitor_kl and model is not None and self._kl_due(state):
            start = time.perf_counter()
            kl = kl_to_reference(model, processing_class, batch["prompts"], batch.get("completion_ids"), self.reference)
            if kl is not None:
                logs["kl_monitor"] = kl
                logs["kl_monitor_seconds"] = time.perf_counter() - start  # its cost, next to the step time
                self._last_kl_step = state.global_step
        if self.completions_every and state.global_step % self.completions_every == 0:
            self._log_table(state.global_step, batch)

    def _log_table(self, step: int, batch: dict) -> None:
        import mlflow

        if mlflow.active_run() is None:
            return
        names = list(batch["scores"])
        rows: dict[str, list] = {"step": [], "prompt": [], "completion": [], "gold": [], "extracted": [],
                                 **{f"reward/{n}": [] for n in names}}
        answers = batch.get("answer") or [None] * len(batch["completions"])
        for i, (p, c) in enumerate(zip(batch["prompts"], batch["completions"])):
            text = completion_text(c)
            rows["step"].append(step)
            rows["prompt"].append(completion_text(p) if isinstance(p, list) else str(p))
            rows["completion"].append(text)
            rows["gold"].append(answers[i])
            rows["extracted"].append(parse(text, self.fmt).strict)
            for name in names:
                rows[f"reward/{name}"].append(batch["scores"][name][i])
        with tracking.tolerate_outage(f"the completions table of step {step} was not logged"):
            mlflow.log_table(rows, artifact_file=f"completions/step_{step:05d}.json")


class ConsumedPromptsCallback(TrainerCallback):
    """Writes, into every checkpoint, the content hashes of the prompts trained on so far (what
    continuous training puts last when new prompts arrive). Fed from the recorder's batches."""

    def __init__(self, recorder: SampleRecorder, already: set[str]):
        self.recorder, self.seen = recorder, set(already)
        self._batch = None

    def on_step_end(self, args, state, control, **kw):
        batch = self.recorder.batch
        fresh = []
        if batch and batch.get("completions") is not self._batch:
            self._batch = batch.get("completions")
            fresh = [checkpoints.prompt_hash(p) for p in batch["prompts"]]
        if args.world_size > 1:  # every process's share of the batch; every process calls this each step
            from accelerate.utils import gather_object

            fresh = gather_object(fresh)
        self.seen.update(fresh)

    def on_save(self, args, state, control, **kw):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            (folder / checkpoints.CONSUMED).write_text(json.dumps(sorted(self.seen)) + "\n")


# ------------------------------------------------------------------ curves and summary
def write_curves(history: list[dict], reward_names: list[str], csv_file: Path, png_file: Path) -> None:
    """Per-step CSV that `dvc plots` draws, and the same curves as a PNG (DVC's HTML needs a CDN)."""
    cols = CURVE_COLUMNS + [f"rewards/{n}/mean" for n in reward_names]
    rows = [h for h in history if "reward" in h]
    csv_file.parent.mkdir(parents=True, exist_ok=True)
    with csv_file.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        for h in rows:
            writer.writerow([int(h["step"]) if c == "step" else h.get(c, "") for c in cols])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def line(ax, key, **kw):
        points = [(h["step"], h[key]) for h in rows if key in h]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 3 else None, **kw)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    line(axes[0], "reward", label="total", linewidth=2)
    for n in reward_names:
        line(axes[0], f"rewards/{n}/mean", label=n, alpha=0.8)
    axes[0].set(title="mean reward per step", xlabel="step")
    axes[0].legend(fontsize=8)
    line(axes[1], "frac_reward_zero_std")
    axes[1].set(title="fraction of groups with zero reward std", xlabel="step", ylim=(-0.05, 1.05))
    kl_key = "kl" if any("kl" in h for h in rows) else "kl_monitor"
    line(axes[2], kl_key)
    axes[2].set(title=f"KL to reference ({kl_key})", xlabel="step")
    fig.tight_layout()
    fig.savefig(png_file, dpi=100)
    plt.close(fig)


def summarize(history: list[dict], reward_names: list[str], window: int = 5) -> dict:
    """Final metrics of a run from its per-step history (means over the first/last `window` logged
    rows; in a run of fewer than 2 x window rows, over its first and last halves, so "first" and
    "final" never share a row unless the run logged one)."""
    rows = [h for h in history if "reward" in h]
    window = max(1, min(window, len(rows) // 2))

    def mean(key: str, part: list[dict]) -> float | None:
        vals = [h[key] for h in part if key in h]
        return sum(vals) / len(vals) if vals else None

    def median(key: str) -> float | None:
        # Medians: the first step (compilation, warm-up) would dominate a mean of a short run.
        vals = sorted(h[key] for h in rows if key in h)
        return vals[len(vals) // 2] if vals else None

    def last_value(key: str) -> float | None:
        vals = [h[key] for h in rows if key in h]
        return vals[-1] if vals else None

    last, first = rows[-window:], rows[:window]
    kl_key = "kl" if any("kl" in h for h in rows) else "kl_monitor"
    out = {
        "reward_final": mean("reward", last), "reward_first": mean("reward", first),
        "frac_reward_zero_std_mean": mean("frac_reward_zero_std", rows),
        "frac_reward_zero_std_final": mean("frac_reward_zero_std", last),
        "completion_length_final": mean("completions/mean_length", last),
        "entropy_final": mean("entropy", last),
        "generated_tokens_per_s": median("throughput/generated_tokens_per_s"),
        "train_tokens_per_s": median("throughput/train_tokens_per_s"),
        "step_seconds": median("step_seconds"),
        "kl_final": last_value(kl_key), "kl_source": kl_key if any(kl_key in h for h in rows) else None,
    }
    out["rewards_final"] = {n: mean(f"rewards/{n}/mean", last) for n in reward_names}
    return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}
