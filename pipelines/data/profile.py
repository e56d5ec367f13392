"""Streaming statistics of a partition, one record batch at a time: the label correlation behind
the leakage check, drift against the reference profile, and this partition's own profile."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.data.batches import BottomK
from pipelines.data.drift import (
    bin_counts,
    categorical_drift,
    drift_check,
    numeric_drift,
    quantile_edges,
)
from pipelines.data.results import CheckResult
from pipelines.data.spec import DatasetSpec

SAMPLE = 20_000  # values per numeric feature kept for KS and the reference's quantile edges
PROFILE_SAMPLE = 2_000  # values per numeric feature the reference profile stores
LEAKAGE_CORRELATION = 0.95  # |Pearson r| with the label from which a feature is leakage


@dataclass
class LabelCorrelation:
    """Running sums for the Pearson correlation of a feature with the label (shifted by the
    first batch's means for numerical stability)."""

    shift_x: float | None = None
    shift_y: float = 0.0
    sums: np.ndarray = field(default_factory=lambda: np.zeros(6))  # n, x, y, xx, yy, xy
    lo: float = np.inf
    hi: float = -np.inf

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        ok = ~(np.isnan(x) | np.isnan(y))
        x, y = x[ok], y[ok]
        if not len(x):
            return
        if self.shift_x is None:
            self.shift_x, self.shift_y = float(x.mean()), float(y.mean())
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        x, y = x - self.shift_x, y - self.shift_y
        self.sums += [len(x), x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()]

    def value(self) -> float | None:
        """The correlation, or None where it is undefined (under 2 rows, a constant side)."""
        n, sx, sy, sxx, syy, sxy = self.sums
        if n < 2 or self.lo == self.hi:
            return None
        vx, vy = sxx / n - (sx / n) ** 2, syy / n - (sy / n) ** 2
        if vx <= 0 or vy <= 0:
            return None
        return float((sxy / n - sx * sy / n**2) / np.sqrt(vx * vy))


class PartitionStats:
    """Leakage, drift against the reference, and the partition's own profile, in one pass.

    Exact: row counts, PSI bin counts, category shares, label correlation. Sampled (a seeded
    bottom-k of 20,000 values per feature): the KS test and the quantile edges of the profile.
    A column missing from a batch is skipped: that is the schema check's finding."""

    def __init__(self, spec: DatasetSpec, ref: dict[str, Any] | None):
        self.spec, self.ref = spec, ref
        self.rows = 0
        self.labels: set[Any] = set()
        self.corr = {n: LabelCorrelation() for n in spec.numeric_features}
        self.sample = {n: BottomK(SAMPLE, seed=i) for i, n in enumerate(spec.numeric_features)}
        self.bins: dict[str, np.ndarray] = {}
        self.counts: dict[str, dict[str, int]] = {n: {} for n in spec.categorical_features}

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        spec, ref_num = self.spec, (self.ref or {}).get("numeric", {})
        names = set(table.column_names)
        y = floats(table.column(spec.label)) if spec.label in names else None
        if y is not None:
            self.labels |= set(np.unique(y[~np.isnan(y)]).tolist())
        for name in spec.numeric_features:
            if name not in names:
                continue
            x = floats(table.column(name))
            if y is not None:
                self.corr[name].add(x, y)
            x = x[~np.isnan(x)]
            self.sample[name].add(x)
            edges = (ref_num.get(name) or {}).get("edges") or []
            if len(edges) > 1:
                self.bins[name] = self.bins.get(name, 0) + bin_counts(edges, x)
        for name, acc in self.counts.items():
            if name in names:
                for k, v in value_counts(table.column(name)).items():
                    acc[k] = acc.get(k, 0) + v

    def leakage_checks(self) -> list[CheckResult]:
        """A feature almost perfectly correlated with the label is leakage, not signal."""
        out: list[CheckResult] = []
        if len(self.labels) < 2:
            return out
        for name, acc in self.corr.items():
            corr = acc.value()
            if corr is None:
                continue
            ok = not abs(corr) >= LEAKAGE_CORRELATION
            detail = "" if ok else f"correlation with {self.spec.label} is {corr:.3f}"
            out.append(CheckResult("label_leakage", name, "block", ok, detail))
        return out

    def drift_checks(self) -> tuple[list[CheckResult], dict[str, dict[str, float]]]:
        """PSI (and KS for numbers) of each feature against the reference profile."""
        checks: list[CheckResult] = []
        report: dict[str, dict[str, float]] = {}
        if self.ref is None or not self.rows:
            return checks, report
        for name, r in self.ref.get("numeric", {}).items():
            if name not in self.bins or not len(self.sample[name].values):
                continue
            value, ks_p = numeric_drift(r, self.bins[name], self.sample[name].values)
            report[name] = {"psi": round(value, 4), "ks_pvalue": ks_p}
            checks.append(drift_check(name, value, self.spec.drift, ks_p))
        for name, shares in self.ref.get("categorical", {}).items():
            cur = self.counts.get(name)
            if not cur:
                continue
            value = categorical_drift(shares, cur)
            report[name] = {"psi": round(value, 4)}
            checks.append(drift_check(name, value, self.spec.drift))
        return checks, report

    def profile(self) -> dict[str, Any]:
        """Reference profile of an accepted batch: quantile bins, category shares, a sample."""
        prof: dict[str, Any] = {"rows": self.rows, "numeric": {}, "categorical": {}}
        for name, sample in self.sample.items():
            x = sample.values
            edges = quantile_edges(x)
            pick = np.linspace(0, len(x) - 1, min(PROFILE_SAMPLE, len(x))).astype(int)
            prof["numeric"][name] = {
                "edges": list(map(float, edges)),
                "sample": list(map(float, x[pick])),
            }
        for name, acc in self.counts.items():
            total = sum(acc.values()) or 1
            ordered = sorted(acc.items(), key=lambda kv: (-kv[1], kv[0]))
            prof["categorical"][name] = {k: v / total for k, v in ordered}
        return prof


def floats(col: pa.ChunkedArray) -> np.ndarray:
    """A column as float64 with NaN for nulls; text that is not a number becomes NaN too."""
    t = col.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), dtype=float)
    return np.asarray(pd.to_numeric(col.to_pandas(), errors="coerce"), dtype=float)


def value_counts(col: pa.ChunkedArray) -> dict[str, int]:
    """Counts of each non-null value, keyed by its text (as the reference profile stores it)."""
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        counts = col.to_pandas().dropna().astype(str).value_counts()
        return {str(k): int(v) for k, v in counts.items()}
    out: dict[str, int] = {}
    for row in pc.value_counts(col.drop_null()).to_pylist():
        out[str(row["values"])] = out.get(str(row["values"]), 0) + int(row["counts"])
    return out
