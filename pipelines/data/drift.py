"""Feature drift against a reference: PSI over the reference's bins, the two-sample KS test, and
the verdict. Arrays and counts in, numbers out, so a partition and a window of live requests are
judged by the same code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from pipelines.data.results import CheckResult
from pipelines.data.spec import DriftSpec

CHECK = "feature_drift"
PSI_BINS = 10  # quantile bins of a numeric feature in the reference profile


def quantile_edges(values: np.ndarray, bins: int = PSI_BINS) -> np.ndarray:
    """Bin edges at the quantiles of ``values`` (fewer where quantiles coincide)."""
    x = np.asarray(values, dtype=float)
    return np.unique(np.quantile(x, np.linspace(0, 1, bins + 1))) if len(x) else x


def bin_counts(edges: Sequence[float] | np.ndarray, values: np.ndarray) -> np.ndarray:
    """Counts of ``values`` in the ``len(edges) - 1`` bins; the outer bins are open-ended, so
    values beyond the reference's range count in its first or last bin."""
    e = np.asarray(edges, dtype=float)
    if len(e) < 2:
        raise ValueError(f"Bins need at least 2 edges, got {len(e)}.")
    idx = np.searchsorted(e[1:-1], np.asarray(values, dtype=float), side="right")
    return np.bincount(idx, minlength=len(e) - 1)


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index of two share (or count) vectors over the same bins."""
    e = np.clip(np.asarray(expected, float), eps, None)
    a = np.clip(np.asarray(actual, float), eps, None)
    if e.shape != a.shape:
        raise ValueError(f"PSI needs the same bins on both sides, got {e.shape} and {a.shape}.")
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def ks_pvalue(reference: np.ndarray, current: np.ndarray) -> float:
    """p-value of the two-sample Kolmogorov-Smirnov test (small: the samples differ)."""
    return float(stats.ks_2samp(reference, current).pvalue)


def numeric_drift(
    reference: Mapping[str, Any], counts: np.ndarray, sample: np.ndarray
) -> tuple[float, float]:
    """PSI and KS p-value of a numeric feature against its reference profile entry.

    ``reference``: ``{"edges": [...], "sample": [...]}`` as the profile stores it; ``counts``:
    the current values' :func:`bin_counts` over those edges; ``sample``: current values for KS."""
    for field in ("edges", "sample"):
        if field not in reference:
            raise ValueError(f"The reference profile entry has no {field!r}.")
    ref_sample = np.asarray(reference["sample"], dtype=float)
    value = psi(bin_counts(reference["edges"], ref_sample), counts)
    return value, ks_pvalue(ref_sample, np.asarray(sample, dtype=float))


def categorical_drift(reference: Mapping[str, float], counts: Mapping[str, int]) -> float:
    """PSI of a category's current counts against the reference's shares; a value on one side
    only counts as a near-empty bin on the other."""
    total = sum(counts.values())
    if total <= 0:
        raise ValueError("Categorical drift needs at least one current value.")
    keys = sorted(set(reference) | set(counts))
    return psi(
        np.array([reference.get(k, 0.0) for k in keys]),
        np.array([counts.get(k, 0) / total for k in keys]),
    )


def drift_check(
    column: str, value: float, spec: DriftSpec, ks_p: float | None = None
) -> CheckResult:
    """The drift verdict of one feature. Beyond ``psi_block`` it blocks (or warns, when the spec
    says drift never blocks) only if KS agrees the samples differ (``ks_p`` below ``ks_alpha``;
    without a KS test, categories, PSI alone decides); beyond ``psi_warn`` it warns."""
    severity = "block" if spec.block else "warn"
    significant = ks_p is None or ks_p < spec.ks_alpha
    if value >= spec.psi_block and significant:
        detail = f"PSI {value:.3f} >= {spec.psi_block} against the reference batch"
        return CheckResult(CHECK, column, severity, False, detail)
    if value >= spec.psi_warn:
        detail = f"PSI {value:.3f} >= {spec.psi_warn} (moderate drift)"
        return CheckResult(CHECK, column, "warn", False, detail)
    return CheckResult(CHECK, column, severity, True)
