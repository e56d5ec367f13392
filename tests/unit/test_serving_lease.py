"""The serving lease: one writer at a time, a dead holder's lease expires, a late release never
frees its successor's. Real create-once writes on the local store; a fake clock where time
matters."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from pipelines.serving.lease import KEEP_GENERATIONS, LeaseBusy, LeaseLost, ServingLease, whoami
from pipelines.store import ObjectStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def lease(tmp_path: Path, clock: Clock, ttl: float = 60, wait: float = 5) -> ServingLease:
    return ServingLease(
        ObjectStore(str(tmp_path)), "m", ttl, wait, poll_s=1, clock=clock, sleep=clock.sleep
    )


def test_a_held_lease_makes_the_next_writer_wait_then_names_its_holder(tmp_path: Path) -> None:
    clock = Clock()
    a, b = lease(tmp_path, clock), lease(tmp_path, clock)
    first = a.acquire("promote v2 (task t1)")
    assert first.generation == 1 and a.current() == first
    with pytest.raises(LeaseBusy) as err:
        b.acquire("monitoring rollback of v2")
    msg = str(err.value)
    assert "promote v2 (task t1)" in msg and "serving.lease_wait_s" in msg
    assert "locks/serving/m/0000000001.json" in msg
    assert clock.now >= 1_000_005  # it waited the whole wait_s before giving up
    a.release(first)
    assert a.current() is None
    second = b.acquire("monitoring rollback of v2")
    assert second.generation == 2 and second.holder.startswith("monitoring")


def test_a_lease_whose_holder_stopped_renewing_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    a, b = lease(tmp_path, clock, ttl=30), lease(tmp_path, clock, ttl=30, wait=0)
    dead = a.acquire("stage_canary v3 (a pod that was killed)")
    clock.now += 31
    with caplog.at_level("WARNING"):
        taken = b.acquire("promote v3")
    assert taken.generation == dead.generation + 1
    assert "expired serving lease" in caplog.text and "a pod that was killed" in caplog.text
    # The dead holder's late release frees its own generation only, not the new holding.
    a.release(dead)
    assert b.current() == taken
    with pytest.raises(LeaseBusy, match="was taken over"):
        a.renew(dead)


def test_renewal_keeps_a_lease_held_past_its_ttl(tmp_path: Path) -> None:
    clock = Clock()
    a, b = lease(tmp_path, clock, ttl=30), lease(tmp_path, clock, ttl=30, wait=0)
    held = a.acquire("promote v4")
    clock.now += 25
    held = a.renew(held)
    clock.now += 25  # 50 s after taking it, 25 s after the renewal
    with pytest.raises(LeaseBusy):
        b.acquire("monitoring rollback of v4")


def test_hold_releases_when_the_block_fails_and_renews_from_a_thread(tmp_path: Path) -> None:
    store = ObjectStore(str(tmp_path))
    real = ServingLease(store, "m", ttl_s=0.3, wait_s=0)
    with pytest.raises(RuntimeError, match="boom"), real.hold("stage_canary v5"):
        time.sleep(0.8)  # past the ttl: only the renewals keep it
        assert real.current() is not None
        raise RuntimeError("boom")
    assert real.current() is None
    doc = json.loads(store.read_text("locks/serving/m/0000000001.json"))
    assert doc["expires_at"] > doc["acquired_at"] + 0.3  # it was renewed


def test_racing_writers_never_hold_it_together(tmp_path: Path) -> None:
    """Eight threads, each taking the lease five times around a read-modify-write of a
    counter: with real create-once writes no increment is lost and no two overlap."""
    store = ObjectStore(str(tmp_path))
    counter, inside, overlaps = tmp_path / "counter", [0], []
    counter.write_text("0")

    def worker(i: int) -> None:
        mine = ServingLease(store, "m", ttl_s=30, wait_s=60, poll_s=0.001)
        for _ in range(5):
            with mine.hold(f"writer {i}"):
                inside[0] += 1
                if inside[0] > 1:
                    overlaps.append(i)
                n = int(counter.read_text())
                time.sleep(0.001)
                counter.write_text(str(n + 1))
                inside[0] -= 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.read_text() == "40" and overlaps == []
    kept = [k for k in store.list("locks/serving/m") if k.endswith(".json")]
    assert len(kept) <= KEEP_GENERATIONS and kept[-1].endswith("0000000040.json")


def test_an_unreadable_lease_names_its_object(tmp_path: Path) -> None:
    clock = Clock()
    store = ObjectStore(str(tmp_path))
    store.write_bytes("locks/serving/m/0000000007.json", b"{not json")
    with pytest.raises(Exception, match=r"0000000007\.json is unreadable"):
        lease(tmp_path, clock).acquire("promote v1")


def test_whoami_names_the_airflow_task_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "mlops_model_monitoring")
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "scheduled__2026-12-01T10:00:00+00:00")
    monkeypatch.setenv("AIRFLOW_CTX_TASK_ID", "roll_back")
    who = whoami("monitoring rollback of v2")
    assert who.startswith("monitoring rollback of v2 (mlops_model_monitoring/scheduled__")
    assert "/roll_back, pid " in who


def test_a_block_whose_lease_was_taken_over_fails_with_lease_lost(tmp_path: Path) -> None:
    """The holder stalls (here: its renewals are stopped) past the ttl, another writer takes the
    lease over; the block's end then raises instead of reporting a clean change."""
    store = ObjectStore(str(tmp_path))
    slow = ServingLease(store, "m", ttl_s=0.3, wait_s=0)
    other = ServingLease(store, "m", ttl_s=30, wait_s=5, poll_s=0.05)
    slow.renew = lambda lease: (_ for _ in ()).throw(OSError("store unreachable"))  # type: ignore[method-assign]
    with pytest.raises(LeaseLost, match="was lost"), slow.hold("promote v6"):
        time.sleep(0.4)
        taken = other.acquire("monitoring rollback of v6")  # the expired lease is taken over
        assert taken.generation == 2
        time.sleep(0.3)


