"""Deterministic sharding: entity-hash splits, K parquet shards per split, manifest published last.

``shards/<dataset>/<data_version>/{train,val,test}/part-NNNNN.parquet`` plus ``manifest.json``.
The data version is a content hash, so re-running an interval yields the same bytes and version;
readers only trust a data set whose manifest exists.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc
import pyarrow.parquet as pq

from pipelines.data import layout
from pipelines.data.batches import (
    DEFAULT_BATCH_ROWS,
    Moments,
    PartitionUnreadable,
    cpu_workers,
    iter_partition,
    partition_rows,
    prefetch,
    stable_hash,
)
from pipelines.data.spec import DatasetSpec
from pipelines.store import ObjectStore, StoreError

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
Fractions = tuple[float, float, float]


class ManifestError(ValueError):
    """A manifest is missing, unreadable or does not match its shards."""


@dataclass(frozen=True)
class Manifest:
    """A published data set: the parsed ``manifest.json`` plus where it lives."""

    uri: str
    data: dict[str, Any]

    @property
    def data_version(self) -> str:
        return str(self.data["data_version"])

    @property
    def base_uri(self) -> str:
        return self.uri.rsplit("/", 1)[0]

    def shards(self, split: str) -> list[dict[str, Any]]:
        return list(self.data["splits"][split]["shards"])

    def rows(self, split: str) -> int:
        return int(self.data["splits"][split]["rows"])


def split_of(entities: pd.Series | pa.Array | pa.ChunkedArray, fractions: Fractions) -> np.ndarray:
    """Split index per row (0 train, 1 val, 2 test) from a stable hash of its entity."""
    buckets = stable_hash(entities) % np.uint64(10_000)
    edges = np.cumsum(np.asarray(fractions) / sum(fractions)) * 10_000
    return np.searchsorted(edges, buckets.astype(np.float64), side="right").clip(0, 2)


class _FeatureStats:
    """Normalisation statistics of the training split, accumulated batch by batch."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        self.moments = {n: Moments() for n in spec.numeric_features}

    def add(self, frame: pd.DataFrame | pa.Table) -> None:
        for name, m in self.moments.items():
            x = np.asarray(frame[name], dtype="float64")
            m.add(np.log1p(np.clip(x, 0, None)) if name in self.spec.log_features else x)

    def result(self) -> dict[str, Any]:
        return {
            n: {"mean": m.mean, "std": m.std if m.std > 0 else 1.0} for n, m in self.moments.items()
        }


def feature_stats(df: pd.DataFrame, spec: DatasetSpec) -> dict[str, Any]:
    """Normalisation statistics from the training split (stored with data and model)."""
    acc = _FeatureStats(spec)
    acc.add(df)
    return acc.result()


def _shard_counts(total_rows: int, fractions: Fractions, target_rows: int) -> list[int]:
    """Shards per split from the footer row count: known before any row is read, and the same
    for the same input. A shard holds about ``target_rows``, never fewer shards than one; the
    node count plays no part (nodes share a split's shards at training time, however few)."""
    shares = np.asarray(fractions) / sum(fractions)
    return [max(math.ceil(total_rows * float(share) / target_rows), 1) for share in shares]


