"""Bounded-memory building blocks: a partition read in record batches, a stable vectorised hash,
a seeded bottom-k sample and running moments. Nothing here holds more than one batch of rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.store import ObjectStore

DEFAULT_BATCH_ROWS = 500_000
T = TypeVar("T")
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


class PartitionUnreadable(ValueError):
    """A landing file is not readable parquet (corrupt or truncated)."""


def partition_files(store: ObjectStore, prefix: str) -> list[str]:
    """The partition's parquet files in a fixed order (reports under ``_validation/`` excluded)."""
    return sorted(k for k in store.list(prefix) if k.endswith(".parquet") and "/_" not in k)


def iter_partition(
    store: ObjectStore,
    prefix: str,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    columns: list[str] | None = None,
) -> Iterator[pa.Table]:
    """Yield the partition as tables of at most ``batch_rows`` rows, file by file.

    Files are opened through the store (ranged reads on S3), so only one batch is decoded at a
    time. Raises :class:`PartitionUnreadable` naming the file when a footer or page is corrupt."""
    for key in partition_files(store, prefix):
        try:
            with store.open(key) as fh:
                pf = pq.ParquetFile(fh)
                if pf.metadata.num_rows == 0:
                    yield pf.schema_arrow.empty_table()  # an empty file still has a schema
                for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                    yield pa.Table.from_batches([batch])
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise PartitionUnreadable(f"{store.uri(key)} is not readable parquet: {exc}") from exc


def prefetch(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Yield ``items`` while a background thread produces up to ``depth`` of them ahead.

    Parquet decoding releases the GIL, so the next batch is read while this one is processed;
    memory grows by ``depth`` batches, not with the partition. The producer's exception is
    raised here, in order; a consumer that stops early stops the producer too."""
    import queue
    import threading

    done = object()
    box: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            box.put((done, exc))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = box.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                box.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def cpu_workers(limit: int = 4) -> int:
    """CPUs this process may use (its affinity, not the host's count), at most ``limit``."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, limit))


def partition_rows(store: ObjectStore, prefix: str) -> int:
    """Row count from the parquet footers alone (no data pages read)."""
    total = 0
    for key in partition_files(store, prefix):
        try:
            with store.open(key) as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise PartitionUnreadable(f"{store.uri(key)} is not readable parquet: {exc}") from exc
    return total


def stable_hash(values: pa.Array | pa.ChunkedArray | pd.Series) -> np.ndarray:
    """64-bit FNV-1a of each value's UTF-8 text, finished with a splitmix64 mix.

    Stable across processes, platforms and library versions (unlike Python's ``hash`` or pandas'
    hashing), and vectorised over the Arrow string buffers: one numpy pass per byte position."""
    if isinstance(values, pd.Series):
        values = pa.array(values.astype(str).to_numpy(dtype=object), type=pa.large_string())
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not pa.types.is_large_string(values.type):
        values = pc.cast(pc.cast(values, pa.string()), pa.large_string())
    values = pc.fill_null(values, "")
    n = len(values)
    _, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[values.offset : values.offset + n + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, "u1")
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        shortest, longest = (int(lengths.min()), int(lengths.max())) if n else (0, 0)
        for j in range(shortest):  # every value has a byte here: whole-array operations
            h = (h ^ data[starts + j].astype(np.uint64)) * _FNV_PRIME
        for j in range(shortest, longest):
            live = np.flatnonzero(lengths > j)
            h[live] = (h[live] ^ data[starts[live] + j].astype(np.uint64)) * _FNV_PRIME
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


@dataclass
class BottomK:
    """A seeded uniform sample of at most ``k`` values from a stream (keeps the k smallest keys).

    The same stream in the same order gives the same sample; memory is O(k)."""

    k: int
    seed: int = 0
    _keys: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _seen: int = 0

    def add(self, values: np.ndarray) -> None:
        rng = np.random.default_rng([self.seed, self._seen])
        self._seen += len(values)
        keys = np.concatenate([self._keys, rng.random(len(values))])
        vals = np.concatenate([self._values, np.asarray(values, dtype=float)])
        if len(keys) > self.k:
            keep = np.argpartition(keys, self.k - 1)[: self.k]
            keys, vals = keys[keep], vals[keep]
        self._keys, self._values = keys, vals

    @property
    def values(self) -> np.ndarray:
        return np.sort(self._values)


@dataclass
class Moments:
    """Count, mean and M2 merged batch by batch (Chan et al.), for a mean and std in one pass."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=float)
        x = x[~np.isnan(x)]
        if not len(x):
            return
        nb, mb = len(x), float(x.mean())
        m2b = float(((x - mb) ** 2).sum())
        n = self.n + nb
        delta = mb - self.mean
        self.mean += delta * nb / n
        self.m2 += m2b + delta**2 * self.n * nb / n
        self.n = n

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.n)) if self.n else 0.0
