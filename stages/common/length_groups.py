"""Generation batches of equal-length prompts (`grpo.group_prompts_by_length`).

Batched generation left-pads prompts of different lengths, and padded rows made each decode step
56% slower on the Unsloth path (8 prompts x 8 generations, docs/benchmarks.md). This swaps TRL's
RepeatSampler order for one where each generation batch holds prompts of one token length when
the data allows, with the same repeats and the same number of batches.
"""
from __future__ import annotations

import random
from typing import Sequence


def length_grouped_chunks(lengths: Sequence[int], batch_size: int, seed: int | None) -> list[list[int]]:
    """Chunks of batch_size dataset indices covering len(lengths) // batch_size full batches.

    Indices are bucketed by length, shuffled within each bucket and cut into chunks; the
    leftovers of all buckets (fewer than batch_size each) are pooled, shuffled and cut into
    mixed chunks; the chunk order is shuffled; an incomplete last chunk is dropped, as
    RepeatSampler drops it. seed=None shuffles nothing (TRL's shuffle=False): buckets in length
    order, each in data order."""
    rng = random.Random(seed) if seed is not None else None
    buckets: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        buckets.setdefault(int(length), []).append(index)
    chunks: list[list[int]] = []
    leftovers: list[int] = []
    for length in sorted(buckets):
        members = buckets[length]
        if rng:
            rng.shuffle(members)
        full = len(members) - len(members) % batch_size
        chunks += [members[i:i + batch_size] for i in range(0, full, batch_size)]
        leftovers += members[full:]
    if rng:
        rng.shuffle(leftovers)
    chunks += [leftovers[i:i + batch_size] for i in range(0, len(leftovers) - batch_size + 1, batch_size)]
    if rng:
        rng.shuffle(chunks)
    return chunks


def length_grouped_trainer(trainer_cls: type, prompt_lengths: Sequence[int]) -> type:
    """A subclass of trainer_cls (TRL's or Unsloth's GRPOTrainer) whose training sampler draws
    generation batches of equal-length prompts; prompt_lengths[i] is row i's prompt token count."""
    from trl.trainer.utils import RepeatSampler

    class LengthGroupedRepeatSampler(RepeatSampler):
        def __iter__(self):
            import torch

            # A fresh seed per pass from the sampler's own generator: deterministic, new order each epoch.
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)) if self.shuffle else None
            for chunk in length_grouped_chunks(prompt_lengths, self.batch_size, seed):
                for _ in range(self.repeat_count):
                    for index in chunk:
                        for _ in range(self.mini_repeat_count):
                            yield index

    class LengthGroupedGRPOTrainer(trainer_cls):
        def _get_train_sampler(self, dataset=None):
            sampler = super()._get_train_sampler(dataset)
            if type(sampler) is not RepeatSampler or len(sampler.data_source) != len(prompt_lengths):
                raise RuntimeError(f"grpo.group_prompts_by_length: expected TRL's RepeatSampler over {len(prompt_lengths)} "
                                   f"prompts, got {type(sampler).__name__}; set grpo.group_prompts_by_length: false")
            return LengthGroupedRepeatSampler(sampler.data_source, sampler.mini_repeat_count, sampler.batch_size,
                                              sampler.repeat_count, sampler.shuffle, sampler.seed)

    LengthGroupedGRPOTrainer.__name__ = LengthGroupedGRPOTrainer.__qualname__ = f"LengthGrouped{trainer_cls.__name__}"
    return LengthGroupedGRPOTrainer
