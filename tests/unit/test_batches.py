"""The bounded-memory helpers: stable hashing, the seeded bottom-k sample, running moments."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines.data.batches import BottomK, Moments, stable_hash


def test_stable_hash_is_fnv1a_and_independent_of_the_container() -> None:
    values = ["card-000001", "", "é-ß", "card-000001"]
    h = stable_hash(pa.array(values))
    # The 64-bit FNV-1a of b"" is its offset basis; the mix turns it into this fixed constant,
    # computed here from the definition so a change of algorithm is caught.
    basis = 0xCBF29CE484222325
    z = basis
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    z ^= z >> 31
    assert int(h[1]) == z
    assert h[0] == h[3] and len(set(h.tolist())) == 3
    assert (stable_hash(pd.Series(values)) == h).all()
    assert (stable_hash(pa.chunked_array([values[:2], values[2:]])) == h).all()
    assert (stable_hash(pa.array(values).slice(2)) == h[2:]).all()
    assert (stable_hash(pa.array([1, 22])) == stable_hash(pa.array(["1", "22"]))).all()


def test_stable_hash_spreads_sequential_ids_evenly() -> None:
    ids = pa.array([f"20261101-{i:08d}" for i in range(50_000)])
    buckets = np.bincount((stable_hash(ids) % np.uint64(10)).astype(int), minlength=10)
    assert buckets.min() > 4_500 and buckets.max() < 5_500


def test_bottom_k_is_seeded_bounded_and_uniform() -> None:
    stream = [np.arange(i * 10_000, (i + 1) * 10_000, dtype=float) for i in range(10)]
    a, b = BottomK(2_000, seed=3), BottomK(2_000, seed=3)
    for chunk in stream:
        a.add(chunk)
        b.add(chunk)
    assert len(a.values) == 2_000
    assert (a.values == b.values).all()
    assert abs(np.median(a.values) - 50_000) < 4_000  # a uniform sample, not the first chunk


def test_moments_merge_batches_exactly() -> None:
    rng = np.random.default_rng(0)
    x = rng.lognormal(3, 1, 10_001)
    m = Moments()
    for part in np.array_split(x, 7):
        m.add(part)
    m.add(np.array([np.nan]))
    assert m.n == len(x)
    assert m.mean == pytest.approx(x.mean(), rel=1e-12)
    assert m.std == pytest.approx(x.std(), rel=1e-10)


def test_prefetch_keeps_order_and_raises_the_producers_error_in_place() -> None:
    from pipelines.data.batches import prefetch

    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))

    def failing() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("page 3 is corrupt")

    got = []
    with pytest.raises(ValueError, match="page 3 is corrupt"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1, 2]


def test_prefetch_stops_its_producer_when_the_consumer_stops() -> None:
    import threading

    from pipelines.data.batches import prefetch

    produced = []

    def endless() -> Iterator[int]:
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = threading.active_count()
    stream = prefetch(endless(), depth=1)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert threading.active_count() == before
    assert len(produced) <= 3 + 2  # at most depth + one in hand were read ahead
