"""Realised performance: the served scores of a trailing window joined by key with the late
labels (outcomes) that have landed, judged against the champion's evaluation-time metrics.

Pure reads and computation; nothing is written here."""

from __future__ import annotations

import datetime as dt
import json
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import MonitoringSettings
from pipelines.data import layout
from pipelines.data.spec import DatasetSpec
from pipelines.evaluate.metrics import classification_metrics
from pipelines.monitoring.logs import MANIFEST
from pipelines.monitoring.metrics import ServingLogError
from pipelines.monitoring.schema import FIXED
from pipelines.store import ObjectStore

SERVED_COLUMNS = ("key", "version", "score", "status", "label", "time")
"""What realised performance needs of the serving log (``label`` is the route, not a label)."""
OUTCOMES_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("outcome", pa.int8(), nullable=False),
        pa.field("source", pa.dictionary(pa.int32(), pa.string()), nullable=False),
    ]
)
"""What :func:`read_outcomes` returns: the spec's key and label columns renamed (the serving log
already has a ``label`` column: the route), and the URI of the file each label came from."""
UNKNOWN_VERSION = "unknown"


class OutcomeError(ValueError):
    """An outcomes file is unusable; the message names the file URI and the column."""


# -- outcomes -------------------------------------------------------------------------------
def outcome_files(store: ObjectStore, dataset: str, date: str | dt.date) -> list[str]:
    """Keys of the outcome files landed on one day, sorted (``_``/``.`` files excluded)."""
    return [
        k
        for k in store.list(layout.outcomes(dataset, date))
        if k.endswith(".parquet") and not posixpath.basename(k).startswith(("_", "."))
    ]


def _labels(column: pa.ChunkedArray, uri: str, name: str) -> np.ndarray:
    """The label column as int8 0/1; anything else (nulls, 2, 0.5, "yes") names an example."""
    if column.null_count:
        row = int(pc.index(pc.is_null(column), True).as_py())
        raise OutcomeError(
            f"{uri}: label column {name!r} has {column.null_count} null(s), e.g. row {row}."
        )
    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise OutcomeError(f"{uri}: label column {name!r} has type {kind}; expected integers 0/1.")
    values = column.to_numpy()
    bad = ~np.isin(values, (0, 1))
    if bad.any():
        raise OutcomeError(
            f"{uri}: label column {name!r} holds {int(bad.sum())} value(s) outside {{0, 1}}, "
            f"e.g. {values[bad][0].item()!r}."
        )
    return values.astype(np.int8)


def _read_outcome_file(
    store: ObjectStore, key: str, spec: DatasetSpec
) -> tuple[pa.Array, np.ndarray]:
    uri = store.uri(key)
    with store.open(key) as fh:
        pf = pq.ParquetFile(fh)
        found = pf.schema_arrow.names
        for name in (spec.key, spec.label):
            if name not in found:
                raise OutcomeError(
                    f"{uri}: column {name!r} is missing (outcomes need the key column "
                    f"{spec.key!r} and the label column {spec.label!r}; found {found})."
                )
        table = pf.read(columns=[spec.key, spec.label])
    keys = table[spec.key]
    if keys.null_count:
        raise OutcomeError(f"{uri}: key column {spec.key!r} has {keys.null_count} null(s).")
    try:
        keys = keys.cast(pa.string())
    except pa.ArrowInvalid as exc:
        raise OutcomeError(
            f"{uri}: key column {spec.key!r} of type {keys.type} is not a key."
        ) from exc
    return keys.combine_chunks(), _labels(table[spec.label], uri, spec.label)


def _duplicate_error(
    keys: pa.Array, sources: pa.DictionaryArray, spec: DatasetSpec
) -> OutcomeError:
    counts = pc.value_counts(keys)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    example = repeated[0].as_py()
    where = pc.filter(sources, pc.equal(keys, example)).dictionary_decode().to_pylist()
    files = sorted(set(where))
    place = f"{len(where)} times in {files[0]}" if len(files) == 1 else f"in {', '.join(files)}"
    return OutcomeError(
        f"Outcomes label {len(repeated):,} value(s) of key column {spec.key!r} more than once, "
        f"e.g. {example!r} {place}."
    )


