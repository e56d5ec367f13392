"""The worker -> launcher result protocol: rank 0 prints one marked line of JSON metrics.

The local launcher finds it in the nodes' output (torchrun may prefix a worker's lines, so the
marker is searched anywhere in a line). On Kubernetes nobody reads stdout: rank 0 logs the same
metrics to the MLflow run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

MARK = "MLOPS_TRAIN_RESULT "


class MalformedResult(ValueError):
    """A line carries the result marker but not a JSON object of numbers after it."""


def format_result(metrics: Mapping[str, float]) -> str:
    """The line rank 0 prints: the marker, then the metrics as one JSON object."""
    return MARK + json.dumps({k: float(v) for k, v in metrics.items()}, sort_keys=True)


def parse_result(line: str) -> dict[str, float] | None:
    """The metrics of a result line, ``None`` for any other line; :class:`MalformedResult` if
    the marker is there but what follows it is not a JSON object of numbers."""
    if MARK not in line:
        return None
    payload = line.split(MARK, 1)[1]
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise MalformedResult(f"Result line is not JSON after {MARK.strip()}: {exc}") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise MalformedResult(f"Result after {MARK.strip()} is a {kind}, not an object.")
    bad = sorted(
        str(k) for k, v in data.items() if isinstance(v, bool) or not isinstance(v, int | float)
    )
    if bad:
        raise MalformedResult(f"Result metrics {bad} are not numbers.")
    return {str(k): float(v) for k, v in data.items()}
