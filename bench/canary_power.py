"""Canary judge power: the sequential judge (the DAG's default), the windowed judge it replaced,
and a threshold-only judge with Flagger's defaults, on the same simulated traffic.

Simulated traffic, so thousands of canary analyses run in seconds with known ground truth.
Stable answers with a 0.3 % error rate, log-normal latency (median 8 ms) and fraud-like scores
(Beta(0.6, 20)). Requests arrive at ``canary.replay_rate`` (400/s) and are routed as Envoy does:
canary at the weight, baseline (stable's version on a pool shaped like the canary's) at
``min(w, 100 - w)``, stable the rest. Each analysis steps 5 -> 25 -> 50 -> 100 %; a window has as
many requests as the local replay sends (``requests_for``: 50 canary requests expected).
Scenarios: ``aa`` (canary = stable), ``aa_correlated`` (canary = stable, but both pools slow
down together in bursts, and requests come in sticky sessions so one pool can be the one
running when a burst hits), ``aa_slow_replica`` (canary = stable, but one of the canary's two
replicas runs 30 % slower throughout: a starved process, not a slower model), ``errors``
(stable 0.5 %, canary 2.5 %), ``latency`` (+20 %),
``scores`` (logit shifted by +0.7, with nothing expected of the pair: a drifted score),
``retrained_small`` and ``retrained_large`` (a retrained model whose scores moved by +0.7 and
+1.5 in logit, exactly as evaluation measured: the analysis holds that expected difference),
``stale_version`` (evaluation expected the +1.5 move, the canary serves the champion's scores: a
stale export or a version mix-up). An analysis may use at most ``canary.max_canary_requests``
(1,000) canary requests.

- ``sequential``: ``monitor.fold`` with the default settings (``canary.judge=sequential``,
  ``canary.alpha`` 0.002), ``sequential_pooled`` the same without the per-replica latency rule
  (``canary.replica_min_pairs`` out of reach: the pooled test alone), and ``sequential_a01``
  with ``canary.alpha`` 0.01 (more power, more false rollbacks);
- ``windowed``: ``monitor.fold`` with ``canary.judge=windowed`` (each window judged alone:
  critical checks roll back at once, 3 failed checks, 3 inconclusive windows), 50 canary
  requests a window, and ``windowed_n200`` with 200;
- ``flagger``: request success rate >= 99 % and request duration p99 <= 500 ms per window, a
  window with a failed metric is a failed check, roll back at ``threshold`` failed checks
  (Flagger's default 1; ``flagger_t5`` uses 5, the value of Flagger's documentation examples).

    .venv/bin/python bench/canary_power.py [--runs 200]

The last line printed is one JSON object: the DAG's judge's figures at the top level
(``aa_false_rollback``, ``aa_correlated_false_rollback``, ``aa_slow_replica_false_rollback``,
``power_errors_2pt``,
``power_latency_20pct``, ``power_scores_shift``, ``promote_retrained_small``,
``promote_retrained_large``, ``power_stale_version``, ``median_canary_requests_to_rollback_errors``,
``median_canary_requests_to_promote_aa``), the same figures for every judge under
``side_by_side``, and the per-scenario detail.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pipelines.config import CanarySettings
from pipelines.serving.canary import requests_for
from pipelines.serving.dataplane.evidence import Sample
from pipelines.serving.monitor import empty_state, fold

SCENARIOS = (
    "aa",
    "aa_correlated",
    "aa_slow_replica",
    "errors",
    "latency",
    "scores",
    "retrained_small",
    "retrained_large",
    "stale_version",
)
# The canary's logit shift per scenario, and the shift evaluation measured for the pair (the
# analysis is centred on that: ``monitor.canary_tick`` puts it in the state).
SERVED_SHIFT = {"scores": 0.7, "retrained_small": 0.7, "retrained_large": 1.5}
EXPECTED_SHIFT = {"retrained_small": 0.7, "retrained_large": 1.5, "stale_version": 1.5}
BASE_ERRORS, BASE_MS = 0.003, 8.0
ERRORS_STABLE, ERRORS_CANARY = 0.005, 0.025  # the issue's +2 points
# aa_correlated: bursts start at this rate, last this long on average, slow everything down by
# 1 + Exp(this); sessions of this many requests on average share one routing key (one pool).
BURST_RATE_S, BURST_MEAN_S, BURST_MEAN_EXTRA, SESSION_MEAN = 0.5, 0.8, 1.0, 8.0
WINDOW_GAP_S = 0.5
# Every pool has this many replicas, each request going to one at random (least request on
# equal replicas); aa_slow_replica: the canary's first replica runs this much slower for the
# whole analysis (a process starved on a busy node; the same bytes serve both pools), which
# puts the pooled canary/baseline ratio near the 1.11-1.15 CI saw in A/A analyses.
REPLICAS, SLOW_REPLICA = 2, 1.3
Result = tuple[bool, int]  # (rolled back, canary requests used)


def _labels(rng: np.random.Generator, n: int, weight: int, sessions: bool) -> np.ndarray:
    """Pool per request: 0 stable, 1 baseline, 2 canary."""
    p = np.array([100 - weight - min(weight, 100 - weight), min(weight, 100 - weight), weight])
    p = p / p.sum()
    if not sessions:
        return rng.choice(3, size=n, p=p)
    out = np.empty(n, dtype=int)
    i = 0
    while i < n:
        k = int(rng.geometric(1 / SESSION_MEAN))
        out[i : i + k] = rng.choice(3, p=p)
        i += k
    return out


def _slowdown(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """A machine-wide latency factor over the window's request times (bursts)."""
    f = np.ones_like(t)
    lo, hi = float(t.min()) - 3 * BURST_MEAN_S, float(t.max())
    start = lo
    while True:
        start += rng.exponential(1 / BURST_RATE_S)
        if start > hi:
            return f
        end = start + rng.exponential(BURST_MEAN_S)
        f[(t >= start) & (t < end)] *= 1 + rng.exponential(BURST_MEAN_EXTRA)


