"""The expected difference between a candidate and the champion, measured offline on the rows
the candidate was evaluated on, each model at its own operating threshold.

A retrained model is meant to differ from the champion. What the serving checks must catch is a
served model that does not behave like the model that was evaluated (an export or preprocessing
skew, a constant or permuted answer, a stale version), however far its scores moved on purpose.
So evaluation publishes how the two models differ on the same rows (paired), and the shadow
stage and the canary test live answers against that:

- ``agreement``: the share of rows both models decide the same way (each at its threshold);
- ``flag_rate``: the share each flags (an operations team sizes its work on it);
- ``rank_correlation``: Spearman's rho of the two scores on the same rows; a constant or
  permuted answer has none;
- ``abs_diff`` and ``diff``: quantiles of the paired score differences (candidate - champion);
- ``p_superiority``: P(candidate's score on one row > champion's score on another row), ties
  counted a half: what the canary's unpaired score test sees when both answer the same traffic
  (1/2 for two copies of one model).

Pure: numbers in, a dictionary out (JSON as it is, for the report and the serving state)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

ABS_QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
DIFF_QUANTILES = {"p01": 0.01, "p05": 0.05, "p50": 0.5, "p95": 0.95, "p99": 0.99}


def p_superiority(a: np.ndarray, b: np.ndarray) -> float:
    """P(A > B) + P(A = B) / 2 for independent draws of ``a`` and ``b`` (the Mann-Whitney U of
    ``a`` over ``len(a) * len(b)``)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not len(a) or not len(b):
        raise ValueError("p_superiority needs scores on both sides")
    ranks = stats.rankdata(np.concatenate([a, b]))  # ties get their mean rank
    u = ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2
    return float(u / (len(a) * len(b)))


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of paired scores; NaN when either side is constant (no ranking at all)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def expected_difference(
    candidate: np.ndarray,
    champion: np.ndarray,
    candidate_threshold: float,
    champion_threshold: float,
    champion_version: str | None = None,
) -> dict[str, Any]:
    """How the candidate's scores differ from the champion's on the same rows (paired)."""
    c, s = np.asarray(candidate, dtype=float), np.asarray(champion, dtype=float)
    if c.shape != s.shape or not len(c):
        raise ValueError(f"paired scores needed: {c.shape} candidate vs {s.shape} champion")
    if not (np.isfinite(c).all() and np.isfinite(s).all()):
        raise ValueError("expected_difference: NaN/Inf scores")
    diff = c - s
    flags_c, flags_s = c >= candidate_threshold, s >= champion_threshold
    return {
        "champion_version": None if champion_version is None else str(champion_version),
        "rows": len(c),
        "thresholds": {
            "candidate": float(candidate_threshold),
            "champion": float(champion_threshold),
        },
        "agreement": float(np.mean(flags_c == flags_s)),
        "flag_rate": {"candidate": float(flags_c.mean()), "champion": float(flags_s.mean())},
        "rank_correlation": rank_correlation(c, s),
        "p_superiority": p_superiority(c, s),
        "abs_diff": {k: float(np.quantile(np.abs(diff), q)) for k, q in ABS_QUANTILES.items()}
        | {"max": float(np.abs(diff).max())},
        "diff": {k: float(np.quantile(diff, q)) for k, q in DIFF_QUANTILES.items()}
        | {"mean": float(diff.mean())},
    }


def _r(v: float | None) -> float | None:
    """Rounded for a tag; None (a NaN in the report) stays None."""
    return None if v is None or not np.isfinite(v) else round(float(v), 6)


def summary_tags(expected: dict[str, Any]) -> dict[str, Any]:
    """The figures an MLflow run or model version carries as tags (``mlops.expected_*``); the
    whole document is in the evaluation report."""
    return {
        "expected_vs_version": expected["champion_version"],
        "expected_agreement": _r(expected["agreement"]),
        "expected_rank_correlation": _r(expected["rank_correlation"]),
        "expected_p_superiority": _r(expected["p_superiority"]),
        "expected_abs_diff_p99": _r(expected["abs_diff"]["p99"]),
        "expected_flag_rate": _r(expected["flag_rate"]["candidate"]),
    }


def describe(expected: dict[str, Any]) -> str:
    """One line for reports and logs."""
    rho = expected["rank_correlation"]
    return (
        f"vs v{expected['champion_version']} on {expected['rows']} rows: agreement "
        f"{expected['agreement']:.2%}, flag rate {expected['flag_rate']['candidate']:.2%} "
        f"(champion {expected['flag_rate']['champion']:.2%}), rank correlation "
        f"{'none' if rho is None or not np.isfinite(rho) else format(rho, '.3f')}, "
        f"P(candidate > champion) {expected['p_superiority']:.3f}, p99 |diff| "
        f"{expected['abs_diff']['p99']:.4f}"
    )
