"""The serving lease on both stores, S3 included (moto's server, conditional PUTs): writers
racing for it take turns, and a held lease is seen as held by another process's view."""

from __future__ import annotations

import threading

import pytest

from pipelines.serving.lease import LeaseBusy, ServingLease
from pipelines.store import ObjectStore


def test_racing_writers_take_turns_on_the_store(store: ObjectStore) -> None:
    inside, overlaps, done = [0], [], []

    def worker(i: int) -> None:
        mine = ServingLease(store, "m", ttl_s=30, wait_s=60, poll_s=0.01)
        for _ in range(3):
            with mine.hold(f"writer {i}") as held:
                inside[0] += 1
                if inside[0] > 1:
                    overlaps.append(i)
                done.append(held.generation)
                inside[0] -= 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [] and sorted(done) == list(range(1, 13))


def test_a_held_lease_refuses_a_second_writer_on_the_store(store: ObjectStore) -> None:
    a = ServingLease(store, "m", ttl_s=30, wait_s=0)
    b = ServingLease(store, "m", ttl_s=30, wait_s=0.2, poll_s=0.05)
    with a.hold("promote v2"), pytest.raises(LeaseBusy, match="promote v2"):
        b.acquire("monitoring rollback of v2")
    assert b.acquire("monitoring rollback of v2").generation == 2


def test_writers_in_other_processes_see_each_others_generations(store: ObjectStore) -> None:
    """Two views of the store with filesystems of their own (as two pods have): a release and a
    new generation written through one are seen through the other, whatever it listed
    before (s3fs caches listings per filesystem)."""
    other_view = ObjectStore(
        store.root_uri, {**store.fs.storage_options, "skip_instance_cache": True}
    )
    a = ServingLease(store, "m", ttl_s=30, wait_s=0)
    b = ServingLease(other_view, "m", ttl_s=30, wait_s=0.3, poll_s=0.05)
    held = a.acquire("promote v2")
    with pytest.raises(LeaseBusy):
        b.acquire("monitoring rollback of v2")  # b has now listed the prefix
    a.release(held)
    assert b.acquire("monitoring rollback of v2").generation == 2
    c = ServingLease(store, "m", ttl_s=30, wait_s=0.3, poll_s=0.05)
    with pytest.raises(LeaseBusy, match="monitoring rollback of v2"):
        c.acquire("stage_canary v3")