def test_a_lease_whose_holder_process_is_gone_from_this_host_is_taken_over_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A killed task's retry (here: a process that took the lease and died without letting
    go) does not wait out the ttl on the host where the holder ran."""
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "from pipelines.serving.lease import ServingLease\n"
        "from pipelines.store import ObjectStore\n"
        f"ServingLease(ObjectStore({str(tmp_path)!r}), 'm', 600, 0).acquire('canary tick')\n"
        "os._exit(0)\n"  # no release, no renewal: as SIGKILL leaves it
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    writer = ServingLease(ObjectStore(str(tmp_path)), "m", 600, 5, poll_s=0.1)
    dead = writer.current()
    assert dead is not None and dead.holder == "canary tick"  # unexpired: held on paper
    began = time.monotonic()
    with caplog.at_level("WARNING"):
        taken = writer.acquire("the retried canary tick")
    assert taken.generation == dead.generation + 1
    assert time.monotonic() - began < 2  # not the 5 s wait, nor the 600 s ttl
    assert "its holder's process is gone from this host" in caplog.text


def test_a_holder_elsewhere_or_alive_or_unrecorded_is_not_gone() -> None:
    from pipelines.serving.lease import holder_gone, this_process

    me = this_process()
    assert not holder_gone(me)  # alive
    assert not holder_gone(None)  # a lease written before processes were recorded
    for key, other in (("host", "another-pod"), ("boot", "x"), ("pid_ns", "pid:[1]")):
        # a process this one cannot see: only the lease's expiry can tell
        assert not holder_gone({**me, key: other, "pid": 2**22 + 1})
    # The same pid, reused by a process that started at another time, is a gone holder.
    assert holder_gone({**me, "start": str(int(me["start"]) - 1)})
