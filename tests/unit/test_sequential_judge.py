"""The sequential canary judge: each anytime-valid test's error control under repeated looks
(seeded simulations), power on clear regressions, resumability, matched time buckets, and
verdicts that explain themselves."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from pipelines.config import CanarySettings
from pipelines.serving import sequential
from pipelines.serving.dataplane.evidence import Sample
from pipelines.serving.monitor import empty_state, fold

CFG = CanarySettings(judge="sequential")


def _looks_reject(step_obs, looks: int, runs: int, log_bound: float, seed: int) -> float:
    """Share of ``runs`` sequences whose test crosses ``log_bound`` at any of ``looks`` looks."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(runs):
        b = sequential._bet()
        for _ in range(looks):
            step_obs(b, rng)
            if b["max_log_e"] >= log_bound:
                hits += 1
                break
    return hits / runs


def test_latency_bet_holds_its_level_however_often_it_looks() -> None:
    """Symmetric clipped log ratios (an A/A canary), one look per observation batch of 10:
    the e-process crosses 1/alpha in at most alpha of the runs (alpha 0.1 to keep it fast)."""

    def obs(b: dict, rng: np.random.Generator) -> None:
        x = np.clip(rng.normal(0, 0.5, 10) - rng.normal(0, 0.5, 10), -1, 1)
        sequential._bet_on(b, x, 0.0, +1, -1.0, 1.0)

    assert _looks_reject(obs, looks=60, runs=400, log_bound=math.log(10), seed=1) <= 0.1


def test_score_bet_holds_its_level_at_the_margin_boundary() -> None:
    """Observations with mean exactly 1/2 + margin: the "outside the margin" test may not fire
    more often than alpha (the least favourable null)."""
    m = CFG.score_margin

    def obs(b: dict, rng: np.random.Generator) -> None:
        u = (rng.random(10) < 0.5 + m).astype(float)
        sequential._bet_on(b, u, 0.5 + m, +1, 0.0, 1.0)

    assert _looks_reject(obs, looks=60, runs=400, log_bound=math.log(10), seed=2) <= 0.1


def test_error_mixture_sprt_holds_its_level_with_equal_rates() -> None:
    """Equal error rates on both pools, varying traffic shares (the weight steps): the mixture
    SPRT's e-value crosses 1/alpha in at most alpha of the analyses, over 40 looks."""
    rng = np.random.default_rng(3)
    runs, hits = 400, 0
    for _ in range(runs):
        llr = np.zeros(len(sequential.ODDS_GRID))
        for w in range(40):
            nc, ns = (3, 57) if w % 2 else (30, 30)
            x, y = int(rng.binomial(nc, 0.02)), int(rng.binomial(ns, 0.02))
            if x + y:
                llr += sequential.fisher_log_lr(x, nc, ns, x + y)
            if sequential.errors_e_value_log({"log_lr": list(llr)}) >= math.log(10):
                hits += 1
                break
    assert hits / runs <= 0.1


def _errors_within_at(
    rng: np.random.Generator, cfg: CanarySettings, c_err: float, s_err: float, windows: int
) -> int | None:
    """Canary requests at which "errors within margin" is first shown (None: never), over
    ``windows`` windows of 50 canary and 950 stable requests (the hold weight, 5 %)."""
    st = sequential.new_state()
    for w in range(windows):
        t = float(w)
        window = {
            "canary": [
                Sample(t, "canary", 500 if x else 200, 8.0, ()) for x in rng.random(50) < c_err
            ],
            "stable": [
                Sample(t, "stable", 500 if x else 200, 8.0, ()) for x in rng.random(950) < s_err
            ],
            "baseline": [],
        }
        st = sequential.update(st, window, cfg)
        if st["errors"]["within_at"] is not None:
            return int(st["errors"]["within_at"])
    return None


def test_errors_within_margin_rarely_promotes_a_canary_exactly_at_the_margin() -> None:
    """The least favourable null: canary rate = stable rate + margin. Over 30 looks the
    within test is shown in at most its half of promote_alpha (0.2 here, to keep it fast)."""
    cfg = CFG.model_copy(update={"promote_alpha": 0.2})
    rng = np.random.default_rng(7)
    runs = 300
    hits = sum(
        _errors_within_at(rng, cfg, 0.01 + cfg.error_margin, 0.01, windows=30) is not None
        for _ in range(runs)
    )
    assert hits / runs <= 0.2 / 2


