"""Each model version's operating threshold: the score at which it flags a transaction, chosen
on the version's validation rows by the configured policy (``evaluate.threshold_policy``),
published with the version (its evaluation report and the run's ``mlops.operating_threshold``
tag), and used wherever that version's decisions are counted: evaluation's precision and
recall, behavioural tests, batch scoring's decision column and monitoring's realised
precision.

Policies:

- ``alert_rate``: flag the top ``evaluate.alert_rate`` share of transactions (what an operations
  team sizes its review work on); the threshold is that quantile of the validation scores.
- ``target_precision``: the lowest threshold whose validation precision reaches
  ``evaluate.target_precision`` (the most recall at that precision).
- ``fixed``: ``evaluate.threshold`` as it is.

A policy that flags (almost) nothing on validation, or cannot reach its target, is reported
with a warning: a threshold at which no transaction is ever flagged decides nothing."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipelines.config import EvaluateSettings
from pipelines.evaluate.metrics import decision_rates

log = logging.getLogger(__name__)

TAG = "operating_threshold"  # run tag mlops.operating_threshold
POLICY_TAG = "threshold_policy"
MIN_FLAG_RATE = 0.001  # below this share of flagged rows a threshold "flags nothing"


def operating_threshold(y: np.ndarray, p: np.ndarray, cfg: EvaluateSettings) -> dict[str, Any]:
    """The threshold of scores ``p`` (labels ``y``) by ``cfg``'s policy, with its validation
    flag rate, precision and recall, and a warning where it decides (almost) nothing. Pure."""
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    if len(p) == 0:
        raise ValueError("No validation rows to choose an operating threshold on.")
    warning = None
    if cfg.threshold_policy == "alert_rate":
        # The score of the k-th highest row: exactly k rows flagged, ties aside.
        k = max(round(cfg.alert_rate * len(p)), 1)
        value = float(np.sort(p)[::-1][k - 1])
    elif cfg.threshold_policy == "target_precision":
        value, warning = _target_precision(y, p, cfg.target_precision)
    else:
        value = float(cfg.threshold)
    out: dict[str, Any] = {
        "policy": cfg.threshold_policy,
        "value": value,
        "rows": float(len(p)),
        **decision_rates(y, p, value),
    }
    if warning is None and out["flag_rate"] < MIN_FLAG_RATE:
        warning = (
            f"threshold {value:.4g} flags {out['flag_rate']:.3%} of validation rows: the "
            f"model decides (almost) nothing there (evaluate.threshold_policy "
            f"{cfg.threshold_policy!r})"
        )
    out["warning"] = warning
    if warning:
        log.warning("operating threshold: %s", warning)
    return out


def _target_precision(y: np.ndarray, p: np.ndarray, target: float) -> tuple[float, str | None]:
    order = np.argsort(-p, kind="stable")
    s, hits = p[order], np.cumsum(y[order] == 1)
    # One candidate per distinct score: the last row of each run of ties.
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    precision = hits[last] / (last + 1)
    ok = np.nonzero(precision >= target)[0]
    if len(ok):
        return float(s[last[ok[-1]]]), None
    best = int(np.argmax(precision))
    return float(s[last[best]]), (
        f"no threshold reaches precision {target:g} on validation (best {precision[best]:.3f}, "
        "used instead)"
    )


def recorded(tags: dict[str, str]) -> float | None:
    """The operating threshold an evaluated run's tags record (None for runs evaluated before
    thresholds were recorded)."""
    raw = tags.get(f"mlops.{TAG}")
    try:
        return None if raw is None else float(raw)
    except ValueError:
        return None


def version_threshold(reg: Any, version: str | int, fallback: float) -> float:
    """A registered version's operating threshold (``reg``: a :class:`Registry`); ``fallback``
    (``evaluate.threshold``), with a warning, for a version evaluated before thresholds were
    recorded."""
    value = recorded(reg.get_run(reg.version_run_id(version)).data.tags)
    if value is None:
        log.warning(
            "version %s records no operating threshold (evaluated before they were): "
            "evaluate.threshold %g is used for its decisions",
            version,
            fallback,
        )
        return fallback
    return value
