"""The canary judge on synthetic windows, and the decision rules as a pure state machine.
(Sticky weighted routing is Envoy's: tests/e2e/test_dataplane.py.)"""

from __future__ import annotations

import json

import numpy as np

from pipelines.config import CanarySettings
from pipelines.serving.canary import Check, WindowVerdict, judge_window, requests_for
from pipelines.serving.dataplane.evidence import Sample
from pipelines.serving.monitor import advance, fold

CFG = CanarySettings(judge="windowed")  # judge_window and advance: the windowed judge


def window(
    n: int,
    label: str,
    seed: int,
    latency: float = 5.0,
    error_rate: float = 0.0,
    shift: float = 0.0,
    nan: bool = False,
) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        code = 500 if rng.random() < error_rate else 200
        score = float(np.clip(rng.beta(1, 30) + shift, 0, 1))
        if nan and i == 0:
            score = float("nan")
        out.append(Sample(0.0, label, code, float(rng.gamma(9, latency / 9)), (score,)))
    return out


def test_identical_traffic_passes() -> None:
    v = judge_window(window(300, "canary", 1), window(900, "stable", 2), CFG)
    assert v.outcome == "pass", v.explain()
    assert v.score == 100.0


def test_too_few_canary_samples_is_inconclusive() -> None:
    v = judge_window(window(10, "canary", 1), window(900, "stable", 2), CFG)
    assert v.outcome == "inconclusive"


def test_errors_are_critical() -> None:
    v = judge_window(window(300, "canary", 1, error_rate=0.05), window(900, "stable", 2), CFG)
    assert v.outcome == "critical"
    failed = {c.name for c in v.checks if not c.passed}
    assert {"success_rate", "errors_vs_stable"} <= failed


def test_one_error_in_a_small_window_is_not_critical() -> None:
    """60 canary requests with one error read 98.3 %: under the 99 % floor as a point estimate,
    but not evidence of a worse canary when stable has the same 0.5 % error rate."""
    canary = window(60, "canary", 1)
    canary[7] = Sample(0.0, "canary", 500, 5.0, ())
    v = judge_window(canary, window(900, "stable", 2, error_rate=0.005), CFG)
    assert v.outcome == "pass", v.explain()


def test_a_dead_backend_is_critical_at_once() -> None:
    dead = [Sample(0.0, "canary", 503, 1.0, ()) for _ in range(50)]
    v = judge_window(dead, window(900, "stable", 2), CFG)
    assert v.outcome == "critical"
    assert "success_rate" in {c.name for c in v.checks if not c.passed}


def test_nan_output_is_critical() -> None:
    v = judge_window(window(300, "canary", 1, nan=True), window(900, "stable", 2), CFG)
    assert v.outcome == "critical"
    assert [c.name for c in v.checks if not c.passed] == ["finite_outputs"]


def test_slower_canary_fails_latency_vs_stable() -> None:
    v = judge_window(window(300, "canary", 1, latency=7.0), window(900, "stable", 2), CFG)
    assert v.outcome == "fail"
    assert [c.name for c in v.checks if not c.passed] == ["latency_vs_stable"]


def test_shifted_scores_fail_drift() -> None:
    v = judge_window(window(300, "canary", 1, shift=0.08), window(900, "stable", 2), CFG)
    assert "score_drift" in {c.name for c in v.checks if not c.passed}


def test_aa_windows_rarely_fail() -> None:
    fails = sum(
        judge_window(window(300, "canary", s), window(900, "stable", s + 1000), CFG).outcome
        != "pass"
        for s in range(40)
    )
    assert fails <= 2


def test_requests_for_gives_canary_enough_samples() -> None:
    assert requests_for(5, 50) == 1200
    assert requests_for(100, 50) == 60


def _state(step: int = 0) -> dict:
    return {
        "step": step,
        "window": 0,
        "failed_checks": 0,
        "inconclusive_run": 0,
        "windows": [],
        "window_start": None,
        "decision": None,
        "reason": None,
    }


def _verdict(outcome: str, failed: int = 0) -> WindowVerdict:
    checks = [Check(f"c{i}", i >= failed) for i in range(4)]
    return WindowVerdict(outcome, 100.0 * (4 - failed) / 4, checks, 60, 900)


def test_advance_walks_the_steps_and_promotes_on_a_final_pass() -> None:
    state = _state()
    for i, step in enumerate(CFG.steps):
        before = json.dumps(state)
        state = advance(state, _verdict("pass"), CFG)
        assert json.dumps(_state()) != json.dumps(state) and before != json.dumps(state)
        assert state["windows"][-1]["weight"] == step
        assert state["decision"] == (None if i < len(CFG.steps) - 1 else "promote")
    assert "every step passed" in state["reason"]


def test_advance_leaves_its_input_unchanged() -> None:
    state = _state()
    frozen = json.dumps(state)
    advance(state, _verdict("fail", 1), CFG)
    assert json.dumps(state) == frozen


def test_advance_rolls_back_at_once_on_a_critical_window() -> None:
    state = advance(_state(1), _verdict("critical", 1), CFG)
    assert state["decision"] == "rollback" and "critical check failed at 25%" in state["reason"]


def test_advance_counts_failed_checks_against_the_limit() -> None:
    state = _state()
    state = advance(state, _verdict("fail", 2), CFG)
    assert state["decision"] is None and state["failed_checks"] == 2 and state["step"] == 1
    state = advance(state, _verdict("fail", 1), CFG)
    assert state["decision"] == "rollback" and "3 failed checks (limit 3)" in state["reason"]


def test_advance_repeats_an_inconclusive_step_three_times_at_most() -> None:
    state = _state(2)
    for _ in range(2):
        state = advance(state, _verdict("inconclusive"), CFG)
        assert state["decision"] is None and state["step"] == 2
    state = advance(state, _verdict("inconclusive"), CFG)
    assert state["decision"] == "rollback" and "inconclusive" in state["reason"]


def test_a_final_window_that_fails_rolls_back() -> None:
    state = advance(_state(len(CFG.steps) - 1), _verdict("fail", 1), CFG)
    assert state["decision"] == "rollback" and "final window did not pass" in state["reason"]


def test_fold_judges_latency_against_the_baseline_pool() -> None:
    """A canary as slow as the baseline (both small, cold pools) but slower than the warm,
    busy stable pool is not a latency regression; one slower than the baseline is."""
    cold = window(300, "canary", 1, latency=6.5)
    stable_warm = window(600, "stable", 2, latency=5.0)
    baseline_cold = window(300, "baseline", 3, latency=6.5)
    state = fold(_state(), {"canary": cold, "stable": stable_warm, "baseline": baseline_cold}, CFG)
    checks = {c["name"]: c for c in state["windows"][-1]["checks"]}
    assert checks["latency_vs_stable"]["passed"], checks["latency_vs_stable"]
    assert "vs baseline" in checks["latency_vs_stable"]["detail"]
    slow = window(300, "canary", 1, latency=9.0)
    state = fold(_state(), {"canary": slow, "stable": stable_warm, "baseline": baseline_cold}, CFG)
    checks = {c["name"]: c for c in state["windows"][-1]["checks"]}
    assert not checks["latency_vs_stable"]["passed"]
    assert state["windows"][-1]["stable_n"] == 900  # errors and scores: every stable answer
    assert "explain" in state["windows"][-1]
