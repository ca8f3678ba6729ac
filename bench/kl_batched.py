"""PROPOSED replacement for stages.grpo.kl_to_base, used by bench/gpu_grpo.py --kl-variant batched.

Measurement only: the stage is not changed; the benchmark swaps this function in to measure the
fix it proposes. Same estimator (k3, per-token mean over the first `limit` completions, the base
being the model with its adapter disabled), but batched forward passes (policy, base; rows_per_pass
completions each) instead of two per completion, and logits only for completion positions (`logits_to_keep`).
Prompts are left-padded and completions right-padded, as TRL lays out its own batches.
"""
from __future__ import annotations


def kl_to_base(model, tokenizer, prompts, completion_ids, limit: int = 8, rows_per_pass: int = 2) -> float | None:
    """Mean per-token KL(policy || base) on sampled completions (k3 estimator), the base being
    the same model with its LoRA adapter disabled. None when there is no adapter to disable.
    rows_per_pass bounds the logits tensor (rows x completion length x vocabulary)."""
    import torch

    if not hasattr(model, "disable_adapter") or not completion_ids:
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

            def logprobs():
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               logits_to_keep=width_c + 1).logits[:, :-1]
                # One row at a time in float32: the full-vocabulary softmax is the large tensor.
                return torch.stack([torch.log_softmax(logits[i].float(), -1).gather(-1, targets[i, :, None])[:, 0]
                                    for i in range(len(chunk))])

            policy = logprobs()
            with model.disable_adapter():
                base = logprobs()
            delta = (base - policy)[target_mask]
            total += (torch.exp(delta) - delta - 1).sum().item()
            count += delta.numel()
    model.train(was_training)
    return total / count if count else None
