"""Monitoring plots render from what the reports hold, gaps included."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipelines.config import MonitoringSettings
from pipelines.monitoring.plots import drift_png, latency_png, scores_png


def _size(png: bytes) -> tuple[int, int]:
    assert png.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(png)).size


def test_drift_and_latency_over_hours_with_unjudged_hours() -> None:
    hours = ["2026-11-03T13", "2026-11-03T14", "2026-11-03T15"]
    png = drift_png(hours, {"amount": [0.01, None, 0.3], "score": [None, None, 0.2]}, 0.1)
    assert _size(png) == (550, 450)
    assert _size(latency_png(hours, [2.0, None, 3.0], [9.0, None, 12.0], MonitoringSettings()))


def test_scores_against_the_reference_bins() -> None:
    rng = np.random.default_rng(0)
    ref = np.sort(rng.beta(1, 8, 2000))
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, 11)))
    assert _size(scores_png(edges.tolist(), ref.tolist(), [5] * (len(edges) - 1)))