def _window(
    rng: np.random.Generator,
    cfg: CanarySettings,
    scenario: str,
    weight: int,
    t0: float,
    replicas: np.random.Generator,
) -> tuple[dict[str, list[Sample]], float]:
    """One window at ``weight`` starting at ``t0``, topped up (at most twice) until the canary
    has ``min_samples`` requests, as ``monitor.canary_tick`` replays: samples per pool, end."""
    out, t = _round(rng, cfg, scenario, weight, t0, replicas)
    for _ in range(2):
        if len(out["canary"]) >= cfg.min_samples:
            break
        more, t = _round(rng, cfg, scenario, weight, t, replicas)
        out = {k: out[k] + more[k] for k in out}
    return out, t + WINDOW_GAP_S


def _round(
    rng: np.random.Generator,
    cfg: CanarySettings,
    scenario: str,
    weight: int,
    t0: float,
    replicas: np.random.Generator,
) -> tuple[dict[str, list[Sample]], float]:
    n = requests_for(weight, cfg.min_samples)
    t = t0 + np.arange(n) / cfg.replay_rate
    pool = _labels(rng, n, weight, scenario == "aa_correlated")
    canary = pool == 2
    base_err = ERRORS_STABLE if scenario == "errors" else BASE_ERRORS
    err = np.where(canary & (scenario == "errors"), ERRORS_CANARY, base_err)
    ms = BASE_MS * np.where(canary & (scenario == "latency"), 1.2, 1.0)
    codes = np.where(rng.random(n) < err, 500, 200)
    lat = rng.lognormal(np.log(ms), 0.35, n)
    # Replicas come from a generator of their own, so the rest of the traffic is exactly what
    # it was before replicas were simulated (the same seeds give the same requests).
    replica = replicas.integers(REPLICAS, size=n)
    if scenario == "aa_slow_replica":
        lat = lat * np.where(canary & (replica == 0), SLOW_REPLICA, 1.0)
    if scenario == "aa_correlated":
        lat = lat * _slowdown(rng, t)
    p = rng.beta(0.6, 20, n)
    if scenario in SERVED_SHIFT:
        p = np.where(canary, _shift(p, SERVED_SHIFT[scenario]), p)
    names = ("stable", "baseline", "canary")
    out: dict[str, list[Sample]] = {k: [] for k in names}
    for ti, k, c, ms_i, s, r in zip(t, pool, codes, lat, p, replica, strict=True):
        out[names[k]].append(
            Sample(
                float(ti),
                names[k],
                int(c),
                float(ms_i),
                (float(s),) if c == 200 else (),
                replica=f"{names[k]}-{r}",
            )
        )
    return out, float(t[-1]) + 1 / cfg.replay_rate


