"""The shadow stage: before any user gets the candidate's answer, mirror a share of stable's
traffic to it and compare the two answers to each request.

Envoy mirrors to the shadow listener, which sends the copy to the canary pool (still at weight
0) and logs its answer with the same request id; the answers are joined by that id. A retrained
model is expected to differ from the champion, so the live differences are read against the
expected difference evaluation published for the pair (``serving/expectation.py``: both torch
models on the held-out rows) plus a noise floor (the same rows sent to two stable replicas):
what it catches is a served model that does not behave like the model that was evaluated
(export or preprocessing skew, a constant or permuted answer, a broken artifact). Each test
against the expectation fails only on significant evidence, so a window of a few hundred pairs
does not stop a candidate that behaves as evaluated. A failed verdict ends the canary analysis
before it starts (decision ``rollback``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.stats import binom, norm

from pipelines.config import Settings, ShadowSettings
from pipelines.data import layout
from pipelines.evaluate.expected import rank_correlation
from pipelines.registry import Registry
from pipelines.serving.control import ServingControl, labels_of
from pipelines.serving.dataplane.evidence import Sample
from pipelines.serving.dataplane.split import Split
from pipelines.serving.expectation import expectation
from pipelines.serving.rollout import RolloutError, save_state
from pipelines.store import open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoiseFloor:
    """Two stable replicas answering the same rows: how far identical models disagree."""

    score_diffs: tuple[float, ...]
    latency_ratio: float


@dataclass
class ShadowCheck:
    name: str
    passed: bool
    detail: str


@dataclass
class ShadowVerdict:
    verdict: str  # pass | fail | skipped
    reasons: list[str]
    checks: list[ShadowCheck] = field(default_factory=list)
    pairs: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict != "fail"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    qs = np.quantile(values, [0.5, 0.9, 0.99])
    return {
        "p50": round(float(qs[0]), 6),
        "p90": round(float(qs[1]), 6),
        "p99": round(float(qs[2]), 6),
        "max": round(float(values.max()), 6),
    }


def judge_shadow(
    primary: list[Sample],
    shadow: list[Sample],
    noise: NoiseFloor,
    expected: dict[str, Any],
    cfg: ShadowSettings,
) -> ShadowVerdict:
    """Join stable's answers (``primary``) and the candidate's (``shadow``) by request id and
    judge them: errors, finite scores, latency, and three tests of the paired answers against
    evaluation's expected difference (``pipelines/evaluate/expected.py``): decision agreement
    (each version at its own operating threshold), the tail of the score differences (plus the
    noise floor), and the rank correlation. Each of the three fails only when the live pairs
    are significantly worse than expected plus its tolerance (one-sided, ``cfg.alpha / 3``
    each), so a candidate that behaves as evaluated passes however far its scores moved, and a
    window of a few hundred pairs does not fail it by chance."""
    by_id = {s.request_id: s for s in shadow if s.request_id}
    pairs = [(p, by_id[p.request_id]) for p in primary if p.request_id in by_id]
    stats: dict[str, Any] = {"primary": len(primary), "shadow": len(shadow)}
    if len(pairs) < cfg.min_pairs:
        reason = f"{len(pairs)} joined answers < shadow.min_pairs {cfg.min_pairs}"
        return ShadowVerdict(
            "fail", [reason], [ShadowCheck("pairs", False, reason)], len(pairs), stats
        )
    checks: list[ShadowCheck] = []
    errors = sum(c.code != 200 for _, c in pairs) / len(pairs)
    checks.append(
        ShadowCheck(
            "shadow_errors",
            errors <= cfg.max_error_rate,
            f"{errors:.2%} non-2xx (limit {cfg.max_error_rate:.2%})",
        )
    )
    ok = [(p, c) for p, c in pairs if p.code == 200 and c.code == 200 and p.scores and c.scores]
    s_scores = np.array([p.scores[0] for p, _ in ok], dtype=float)
    c_scores = np.array([c.scores[0] for _, c in ok], dtype=float)
    bad = int(np.sum(~np.isfinite(c_scores)))
    checks.append(ShadowCheck("finite_outputs", bad == 0, f"{bad} NaN/Inf scores"))
    fin = np.isfinite(c_scores) & np.isfinite(s_scores)
    s_scores, c_scores = s_scores[fin], c_scores[fin]
    level = cfg.alpha / 3
    agreement, check = agreement_check(s_scores, c_scores, expected, cfg.agreement_tolerance, level)
    checks.append(check)
    diffs = np.abs(c_scores - s_scores)
    noise_p99 = float(np.quantile(noise.score_diffs, 0.99)) if noise.score_diffs else 0.0
    checks.append(tail_check(diffs, expected, noise_p99, cfg.max_score_diff, level))
    rho, check = rank_check(s_scores, c_scores, expected, cfg.rank_tolerance, level)
    checks.append(check)
    s_lat = np.array([p.latency_ms for p, _ in ok])
    c_lat = np.array([c.latency_ms for _, c in ok])
    ratio = float(np.median(c_lat) / max(np.median(s_lat), 1e-9)) if len(ok) else math.inf
    checks.append(
        ShadowCheck(
            "latency",
            ratio <= cfg.latency_ratio * max(noise.latency_ratio, 1.0),
            f"shadow/stable p50 {ratio:.2f} ({np.median(c_lat) if len(ok) else math.nan:.2f} "
            f"vs {np.median(s_lat) if len(ok) else math.nan:.2f} ms; limit {cfg.latency_ratio} "
            f"x noise {noise.latency_ratio:.2f})",
        )
    )
    stats.update(
        score_diff=_quantiles(diffs),
        noise_score_diff=_quantiles(np.asarray(noise.score_diffs, dtype=float)),
        expected=expected,
        offline_agreement=round(expected["agreement"], 6),
        stable_latency_ms=_quantiles(s_lat),
        shadow_latency_ms=_quantiles(c_lat),
        agreement=round(agreement, 6),
        rank_correlation=None if math.isnan(rho) else round(rho, 6),
    )
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.passed]
    if failed:
        return ShadowVerdict("fail", failed, checks, len(pairs), stats)
    return ShadowVerdict("pass", ["every check passed"], checks, len(pairs), stats)


def agreement_check(
    stable: np.ndarray, candidate: np.ndarray, expected: dict[str, Any], tol: float, level: float
) -> tuple[float, ShadowCheck]:
    """The paired answers' decision agreement, each version at its own operating threshold.
    Fails when the disagreements are significantly more than expected + ``tol`` (exact
    binomial, one-sided at ``level``)."""
    cand_thr, champ_thr = expected["thresholds"]["candidate"], expected["thresholds"]["champion"]
    n = len(stable)
    disagree = int(np.sum((stable >= champ_thr) != (candidate >= cand_thr))) if n else 0
    agreement = 1.0 - disagree / n if n else 0.0
    q = min(1.0 - expected["agreement"] + tol, 1.0)
    p = float(binom.sf(disagree - 1, n, q)) if n else 0.0
    at = f"{cand_thr:.4g}" if cand_thr == champ_thr else f"{cand_thr:.4g} / {champ_thr:.4g}"
    return agreement, ShadowCheck(
        "decision_agreement",
        p >= level,
        f"{agreement:.2%} same decisions at {at} over {n} pairs (expected "
        f"{expected['agreement']:.2%}; significantly below {1 - q:.2%}? p={p:.3g}, fails under "
        f"{level:.3g})",
    )


def tail_check(
    diffs: np.ndarray, expected: dict[str, Any], noise_p99: float, tol: float, level: float
) -> ShadowCheck:
    """Live |score differences| beyond evaluation's p99 + the noise floor's p99 + ``tol``: as
    evaluated, at most 1 % of pairs land there. Fails when significantly more do (exact
    binomial, one-sided at ``level``)."""
    offline_p99 = float(expected["abs_diff"]["p99"])
    bound = offline_p99 + noise_p99 + tol
    n, over = len(diffs), int(np.sum(diffs > bound))
    p = float(binom.sf(over - 1, n, 0.01)) if n else 0.0
    p99 = float(np.quantile(diffs, 0.99)) if n else math.inf
    return ShadowCheck(
        "score_difference",
        p >= level,
        f"{over} of {n} pairs differ by more than {bound:.4f} (expected p99 |diff| "
        f"{offline_p99:.4f} + noise floor p99 {noise_p99:.4f} + {tol}; live p99 {p99:.4f}); "
        f"more than 1 %? p={p:.3g}, fails under {level:.3g}",
    )


def rank_check(
    stable: np.ndarray, candidate: np.ndarray, expected: dict[str, Any], tol: float, level: float
) -> tuple[float, ShadowCheck]:
    """Spearman's rho of the paired scores against evaluation's minus ``tol``: a constant or
    permuted answer keeps no ranking, whatever its score distribution. Fails when the live rho
    is significantly lower (Fisher's z with Bonett and Wright's standard error; one-sided at
    ``level``)."""
    want = expected.get("rank_correlation")
    n = len(stable)
    if want is None or not math.isfinite(want):
        return math.nan, ShadowCheck(
            "rank_correlation", True, f"not judged: evaluation expects no ranking (rho {want})"
        )
    if n < 4:
        return math.nan, ShadowCheck(
            "rank_correlation",
            False,
            f"{n} scored pairs: too few to rank (expected rho {want:.3f})",
        )
    rho = rank_correlation(stable, candidate)
    if math.isnan(rho):
        return rho, ShadowCheck(
            "rank_correlation",
            False,
            f"no ranking over {n} pairs: one side answered a constant (expected rho {want:.3f})",
        )
    floor = min(max(want - tol, -0.9999), 0.9999)
    # Bonett and Wright's (2000) standard error of Spearman's rho on Fisher's z scale, at the
    # null's rho: 1.06 / sqrt(n - 3) holds near 0 only, and is too small at high rho.
    se = math.sqrt(1 + floor * floor / 2) / math.sqrt(n - 3)
    z = (math.atanh(min(max(rho, -0.9999), 0.9999)) - math.atanh(floor)) / se
    p = float(norm.cdf(z))
    return rho, ShadowCheck(
        "rank_correlation",
        p >= level,
        f"rho {rho:.3f} over {n} pairs (expected {want:.3f}); significantly below "
        f"{floor:.3f}? p={p:.3g}, fails under {level:.3g}",
    )


def noise_floor(
    control: ServingControl, model: str, instances: list[dict[str, Any]], n: int
) -> NoiseFloor:
    """The same ``n`` rows to the first and the last stable replica, directly."""
    clients = control.clients("stable")
    if not clients:
        return NoiseFloor((), 1.0)
    a, b = clients[0], clients[-1]
    diffs, lat_a, lat_b = [], [], []
    for i in range(n):
        inst = [instances[i % len(instances)]]
        t0 = time.perf_counter()
        pa = a.predict(model, inst)
        t1 = time.perf_counter()
        pb = b.predict(model, inst)
        t2 = time.perf_counter()
        lat_a.append(t1 - t0)
        lat_b.append(t2 - t1)
        fa, fb = float(np.ravel(pa)[0]), float(np.ravel(pb)[0])
        diffs.append(abs(fa - fb))
    ratio = float(
        max(np.median(lat_a), np.median(lat_b)) / max(min(np.median(lat_a), np.median(lat_b)), 1e-9)
    )
    return NoiseFloor(tuple(diffs), ratio)


def shadow_key(settings: Settings, version: str) -> str:
    return f"{layout.rollout(settings.mlflow.model_name, version)}/shadow.json"


def shadow_candidate(settings: Settings, control: ServingControl, version: str) -> dict[str, Any]:
    """Mirror stable's traffic to the staged candidate, judge, record the verdict (report,
    MLflow tags, log); a failed verdict decides the canary analysis as ``rollback``."""
    from pipelines.serving import monitor

    cfg, v = settings.shadow, int(version)
    labels = labels_of(control)
    if labels.get("canary") != v:
        raise RolloutError(f"Version {version} is not staged as canary; run stage_canary first.")
    if not cfg.enabled:
        verdict = ShadowVerdict("skipped", ["shadow.enabled is false (skip_shadow param)"])
    elif labels.get("stable") in (None, v):
        verdict = ShadowVerdict("skipped", ["first deployment: no stable to compare against"])
    else:
        try:
            verdict = _measure(settings, control, version)
        except Exception as exc:
            # A shadow that cannot be measured must not let the candidate reach users: the
            # analysis is decided, and the DAG's decide/rollback tasks undo the staging.
            monitor.decide_early(
                settings, control, version, "rollback", f"shadow stage failed: {exc}"
            )
            raise
    report = {"version": str(version), "stable": labels.get("stable"), **verdict.to_dict()}
    store = open_store(settings.store)
    store.write_text(shadow_key(settings, version), json.dumps(report, indent=2, default=str))
    save_state(store, settings, version, phase="shadowed", shadow=report)
    Registry(settings.mlflow).set_version_tags(
        version,
        {"shadow_verdict": verdict.verdict, "shadow_reason": "; ".join(verdict.reasons)[:4000]},
    )
    log.info(
        "shadow verdict for version %s: %s (%s)",
        version,
        verdict.verdict,
        "; ".join(verdict.reasons),
    )
    if not verdict.passed:
        reason = "shadow: " + "; ".join(verdict.reasons)
        monitor.decide_early(settings, control, version, "rollback", reason)
    return report


def latency_only(verdict: ShadowVerdict) -> bool:
    """True when the latency check is the only one that failed."""
    failed = [c.name for c in verdict.checks if not c.passed]
    return failed == ["latency"]


def confirm_latency(measure: Callable[[], ShadowVerdict], windows: int) -> ShadowVerdict:
    """``measure()`` again while its verdict fails on latency alone, up to ``windows`` windows:
    the verdict fails on latency only if every window is slow (a slow model is slow in every
    window, a noisy neighbour on a shared host rarely twice in a row). Any other failed check
    decides at once."""
    slow: list[str] = []
    while True:
        verdict = measure()
        if not latency_only(verdict) or len(slow) + 1 >= windows:
            break
        slow.append(verdict.reasons[0])
        log.warning(
            "shadow window %d failed on latency alone (%s); measuring again", len(slow), slow[-1]
        )
    verdict.stats["slow_windows"] = slow
    if slow and verdict.passed:
        verdict.reasons = [
            f"every check passed (after {len(slow)} window(s) slow on latency alone: "
            + "; ".join(slow)
            + ")"
        ]
    elif slow and latency_only(verdict):
        verdict.reasons = [f"{verdict.reasons[0]}, in {len(slow) + 1} windows in a row"]
    return verdict


def _measure(settings: Settings, control: ServingControl, version: str) -> ShadowVerdict:
    rows, expected = _rows_and_expected(settings, control, version)
    return confirm_latency(
        lambda: _window(settings, control, rows, expected), settings.shadow.latency_windows
    )


def _rows_and_expected(
    settings: Settings, control: ServingControl, version: str
) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    from pipelines.serving import monitor

    control.ensure_running()
    rows = monitor.replay_rows(settings, version)
    return rows, expectation(settings, version, str(labels_of(control)["stable"]))


def _window(
    settings: Settings,
    control: ServingControl,
    rows: list[tuple[str, dict[str, Any]]],
    expected: dict[str, Any],
) -> ShadowVerdict:
    from pipelines.serving import monitor

    cfg, name = settings.shadow, settings.mlflow.model_name
    noise = noise_floor(control, name, [inst for _, inst in rows], cfg.noise_requests)
    start = time.time()
    control.set_split(Split(0, shadow=cfg.percent))
    try:
        if settings.canary.replay:
            _, ids = monitor.replay(
                control.endpoint(),
                name,
                rows,
                cfg.requests,
                settings.canary.replay_rate,
                settings.canary.replay_concurrency,
                0,
            )
            samples = _wait_for_both(control, start, ids, cfg.percent)
        else:
            time.sleep(cfg.window_seconds)
            samples = control.window(start)
    finally:
        control.set_split(Split(0, shadow=0))
    primary = [s for s in samples if s.listener == "primary" and s.label == "stable"]
    mirrored = [s for s in samples if s.listener == "shadow"]
    return judge_shadow(primary, mirrored, noise, expected, cfg)


def _wait_for_both(
    control: ServingControl, since: float, ids: set[str], percent: int, timeout: float = 15.0
) -> list[Sample]:
    """The window once stable's answers and (most of) the mirrored ones are logged: a mirror
    is fire-and-forget, so its line can trail the primary's."""
    deadline = time.monotonic() + timeout
    want = len(ids) * percent / 100 * 0.98
    samples = control.window(since, request_ids=ids)
    while time.monotonic() < deadline:
        shadowed = sum(s.listener == "shadow" and s.request_id in ids for s in samples)
        if shadowed >= want:
            break
        time.sleep(0.1)
        samples = control.window(since)
    return samples
