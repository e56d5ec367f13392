"""The shadow judge on synthetic answers: joined by request id, read against the offline
expectation and the noise floor."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.config import ShadowSettings
from pipelines.evaluate.expected import expected_difference
from pipelines.serving.dataplane.evidence import Sample
from pipelines.serving.shadow import (
    NoiseFloor,
    ShadowVerdict,
    confirm_latency,
    judge_shadow,
)

CFG = ShadowSettings()
QUIET = NoiseFloor(tuple([0.0] * 50), 1.0)


def _exp(
    candidate: np.ndarray, champion: np.ndarray, thr: float, champ_thr: float | None = None
) -> dict[str, Any]:
    """Evaluation's expected difference of the pair (as the evaluation report publishes it)."""
    return expected_difference(candidate, champion, thr, thr if champ_thr is None else champ_thr)


def _answers(scores: np.ndarray, listener: str, code: int = 200, ms: float = 1.0) -> list[Sample]:
    label = "canary" if listener == "shadow" else "stable"
    return [
        Sample(0.0, label, code, ms, (float(s),), request_id=f"r{i}", listener=listener)
        for i, s in enumerate(scores)
    ]


def _scores(n: int = 400, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).beta(1, 8, n)


def test_an_identical_candidate_passes() -> None:
    s = _scores()
    v = judge_shadow(_answers(s, "primary"), _answers(s, "shadow"), QUIET, _exp(s, s, 0.5), CFG)
    assert v.verdict == "pass", v.reasons
    assert v.pairs == 400 and v.stats["agreement"] == 1.0


def test_a_retrained_model_that_differs_as_evaluated_passes() -> None:
    """A challenger differs from the champion; what matters is that it differs live as it did
    offline."""
    champ = _scores()
    cand = np.clip(champ + np.random.default_rng(1).normal(0, 0.05, len(champ)), 0, 1)
    exp = _exp(cand, champ, 0.5)
    v = judge_shadow(_answers(champ, "primary"), _answers(cand, "shadow"), QUIET, exp, CFG)
    assert v.verdict == "pass", v.reasons


def test_decisions_are_each_versions_at_its_own_operating_threshold() -> None:
    """A retrained model whose scores sit lower flags the same rows at its own, lower
    threshold: the same decisions, though one shared threshold would split them."""
    champ = _scores()
    cand = champ * 0.5
    exp = _exp(cand, champ, 0.3, 0.6)
    assert exp["agreement"] == 1.0 and exp["thresholds"] == {"candidate": 0.3, "champion": 0.6}
    v = judge_shadow(_answers(champ, "primary"), _answers(cand, "shadow"), QUIET, exp, CFG)
    agreement = next(c for c in v.checks if c.name == "decision_agreement")
    assert agreement.passed and "at 0.3 / 0.6" in agreement.detail, agreement
    assert _exp(cand, champ, 0.6)["agreement"] < 1.0


def test_a_served_model_unlike_the_evaluated_one_is_stopped() -> None:
    s = _scores()
    shifted = np.minimum(s + 0.25, 1.0)  # what the export serves; offline it matched stable
    v = judge_shadow(
        _answers(s, "primary"), _answers(shifted, "shadow"), QUIET, _exp(s, s, 0.5), CFG
    )
    assert v.verdict == "fail"
    assert any(r.startswith("score_difference") for r in v.reasons)
    assert any(r.startswith("decision_agreement") for r in v.reasons)


def test_answers_that_keep_the_score_distribution_but_not_the_rows_are_stopped() -> None:
    """A served model that answers another row's score (permuted) or one number near the
    median: the score distribution looks right, the pairs do not."""
    champ = _scores(seed=2)
    cand = np.clip(champ + np.random.default_rng(3).normal(0, 0.03, len(champ)), 0, 1)
    exp = _exp(cand, champ, 0.3)
    permuted = np.random.default_rng(4).permutation(cand)
    v = judge_shadow(_answers(champ, "primary"), _answers(permuted, "shadow"), QUIET, exp, CFG)
    assert v.verdict == "fail"
    assert any(r.startswith("rank_correlation") for r in v.reasons), v.reasons
    constant = np.full(len(cand), float(np.median(cand)))
    v = judge_shadow(_answers(champ, "primary"), _answers(constant, "shadow"), QUIET, exp, CFG)
    rank = next(c for c in v.checks if c.name == "rank_correlation")
    assert not rank.passed and "constant" in rank.detail, rank


def test_an_inverted_answer_and_too_few_pairs_fail_the_rank_test_without_crashing() -> None:
    """An export that answers 1 - p (rho -1), and a window with three scored pairs."""
    from pipelines.serving.shadow import rank_check

    s = _scores()
    exp = _exp(s, s, 0.5)
    v = judge_shadow(_answers(s, "primary"), _answers(1 - s, "shadow"), QUIET, exp, CFG)
    rank = next(c for c in v.checks if c.name == "rank_correlation")
    assert not rank.passed and "rho -1.000" in rank.detail, rank
    _, few = rank_check(s[:3], s[:3], exp, 0.05, 0.01)
    assert not few.passed and "too few to rank" in few.detail


