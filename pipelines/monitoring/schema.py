"""The serving log's record: one row per scored instance of a routed model call, as the data
plane saw it, shipped to ``serving_logs/<model>/dt=D/hour=HH/`` (pipelines.monitoring.logs).

Fixed columns first, then one column per model feature of the dataset spec (numbers as
float64, categories as strings, PII columns masked as the data gate masks them)."""

from __future__ import annotations

import pyarrow as pa

from pipelines.data.spec import DatasetSpec

FIXED = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),  # Envoy's x-request-id
        pa.field("instance", pa.int32(), nullable=False),  # index within the request
        pa.field("time", pa.timestamp("ms", tz="UTC"), nullable=False),  # request start
        pa.field("key", pa.string()),  # the row's key (x-request-key), null when absent
        pa.field("label", pa.string(), nullable=False),  # stable | canary | baseline
        pa.field("version", pa.int64()),  # model version that answered, null when unknown
        pa.field("status", pa.int32(), nullable=False),  # HTTP status
        pa.field("latency_ms", pa.float64(), nullable=False),  # Envoy's downstream duration
        pa.field("score", pa.float64()),  # the answer, null when there was none (an error)
    ]
)


def feature_fields(spec: DatasetSpec) -> list[pa.Field]:
    return [pa.field(n, pa.float64()) for n in spec.numeric_features] + [
        pa.field(n, pa.string()) for n in spec.categorical_features
    ]


def schema(spec: DatasetSpec) -> pa.Schema:
    """The serving log's schema for a dataset's model."""
    return pa.schema(list(FIXED) + feature_fields(spec))


def missing_columns(spec: DatasetSpec, actual: pa.Schema) -> list[str]:
    """Columns of :func:`schema` that ``actual`` lacks (empty: readable as a serving log)."""
    return [f.name for f in schema(spec) if f.name not in actual.names]