def _shift(p: np.ndarray, logit: float) -> np.ndarray:
    return 1 / (1 + np.exp(-(np.log(p / (1 - p)) + logit)))


def expected_center(logit: float, n: int = 200_000) -> float:
    """P(candidate score > champion score) as evaluation measures it for a candidate whose
    scores are the champion's moved by ``logit`` (on its own large sample)."""
    from pipelines.evaluate.expected import p_superiority

    rng = np.random.default_rng(12345)
    return p_superiority(_shift(rng.beta(0.6, 20, n), logit), rng.beta(0.6, 20, n))


def _state(scenario: str = "aa") -> dict[str, Any]:
    state = empty_state()
    if scenario in EXPECTED_SHIFT:
        if scenario not in _CENTERS:
            _CENTERS[scenario] = expected_center(EXPECTED_SHIFT[scenario])
        state["expected"] = {
            "champion_version": "1",
            "source": "bench",
            "p_superiority": _CENTERS[scenario],
        }
    return state


_CENTERS: dict[str, float] = {}


def run_fold(seed: int, scenario: str, cfg: CanarySettings) -> Result:
    """One analysis by the controller's own state machine (``monitor.fold``)."""
    rng, replicas = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    state, t, used = _state(scenario), 0.0, 0
    while state["decision"] is None:
        window, t = _window(rng, cfg, scenario, cfg.steps[state["step"]], t, replicas)
        used += len(window["canary"])
        state = fold(state, window, cfg)
    return state["decision"] == "rollback", used


def run_flagger(seed: int, scenario: str, cfg: CanarySettings, threshold: int) -> Result:
    rng, replicas = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    failed, used, t = 0, 0, 0.0
    for weight in cfg.steps:
        window, t = _window(rng, cfg, scenario, weight, t, replicas)
        canary = window["canary"]
        used += len(canary)
        ok = [s.code == 200 for s in canary]
        lat = [s.latency_ms for s in canary]
        success = bool(canary) and sum(ok) / len(canary) >= 0.99
        fast = bool(lat) and float(np.percentile(lat, 99)) <= 500.0
        failed += int(not (success and fast))  # no data counts as a failed check
        if failed >= threshold:
            return True, used
    return False, used


def summarise(results: list[Result]) -> dict[str, Any]:
    back = [n for rolled, n in results if rolled]
    ahead = [n for rolled, n in results if not rolled]
    return {
        "rollback_rate": round(len(back) / len(results), 4),
        "median_canary_requests_to_rollback": int(np.median(back)) if back else None,
        "median_canary_requests_to_promote": int(np.median(ahead)) if ahead else None,
        "max_canary_requests": max(n for _, n in results),
    }