def test_a_candidate_that_behaves_as_evaluated_fails_by_chance_at_most_alpha() -> None:
    """Evaluation's pair on 3,000 held-out rows (a retrained model whose scores moved: 96 %
    decision agreement at each one's own threshold, as the demo's day 2); each shadow window
    replays 400 of those rows through the served pair, which behaves exactly as evaluated.
    Over 300 windows the verdict fails at most ``alpha`` of the time (plus sampling slack).
    The point-estimate rule it replaced (live agreement under expected - 1 point fails) failed
    such windows far more often: the standard error of 400 pairs' agreement is about 1 point."""
    rng = np.random.default_rng(7)
    champ = rng.beta(0.6, 12, 3000)
    cand = np.clip(champ * 1.3 + rng.normal(0, 0.06, 3000), 0, 1)
    thr_c, thr_s = float(np.quantile(cand, 0.95)), float(np.quantile(champ, 0.95))
    exp = _exp(cand, champ, thr_c, thr_s)
    assert 0.94 < exp["agreement"] < 0.98, exp["agreement"]
    failed, point_rule = 0, 0
    for _ in range(300):
        rows = rng.choice(3000, 400, replace=False)
        v = judge_shadow(
            _answers(champ[rows], "primary"), _answers(cand[rows], "shadow"), QUIET, exp, CFG
        )
        failed += v.verdict == "fail"
        point_rule += v.stats["agreement"] < exp["agreement"] - CFG.agreement_tolerance
    assert failed <= 300 * CFG.alpha + 3, failed  # 3 is about 2 sd of Binomial(300, 0.01)
    assert point_rule >= 15, point_rule


def test_errors_nan_and_too_few_pairs_fail() -> None:
    s = _scores()
    exp = _exp(s, s, 0.5)
    errors = judge_shadow(_answers(s, "primary"), _answers(s, "shadow", 503), QUIET, exp, CFG)
    assert any(r.startswith("shadow_errors") for r in errors.reasons)
    nan = s.copy()
    nan[3] = np.nan
    v = judge_shadow(_answers(s, "primary"), _answers(nan, "shadow"), QUIET, exp, CFG)
    assert any(r.startswith("finite_outputs") for r in v.reasons)
    few = judge_shadow(_answers(s[:10], "primary"), _answers(s[:10], "shadow"), QUIET, exp, CFG)
    assert few.verdict == "fail" and "min_pairs" in few.reasons[0]


def test_answers_are_joined_by_request_id_not_by_position() -> None:
    s = _scores()
    shadow = list(reversed(_answers(s, "shadow")))
    v = judge_shadow(_answers(s, "primary"), shadow, QUIET, _exp(s, s, 0.5), CFG)
    assert v.verdict == "pass" and v.stats["score_diff"]["max"] == 0.0


def test_a_slow_candidate_fails_latency_against_the_noise_floor() -> None:
    s = _scores()
    exp = _exp(s, s, 0.5)
    slow = _answers(s, "shadow", ms=5.0)
    v = judge_shadow(_answers(s, "primary", ms=1.0), slow, QUIET, exp, CFG)
    assert any(r.startswith("latency") for r in v.reasons)
    noisy = NoiseFloor(QUIET.score_diffs, 3.0)  # replicas of one model differ 3x here
    v = judge_shadow(_answers(s, "primary", ms=1.0), slow, noisy, exp, CFG)
    assert v.verdict == "pass", v.reasons


def _judged(shadow_ms: float, code: int = 200) -> ShadowVerdict:
    s = _scores()
    return judge_shadow(
        _answers(s, "primary", ms=1.0),
        _answers(s, "shadow", code=code, ms=shadow_ms),
        QUIET,
        _exp(s, s, 0.5),
        CFG,
    )


def test_a_window_slow_on_latency_alone_is_measured_again_and_passes_if_the_next_is_not() -> None:
    windows = iter([_judged(5.0), _judged(1.0)])
    calls = []

    def measure() -> ShadowVerdict:
        calls.append(1)
        return next(windows)

    v = confirm_latency(measure, 2)
    assert v.verdict == "pass" and len(calls) == 2
    assert "1 window(s) slow on latency alone" in v.reasons[0]
    assert v.stats["slow_windows"][0].startswith("latency: shadow/stable p50 5.00")


def test_latency_fails_only_when_every_window_is_slow() -> None:
    v = confirm_latency(lambda: _judged(5.0), 3)
    assert v.verdict == "fail" and v.reasons[0].endswith("in 3 windows in a row")
    assert len(v.stats["slow_windows"]) == 2
    assert confirm_latency(lambda: _judged(5.0), 1).stats["slow_windows"] == []


def test_any_other_failed_check_decides_at_once() -> None:
    calls = []

    def measure() -> ShadowVerdict:
        calls.append(1)
        return _judged(5.0, code=503)  # slow and failing

    v = confirm_latency(measure, 3)
    assert v.verdict == "fail" and len(calls) == 1
    assert any(r.startswith("shadow_errors") for r in v.reasons)