def test_errors_within_margin_is_shown_for_an_equal_canary_in_a_few_hundred_requests() -> None:
    """Efficiency at the DAG's settings: equal rates of 0.3 %, the median canary is shown within
    the margin by 300 requests (250 here; with no error seen it takes 200-250). Bounding each
    rate by its own confidence sequence and comparing the bounds, as this test did before,
    needed a median of 400 on these seeds."""
    rng = np.random.default_rng(8)
    shown = [_errors_within_at(rng, CFG, 0.003, 0.003, windows=20) for _ in range(100)]
    assert float(np.median([math.inf if n is None else n for n in shown])) <= 300


def test_a_stable_outage_every_request_an_error_is_judged_not_crashed() -> None:
    """Every stable request so far failed (a stable outage): the rate's bounds are (lo, 1) and
    the window is folded and explained; before, log1p(-1) raised a math domain error."""
    lo, hi = sequential.rate_bounds(2, 2, 0.01, 50.0)
    assert hi == 1.0 and 0.0 < lo < 1.0
    lo, hi = sequential.rate_bounds(400, 400, 0.01, 50.0)
    assert hi == 1.0 and 0.5 < lo < 1.0
    window = {
        "canary": [Sample(0.0, "canary", 200, 8.0, (0.1,)) for _ in range(5)],
        "stable": [Sample(0.0, "stable", 503, 8.0, ()) for _ in range(2)],
        "baseline": [],
    }
    st = sequential.update(sequential.new_state(), window, CFG)
    found = {f.name: f for f in sequential.findings(st, CFG)}
    assert "stable 2/2 errors" in found["errors_vs_stable"].detail


def test_rate_confidence_sequence_covers_at_every_look() -> None:
    """The Beta-binomial bound misses the true rate at some look in at most its level."""
    rng = np.random.default_rng(4)
    p, level, runs, misses = 0.01, 0.1, 200, 0
    for _ in range(runs):
        k = 0
        for n in range(50, 1001, 50):
            k += int(rng.binomial(50, p))
            lo, hi = sequential.rate_bounds(k, n, level, 50.0)
            if not lo <= p <= hi:
                misses += 1
                break
    assert misses / runs <= level


def _window(
    rng: np.random.Generator,
    weight: int,
    t0: float,
    n: int = 600,
    c_err: float = 0.003,
    s_err: float = 0.003,
    c_ms: float = 8.0,
    shift: float = 0.0,
    slow: dict[int, float] | None = None,
    replicas: int = 1,
    replica_factor: dict[str, float] | None = None,
) -> dict[str, list[Sample]]:
    """``n`` requests at 400/s from ``t0``, routed canary / baseline / stable as Envoy does,
    each pool's to one of ``replicas`` at random; ``slow`` maps a bucket index to a latency
    factor that hits every pool, ``replica_factor`` a replica (``canary-0``) to its own."""
    out: dict[str, list[Sample]] = {"canary": [], "stable": [], "baseline": []}
    base = min(weight, 100 - weight)
    for i in range(n):
        t = t0 + i / 400
        r = rng.random() * 100
        label = "canary" if r < weight else "baseline" if r < weight + base else "stable"
        canary = label == "canary"
        code = 500 if rng.random() < (c_err if canary else s_err) else 200
        f = (slow or {}).get(int(t / CFG.bucket_seconds), 1.0)
        ms = float(rng.lognormal(math.log(c_ms if canary else 8.0), 0.35)) * f
        p = float(rng.beta(0.6, 20))
        if canary and shift:
            p = 1 / (1 + math.exp(-(math.log(p / (1 - p)) + shift)))
        replica = f"{label}-{int(rng.integers(replicas))}" if replicas > 1 else ""
        ms *= (replica_factor or {}).get(replica, 1.0)
        scores = (p,) if code == 200 else ()
        out[label].append(Sample(t, label, code, ms, scores, replica=replica))
    return out


def _state() -> dict[str, Any]:
    return empty_state()


