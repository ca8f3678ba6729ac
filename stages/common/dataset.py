"""The name of the dataset a run used, from `params.prepare`: what tags, reports and metrics
files call it, so a run on another dataset is never reported as GSM8K.

    dataset_name(params.prepare)   # 'gsm8k', 'hub:openai/gsm8k/main', 'file:a.jsonl+b.jsonl', 'synthetic:+-:10-99'
"""
from __future__ import annotations

from stages.common.params import PrepareParams


def dataset_name(p: PrepareParams) -> str:
    if p.source == "hub":
        return f"hub:{p.hub_id}" + (f"/{p.hub_config}" if p.hub_config else "")
    if p.source == "file":
        return f"file:{p.train_file}+{p.test_file}"
    if p.source == "synthetic":
        s = p.synthetic
        return f"synthetic:{''.join(s.operations)}:{s.min_operand}-{s.max_operand}"
    return "gsm8k"
