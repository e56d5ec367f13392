"""Which train rows each rank reads: every rank gets rows, every row goes to exactly one rank."""

from __future__ import annotations

import pytest

from pipelines.data.shard import _shard_counts
from pipelines.train.partition import RowSlice, rank_rows


def _rows(shard_rows: list[int], world: int) -> list[list[tuple[int, int]]]:
    """Each rank's rows as (shard, row) pairs."""
    return [
        [(p.shard, r) for p in rank_rows(shard_rows, rank, world) for r in range(p.start, p.stop)]
        for rank in range(world)
    ]


@pytest.mark.parametrize(
    ("shard_rows", "world"),
    [
        ([100, 100, 100, 100], 2),  # shards >= ranks
        ([100, 90, 80, 70, 60], 4),  # shards >= ranks, uneven
        ([1000], 3),  # one shard, three nodes
        ([500, 7], 6),  # fewer shards than ranks
        ([10, 0, 10], 4),  # an empty shard in between
        ([5], 5),  # a row per rank
    ],
)
def test_every_rank_gets_rows_and_every_row_is_used_exactly_once(
    shard_rows: list[int], world: int
) -> None:
    per_rank = _rows(shard_rows, world)
    assert all(per_rank), per_rank  # no rank is left without rows (DDP would hang)
    flat = [row for rows in per_rank for row in rows]
    assert sorted(flat) == [(s, r) for s, n in enumerate(shard_rows) for r in range(n)]
    sizes = [len(rows) for rows in per_rank]
    assert max(sizes) - min(sizes) <= 1  # balanced: the common step count wastes no rows


def test_with_more_shards_than_nodes_a_rank_reads_only_the_shards_under_its_range() -> None:
    assert rank_rows([100, 100, 100, 100], 0, 2) == [RowSlice(0, 0, 100), RowSlice(1, 0, 100)]
    assert rank_rows([100, 100, 100, 100], 1, 2) == [RowSlice(2, 0, 100), RowSlice(3, 0, 100)]


def test_one_shard_and_three_nodes_gives_each_a_disjoint_slice() -> None:
    assert [rank_rows([1000], r, 3) for r in range(3)] == [
        [RowSlice(0, 0, 333)],
        [RowSlice(0, 333, 666)],
        [RowSlice(0, 666, 1000)],
    ]


def test_the_assignment_is_a_function_of_shard_sizes_and_world_only() -> None:
    assert (
        rank_rows([70, 30], 1, 2)
        == rank_rows([70, 30], 1, 2)
        == [
            RowSlice(0, 50, 70),
            RowSlice(1, 0, 30),
        ]
    )


@pytest.mark.parametrize("shard_rows", [[], [0], [0, 0]])
def test_an_empty_train_split_is_a_clear_error(shard_rows: list[int]) -> None:
    with pytest.raises(ValueError, match="train split has no rows"):
        rank_rows(shard_rows, 0, 2)


def test_fewer_rows_than_ranks_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="3 rows, fewer than the 4 ranks"):
        rank_rows([3], 0, 4)


@pytest.mark.parametrize(("rank", "world"), [(2, 2), (-1, 2), (0, 0)])
def test_a_rank_outside_the_world_is_refused(rank: int, world: int) -> None:
    with pytest.raises(ValueError, match="not in a world"):
        rank_rows([10], rank, world)


def test_shard_counts_are_sized_for_real_days_and_never_depend_on_nodes() -> None:
    fractions = (0.7, 0.15, 0.15)
    assert _shard_counts(2_000_000, fractions, 250_000) == [6, 2, 2]
    assert _shard_counts(20_000, fractions, 250_000) == [1, 1, 1]  # the demo stays small
    assert _shard_counts(10, fractions, 250_000) == [1, 1, 1]