def _analyse(
    seed: int,
    cfg: CanarySettings = CFG,
    max_windows: int = 60,
    start: dict[str, Any] | None = None,
    **kw,
) -> dict:
    """One analysis of simulated windows from ``start`` (a new analysis when None)."""
    rng = np.random.default_rng(seed)
    state, t = start or _state(), 0.0
    for _ in range(max_windows):
        weight = cfg.steps[state["step"]]
        state = fold(state, _window(rng, weight, t, n=6000 // weight, **kw), cfg)
        t += 10.0
        if state["decision"]:
            break
    return state


def test_an_identical_canary_promotes_within_every_margin_and_explains_it() -> None:
    state = _analyse(10)
    assert state["decision"] == "promote", state["reason"]
    assert "within every margin" in state["reason"]
    for name in ("errors_vs_stable", "latency_vs_stable", "score_drift"):
        assert name in state["reason"]
    assert "boundary" in state["reason"] and "canary requests" in state["reason"]
    last = state["windows"][-1]
    assert set(last["evidence"]) == {"errors_vs_stable", "latency_vs_stable", "score_drift"}
    assert all(e["within"] and not e["worse"] for e in last["evidence"].values())
    assert state["evidence"]["canary_requests"] <= CFG.max_canary_requests


def test_more_errors_roll_back_with_the_statistic_boundary_and_requests() -> None:
    # Below the critical success-rate floor's reach (2.5 % errors), so the SPRT decides.
    state = _analyse(11, c_err=0.025, s_err=0.005)
    assert state["decision"] == "rollback", state["reason"]
    assert "errors_vs_stable" in state["reason"] and "mixture SPRT e=" in state["reason"]
    assert f"boundary {sequential._e(math.log(3 / CFG.alpha))}" in state["reason"]
    ev = state["windows"][-1]["evidence"]["errors_vs_stable"]
    assert ev["worse"] and ev["e_worse"] >= ev["boundary_worse"] and ev["requests"] > 0


def test_a_slower_canary_rolls_back_on_latency() -> None:
    state = _analyse(12, c_ms=8.0 * 1.3)
    assert state["decision"] == "rollback", state["reason"]
    assert "latency_vs_stable" in state["reason"]
    failed = {c["name"] for w in state["windows"] for c in w["checks"] if not c["passed"]}
    assert "latency_vs_stable" in failed  # the name the e2e fault tests look for


def test_shifted_scores_roll_back_on_score_drift() -> None:
    state = _analyse(13, shift=1.5)
    assert state["decision"] == "rollback", state["reason"]
    failed = {c["name"] for w in state["windows"] for c in w["checks"] if not c["passed"]}
    assert "score_drift" in failed


def test_nan_scores_roll_back_at_once() -> None:
    rng = np.random.default_rng(14)
    window = _window(rng, 5, 0.0, n=1200)
    canary = window["canary"]
    canary[0] = Sample(canary[0].t, "canary", 200, 5.0, (float("nan"),))
    state = fold(_state(), window, CFG)
    assert state["decision"] == "rollback" and "critical" in state["reason"]
    assert len(state["windows"]) == 1


def test_a_common_slowdown_cancels_in_matched_buckets() -> None:
    """Half the time buckets are 3x slower for every pool, and the canary's requests sit mostly
    in them: pooled, the canary reads ~2x slower; matched by bucket, the ratio is ~1."""
    rng = np.random.default_rng(15)
    slow = {b: 3.0 for b in range(0, 400, 2)}
    window = _window(rng, 50, 0.0, n=4000, slow=slow)
    # Keep the canary's requests in slow buckets and the baseline's mostly in fast ones.
    in_slow = lambda s: int(s.t / CFG.bucket_seconds) in slow  # noqa: E731
    window["canary"] = [s for s in window["canary"] if in_slow(s) or rng.random() < 0.2]
    window["baseline"] = [s for s in window["baseline"] if not in_slow(s) or rng.random() < 0.2]
    pooled = np.mean([s.latency_ms for s in window["canary"]]) / np.mean(
        [s.latency_ms for s in window["baseline"]]
    )
    assert pooled > 1.8
    ev = sequential.update(sequential.new_state(), window, CFG)
    (lat,) = [f for f in sequential.findings(ev, CFG) if f.name == "latency_vs_stable"]
    assert 0.9 < lat.data["ratio"] < 1.1, lat.detail
    assert not lat.worse


def test_the_evidence_resumes_identically_after_a_json_round_trip() -> None:
    """A crashed controller reloads canary.json: continuing from the reloaded state gives the
    same analysis, window for window, as never stopping."""
    rng = np.random.default_rng(16)
    windows = [_window(rng, w, 10.0 * i, n=6000 // w) for i, w in enumerate((5, 25, 50, 5, 5, 5))]
    straight = _state()
    for w in windows:
        straight = fold(straight, w, CFG)
    resumed = _state()
    for w in windows:
        resumed = json.loads(json.dumps(fold(resumed, w, CFG)))
    assert json.dumps(resumed, sort_keys=True) == json.dumps(straight, sort_keys=True)
    assert resumed["evidence"]["canary_requests"] > 0


def test_fold_leaves_its_input_unchanged_and_walks_the_ramp_then_holds_low() -> None:
    rng = np.random.default_rng(17)
    state = _state()
    weights = []
    for i in range(5):
        frozen = json.dumps(state)
        weight = CFG.steps[state["step"]]
        weights.append(weight)
        nxt = fold(state, _window(rng, weight, 10.0 * i, n=6000 // weight), CFG)
        assert json.dumps(state) == frozen
        state = nxt
        if state["decision"]:
            break
    assert weights[:3] == [5, 25, 50]
    assert all(w == 5 for w in weights[3:])  # 100 % has no stable traffic to compare with


def test_at_the_budget_a_metric_not_judged_rolls_back() -> None:
    """No baseline traffic at all: latency is never judged, so the budget cannot promote."""
    cfg = CanarySettings(judge="sequential", max_canary_requests=100)
    rng = np.random.default_rng(18)
    window = _window(rng, 5, 0.0, n=3000)
    window["stable"] += window["baseline"]
    window["baseline"] = []
    state = fold(_state(), window, cfg)
    assert state["decision"] == "rollback"
    assert "budget" in state["reason"] and "latency_vs_stable" in state["reason"]


def test_the_windowed_judge_stays_selectable() -> None:
    cfg = CanarySettings(judge="windowed")
    rng = np.random.default_rng(19)
    state, i = _state(), 0
    while state["decision"] is None:
        weight = cfg.steps[state["step"]]
        state = fold(state, _window(rng, weight, 10.0 * i, n=int(90 * 100 / weight)), cfg)
        i += 1
    assert state["decision"] == "promote", state["reason"]
    assert [w["weight"] for w in state["windows"]] == list(cfg.steps)
    assert state["evidence"] is None


def test_a_replayed_row_counts_once_for_the_score_comparison() -> None:
    """Sticky routing over a finite replay set sends a canary the same rows every window; the
    score evidence must not grow from repeats (latency and errors still do: new requests)."""
    rng = np.random.default_rng(20)
    first = _window(rng, 5, 0.0, n=1200)
    keyed = {
        k: [
            Sample(s.t, s.label, s.code, s.latency_ms, s.scores, key=f"k{i}")
            for i, s in enumerate(v)
        ]
        for k, v in first.items()
    }
    again = {
        k: [Sample(s.t + 10, s.label, s.code, s.latency_ms, s.scores, key=s.key) for s in v]
        for k, v in keyed.items()
    }
    ev = sequential.update(sequential.new_state(), keyed, CFG)
    ev2 = sequential.update(json.loads(json.dumps(ev)), again, CFG)
    assert ev2["scores"]["pairs"] == ev["scores"]["pairs"] > 0
    assert ev2["latency"]["pairs"] > ev["latency"]["pairs"]
    assert ev2["canary_requests"] == 2 * ev["canary_requests"]


def test_one_slow_canary_replica_never_shows_the_version_worse() -> None:
    """An A/A canary whose first replica runs 1.5x slower (a starved process, the same bytes):
    the pooled latency test crosses its boundary, but the other canary replica's does not, so
    latency never shows the version worse. The analysis runs to the budget, where the pooled
    estimate (1.2, over the 1.15 margin) decides: the safe side when the evidence cannot tell a
    slow process from a slow version. The evidence names each replica."""
    state = _analyse(16, replicas=2, replica_factor={"canary-0": 1.5})
    lat = state["evidence"]["latency"]
    assert lat["worse"]["rejected_at"] is not None  # the pooled test alone would roll back
    assert state["reason"].startswith("budget of"), state["reason"]
    assert state["evidence"]["canary_requests"] >= CFG.max_canary_requests
    last = state["windows"][-1]["evidence"]["latency_vs_stable"]
    assert not last["worse"]
    reps = last["replicas"]
    assert set(reps) == {
        "canary canary-0",
        "canary canary-1",
        "baseline baseline-0",
        "baseline baseline-1",
    }
    assert (
        reps["canary canary-0"]["shown_at"] is not None and reps["canary canary-0"]["ratio"] > 1.3
    )
    assert reps["canary canary-1"]["shown_at"] is None and reps["canary canary-1"]["ratio"] < 1.1
    assert "canary canary-0 ratio" in state["reason"]


def test_one_fast_baseline_replica_never_shows_the_version_worse() -> None:
    state = _analyse(17, replicas=2, replica_factor={"baseline-1": 1 / 1.5})
    assert state["evidence"]["latency"]["worse"]["rejected_at"] is not None
    assert not state["windows"][-1]["evidence"]["latency_vs_stable"]["worse"]
    assert state["reason"].startswith("budget of"), state["reason"]


def test_a_slower_version_is_slower_on_every_replica_and_rolls_back() -> None:
    state = _analyse(18, c_ms=8.0 * 1.3, replicas=2)
    assert state["decision"] == "rollback", state["reason"]
    assert "latency_vs_stable" in state["reason"]
    reps = state["windows"][-1]["evidence"]["latency_vs_stable"]["replicas"]
    judged = [r for r in reps.values() if r["pairs"] >= CFG.replica_min_pairs]
    assert len(judged) == 4 and all(r["shown_at"] is not None for r in judged)


def test_a_replica_that_stopped_answering_no_longer_holds_the_rule_back() -> None:
    """A slower version whose canary-1 pod was replaced after two windows (its new pod answers
    under another name): the old name's test never crosses, and after RECENT_WINDOWS windows
    without it the others decide."""
    rng = np.random.default_rng(19)
    state, t = _state(), 0.0
    for i in range(40):
        w = _window(rng, 5, t, n=1200, c_ms=8.0 * 1.4, replicas=2)
        if i >= 2:  # canary-1 is gone; its requests now come from canary-2
            w["canary"] = [
                Sample(x.t, x.label, x.code, x.latency_ms, x.scores, replica="canary-2")
                if x.replica == "canary-1"
                else x
                for x in w["canary"]
            ]
        state = fold(state, w, CFG)
        t += 10.0
        if state["decision"]:
            break
    assert state["decision"] == "rollback" and "latency_vs_stable" in state["reason"]
    groups = state["evidence"]["latency"]["replicas"]
    assert groups["canary canary-1"]["worse"]["rejected_at"] is None  # it never crossed
    assert state["evidence"]["canary_requests"] < CFG.max_canary_requests  # not the budget


def _expecting(center: float) -> dict[str, Any]:
    """An analysis whose pair evaluation measured: P(candidate > champion) = ``center``."""
    state = empty_state()
    state["expected"] = {
        "champion_version": "1",
        "source": "evaluation",
        "p_superiority": center,
    }
    return state


def _shifted_center(shift: float, n: int = 20000) -> float:
    """What evaluation measures for a candidate whose scores are the champion's shifted by
    ``shift`` in logit, as :func:`_window` serves it."""
    from pipelines.evaluate.expected import p_superiority

    rng = np.random.default_rng(99)
    p = rng.beta(0.6, 20, n)
    moved = 1 / (1 + np.exp(-(np.log(p / (1 - p)) + shift)))
    return p_superiority(moved, rng.beta(0.6, 20, n))


def test_scores_that_moved_as_evaluated_promote_on_every_seed() -> None:
    """A retrained model's scores moved on purpose (P(candidate > champion) about 0.75, far
    outside 1/2 +- margin): judged against what evaluation measured for the pair, it is
    promoted; judged against 1/2 (no expectation) it would be rolled back."""
    center = _shifted_center(1.5)
    assert center - 0.5 > 2 * CFG.score_margin, center
    for seed in range(8):
        state = _analyse(200 + seed, start=_expecting(center), shift=1.5)
        assert state["decision"] == "promote", (seed, state["reason"])
        ev = state["windows"][-1]["evidence"]["score_drift"]
        assert ev["expected"] == center and abs(ev["p_superiority"] - center) < CFG.score_margin
        assert "expected" in state["reason"] and "(evaluation, vs v1)" in state["reason"]


def test_a_served_model_that_did_not_move_as_evaluated_rolls_back() -> None:
    """Evaluation expected the candidate's scores to move (a retrained model); the canary
    answers like the champion (a stale export or a version mix-up): rolled back on scores."""
    state = _analyse(210, start=_expecting(_shifted_center(1.5)), shift=0.0)
    assert state["decision"] == "rollback", state["reason"]
    assert "score_drift" in state["reason"], state["reason"]


def test_a_band_reaching_one_leaves_that_side_untested_and_still_promotes() -> None:
    """Evaluation expects P(candidate > champion) 0.966: expected + margin is past 1, where no
    canary can be shown worse nor needs showing within; the lower side still decides."""
    center = _shifted_center(5.0)
    assert center + CFG.score_margin > 1
    state = _analyse(230, start=_expecting(center), shift=5.0)
    assert state["decision"] == "promote", state["reason"]
    assert "that side untested" in state["reason"]
    stale = _analyse(231, start=_expecting(center), shift=0.0)
    assert stale["decision"] == "rollback" and "score_drift" in stale["reason"], stale["reason"]
