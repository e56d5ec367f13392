"""Monitoring plots as PNG bytes (matplotlib's Agg canvas, no display): feature drift and
latency over the day's monitored hours, and the hour's scores against the reference's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipelines.evaluate.plots import new_figure, to_png


def drift_png(hours: Sequence[str], psi: dict[str, list[float | None]], threshold: float) -> bytes:
    """PSI of each feature (and the scores) per monitored hour, with the drift threshold."""
    fig, ax = new_figure()
    x = np.arange(len(hours))
    for name, values in sorted(psi.items()):
        y = np.array([np.nan if v is None else v for v in values], dtype=float)
        ax.plot(x, y, marker="o", label=name)
    ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"drift {threshold}")
    ax.set_xticks(x, [h[-2:] for h in hours])
    ax.set(xlabel="hour (UTC)", ylabel="PSI vs the champion's reference", title="Drift")
    ax.legend(fontsize=7, ncol=2)
    return to_png(fig)


def latency_png(
    hours: Sequence[str], p50: Sequence[float | None], p99: Sequence[float | None], slo: Any
) -> bytes:
    """The champion's p50 and p99 per monitored hour, with the SLOs."""
    fig, ax = new_figure()
    x = np.arange(len(hours))
    for label, values, limit in (("p50", p50, slo.slo_p50_ms), ("p99", p99, slo.slo_p99_ms)):
        y = np.array([np.nan if v is None else v for v in values], dtype=float)
        (line,) = ax.plot(x, y, marker="o", label=label)
        ax.axhline(limit, color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_xticks(x, [h[-2:] for h in hours])
    ax.set(xlabel="hour (UTC)", ylabel="ms", title="Champion latency (dashed: SLO)")
    ax.legend()
    return to_png(fig)


def scores_png(edges: Sequence[float], reference: Sequence[float], live: Sequence[int]) -> bytes:
    """The hour's score distribution over the reference's quantile bins, beside the
    reference's own (evaluation-time) shares."""
    fig, ax = new_figure()
    ref = np.histogram(np.asarray(reference, float), bins=np.asarray(edges, float))[0]
    x = np.arange(len(live))
    ref_share = ref / max(ref.sum(), 1)
    live_share = np.asarray(live, float) / max(float(np.sum(live)), 1.0)
    ax.bar(x - 0.2, ref_share, width=0.4, label="evaluation")
    ax.bar(x + 0.2, live_share, width=0.4, label="this hour")
    ax.set(xlabel="score bin (reference quantiles)", ylabel="share", title="Scores")
    ax.legend()
    return to_png(fig)
