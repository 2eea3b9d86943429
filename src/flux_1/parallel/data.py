"""Data-parallel generation: the seeds are dealt over the ranks, each rank generates its share with the
whole model and writes its own files. Nothing is communicated but the final count (no image moves)."""

from __future__ import annotations

import mlx.core as mx


def my_seeds(seeds: list[int], rank: int, size: int) -> list[int]:
    """Round-robin: rank r takes seeds r, r + size, ... (counts differ by at most one)."""
    return list(seeds[rank::size])


def total_written(count: int, group: mx.distributed.Group) -> int:
    """The number of images written by all ranks (one small all_sum, also a final barrier)."""
    total = mx.distributed.all_sum(mx.array(count, dtype=mx.int32), group=group)
    return int(total.item())
