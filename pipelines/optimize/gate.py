"""The optimisation gate: an optimised runtime replaces the current one only when it is faster at
both batch sizes and scores like the baseline (AUC, decisions); every verdict says why.

Pure: the measurements come in, a :class:`GateReport` goes out (``optimize.run`` does the I/O).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Measured:
    """One runtime/variant measured on the test split in the same run as the others."""

    name: str
    """e.g. ``savedmodel-fp32``, ``onnxruntime-fp32``, ``onnxruntime-int8``."""
    runtime: str
    """``savedmodel`` or ``onnxruntime``."""
    variant: str
    """``fp32`` or ``int8``."""
    p50_ms_b1: float
    """median latency of a single-row call, ms."""
    p99_ms_b1: float
    """99th percentile latency of a single-row call, ms."""
    rows_per_s_b1024: float
    """throughput at batch 1024 (median of several repetitions)."""
    roc_auc: float
    """ROC-AUC on the test split's labels."""
    agreement: float
    """share of rows with the baseline's decision at the operating threshold."""
    max_abs_diff: float
    """largest score difference vs the baseline."""


@dataclass(frozen=True)
class Limits:
    """How far a candidate's scores may move from the baseline's."""

    max_auc_drop: float = 0.002
    """largest ROC-AUC drop vs the baseline."""
    min_agreement: float = 0.995
    """smallest share of rows with the baseline's decision."""


@dataclass(frozen=True)
class Verdict:
    """A candidate's row of the report: kept or not, against what, and why."""

    candidate: Measured
    kept: bool
    compared_with: str
    """the runtime chosen when this candidate was judged (its speed is the bar)."""
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GateReport:
    baseline: Measured
    verdicts: list[Verdict]
    chosen: Measured
    limits: Limits

    @property
    def chosen_runtime(self) -> str:
        return self.chosen.runtime

    @property
    def chosen_variant(self) -> str:
        return self.chosen.variant

    def table(self) -> list[dict[str, Any]]:
        """One row per runtime (the baseline first) for logs, MLflow and the JSON report."""
        rows = [
            {
                **asdict(self.baseline),
                "role": "baseline",
                "kept": True,
                "chosen": self.chosen.name == self.baseline.name,
                "compared_with": None,
                "reasons": ["serves today: the bar every candidate is judged against"],
            }
        ]
        for v in self.verdicts:
            rows.append(
                {
                    **asdict(v.candidate),
                    "role": "candidate",
                    "kept": v.kept,
                    "chosen": self.chosen.name == v.candidate.name,
                    "compared_with": v.compared_with,
                    "reasons": list(v.reasons),
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.name,
            "chosen_runtime": self.chosen_runtime,
            "chosen_variant": self.chosen_variant,
            "limits": asdict(self.limits),
            "table": self.table(),
        }


def _judge(c: Measured, current: Measured, baseline: Measured, limits: Limits) -> list[str]:
    """Failure reasons of ``c`` (empty: kept). Speed against ``current``, accuracy against the
    baseline, so accuracy losses of successive candidates cannot add up unnoticed."""
    failures = []
    if c.p50_ms_b1 >= current.p50_ms_b1:
        failures.append(
            f"{c.variant} p50 {c.p50_ms_b1:.3f} ms is slower than {current.name}'s "
            f"{current.p50_ms_b1:.3f} ms"
        )
    if c.rows_per_s_b1024 <= current.rows_per_s_b1024:
        failures.append(
            f"{c.variant} {c.rows_per_s_b1024:,.0f} rows/s at batch 1024 is slower than "
            f"{current.name}'s {current.rows_per_s_b1024:,.0f}"
        )
    drop = baseline.roc_auc - c.roc_auc
    if drop > limits.max_auc_drop:
        failures.append(
            f"ROC-AUC {c.roc_auc:.4f} is {drop:.4f} below {baseline.name}'s {baseline.roc_auc:.4f} "
            f"(limit {limits.max_auc_drop})"
        )
    if c.agreement < limits.min_agreement:
        failures.append(
            f"agreement {c.agreement:.4f} with {baseline.name}'s decisions is under "
            f"{limits.min_agreement}"
        )
    return failures


def decide(
    baseline: Measured, candidates: Sequence[Measured], limits: Limits | None = None
) -> GateReport:
    """Try ``candidates`` in order (fp32 ORT, then int8); each must beat the runtime chosen so
    far on p50 at batch 1 AND rows/s at batch 1024, and stay within ``limits`` of the baseline,
    to become the chosen one (so int8 has to beat fp32 ORT, not only the SavedModel)."""
    limits = limits or Limits()
    chosen, verdicts = baseline, []
    for c in candidates:
        failures = _judge(c, chosen, baseline, limits)
        if failures:
            reasons = [f"REJECTED {c.name}: {f}" for f in failures]
        else:
            reasons = [
                f"KEPT {c.name}: p50 {c.p50_ms_b1:.3f} ms vs {chosen.p50_ms_b1:.3f} ms, "
                f"{c.rows_per_s_b1024:,.0f} vs {chosen.rows_per_s_b1024:,.0f} rows/s at batch "
                f"1024, ROC-AUC {c.roc_auc:.4f} vs {baseline.roc_auc:.4f}, agreement "
                f"{c.agreement:.4f}"
            ]
        verdicts.append(Verdict(c, not failures, chosen.name, reasons))
        if not failures:
            chosen = c
    return GateReport(baseline, verdicts, chosen, limits)
