"""Classification metrics, paired bootstrap CIs of candidate-vs-champion deltas, slice metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

Metric = Callable[[np.ndarray, np.ndarray], float]


def calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over equal-width probability bins."""
    idx = np.minimum((p * bins).astype(int), bins - 1)
    err = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            err += m.mean() * abs(p[m].mean() - y[m].mean())
    return float(err)


METRICS: dict[str, Metric] = {
    "roc_auc": lambda y, p: float(roc_auc_score(y, p)),
    "pr_auc": lambda y, p: float(average_precision_score(y, p)),
    "log_loss": lambda y, p: float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])),
    "calibration_error": calibration_error,
}
HIGHER_IS_BETTER = {"roc_auc": True, "pr_auc": True, "log_loss": False, "calibration_error": False}


def decision_rates(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Share flagged (score >= ``threshold``), precision and recall of those decisions
    (precision 0 when nothing is flagged)."""
    pred = p >= threshold
    tp = float(np.sum(pred & (y == 1)))
    return {
        "flag_rate": float(pred.mean()) if len(pred) else 0.0,
        "precision": tp / max(float(pred.sum()), 1.0),
        "recall": tp / max(float((y == 1).sum()), 1.0),
    }


def classification_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    out = {name: fn(y, p) for name, fn in METRICS.items()} if len(np.unique(y)) > 1 else {}
    rates = decision_rates(y, p, threshold)
    out["precision"], out["recall"] = rates["precision"], rates["recall"]
    out["rows"], out["positives"] = float(len(y)), float(y.sum())
    return out


def paired_bootstrap(
    y: np.ndarray,
    p_new: np.ndarray,
    p_old: np.ndarray,
    samples: int,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """CI of (candidate - champion) for each metric, resampling rows jointly for both."""
    rng = np.random.default_rng(seed)
    n = len(y)
    deltas: dict[str, list[float]] = {k: [] for k in METRICS}
    for _ in range(samples):
        i = rng.integers(0, n, n)
        yi = y[i]
        if yi.min() == yi.max():
            continue
        for name, fn in METRICS.items():
            deltas[name].append(fn(yi, p_new[i]) - fn(yi, p_old[i]))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for name, vals in deltas.items():
        arr = np.asarray(vals)
        out[name] = {
            "delta": float(METRICS[name](y, p_new) - METRICS[name](y, p_old)),
            "ci_low": float(np.percentile(arr, lo)),
            "ci_high": float(np.percentile(arr, hi)),
            "higher_is_better": HIGHER_IS_BETTER[name],
        }
    return out


def slice_metrics(
    df: pd.DataFrame, label: str, p: np.ndarray, slices: list[str], threshold: float
) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics per value of each slice column (AUC only where both classes occur)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    y = df[label].to_numpy()
    for col in slices:
        out[col] = {}
        for value, idx in df.groupby(col, sort=True).indices.items():
            out[col][str(value)] = classification_metrics(y[idx], p[idx], threshold)
    return out


def jsonable(d: Any) -> Any:
    """Plain JSON values: NaN and infinities become None, numpy scalars Python numbers."""
    if isinstance(d, dict):
        return {k: jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [jsonable(v) for v in d]
    if isinstance(d, np.generic):
        d = d.item()
    if isinstance(d, float) and not np.isfinite(d):
        return None
    return d
