"""How few canary requests could any judge need to promote a healthy (A/A) canary?

Runs the DAG's sequential judge (``monitor.fold``) on ``bench/canary_power.py``'s simulated A/A
traffic and, beside it on the same requests, an oracle for the "errors within margin" test:
Wald's SPRT of canary rate = stable's true rate against stable's true rate + ``error_margin``,
at the full ``promote_alpha``, knowing both rates. A judge promotes only when every metric is
within its margin, so the oracle's promotion point is the later of its own crossing (rounded up
to the end of a window, where the judge decides) and the judge's latency and score tests.

- ``median_judge``: the judge's median canary requests to promote;
- ``median_others``: when its latency and score "within" tests had all crossed;
- ``median_oracle``: the oracle errors test combined with those;
- ``binding``: how often each test was the last to cross in the judge's own analyses.

    .venv/bin/python bench/canary_oracle.py [--runs 200]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import canary_power as cp

from pipelines.config import CanarySettings
from pipelines.serving.monitor import fold, hold_step

NEVER = 10**9


def one(seed: int, cfg: CanarySettings) -> dict[str, int]:
    p = cp.BASE_ERRORS
    q = p + cfg.error_margin
    gain, cost = math.log((1 - p) / (1 - q)), math.log(q / p)
    bound = math.log(1 / cfg.promote_alpha)
    rng, replicas = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    state, t, used, log_e, oracle_at = cp._state(), 0.0, 0, 0.0, None

    def feed(window: dict) -> None:
        nonlocal used, log_e, oracle_at
        used += len(window["canary"])
        for s in window["canary"]:
            log_e += -cost if s.code != 200 else gain
        if oracle_at is None and log_e >= bound:
            oracle_at = used

    while state["decision"] is None:
        window, t = cp._window(rng, cfg, "aa", cfg.steps[state["step"]], t, replicas)
        feed(window)
        state = fold(state, window, cfg)
    judge = state["evidence"]["canary_requests"]
    while oracle_at is None:  # the judge decided first: the oracle goes on at the hold weight
        window, t = cp._window(rng, cfg, "aa", cfg.steps[hold_step(cfg)], t, replicas)
        feed(window)
    ev = state["evidence"]
    at = {
        "errors": ev["errors"]["within_at"],
        "latency": ev["latency"]["within"]["rejected_at"],
        "scores_above": ev["scores"]["within_above"]["rejected_at"],
        "scores_below": ev["scores"]["within_below"]["rejected_at"],
    }
    at = {k: NEVER if v is None else int(v) for k, v in at.items()}
    others = max(at["latency"], at["scores_above"], at["scores_below"])
    return {"judge": judge, "others": others, "oracle": max(others, oracle_at), **at}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    cfg = CanarySettings()
    rows = [one(seed, cfg) for seed in range(args.runs)]

    def med(key: str) -> float:
        return float(np.median([r[key] for r in rows]))

    tests = ("errors", "latency", "scores_above", "scores_below")
    binding = {k: 0 for k in tests}
    for r in rows:
        binding[max(tests, key=lambda k: r[k])] += 1
    out = {
        "bench": "canary_oracle",
        "runs": args.runs,
        "stable_error_rate": cp.BASE_ERRORS,
        "error_margin": cfg.error_margin,
        "promote_alpha": cfg.promote_alpha,
        "median_judge": med("judge"),
        "median_judge_errors_within": med("errors"),
        "median_others": med("others"),
        "median_oracle": med("oracle"),
        "binding": binding,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
