"""The prompts GRPO trains on: read from the prepare stage's parquet, too-long ones dropped and
counted (TRL 1.14 has no max_prompt_length), and the order continuous training wants."""
from __future__ import annotations

from pathlib import Path

from stages.common import checkpoints


def load_prompts(file: Path, tokenizer, max_prompt_length: int):
    """(prompts that fit, how many were dropped as too long, the kept prompts' token counts)."""
    import datasets

    data = datasets.Dataset.from_parquet(str(file))
    if len(data) == 0:
        raise ValueError(f"{file} has no prompts: check the prepare stage's metrics")

    def length(row):
        text = tokenizer.apply_chat_template(list(row["prompt"]), tokenize=False, add_generation_prompt=True)
        return {"prompt_tokens": len(tokenizer(text, add_special_tokens=False).input_ids)}

    data = data.map(length)
    kept = data.filter(lambda r: r["prompt_tokens"] <= max_prompt_length)
    if len(kept) == 0:
        raise ValueError(f"all {len(data)} prompts are longer than grpo.max_prompt_length={max_prompt_length} tokens")
    return kept.remove_columns(["prompt_tokens"]), len(data) - len(kept), kept["prompt_tokens"]


def unseen_first(data, trained: set[str], seed: int):
    """The prompts reordered for continuous training: those not in `trained` (content hashes)
    first, then the rest, each part shuffled with the seed. (order, how many are unseen)."""
    import random

    rng = random.Random(seed)
    fresh, old = [], []
    for i, prompt in enumerate(data["prompt"]):
        (old if checkpoints.prompt_hash(prompt) in trained else fresh).append(i)
    rng.shuffle(fresh), rng.shuffle(old)
    return data.select(fresh + old), len(fresh)
