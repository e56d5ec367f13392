"""Shared by the data-gate unit tests: a five-column spec small enough to read at a glance."""

from __future__ import annotations

from typing import Any

from pipelines.data.spec import DatasetSpec, parse_spec


def tiny_spec(**overrides: Any) -> DatasetSpec:
    """Key ``id``, label ``y`` in {0, 1}; features ``amount`` (0-100) and ``channel``
    (pos/online, unseen values warn); ``memo`` is nullable PII text."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "key": "id",
        "label": "y",
        "min_rows": 2,
        "columns": {
            "id": {"type": "string"},
            "amount": {"type": "float", "min": 0.0, "max": 100.0, "feature": True},
            "channel": {
                "type": "category",
                "values": ["pos", "online"],
                "feature": True,
                "unseen": "warn",
            },
            "memo": {"type": "string", "nullable": True, "pii": True},
            "y": {"type": "int", "values": [0, 1]},
        },
    }
    return parse_spec({**raw, **overrides}, source="tiny")
