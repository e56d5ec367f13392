"""Canary judge power: our statistical judge vs a threshold-only judge with Flagger's defaults.

Simulated traffic, so thousands of canary analyses run in seconds with known ground truth.
Stable answers with a 0.3 % error rate, log-normal latency (median 8 ms) and fraud-like scores
(Beta(0.6, 20)). Each analysis steps the canary weight 5 -> 25 -> 50 -> 100 %; a window has as
many requests as the local replay sends (``requests_for``: 50 canary requests expected), split
by the weight. Scenarios: ``aa`` (canary = stable), ``errors`` (+2 points), ``latency``
(+20 %), ``scores`` (logit shifted by +0.7).

- ``ours``: ``judge_window`` and the controller's decision rules (``monitor.fold_window``:
  critical checks roll back at once, 3 failed checks roll back, 3 inconclusive windows too),
  with the default 50 canary requests a window, and ``ours_n200`` with 200;
- ``flagger``: request success rate >= 99 % and request duration p99 <= 500 ms per window, a
  window with a failed metric is a failed check, roll back at ``threshold`` failed checks
  (Flagger's default 1; ``flagger_t5`` uses 5, the value of Flagger's documentation examples).

Figures per judge and scenario: rollback rate, median requests to the rollback, and the power
above the judge's own A/A (false-rollback) rate; on ``aa`` the false-rollback rate.

    .venv/bin/python bench/canary_power.py [--runs 200]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from pipelines.config import CanarySettings
from pipelines.serving.canary import judge_window, requests_for
from pipelines.serving.dataplane.evidence import Sample
from pipelines.serving.monitor import advance

SCENARIOS = ("aa", "errors", "latency", "scores")
BASE_ERRORS, BASE_MS = 0.003, 8.0


def _side(rng: np.random.Generator, n: int, label: str, scenario: str) -> list[Sample]:
    canary = label == "canary"
    err = BASE_ERRORS + (0.02 if canary and scenario == "errors" else 0.0)
    ms = BASE_MS * (1.2 if canary and scenario == "latency" else 1.0)
    codes = np.where(rng.random(n) < err, 500, 200)
    lat = rng.lognormal(np.log(ms), 0.35, n)
    p = rng.beta(0.6, 20, n)
    if canary and scenario == "scores":
        p = 1 / (1 + np.exp(-(np.log(p / (1 - p)) + 0.7)))
    return [
        Sample(0.0, label, int(c), float(t), (float(s),) if c == 200 else ())
        for c, t, s in zip(codes, lat, p, strict=True)
    ]


def _window(
    rng: np.random.Generator, cfg: CanarySettings, scenario: str, weight: int
) -> tuple[int, dict[str, list[Sample]]]:
    """One window at ``weight``: its request count and the samples of both sides."""
    n = requests_for(weight, cfg.min_samples)
    nc = int(rng.binomial(n, weight / 100))
    return n, {
        "canary": _side(rng, nc, "canary", scenario),
        "stable": _side(rng, n - nc, "stable", scenario),
    }


def run_ours(seed: int, scenario: str, cfg: CanarySettings) -> tuple[bool, int]:
    rng = np.random.default_rng(seed)
    state: dict[str, Any] = {
        "step": 0,
        "window": 0,
        "failed_checks": 0,
        "inconclusive_run": 0,
        "windows": [],
        "decision": None,
    }
    sent = 0
    while state["decision"] is None:
        weight = cfg.steps[state["step"]]
        n, window = _window(rng, cfg, scenario, weight)
        sent += n
        state = advance(state, judge_window(window["canary"], window["stable"], cfg), cfg)
    return state["decision"] == "rollback", sent


def run_flagger(seed: int, scenario: str, cfg: CanarySettings, threshold: int) -> tuple[bool, int]:
    rng = np.random.default_rng(seed)
    failed, sent = 0, 0
    for weight in cfg.steps:
        n, window = _window(rng, cfg, scenario, weight)
        sent += n
        canary = window["canary"]
        ok = [s.code == 200 for s in canary]
        lat = [s.latency_ms for s in canary]
        success = bool(canary) and sum(ok) / len(canary) >= 0.99
        fast = bool(lat) and float(np.percentile(lat, 99)) <= 500.0
        failed += int(not (success and fast))  # no data counts as a failed check
        if failed >= threshold:
            return True, sent
    return False, sent


def summarise(results: list[tuple[bool, int]]) -> dict[str, Any]:
    hits = [sent for rolled, sent in results if rolled]
    return {
        "rollback_rate": round(len(hits) / len(results), 4),
        "median_requests_to_rollback": int(np.median(hits)) if hits else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    cfg = CanarySettings()
    t0 = time.perf_counter()
    figures: dict[str, Any] = {"bench": "canary_power", "runs": args.runs}
    big = cfg.model_copy(update={"min_samples": 200})
    judges = {
        "ours": lambda seed, sc: run_ours(seed, sc, cfg),
        "ours_n200": lambda seed, sc: run_ours(seed, sc, big),
        "flagger": lambda seed, sc: run_flagger(seed, sc, cfg, 1),
        "flagger_t5": lambda seed, sc: run_flagger(seed, sc, cfg, 5),
    }
    for name, judge in judges.items():
        figures[name] = {
            sc: summarise([judge(s, sc) for s in range(args.runs)]) for sc in SCENARIOS
        }
        print(json.dumps({name: figures[name]}), flush=True)
    # A rollback rate on a bad canary counts only above the judge's own A/A rate: a judge that
    # rolls back half of all canaries "detects" half of everything.
    for name in judges:
        aa = figures[name]["aa"]["rollback_rate"]
        for sc in SCENARIOS[1:]:
            figures[name][sc]["power_above_aa"] = round(figures[name][sc]["rollback_rate"] - aa, 4)
    figures["false_rollback_ours"] = figures["ours"]["aa"]["rollback_rate"]
    figures["false_rollback_flagger"] = figures["flagger"]["aa"]["rollback_rate"]
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
