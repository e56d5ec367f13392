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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data import layout
from pipelines.data.spec import DatasetSpec
from pipelines.data.validate import read_partition
from pipelines.store import ObjectStore, StoreError

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"


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


def split_of(entities: pd.Series, fractions: tuple[float, float, float]) -> np.ndarray:
    """Split name per row from a stable hash of its entity (the same entity, the same split)."""
    uniq = pd.unique(entities.astype(str))
    buckets = np.array(
        [
            int.from_bytes(hashlib.blake2b(e.encode(), digest_size=8).digest(), "little") % 10_000
            for e in uniq
        ]
    )
    edges = np.cumsum(np.asarray(fractions) / sum(fractions)) * 10_000
    names = np.array(SPLITS)[np.searchsorted(edges, buckets, side="right").clip(0, 2)]
    mapping = dict(zip(uniq, names, strict=True))
    return entities.astype(str).map(mapping).to_numpy()


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf, compression="zstd")
    return buf.getvalue()


def feature_stats(df: pd.DataFrame, spec: DatasetSpec) -> dict[str, Any]:
    """Normalisation statistics from the training split (stored with data and model)."""
    out: dict[str, Any] = {}
    for name in spec.numeric_features:
        x = df[name].astype("float64")
        if name in spec.log_features:
            x = np.log1p(x.clip(lower=0))
        std = float(x.std(ddof=0)) if len(x) else 1.0
        out[name] = {"mean": float(x.mean()) if len(x) else 0.0, "std": std if std > 0 else 1.0}
    return out


def shard_dataset(
    store: ObjectStore,
    spec: DatasetSpec,
    date: str,
    target_rows: int,
    nodes: int = 1,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> Manifest:
    """Shard the validated landing partition of ``date`` and publish its manifest."""
    df, error = read_partition(store, layout.landing(spec.name, date))
    if df is None or df.empty:
        raise ManifestError(
            f"Landing partition {store.uri(layout.landing(spec.name, date))} is "
            f"{'unreadable' if df is None else 'empty'}; validate it first. {error or ''}".strip()
        )
    df = df[spec.column_names]
    split = split_of(df[spec.entity], fractions)
    schema = pa.Schema.from_pandas(df, preserve_index=False)
    manifest: dict[str, Any] = {
        "format": 1,
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
        "nodes": nodes,
        "splits": {},
    }
    digest = hashlib.sha256(spec.fingerprint().encode())
    with tempfile.TemporaryDirectory(prefix="shards-") as tmp:
        files: list[tuple[Path, str]] = []
        for name in SPLITS:
            part = df[split == name].sort_values(spec.key, kind="stable").reset_index(drop=True)
            if name == "train":
                manifest["stats"] = feature_stats(part, spec)
            k = max(math.ceil(len(part) / target_rows), nodes if name == "train" else 1, 1)
            bounds = np.linspace(0, len(part), k + 1).astype(int)
            shards = []
            for i in range(k):
                chunk = part.iloc[bounds[i] : bounds[i + 1]]
                data = _parquet_bytes(chunk)
                sha = hashlib.sha256(data).hexdigest()
                rel = f"{name}/part-{i:05d}.parquet"
                local = Path(tmp) / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(data)
                files.append((local, rel))
                digest.update(sha.encode())
                shards.append({"path": rel, "rows": len(chunk), "sha256": sha, "node": i % nodes})
            manifest["splits"][name] = {
                "rows": len(part),
                "positives": int(part[spec.label].sum()),
                "shards": shards,
            }
        version = digest.hexdigest()[:16]
        manifest["data_version"] = version
        prefix = layout.shards(spec.name, version)
        manifest_key = f"{prefix}/{MANIFEST}"
        body = json.dumps(manifest, indent=2, sort_keys=True)
        if store.exists(manifest_key) and store.read_text(manifest_key) == body:
            return Manifest(store.uri(manifest_key), manifest)  # same content already published
        for local, rel in files:
            store.put_file(local, f"{prefix}/{rel}")
        store.write_text(manifest_key, body)  # publish last
    return Manifest(store.uri(manifest_key), manifest)


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