def read_outcomes(
    store: ObjectStore, spec: DatasetSpec, dates: Iterable[str | dt.date]
) -> pa.Table:
    """The outcomes landed on ``dates`` as one table (:data:`OUTCOMES_SCHEMA`), each file checked:
    both columns present, labels 0/1 without nulls, and every key labelled once across all the
    files and days read (a second label for a key is a corrected or replayed feed; which one is
    right cannot be told here). Days with nothing landed contribute nothing."""
    keys: list[pa.Array] = []
    labels: list[np.ndarray] = []
    uris: list[str] = []
    for date in dates:
        for key in outcome_files(store, spec.name, date):
            file_keys, file_labels = _read_outcome_file(store, key, spec)
            keys.append(file_keys)
            labels.append(file_labels)
            uris.append(store.uri(key))
    if not keys:
        return OUTCOMES_SCHEMA.empty_table()
    all_keys = pa.concat_arrays(keys)
    lengths = np.array([len(k) for k in keys])
    sources = pa.DictionaryArray.from_arrays(
        pa.array(np.repeat(np.arange(len(uris), dtype=np.int32), lengths)), pa.array(uris)
    )
    if len(pc.unique(all_keys)) != len(all_keys):
        raise _duplicate_error(all_keys, sources, spec)
    return pa.Table.from_arrays(
        [all_keys, pa.array(np.concatenate(labels)), sources], schema=OUTCOMES_SCHEMA
    )


# -- served scores ------------------------------------------------------------------------
def published_hours(store: ObjectStore, model_name: str, date: str | dt.date) -> list[str]:
    """Prefixes of the day's serving-log hours whose ``_manifest.json`` exists (published)."""
    day = layout.serving_logs(model_name, date)
    return [
        posixpath.dirname(k)
        for k in store.list(day, recursive=True)
        if posixpath.basename(k) == MANIFEST
        and posixpath.basename(posixpath.dirname(k)).startswith("hour=")
    ]


