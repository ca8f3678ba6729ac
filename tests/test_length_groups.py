"""grpo.group_prompts_by_length: generation batches of equal-length prompts, same coverage and
repeats as TRL's RepeatSampler; on the tiny model the stage's generation batches come out pure."""
from __future__ import annotations

from collections import Counter

import pytest

from stages.common.length_groups import length_grouped_chunks
from tests.conftest import tiny

GENERATION_BATCHES: list[list[str]] = []


def record_prompts(prompts, completions, **kwargs):
    """A reward that records each generation batch's prompts and varies with the completion."""
    GENERATION_BATCHES.append([p[-1]["content"] for p in prompts])
    return [len(set(str(c))) / 10 for c in completions]


@pytest.mark.parametrize("seed", [0, 1, None])
def test_chunks_cover_full_batches_and_are_pure_where_buckets_allow(seed):
    lengths = [5] * 10 + [7] * 7 + [9] * 3 + [11]  # 21 prompts, batch 4
    chunks = length_grouped_chunks(lengths, 4, seed)
    assert all(len(c) == 4 for c in chunks) and len(chunks) == len(lengths) // 4
    flat = [i for c in chunks for i in c]
    assert len(set(flat)) == len(flat)
    pure = [c for c in chunks if len({lengths[i] for i in c}) == 1]
    assert Counter(lengths[c[0]] for c in pure) == Counter({5: 2, 7: 1})  # 10 // 4 and 7 // 4
    assert len(chunks) - len(pure) == 2  # leftovers 2 + 3 + 3 + 1 = 9: two mixed chunks, one index dropped


def test_chunks_are_deterministic_per_seed_and_keep_order_without_one():
    lengths = [i % 3 for i in range(30)]
    assert length_grouped_chunks(lengths, 5, 3) == length_grouped_chunks(lengths, 5, 3)
    assert length_grouped_chunks(lengths, 5, 3) != length_grouped_chunks(lengths, 5, 4)
    assert length_grouped_chunks(lengths, 5, None)[0] == [0, 3, 6, 9, 12]


def test_grpo_stage_generates_from_equal_length_prompts(tmp_path, base_dir):
    import pandas as pd

    from stages import grpo
    from stages.common.answer_format import AnswerFormat

    fmt = AnswerFormat()
    # Two prompt lengths, eight prompts each: with batches of 2 prompts, every batch can be pure,
    # while TRL's shuffled order would pair a short with a long prompt in most batches.
    questions = [f"What is {a} + {a + 1}?" for a in range(11, 19)] + \
                [f"What is {a} + {a + 1} + {a + 2} + {a + 3}?" for a in range(11, 19)]
    file = tmp_path / "grpo.parquet"
    pd.DataFrame({"prompt": [fmt.messages(q) for q in questions], "answer": ["1"] * 16,
                  "question": questions}).to_parquet(file)
    params = tiny({"grpo": {"rewards": [{"name": "tests.test_length_groups:record_prompts"}],
                            "group_prompts_by_length": True, "num_generations": 4, "per_device_train_batch_size": 8,
                            "max_steps": 4, "save_steps": 100, "max_completion_length": 8, "log_completions_every": 0,
                            "monitor_kl": False}})
    GENERATION_BATCHES.clear()
    metrics = grpo.run(params, file, base_dir, None, tmp_path / "out", tmp_path / "ckpt", tmp_path / "plots")
    assert metrics["steps"] == 4 and len(GENERATION_BATCHES) == 4
    for batch in GENERATION_BATCHES:
        assert len(set(batch)) == 2, batch  # 8 completions = 2 prompts x 4 generations
        assert len({q.count("+") for q in batch}) == 1, f"a generation batch mixed prompt lengths: {set(batch)}"