class _Spill:
    """Pass 1: each input batch, grouped by output shard, written as one Arrow IPC file with a
    record batch per shard present. Pass 2 reads a shard's pieces back: at most a shard of rows
    is in memory at any time."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.files: list[tuple[Path, dict[int, int]]] = []

    def add(self, table: pa.Table, group: np.ndarray) -> None:
        if not table.num_rows:
            return
        order = np.argsort(group, kind="stable")
        table, group = table.take(pa.array(order)), group[order]
        starts: list[int] = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]).tolist()
        path = self.tmp / f"spill-{len(self.files):05d}.arrow"
        index: dict[int, int] = {}
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            bounds = [*starts, len(group)]
            for i, start in enumerate(bounds[:-1]):
                index[int(group[start])] = i
                writer.write_table(table.slice(start, bounds[i + 1] - start))
        self.files.append((path, index))

    def read(self, g: int, schema: pa.Schema) -> pa.Table:
        pieces = []
        for path, index in self.files:
            if g in index:
                with pa.OSFile(str(path), "rb") as src:
                    pieces.append(pa.ipc.open_file(src).get_batch(index[g]))
        return pa.Table.from_batches(pieces, schema=schema)


def shard_dataset(
    store: ObjectStore,
    spec: DatasetSpec,
    date: str,
    target_rows: int,
    fractions: Fractions = (0.7, 0.15, 0.15),
    batch_rows: int = DEFAULT_BATCH_ROWS,
    workers: int | None = None,
) -> Manifest:
    """Shard the validated landing partition of ``date`` and publish its manifest.

    Rows go to a split by their entity's hash and to a shard of that split by their key's hash,
    then each shard is sorted by key: the bytes depend on the rows only, not on file or row
    order. Two passes over ``batch_rows``-row batches keep memory bounded by a batch or by
    ``workers`` shards (default: one per CPU)."""
    threads = cpu_workers() if workers is None else max(workers, 1)
    prefix = layout.landing(spec.name, date)
    try:
        total = partition_rows(store, prefix) if store.exists(prefix) else 0
    except PartitionUnreadable as exc:
        raise ManifestError(f"{exc}; validate it first.") from exc
    if total == 0:
        raise ManifestError(
            f"Landing partition {store.uri(prefix)} is missing or empty; validate it first."
        )
    counts = _shard_counts(total, fractions, target_rows)
    first_group = np.cumsum([0, *counts])
    stats = _FeatureStats(spec)
    rows, positives = [0, 0, 0], [0, 0, 0]
    schema = canonical_schema(spec)
    digest = hashlib.sha256(spec.fingerprint().encode())
    with tempfile.TemporaryDirectory(prefix="shards-") as tmp:
        spill = _Spill(Path(tmp))
        for table in prefetch(iter_partition(store, prefix, batch_rows)):
            table = table.select(spec.column_names)
            split = split_of(table.column(spec.entity), fractions)
            shard = stable_hash(table.column(spec.key)) % np.asarray(counts, np.uint64)[split]
            spill.add(table.cast(schema, safe=False), first_group[split] + shard.astype(np.int64))
            label = table.column(spec.label).to_numpy(zero_copy_only=False)
            for i in range(3):
                rows[i] += int((split == i).sum())
                positives[i] += int(label[split == i].sum())
            stats.add(table.select(spec.numeric_features).filter(pa.array(split == 0)))
        manifest = _manifest_head(spec, date, schema)
        manifest["stats"] = stats.result()
        jobs = [
            (name, k, int(first_group[i]) + k)
            for i, name in enumerate(SPLITS)
            for k in range(counts[i])
        ]

        def write(job: tuple[str, int, int]) -> tuple[Path, str, int, str]:
            name, k, group = job
            rel = f"{name}/part-{k:05d}.parquet"
            rows_, sha = _write_shard(spill.read(group, schema), spec.key, Path(tmp) / rel)
            return Path(tmp) / rel, rel, rows_, sha

        # Sorting, encoding and hashing release the GIL: shards are written on `threads`
        # threads (each holds one shard), and their digests are folded in a fixed order.
        with ThreadPoolExecutor(threads) as pool:
            written = list(pool.map(write, jobs))
        files: list[tuple[Path, str]] = []
        by_split: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
        for (name, _, _), (local, rel, n, sha) in zip(jobs, written, strict=True):
            files.append((local, rel))
            digest.update(sha.encode())
            # No node assignment here: it would make the manifest depend on the node count
            # while the data version (the shards' bytes) does not; ranks take row ranges of
            # the train split at training time (train.partition.rank_rows).
            by_split[name].append({"path": rel, "rows": n, "sha256": sha})
        for i, name in enumerate(SPLITS):
            manifest["splits"][name] = {
                "rows": rows[i],
                "positives": positives[i],
                "shards": by_split[name],
            }
        version = digest.hexdigest()[:16]
        manifest["data_version"] = version
        out = layout.shards(spec.name, version)
        manifest_key = f"{out}/{MANIFEST}"
        body = json.dumps(manifest, indent=2, sort_keys=True)
        if store.exists(manifest_key) and store.read_text(manifest_key) == body:
            return Manifest(store.uri(manifest_key), manifest)  # same content already published
        for local, rel in files:
            store.put_file(local, f"{out}/{rel}")
        store.write_text(manifest_key, body)  # publish last
    return Manifest(store.uri(manifest_key), manifest)


_ARROW_TYPES = {
    "string": pa.string(),
    "category": pa.string(),
    "float": pa.float64(),
    "int": pa.int64(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}


def canonical_schema(spec: DatasetSpec) -> pa.Schema:
    """The shards' schema, from the spec alone: how a writer typed the landing files (string or
    large_string, ns or us, pandas metadata) must not change the shards' bytes."""
    return pa.schema([pa.field(c.name, _ARROW_TYPES[c.type]) for c in spec.columns])


def _manifest_head(spec: DatasetSpec, date: str, schema: pa.Schema) -> dict[str, Any]:
    return {
        "format": 3,
        "dataset": spec.name,
        "date": date[:10],
        "spec_fingerprint": spec.fingerprint(),
        "key": spec.key,
        "entity": spec.entity,
        "label": spec.label,
        "slices": list(spec.slices),
        "features": {
            "numeric": spec.numeric_features,
            "categorical": {c: spec.vocab(c) for c in spec.categorical_features},
            "log1p": spec.log_features,
        },
        "schema": [{"name": f.name, "type": str(f.type)} for f in schema],
        "splits": {},
    }


def _write_shard(part: pa.Table, key: str, path: Path) -> tuple[int, str]:
    """Sort a shard's rows by key and write them as zstd parquet; (rows, sha256 of the file)."""
    part = part.take(pc.sort_indices(part, [(key, "ascending")]))
    data = _parquet_bytes(part.combine_chunks())  # chunking must not shape the bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return part.num_rows, hashlib.sha256(data).hexdigest()


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def load_manifest(store: ObjectStore, uri: str) -> Manifest:
    try:
        data = json.loads(store.read_text(store.key_of(uri)))
    except (StoreError, json.JSONDecodeError) as exc:
        raise ManifestError(f"Cannot read manifest {uri}: {exc}") from exc
    return Manifest(uri, data)


def read_shards(
    store: ObjectStore, manifest: Manifest, shards: list[dict[str, Any]], verify: bool = True
) -> pd.DataFrame:
    """Read shards of a manifest, checking each one's sha256 (a torn or altered shard fails)."""
    base = store.key_of(manifest.base_uri)
    frames = []
    for shard in shards:
        data = store.read_bytes(f"{base}/{shard['path']}")
        if verify and hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise ManifestError(f"Shard {shard['path']} of {manifest.uri} fails its sha256 check.")
        frames.append(pq.read_table(io.BytesIO(data)).to_pandas())
    if not frames:
        return pd.DataFrame(columns=[c["name"] for c in manifest.data["schema"]])
    return pd.concat(frames, ignore_index=True)


def read_split(store: ObjectStore, manifest: Manifest, split: str) -> pd.DataFrame:
    return read_shards(store, manifest, manifest.shards(split))
