"""Evaluation plots as PNG bytes: ROC, precision-recall, reliability and the training loss.

Rendered with matplotlib's Agg backend (no display), candidate and champion on one figure.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np


def new_figure() -> tuple[Any, Any]:
    """A figure and its axes on an Agg canvas (the evaluation and monitoring plots)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on an Agg canvas, not pyplot: no global backend switch, nothing to close.
    fig = Figure(figsize=(5.5, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def to_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


Curves = dict[str, np.ndarray]


def roc_png(y: np.ndarray, scores: Curves) -> bytes:
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = new_figure()
    for label, p in scores.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(y, p):.4f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curve")
    ax.legend(loc="lower right")
    return to_png(fig)


def pr_png(y: np.ndarray, scores: Curves) -> bytes:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig, ax = new_figure()
    for label, p in scores.items():
        precision, recall, _ = precision_recall_curve(y, p)
        ax.plot(recall, precision, label=f"{label} (AP {average_precision_score(y, p):.4f})")
    ax.axhline(float(np.mean(y)), linestyle=":", color="grey", label="prevalence")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall curve")
    ax.legend(loc="upper right")
    return to_png(fig)


def reliability_png(y: np.ndarray, scores: Curves, bins: int = 10) -> bytes:
    """Mean predicted vs observed positive rate per equal-width bin (empty bins skipped)."""
    fig, ax = new_figure()
    edges = np.linspace(0, 1, bins + 1)
    for label, p in scores.items():
        idx = np.minimum((p * bins).astype(int), bins - 1)
        pts = [(p[idx == b].mean(), y[idx == b].mean()) for b in range(bins) if (idx == b).any()]
        xs, ys = zip(*pts, strict=True) if pts else ((), ())
        ax.plot(xs, ys, marker="o", label=label)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfectly calibrated")
    ax.set(
        xlabel="mean predicted probability",
        ylabel="observed positive rate",
        title=f"Reliability ({bins} bins of width {edges[1]:.1f})",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left")
    return to_png(fig)


def loss_png(history: Sequence[tuple[int, float]], title: str = "Training loss") -> bytes:
    fig, ax = new_figure()
    steps, values = zip(*history, strict=True) if history else ((), ())
    ax.plot(steps, values)
    ax.set(xlabel="step", ylabel="loss (BCE)", title=title)
    return to_png(fig)


def evaluation_plots(
    y: np.ndarray, scores: Curves, loss_history: Sequence[tuple[int, float]]
) -> dict[str, bytes]:
    """File name -> PNG. Curves need both classes; the loss plot needs a logged history."""
    out: dict[str, bytes] = {}
    if len(np.unique(y)) > 1:
        out["roc.png"] = roc_png(y, scores)
        out["pr.png"] = pr_png(y, scores)
    out["calibration.png"] = reliability_png(y, scores)
    if loss_history:
        out["loss.png"] = loss_png(loss_history)
    return out
