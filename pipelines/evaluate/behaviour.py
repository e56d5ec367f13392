"""Behavioural model tests (Made-With-ML style) declared in the dataset spec, run on raw rows.

Invariance (fields the model must ignore), directional expectations (a change must not lower
or raise scores on most rows) and minimum functionality (hand-written cases). Each result
becomes a gate rule; the scorer is any ``raw frame -> probabilities`` function.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipelines.data.spec import (
    BehaviourSpec,
    DatasetSpec,
    DirectionalTest,
    FunctionalityTest,
    InvarianceTest,
    Perturbation,
    Severity,
)

Scorer = Callable[[pd.DataFrame], np.ndarray]


@dataclass
class BehaviourResult:
    name: str
    kind: str
    """invariance | directional | minimum_functionality"""
    passed: bool
    judged: bool
    severity: Severity
    detail: str
    why: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def perturb(
    df: pd.DataFrame, changes: tuple[Perturbation, ...], spec: DatasetSpec, rng: np.random.Generator
) -> pd.DataFrame:
    """A copy of ``df`` with each change applied; numeric results stay in the column's range."""
    out = df.copy()
    n = len(out)
    for ch in changes:
        col = spec.column(ch.column)
        if ch.op == "set" and col.is_numeric and ch.value is not None:
            out[ch.column] = np.full(n, float(ch.value))
        elif ch.op == "set":
            out[ch.column] = pd.Series([ch.value] * n, index=out.index, dtype=object)
        elif ch.op == "choice":
            picks = rng.integers(0, len(ch.value), n)
            out[ch.column] = pd.Series([ch.value[i] for i in picks], index=out.index, dtype=object)
        elif ch.op == "shuffle":
            out[ch.column] = rng.permutation(out[ch.column].to_numpy())
        else:
            x = pd.to_numeric(out[ch.column], errors="coerce").to_numpy(dtype="float64")
            x = x * ch.value if ch.op == "scale" else x + ch.value
            x = np.clip(
                x,
                -np.inf if col.min is None else col.min,
                np.inf if col.max is None else col.max,
            )
            if col.type == "int":
                x = np.rint(x)
            out[ch.column] = x.astype(df[ch.column].dtype) if col.type == "int" else x
    return out


def _rng(seed: int, name: str) -> np.random.Generator:
    # Per-test streams: adding or reordering tests does not change another test's rows.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _invariance(
    t: InvarianceTest,
    rows: pd.DataFrame,
    base: np.ndarray,
    scorer: Scorer,
    spec: DatasetSpec,
    seed: int,
) -> tuple[bool, bool, str, dict[str, Any]]:
    moved = np.abs(scorer(perturb(rows, t.perturb, spec, _rng(seed, t.name))) - base)
    worst = float(moved.max()) if len(moved) else 0.0
    n_moved = int((moved > t.tolerance).sum())
    cols = ", ".join(p.column for p in t.perturb)
    detail = (
        f"perturbing {cols} moved {n_moved} of {len(rows)} scores by more than "
        f"{t.tolerance:g} (largest change {worst:.6f})"
    )
    evidence = {"rows": len(rows), "rows_moved": n_moved, "max_abs_delta": worst}
    return n_moved == 0, len(rows) > 0, detail, evidence


def _directional(
    t: DirectionalTest,
    rows: pd.DataFrame,
    base: np.ndarray,
    scorer: Scorer,
    spec: DatasetSpec,
    seed: int,
) -> tuple[bool, bool, str, dict[str, Any]]:
    mask = np.ones(len(rows), dtype=bool)
    for column, value in t.where:
        mask &= (rows[column].astype(object) == value).to_numpy()
    sub, before = rows[mask], base[mask]
    cols = ", ".join(f"{p.column} {p.op} {p.value!r}" for p in t.perturb)
    if len(sub) == 0:
        where = ", ".join(f"{c}={v}" for c, v in t.where)
        return False, False, f"no test row matches {where}; nothing to judge", {"rows": 0}
    after = scorer(perturb(sub, t.perturb, spec, _rng(seed, t.name)))
    delta = after - before
    ok = delta >= -t.tolerance if t.expect == "not_lower" else delta <= t.tolerance
    share = float(ok.mean())
    detail = (
        f"after {cols}, {share:.1%} of {len(sub)} rows' scores are {t.expect.replace('_', ' ')} "
        f"(required {t.min_share:.0%}; mean delta {float(delta.mean()):+.4f})"
    )
    evidence = {
        "rows": len(sub),
        "share": share,
        "min_share": t.min_share,
        "mean_delta": float(delta.mean()),
        "worst_delta": float(delta.min() if t.expect == "not_lower" else delta.max()),
    }
    return share >= t.min_share, True, detail, evidence


def _functionality(
    t: FunctionalityTest,
    behaviour: BehaviourSpec,
    spec: DatasetSpec,
    scorer: Scorer,
    threshold: float,
) -> tuple[bool, bool, str, dict[str, Any]]:
    names = [t.case] + ([t.than] if t.than else [])
    # Cases give the features; every other column is present and empty, as in a raw row.
    columns = [c for c in spec.column_names if c != spec.label]
    scores = scorer(pd.DataFrame([behaviour.case(n) for n in names], columns=columns))
    s = float(scores[0])
    if t.expect == "higher":
        other = float(scores[1])
        detail = f"{t.case} scores {s:.4f}, {t.than} {other:.4f}; expected {t.case} higher"
        evidence = {"scores": dict(zip(names, map(float, scores), strict=True))}
        return s > other, True, detail, evidence
    thr = threshold if t.threshold is None else t.threshold
    ok = s >= thr if t.expect == "above" else s < thr
    detail = f"{t.case} scores {s:.4f}; expected {t.expect} the threshold {thr}"
    return ok, True, detail, {"scores": {t.case: s}, "threshold": thr}


def run_behaviour(
    behaviour: BehaviourSpec,
    spec: DatasetSpec,
    rows: pd.DataFrame,
    scorer: Scorer,
    threshold: float,
    default_severity: Severity = "block",
    seed: int = 0,
) -> list[BehaviourResult]:
    """Every declared test against ``scorer`` on ``rows`` (raw test rows); deterministic."""
    rows = rows.reset_index(drop=True)
    base = np.asarray(scorer(rows), dtype="float64") if len(rows) else np.zeros(0)
    results = []
    for t in behaviour.tests:
        if isinstance(t, InvarianceTest):
            kind = "invariance"
            passed, judged, detail, evidence = _invariance(t, rows, base, scorer, spec, seed)
        elif isinstance(t, DirectionalTest):
            kind = "directional"
            passed, judged, detail, evidence = _directional(t, rows, base, scorer, spec, seed)
        else:
            kind = "minimum_functionality"
            passed, judged, detail, evidence = _functionality(t, behaviour, spec, scorer, threshold)
        results.append(
            BehaviourResult(
                t.name,
                kind,
                passed and judged,
                judged,
                t.severity or default_severity,
                detail,
                t.why,
                evidence,
            )
        )
    return results
