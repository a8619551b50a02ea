"""The order a training stage visits its data in: seeded epochs of global batches, and their split into
micro-batches.

The in-process oracle (`rayalign.oracle`) and the Ray Train workers (`rayalign.train_loop`) both take their
batches from here, so they train on the same pairs at the same step, and a global batch is split the same
way however many workers and accumulation steps share it. Pure Python: no torch, no Ray, no data.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator


def total_steps(num_pairs: int, train, epochs: int) -> int:
    """Optimizer steps of a stage: `epochs` of ceil(num_pairs / global batch), capped by train.max_steps
    (`train` is a TrainConfig; the epochs are the stage's, `rayalign.stage_inputs`)."""
    per_epoch = math.ceil(num_pairs / train.global_batch_size)
    return min(per_epoch * epochs, train.max_steps or per_epoch * epochs)


def step_batches(num_pairs: int, train, epochs: int) -> Iterator[tuple[int, list[int]]]:
    """(epoch, pair indices) of each global batch: a seeded shuffle per epoch, the last partial batch kept."""
    size = train.global_batch_size
    for epoch in range(epochs):
        order = list(range(num_pairs))
        random.Random(train.seed + epoch).shuffle(order)
        for start in range(0, num_pairs, size):
            yield epoch, order[start:start + size]


def micro_batch_bounds(size: int, splits: int) -> list[range]:
    """Positions of the `splits` contiguous micro-batches of a global batch of `size` pairs: ceil(size /
    splits) each, so the last ones may be short or empty (an empty range keeps its would-be start)."""
    step = math.ceil(size / splits)
    return [range(i * step, min((i + 1) * step, size)) for i in range(splits)]


def micro_batches(indices: list[int], splits: int) -> list[list[int]]:
    """The `splits` micro-batches of a global batch (`micro_batch_bounds`); micro-batch r*A + a is
    accumulation step a of worker r when `splits` = workers x A."""
    return [indices[bounds.start:bounds.stop] for bounds in micro_batch_bounds(len(indices), splits)]
