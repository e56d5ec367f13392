"""The windowed canary judge: one window of canary vs stable traffic in, checks and an outcome
out (``canary.judge=windowed``; the default sequential judge is ``sequential.py`` and shares the
critical checks here).

Checks follow ``shared/research/canary_tfserving.md``: success rate and NaN/Inf outputs are
critical; p99 bound; latency vs stable (Mann-Whitney U plus a mean-ratio effect size); errors vs
stable (Fisher exact plus a minimum difference); score distribution vs stable (KS plus PSI).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from pipelines.config import CanarySettings
from pipelines.serving.dataplane.evidence import Sample


@dataclass
class Check:
    name: str
    passed: bool
    critical: bool = False
    detail: str = ""


@dataclass
class WindowVerdict:
    outcome: str  # pass | fail | critical | inconclusive
    score: float
    checks: list[Check] = field(default_factory=list)
    canary_n: int = 0
    stable_n: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def explain(self) -> str:
        parts = [
            f"{c.name}={'ok' if c.passed else 'FAIL'}" + (f" ({c.detail})" if c.detail else "")
            for c in self.checks
        ]
        return (
            f"{self.outcome} score={self.score:.0f} canary_n={self.canary_n} "
            f"stable_n={self.stable_n}: " + "; ".join(parts)
        )


def score_psi(a: np.ndarray, b: np.ndarray, bins: int = 10) -> float:
    """PSI of canary scores ``b`` against stable scores ``a`` on stable's quantile bins."""
    edges = np.unique(np.quantile(a, np.linspace(0, 1, bins + 1)))[1:-1]
    ea = np.bincount(np.searchsorted(edges, a, side="right"), minlength=len(edges) + 1) + 0.5
    eb = np.bincount(np.searchsorted(edges, b, side="right"), minlength=len(edges) + 1) + 0.5
    pa, pb = ea / ea.sum(), eb / eb.sum()
    return float(np.sum((pb - pa) * np.log(pb / pa)))


def critical_checks(canary: list[Sample], cfg: CanarySettings) -> list[Check]:
    """The checks that roll back at once, in either judge: success rate clearly below the floor
    and NaN/Inf outputs."""
    cn = len(canary)
    good = sum(s.code == 200 for s in canary)
    rate = good / cn if cn else 0.0
    # Critical only when clearly below the floor: at 60 requests one error already reads 98.3%,
    # so a point-estimate floor would roll back healthy canaries (a one-sided binomial test).
    p_floor = float(stats.binom.cdf(good, cn, cfg.min_success_rate)) if cn else 1.0
    c_scores = np.array([v for s in canary if s.code == 200 for v in s.scores], dtype=float)
    bad = int(np.sum(~np.isfinite(c_scores))) if len(c_scores) else 0
    return [
        Check(
            "success_rate",
            p_floor >= cfg.success_alpha,
            True,
            f"{rate:.2%} 2xx (floor {cfg.min_success_rate:.0%}, binomial p={p_floor:.3g})",
        ),
        Check("finite_outputs", bad == 0, True, f"{bad} NaN/Inf scores"),
    ]


def p99_check(c_lat: np.ndarray, cfg: CanarySettings) -> Check:
    p99 = float(np.percentile(c_lat, 99))
    return Check(
        "p99_latency",
        p99 <= cfg.max_p99_ms,
        detail=f"p99 {p99:.1f} ms (bound {cfg.max_p99_ms:.0f})",
    )


def judge_window(
    canary: list[Sample],
    stable: list[Sample],
    cfg: CanarySettings,
    baseline: list[Sample] | None = None,
) -> WindowVerdict:
    """``stable``: every request the stable version answered (errors and scores compare with
    these); ``baseline``: those of them served by the pool shaped like the canary's, which
    latency compares with (a warm, busy pool is faster: see ``dataplane.envoy.POOLS``)."""
    cn, sn = len(canary), len(stable)
    reference = stable if baseline is None else baseline
    if cn < cfg.min_samples:
        return WindowVerdict(
            "inconclusive",
            0.0,
            [Check("samples", False, detail=(f"{cn} canary requests < {cfg.min_samples}"))],
            cn,
            sn,
        )
    checks = critical_checks(canary, cfg)
    ok = [s.code == 200 for s in canary]
    c_scores = np.array([v for s in canary if s.code == 200 for v in s.scores], dtype=float)
    c_lat = np.array([s.latency_ms for s in canary if s.code == 200])
    if len(c_lat):
        checks.append(p99_check(c_lat, cfg))
    if sn >= cfg.min_samples:
        s_lat = np.array([s.latency_ms for s in reference if s.code == 200])
        if len(s_lat) < cfg.min_samples:
            s_lat = np.array([])  # too few baseline requests (the 100 % step): not judged
        if len(c_lat) and len(s_lat):
            p = float(stats.mannwhitneyu(c_lat, s_lat, alternative="greater").pvalue)
            ratio = float(c_lat.mean() / max(s_lat.mean(), 1e-9))
            slower = p < cfg.p_value and ratio >= cfg.latency_ratio
            checks.append(
                Check(
                    "latency_vs_stable",
                    not slower,
                    detail=f"MWU p={p:.3g}, mean ratio {ratio:.2f} vs "
                    + ("stable" if baseline is None else "baseline"),
                )
            )
        s_err = sum(s.code != 200 for s in stable)
        c_err = cn - sum(ok)
        p = float(
            stats.fisher_exact(
                [[c_err, cn - c_err], [s_err, sn - s_err]], alternative="greater"
            ).pvalue
        )
        diff = c_err / cn - s_err / sn
        worse = p < cfg.p_value and diff >= cfg.error_min_diff
        checks.append(
            Check("errors_vs_stable", not worse, detail=f"Fisher p={p:.3g}, diff {diff:+.2%}")
        )
        s_scores = np.array([v for s in stable if s.code == 200 for v in s.scores], dtype=float)
        c_fin, s_fin = c_scores[np.isfinite(c_scores)], s_scores[np.isfinite(s_scores)]
        if len(c_fin) >= cfg.min_samples and len(s_fin) >= cfg.min_samples:
            p = float(stats.ks_2samp(c_fin, s_fin).pvalue)
            value = score_psi(s_fin, c_fin)
            drift = p < cfg.ks_alpha and value >= cfg.psi_block
            checks.append(Check("score_drift", not drift, detail=f"KS p={p:.3g}, PSI {value:.3f}"))
    passed = sum(c.passed for c in checks)
    score = 100.0 * passed / len(checks)
    if any(c.critical and not c.passed for c in checks):
        outcome = "critical"
    elif passed == len(checks):
        outcome = "pass"
    else:
        outcome = "fail"
    return WindowVerdict(outcome, score, checks, cn, sn)


def requests_for(weight: float, min_samples: int) -> int:
    """Requests a window needs so the canary side sees ``min_samples`` on average (+20%)."""
    return math.ceil(min_samples * 1.2 / max(weight / 100.0, 1e-6))