def _manifest_parts(store: ObjectStore, hour: str) -> tuple[list[str], int]:
    uri = store.uri(f"{hour}/{MANIFEST}")
    try:
        manifest = json.loads(store.read_text(f"{hour}/{MANIFEST}"))
        parts, rows = manifest["parts"], manifest["rows"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ServingLogError(f"{uri}: not a manifest with 'parts' and 'rows' ({exc!r}).") from exc
    if not isinstance(parts, list) or not all(isinstance(p, str) and p for p in parts):
        raise ServingLogError(f"{uri}: 'parts' must list the part file names.")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise ServingLogError(f"{uri}: 'rows' must be a row count, got {rows!r}.")
    return [f"{hour}/{p}" for p in parts], rows


def served_scores(
    store: ObjectStore,
    model_name: str,
    days: Iterable[str | dt.date],
    columns: Sequence[str] = SERVED_COLUMNS,
    keys: pa.Array | pa.ChunkedArray | None = None,
) -> pa.Table:
    """The serving-log rows of ``days`` (only ``columns``), from published hours only: an hour
    counts once its ``_manifest.json`` exists, and only the parts it lists are read (a part
    still being shipped, or left over from a failed shipment, is not). A listed part that is
    missing, lacks a column, or a row count that disagrees with the manifest raises. With
    ``keys``, only rows whose key is among them are kept (one part in memory at a time)."""
    tables: list[pa.Table] = []
    for date in days:
        for hour in published_hours(store, model_name, date):
            parts, rows = _manifest_parts(store, hour)
            read = 0
            for key in parts:
                uri = store.uri(key)
                if not store.exists(key):
                    raise ServingLogError(f"{uri} is listed in {hour}/{MANIFEST} but missing.")
                with store.open(key) as fh:
                    pf = pq.ParquetFile(fh)
                    missing = [c for c in columns if c not in pf.schema_arrow.names]
                    if missing:
                        raise ServingLogError(f"{uri}: column(s) {missing} missing.")
                    table = pf.read(columns=list(columns))
                read += table.num_rows
                if keys is not None:  # only the rows these keys are for are kept
                    table = table.filter(
                        pc.fill_null(pc.is_in(table["key"], value_set=keys), False)
                    )
                tables.append(table)
            if read != rows:
                raise ServingLogError(
                    f"{store.uri(hour)}: the parts hold {read} rows, the manifest says {rows}."
                )
    if not tables:
        fields = [FIXED.field(c) if c in FIXED.names else pa.field(c, pa.null()) for c in columns]
        return pa.schema(fields).empty_table()
    return pa.concat_tables(tables, promote_options="permissive")


def _answered(logged: pa.Table) -> pa.ChunkedArray:
    """Mask of the rows that are answers: status 200, a key and a score."""
    missing = [
        c for c in ("key", "version", "score", "status", "time") if c not in logged.column_names
    ]
    if missing:
        raise ServingLogError(f"Served rows lack column(s) {missing}.")
    ok = pc.and_(pc.equal(logged["status"], 200), pc.is_valid(logged["key"]))
    return pc.fill_null(pc.and_(ok, pc.is_valid(logged["score"])), False)


def first_answers(logged: pa.Table) -> pa.Table:
    """Status-200 rows with a key and a score, one per key: the earliest by ``time`` (ties keep
    log order). A client that re-sends a request gets a second answer; the first is the one it
    acted on, so the first is the one the outcome judges."""
    rows = logged.filter(_answered(logged))
    if rows.num_rows == 0:
        return rows
    # Arrow's sort is stable, so equal times keep log order; hashing the keys to codes and
    # taking each code's first index (numpy's return_index is stable) avoids a string sort.
    rows = rows.take(pc.sort_indices(rows["time"]))
    codes = pc.dictionary_encode(rows["key"].combine_chunks()).indices.to_numpy()
    _, first = np.unique(codes, return_index=True)
    return rows.take(pa.array(np.sort(first)))


# -- judgement ------------------------------------------------------------------------------
def _judge(
    metric: str,
    realised: float | None,
    expected: float | None,
    max_drop: float,
    n: int,
) -> dict[str, Any] | None:
    if expected is None or realised is None:
        return None
    title = {"roc_auc": "ROC-AUC", "precision": "precision"}[metric]
    decayed = realised < expected - max_drop
    op = "<" if decayed else ">="
    return {
        "metric": metric,
        "realised": realised,
        "expected": expected,
        "max_drop": max_drop,
        "decayed": decayed,
        "detail": f"realised {title} {realised:.3f} over {n:,} matured labels {op} evaluation "
        f"{expected:.3f} - {max_drop:.3f}",
    }


def _group(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    expected: Mapping[str, float | None],
    cfg: MonitoringSettings,
) -> dict[str, Any]:
    n, positives = len(y), int(y.sum())
    m = classification_metrics(y, p, threshold) if n else {"precision": 0.0, "recall": 0.0}
    auc = m.get("roc_auc")
    out: dict[str, Any] = {
        "n": n,
        "positives": positives,
        "roc_auc": None if auc is None else float(auc),
        "precision": float(m["precision"]) if n else None,
        "recall": float(m["recall"]) if n else None,
        "status": "insufficient",
        "decayed": False,
        "judgements": [],
    }
    if n < cfg.min_labels:
        out["detail"] = f"{n:,} matured labels < min_labels {cfg.min_labels:,}: not judged"
        return out
    if auc is None:
        out["detail"] = (
            f"a single class ({n:,} matured labels, {positives:,} positives): not judged"
        )
        return out
    # Precision counts as 0 when nothing is flagged, as at evaluation: a model that stopped
    # flagging has decayed.
    judgements = [
        j
        for j in (
            _judge("roc_auc", out["roc_auc"], expected.get("roc_auc"), cfg.max_auc_drop, n),
            _judge(
                "precision", out["precision"], expected.get("precision"), cfg.max_precision_drop, n
            ),
        )
        if j is not None
    ]
    out["judgements"] = judgements
    out["decayed"] = any(j["decayed"] for j in judgements)
    out["status"] = "decayed" if out["decayed"] else "ok"
    decayed = [j["detail"] for j in judgements if j["decayed"]]
    out["detail"] = (
        "; ".join(decayed)
        if decayed
        else "; ".join(j["detail"] for j in judgements) or "no evaluation metrics to judge against"
    )
    return out


def realised_performance(
    logged: pa.Table,
    outcomes: pa.Table,
    threshold: float,
    spec: DatasetSpec,
    expected: Mapping[str, float | None],
    cfg: MonitoringSettings,
    allow_unknown_keys: bool = False,
) -> dict[str, Any]:
    """Join the window's served scores (:func:`served_scores`) with the outcomes
    (:func:`read_outcomes`) by key and judge them, overall and per model version.

    Only status-200 rows with a key and a score count, and a key answered more than once (a
    client re-sent it) keeps its first answer by time (:func:`first_answers`). Served keys
    without an outcome are not matured yet and are left out. An outcome for a key never served
    in the window is refused (:class:`OutcomeError` naming its file) unless
    ``allow_unknown_keys``: the feed is keyed by the requests it answers, so an unknown key is a
    broken feed, or a window that does not reach back to the requests the outcomes label.

    A group is ``insufficient`` (never decayed) below ``cfg.min_labels`` or with one class
    only; otherwise it is ``decayed`` when ROC-AUC or precision at ``threshold`` fall more than
    ``cfg.max_auc_drop`` / ``cfg.max_precision_drop`` below ``expected`` (the champion's
    evaluation-time ``{"roc_auc": ..., "precision": ...}``; a missing metric is not judged)."""
    answers = int(pc.sum(pc.cast(_answered(logged), pa.int64())).as_py() or 0)
    served = first_answers(logged)
    served_keys = served["key"].combine_chunks()
    outcome_keys = outcomes["key"].combine_chunks()
    known = pc.is_in(outcome_keys, value_set=served_keys).to_numpy(zero_copy_only=False)
    unknown = int((~known).sum())
    if unknown and not allow_unknown_keys:
        i = int(np.flatnonzero(~known)[0])
        raise OutcomeError(
            f"{outcomes['source'][i].as_py()}: labels for unknown keys: {unknown:,} value(s) of "
            f"key column {spec.key!r} were never answered in the served window, e.g. "
            f"{outcome_keys[i].as_py()!r}."
        )
    idx = pc.index_in(served_keys, value_set=outcome_keys)
    labelled = pc.is_valid(idx).to_numpy(zero_copy_only=False)
    y = outcomes["outcome"].to_numpy()[pc.drop_null(idx).to_numpy()]
    p = served["score"].to_numpy()[labelled]
    versions = pc.fill_null(served["version"], -1).to_numpy()[labelled]

    overall = _group(y, p, threshold, expected, cfg)
    by_version = {
        (UNKNOWN_VERSION if v < 0 else str(int(v))): _group(
            y[versions == v], p[versions == v], threshold, expected, cfg
        )
        for v in np.unique(versions)
    }
    groups = {"overall": overall, **{f"version {v}": g for v, g in by_version.items()}}
    reasons = [
        f"{name}: {j['detail']}"
        for name, g in groups.items()
        for j in g["judgements"]
        if j["decayed"]
    ]
    return {
        "threshold": threshold,
        "answers": answers,
        "served_keys": served.num_rows,
        "resent": answers - served.num_rows,
        "outcomes": outcomes.num_rows,
        "unknown_keys": unknown,
        "labelled": int(labelled.sum()),
        "decayed": bool(reasons),
        "reasons": reasons,
        "overall": overall,
        "versions": by_version,
    }
