"""One writer at a time for a model's serving: a lease in the object store.

Everything that moves a model's serving (staging a canary, promoting it, rolling it back, and
the monitor restoring the previous champion) runs under this lease, so two of them never
interleave. It lives in the store because the writers are different Airflow tasks, in other
processes, and on Kubernetes in other pods; the store is what they all share.

The lease is a sequence of create-once objects, one per holding (Kubernetes' Lease and etcd's
revisions work the same way)::

    locks/serving/<model>/0000000042.json        who holds it, until when
    locks/serving/<model>/0000000042.released    written when the holder lets go

Generation ``g + 1`` can be created only once (a conditional PUT on S3, a hard link locally),
so of two writers racing for a free lease exactly one wins. That needs a store that honours
``If-None-Match: *`` (AWS S3 does; an S3 look-alike that ignores it would let both win).
The newest generation is held while it has no ``.released`` marker and its ``expires_at`` is
in the future. Its holder renews it every third of ``ttl_s`` from a thread, so a lease
expires only when its holder died or hung that long; the next writer then takes it over with
a warning naming the holder. A holder that is known to be gone does not keep it that long:
each lease records its holder's process (host, boot, pid namespace, pid and the process's
start time), and a writer that runs on the same host, boot and pid namespace, where that
process no longer exists, takes the lease over at once (a killed task's retry then does not
wait out the ttl). Anywhere else only the expiry can tell. A holder can release only its own
generation: a late release of an expired lease never frees the one that replaced it. A block
whose lease was lost meanwhile fails with :class:`LeaseLost` (its step is retried). The
generation is the fencing token: the audit entry of each serving change records it."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.store import ObjectStore, StoreError

log = logging.getLogger(__name__)

KEEP_GENERATIONS = 16
"""Generations kept for the record; older ones are deleted by the next holder."""


class LeaseBusy(RuntimeError):
    """Another writer holds the lease and did not let go within the wait."""


class LeaseLost(RuntimeError):
    """The lease expired or was taken over while its holder's block ran: what the block did
    to serving may have interleaved with another writer, so the step fails (and is retried;
    every serving step is idempotent)."""


@dataclass(frozen=True)
class Lease:
    model: str
    generation: int
    holder: str
    acquired_at: float
    expires_at: float
    # The holder's process (``this_process()``); None in leases written before it was kept.
    process: dict[str, Any] | None = field(default=None)

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.acquired_at))
        return f"generation {self.generation}, held by {self.holder} since {since}"


def lease_prefix(model: str) -> str:
    return f"locks/serving/{model}"


def whoami(what: str) -> str:
    """``what`` and who is doing it: the Airflow task when there is one, and host and pid."""
    ctx = [os.environ.get(f"AIRFLOW_CTX_{k}") for k in ("DAG_ID", "DAG_RUN_ID", "TASK_ID")]
    task = "/".join(c for c in ctx if c)
    where = f"pid {os.getpid()} on {socket.gethostname()}"
    return f"{what} ({task}, {where})" if task else f"{what} ({where})"


def _read_proc(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot ("" if there is none)."""
    stat = _read_proc(f"/proc/{pid}/stat")
    # The command name (field 2) may hold spaces and parentheses: count after its last ")".
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def this_process() -> dict[str, Any]:
    """What identifies this process on its host: host name, boot, pid namespace, pid and the
    process's start time (a reused pid has another)."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot": _read_proc("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _pid_namespace(),
        "pid": pid,
        "start": _start_ticks(pid),
    }


def holder_gone(process: dict[str, Any] | None) -> bool:
    """True only when ``process`` ran on this host, boot and pid namespace and no longer
    exists there (its pid is free, or taken by a process that started later). Anything this
    process cannot see (another host or container, no record, no /proc) is not gone."""
    if not process:
        return False
    me = this_process()
    if not me["boot"] or not me["pid_ns"] or not process.get("start"):
        return False
    if any(process.get(k) != me[k] for k in ("host", "boot", "pid_ns")):
        return False
    return _start_ticks(int(process["pid"])) != process["start"]


class ServingLease:
    """The lease of one model's serving in ``store``."""

    def __init__(
        self,
        store: ObjectStore,
        model: str,
        ttl_s: float,
        wait_s: float,
        poll_s: float = 0.5,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if ttl_s <= 0 or wait_s < 0:
            raise ValueError("A lease needs ttl_s > 0 and wait_s >= 0.")
        self.store, self.model = store, model
        self.ttl_s, self.wait_s, self.poll_s = ttl_s, wait_s, poll_s
        self._clock, self._sleep = clock, sleep
        self.prefix = lease_prefix(model)

    # -- reading --------------------------------------------------------------------------
    def _key(self, generation: int, suffix: str = "json") -> str:
        return f"{self.prefix}/{generation:010d}.{suffix}"

    def _generations(self) -> tuple[list[int], set[int]]:
        held, released = [], set()
        # The other writers are other processes: a listing s3fs cached earlier would hide the
        # generations and release markers they wrote since.
        self.store.fs.invalidate_cache()
        for key in self.store.list(self.prefix):
            stem, _, suffix = key.rsplit("/", 1)[-1].partition(".")
            if not stem.isdigit():
                continue
            if suffix == "json":
                held.append(int(stem))
            elif suffix == "released":
                released.add(int(stem))
        return sorted(held), released

    def _read(self, generation: int) -> Lease:
        try:
            return Lease(**json.loads(self.store.read_text(self._key(generation))))
        except (StoreError, ValueError, TypeError) as exc:
            raise StoreError(
                f"The serving lease {self.store.uri(self._key(generation))} is unreadable: {exc}"
            ) from exc

    def current(self) -> Lease | None:
        """The lease as held now (None when free)."""
        held, released = self._generations()
        if not held or held[-1] in released:
            return None
        lease = self._read(held[-1])
        return lease if lease.expires_at > self._clock() else None

    # -- holding --------------------------------------------------------------------------
    def acquire(self, holder: str) -> Lease:
        """Take the lease, waiting up to ``wait_s`` for its holder; :class:`LeaseBusy` then."""
        deadline = self._clock() + self.wait_s
        while True:
            held, released = self._generations()
            top = held[-1] if held else 0
            if held and top not in released:
                other = self._read(top)
                gone = other.expires_at > self._clock() and holder_gone(other.process)
                if gone:
                    log.warning(
                        "Taking over the serving lease of %s (%s): its holder's process is "
                        "gone from this host.",
                        self.model,
                        other.describe(),
                    )
                elif other.expires_at > self._clock():
                    if self._clock() >= deadline:
                        raise LeaseBusy(
                            f"The serving of {self.model} is being changed by {other.holder} "
                            f"(lease {self.store.uri(self._key(top))}, {other.describe()}); "
                            f"waited {self.wait_s:g} s (serving.lease_wait_s)."
                        )
                    self._sleep(self.poll_s)
                    continue
                else:
                    log.warning(
                        "Taking over the expired serving lease of %s (%s): its holder stopped "
                        "renewing it %.0f s ago.",
                        self.model,
                        other.describe(),
                        self._clock() - other.expires_at,
                    )
            now = self._clock()
            lease = Lease(self.model, top + 1, holder, now, now + self.ttl_s, this_process())
            key = self._key(lease.generation)
            if self.store.create_bytes(key, _encode(lease)):
                self._prune(lease.generation)
                log.info("serving lease of %s taken: %s", self.model, lease.describe())
                return lease
            # Another writer created that generation first: look again, within the wait.
            if self._clock() >= deadline:
                raise LeaseBusy(
                    f"The serving lease of {self.model} kept being taken by other writers "
                    f"for {self.wait_s:g} s (serving.lease_wait_s); last at "
                    f"{self.store.uri(key)}."
                )
            self._sleep(self.poll_s)

    def renew(self, lease: Lease) -> Lease:
        """Push the expiry of a lease this process holds; only its holder writes its object."""
        if self.current_generation() != lease.generation:
            raise LeaseBusy(
                f"The serving lease of {self.model} (generation {lease.generation}) was "
                "taken over: its holder stalled longer than serving.lease_ttl_s."
            )
        renewed = Lease(**{**asdict(lease), "expires_at": self._clock() + self.ttl_s})
        self.store.write_bytes(self._key(lease.generation), _encode(renewed))
        return renewed

    def current_generation(self) -> int:
        held, _ = self._generations()
        return held[-1] if held else 0

    def release(self, lease: Lease) -> None:
        """Let go of ``lease`` (its own generation only; idempotent)."""
        self.store.create_bytes(self._key(lease.generation, "released"), b"")

    @contextmanager
    def hold(self, holder: str) -> Iterator[Lease]:
        """Hold the lease for a block, renewed from a thread, released however the block
        ends. A block that ends after its lease was lost (taken over, or not renewed before
        it expired: the store was unreachable for ``ttl_s``) raises :class:`LeaseLost`."""
        lease = self.acquire(holder)
        stop, lost = threading.Event(), threading.Event()
        renewed = [lease]

        def keep() -> None:
            while not stop.wait(self.ttl_s / 3):
                try:
                    renewed[0] = self.renew(renewed[0])
                except LeaseBusy as exc:
                    log.error("%s", exc)
                    lost.set()
                    return
                except Exception:  # a store hiccup: try again at the next tick
                    log.warning("renewing the serving lease failed", exc_info=True)
                    if self._clock() >= renewed[0].expires_at:
                        log.error("the serving lease of %s expired unrenewed", self.model)
                        lost.set()
                        return

        renewer = threading.Thread(target=keep, name=f"lease-{self.model}", daemon=True)
        renewer.start()
        failed = True
        try:
            yield lease
            failed = False
        finally:
            stop.set()
            renewer.join()
            try:
                self.release(lease)
            except Exception:  # never hide the block's own outcome; the lease then expires
                log.exception("releasing the serving lease of %s failed", self.model)
                if not failed:
                    raise
        if lost.is_set():
            raise LeaseLost(
                f"The serving lease of {self.model} ({lease.describe()}) was lost while "
                "serving was being changed; another writer may have interleaved. The step "
                "is failed so that it is retried."
            )

    def _prune(self, newest: int) -> None:
        held, released = self._generations()
        for g in held:
            if g <= newest - KEEP_GENERATIONS:
                for key in (self._key(g), self._key(g, "released")):
                    if g in released or key.endswith(".json"):
                        self.store.delete(key)


def _encode(lease: Lease) -> bytes:
    return json.dumps(asdict(lease), sort_keys=True).encode()
