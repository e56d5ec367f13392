"""Which rows of the train split each rank trains on: a pure function of shard sizes and world.

The manifest knows nothing of nodes (its content, and so its data version, must not depend on
how many read it), so the assignment happens here, at training time, for the world that formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RowSlice:
    """Rows ``start:stop`` of the train split's shard number ``shard`` (manifest order)."""

    shard: int
    start: int
    stop: int


def rank_rows(shard_rows: Sequence[int], rank: int, world: int) -> list[RowSlice]:
    """Rank ``rank``'s rows: the ``rank``-th of ``world`` contiguous, equal (within one row)
    ranges of the split's rows laid end to end in manifest order.

    Every rank gets rows and every row goes to exactly one rank, however many shards there are:
    with more shards than ranks a rank reads only the shards under its range (data locality);
    with fewer (one 250,000-row shard, three nodes) ranks share a shard and each takes its own
    slice of it. Balanced ranges matter because every rank runs the minimum step count of all
    (DDP's all-reduce would hang otherwise): a rank holding more rows would leave them unseen."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"Rank {rank} is not in a world of {world}.")
    total = sum(shard_rows)
    if total == 0:
        raise ValueError("The train split has no rows: there is nothing to train on.")
    if total < world:
        raise ValueError(
            f"The train split has {total} rows, fewer than the {world} ranks that need one each."
        )
    lo, hi = rank * total // world, (rank + 1) * total // world
    out, first = [], 0
    for i, n in enumerate(shard_rows):
        start, stop = max(lo - first, 0), min(hi - first, n)
        if start < stop:
            out.append(RowSlice(i, start, stop))
        first += n
    return out