def headline(fig: dict[str, Any]) -> dict[str, Any]:
    """The issue's figures of one judge."""
    return {
        "aa_false_rollback": fig["aa"]["rollback_rate"],
        "aa_correlated_false_rollback": fig["aa_correlated"]["rollback_rate"],
        "aa_slow_replica_false_rollback": fig["aa_slow_replica"]["rollback_rate"],
        "power_errors_2pt": fig["errors"]["rollback_rate"],
        "power_latency_20pct": fig["latency"]["rollback_rate"],
        "power_scores_shift": fig["scores"]["rollback_rate"],
        "promote_retrained_small": round(1 - fig["retrained_small"]["rollback_rate"], 4),
        "promote_retrained_large": round(1 - fig["retrained_large"]["rollback_rate"], 4),
        "power_stale_version": fig["stale_version"]["rollback_rate"],
        "median_canary_requests_to_rollback_errors": fig["errors"][
            "median_canary_requests_to_rollback"
        ],
        "median_canary_requests_to_promote_aa": fig["aa"]["median_canary_requests_to_promote"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    # The judge the DAG runs (config's default) heads the line; the others are side by side.
    cfg = CanarySettings()
    t0 = time.perf_counter()
    windowed = cfg.model_copy(update={"judge": "windowed"})
    judges: dict[str, Callable[[int, str], Result]] = {
        "sequential": lambda seed, sc: run_fold(seed, sc, cfg),
        # The same judge without the per-replica rule: the pooled latency test alone.
        "sequential_pooled": lambda seed, sc: run_fold(
            seed, sc, cfg.model_copy(update={"replica_min_pairs": 10**9})
        ),
        "sequential_a01": lambda seed, sc: run_fold(
            seed, sc, cfg.model_copy(update={"alpha": 0.01})
        ),
        "windowed": lambda seed, sc: run_fold(seed, sc, windowed),
        "windowed_n200": lambda seed, sc: run_fold(
            seed, sc, windowed.model_copy(update={"min_samples": 200})
        ),
        "flagger": lambda seed, sc: run_flagger(seed, sc, cfg, 1),
        "flagger_t5": lambda seed, sc: run_flagger(seed, sc, cfg, 5),
    }
    detail: dict[str, Any] = {}
    for name, judge in judges.items():
        detail[name] = {sc: summarise([judge(s, sc) for s in range(args.runs)]) for sc in SCENARIOS}
        print(json.dumps({name: detail[name]}), flush=True)
    # A rollback rate on a bad canary counts only above the judge's own A/A rate: a judge that
    # rolls back half of all canaries "detects" half of everything.
    for name in judges:
        aa = detail[name]["aa"]["rollback_rate"]
        for sc in ("errors", "latency", "scores", "stale_version"):
            detail[name][sc]["power_above_aa"] = round(detail[name][sc]["rollback_rate"] - aa, 4)
    dag = cfg.judge
    top = headline(detail[dag])
    windowed_promote = headline(detail["windowed"])["median_canary_requests_to_promote_aa"]
    goals = {
        "aa_rates_le_1pct": top["aa_false_rollback"] <= 0.01
        and top["aa_correlated_false_rollback"] <= 0.01,
        "power_errors_2pt_ge_0.95": top["power_errors_2pt"] >= 0.95,
        "retrained_as_evaluated_promoted_ge_0.99": min(
            top["promote_retrained_small"], top["promote_retrained_large"]
        )
        >= 0.99,
        "power_stale_version_ge_0.95": top["power_stale_version"] >= 0.95,
        "median_rollback_errors_le_budget": (top["median_canary_requests_to_rollback_errors"] or 0)
        <= cfg.max_canary_requests,
        "aa_promotes_in_fewer_canary_requests_than_windowed": (
            top["median_canary_requests_to_promote_aa"] or 10**9
        )
        < (windowed_promote or 0),
    }
    figures = {
        "bench": "canary_power",
        "runs": args.runs,
        "judge": dag,
        "budget_canary_requests": cfg.max_canary_requests,
        **top,
        "goals": goals,
        "side_by_side": {name: headline(detail[name]) for name in judges},
        "detail": detail,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
