"""Canary monitoring as a resumable state machine: each call judges one window and returns.

The decision rules are a pure function, :func:`fold` ``(state, window, settings) -> state``:
the sequential judge (:func:`advance_sequential`, evidence accumulated over the analysis) or the
windowed one (:func:`advance`); :func:`canary_tick` does the I/O around it: set the split,
send (or wait for) a window of traffic, read the window from the data plane's access log, judge
it, persist. State (weight step, window, failure counts, replay offset, judged windows, the
sequential evidence, decision) lives in ``rollouts/<model>/<version>/canary.json``, written
after every window, so the Airflow sensor holds no worker slot between pokes and a crashed
controller resumes where the last judged window left it, its evidence intact. A window in
flight when the process died is simply judged again.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import requests

from pipelines.config import CanarySettings, Settings
from pipelines.registry import Registry
from pipelines.serving import sequential
from pipelines.serving.canary import (
    Check,
    WindowVerdict,
    critical_checks,
    judge_window,
    p99_check,
    requests_for,
)
from pipelines.serving.client import ServingUnavailable
from pipelines.serving.control import ServingControl, labels_of
from pipelines.serving.dataplane.evidence import Sample, by_label
from pipelines.serving.dataplane.split import Split
from pipelines.serving.rollout import RolloutError, canary_state_key, held_out, save_state
from pipelines.store import open_store

log = logging.getLogger(__name__)


def load_state(settings: Settings, version: str) -> dict[str, Any] | None:
    store = open_store(settings.store)
    key = canary_state_key(settings, version)
    return dict(json.loads(store.read_text(key))) if store.exists(key) else None


def _save(settings: Settings, version: str, state: dict[str, Any]) -> None:
    state["updated"] = time.time()
    open_store(settings.store).write_text(
        canary_state_key(settings, version), json.dumps(state, indent=2)
    )


def replay(
    url: str,
    name: str,
    rows: list[tuple[str, dict[str, Any]]],
    n: int,
    rate: float,
    concurrency: int,
    start: int,
    fresh_keys: bool = True,
) -> tuple[int, set[str]]:
    """Send ``n`` held-out rows through the data plane at ``rate`` req/s, each with its own
    ``X-Request-Id``; returns the next offset and the ids sent.

    With ``fresh_keys`` each replayed request is routed as a new user (its routing key is the
    row's key and its offset in the replay): sticky routing over a few thousand rows would give
    the canary a fixed ~5 % of them for the whole analysis, and rows differ in cost (payload
    size), so an A/A canary measured 10 % slower than its baseline on its own rows and was
    rolled back on latency. Without, the key is the row's own (traffic whose late labels are
    joined back by key)."""
    session_local = threading.local()
    ids = [uuid.uuid4().hex for _ in range(n)]

    def send(i: int) -> None:
        if not hasattr(session_local, "s"):
            session_local.s = requests.Session()
            # The local plane's loopback address: no proxy or netrc lookups per request.
            session_local.s.trust_env = False
        key, inst = rows[(start + i) % len(rows)]
        try:
            session_local.s.post(
                f"{url}/v1/models/{name}:predict",
                json={"instances": [inst]},
                headers={
                    "X-Request-Key": f"{key}@{start + i}" if fresh_keys else key,
                    "X-Request-Id": ids[i],
                },
                timeout=15,
            )
        except requests.RequestException:
            pass  # the access log records what the plane answered; a dead plane shows as none

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = []
        for i in range(n):
            wait = t0 + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            futures.append(pool.submit(send, i))
        for f in futures:
            f.result()
    return start + n, set(ids)


def replay_rows(settings: Settings, version: str) -> list[tuple[str, dict[str, Any]]]:
    """Held-out rows in a seeded order; request keys are salted by the seed, so each seed
    routes a different set of keys to the canary."""
    from pipelines.serving.export import to_instances  # torch: only where rows are replayed

    _, manifest, test, model = held_out(settings, version)
    seed = settings.canary.seed
    keys = [f"{seed}:{k}" for k in test[manifest.data["key"]].astype(str)]
    rows = list(zip(keys, to_instances(test, model), strict=True))
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order]


def empty_state(version: str = "", seed: int = 0, started: float = 0.0) -> dict[str, Any]:
    """An analysis before its first window (the bench and the tests fold windows into it)."""
    return {
        "version": str(version),
        "started": started,
        "step": 0,
        "window": 0,
        "failed_checks": 0,
        "inconclusive_run": 0,
        "offset": 0,
        "window_start": None,
        "windows": [],
        "evidence": None,
        "ramped": False,
        "decision": None,
        "reason": None,
        "seed": seed,
        "expected": None,  # evaluation's expected difference of the pair (see canary_tick)
    }


def new_state(settings: Settings, version: str) -> dict[str, Any]:
    return empty_state(version, settings.canary.seed, time.time())


def _decided(state: dict[str, Any], decision: str, reason: str) -> dict[str, Any]:
    return {**state, "decision": decision, "reason": reason}


def advance(state: dict[str, Any], verdict: WindowVerdict, cfg: CanarySettings) -> dict[str, Any]:
    """The decision rules: fold one judged window into a new state (the input is unchanged):
    the next step, or a decision. ``bench/canary_power.py`` runs them on simulated traffic."""
    step = cfg.steps[state["step"]]
    out = copy.deepcopy(state)
    out["windows"].append({"weight": step, **verdict.to_dict(), "explain": verdict.explain()})
    out["window_start"] = None
    if verdict.outcome == "critical":
        return _decided(out, "rollback", f"critical check failed at {step}%: {verdict.explain()}")
    if verdict.outcome == "inconclusive":
        out["inconclusive_run"] += 1
        if out["inconclusive_run"] >= 3:
            return _decided(out, "rollback", f"3 inconclusive windows in a row at {step}%")
        return out  # judge the same step again
    out["inconclusive_run"] = 0
    out["failed_checks"] += sum(not c.passed for c in verdict.checks)
    if out["failed_checks"] >= cfg.failure_limit:
        return _decided(
            out,
            "rollback",
            f"{out['failed_checks']} failed checks (limit {cfg.failure_limit}); "
            f"last window at {step}%: {verdict.explain()}",
        )
    out["window"] += 1
    if out["window"] >= cfg.windows_per_step:
        out["window"], out["step"] = 0, out["step"] + 1
    if out["step"] >= len(cfg.steps):
        if verdict.outcome == "pass":
            return _decided(
                out, "promote", f"every step passed ({out['failed_checks']} failed checks)"
            )
        return _decided(out, "rollback", f"the final window did not pass: {verdict.explain()}")
    return out


def judge(window: dict[str, list[Sample]], cfg: CanarySettings) -> WindowVerdict:
    """One window's verdict. Latency against baseline, the stable version on a pool of the
    canary's size at its weight (see ``dataplane.envoy.POOLS``), so warm-vs-cold load does not
    read as a regression; errors and scores against every request the stable version answered."""
    stable = window["stable"] + window["baseline"]
    return judge_window(window["canary"], stable, cfg, baseline=window["baseline"])


def hold_step(cfg: CanarySettings) -> int:
    """The step the sequential judge stays at, once the ramp is walked, until it decides: the
    lowest weight below 100 %. The budget counts exposed canary requests, and a low weight buys
    the most comparison per canary request: at 5 % each canary error or score is weighed against
    about 19 stable ones, at 50 % against one (a 100 % step has no stable traffic at all)."""
    below = [i for i, w in enumerate(cfg.steps) if w < 100]
    return min(below, key=lambda i: cfg.steps[i]) if below else len(cfg.steps) - 1


def _next_step(state: dict[str, Any], cfg: CanarySettings) -> int:
    """Up the ramp one step at a time (steps below 100 %), then :func:`hold_step`."""
    nxt = state["step"] + 1
    if not state.get("ramped") and nxt < len(cfg.steps) and cfg.steps[nxt] < 100:
        return nxt
    state["ramped"] = True
    return hold_step(cfg)


def advance_sequential(
    state: dict[str, Any], window: dict[str, list[Sample]], cfg: CanarySettings
) -> dict[str, Any]:
    """The sequential judge's rules: fold one window into the analysis' evidence, then decide.

    Critical checks roll back at once; so does any comparison shown worse (anytime-valid, the
    analysis' false-rollback rate <= ``alpha``). Every comparison shown within its margin
    promotes, at any step. Otherwise the weight walks the steps below 100 %
    (``windows_per_step`` windows each), then holds at :func:`hold_step`; at
    ``max_canary_requests`` the point estimates decide: promote only if every one is within its
    margin (a metric not judged is not within).
    """
    step = cfg.steps[state["step"]]
    out = copy.deepcopy(state)
    evidence = sequential.update(out.get("evidence") or _evidence(out), window, cfg)
    out["evidence"] = evidence
    out["window_start"] = None
    canary = window["canary"]
    checks = critical_checks(canary, cfg)
    lat = np.array([s.latency_ms for s in canary if s.code == 200])
    if len(lat):
        checks.append(p99_check(lat, cfg))
    found = sequential.findings(evidence, cfg)
    checks += [Check(f.name, not f.worse, detail=f.detail) for f in found]
    small = len(canary) < cfg.min_samples
    if small:
        checks.insert(
            0,
            Check(
                "samples",
                False,
                detail=f"{len(canary)} canary requests < "
                f"{cfg.min_samples} (folded into the evidence)",
            ),
        )
    passed = sum(c.passed for c in checks)
    if any(c.critical and not c.passed for c in checks):
        outcome = "critical"
    elif small:
        outcome = "inconclusive"
    else:
        outcome = "pass" if passed == len(checks) else "fail"
    verdict = WindowVerdict(
        outcome,
        100.0 * passed / len(checks),
        checks,
        len(canary),
        len(window["stable"]) + len(window["baseline"]),
    )
    n = evidence["canary_requests"]
    out["windows"].append(
        {
            "weight": step,
            **verdict.to_dict(),
            "explain": f"{verdict.explain()} [{n} canary requests so far]",
            "evidence": {f.name: {"worse": f.worse, "within": f.within, **f.data} for f in found},
        }
    )
    if outcome == "critical":
        return _decided(out, "rollback", f"critical check failed at {step}%: {verdict.explain()}")
    worse = [f for f in found if f.worse]
    if worse:
        return _decided(
            out,
            "rollback",
            f"worse than stable after {n} canary requests (anytime-valid, alpha "
            f"{cfg.alpha:g}) at {step}%: " + "; ".join(f"{f.name}: {f.detail}" for f in worse),
        )
    if small:
        out["inconclusive_run"] += 1
        if out["inconclusive_run"] >= 3:
            return _decided(out, "rollback", f"3 inconclusive windows in a row at {step}%")
    else:
        out["inconclusive_run"] = 0
    out["failed_checks"] += sum(c.name == "p99_latency" and not c.passed for c in checks)
    if out["failed_checks"] >= cfg.failure_limit:
        return _decided(
            out, "rollback", f"p99 over {cfg.max_p99_ms:.0f} ms in {out['failed_checks']} windows"
        )
    explained = "; ".join(f"{f.name}: {f.detail}" for f in found)
    if all(f.within for f in found):
        return _decided(
            out,
            "promote",
            f"within every margin after {n} canary requests (promote alpha "
            f"{cfg.promote_alpha:g}) at {step}%: {explained}",
        )
    if n >= cfg.max_canary_requests:
        off = [f.name for f in found if f.estimate_ok is not True]
        if off:
            return _decided(
                out,
                "rollback",
                f"budget of {cfg.max_canary_requests} canary requests spent ({n}) with "
                f"{', '.join(off)} not within margin (or not judged): {explained}",
            )
        return _decided(
            out,
            "promote",
            f"budget of {cfg.max_canary_requests} canary requests spent ({n}); nothing shown "
            f"worse and every estimate within its margin: {explained}",
        )
    if not small:
        out["window"] += 1
        if out["window"] >= cfg.windows_per_step:
            out["window"], out["step"] = 0, _next_step(out, cfg)
    return out


def _evidence(state: dict[str, Any]) -> dict[str, Any]:
    """The sequential evidence of an analysis before its first window: the score test centred
    on the expected difference the analysis holds (1/2, one model against itself, when none)."""
    exp = state.get("expected")
    if not exp:
        return sequential.new_state()
    return sequential.new_state(
        exp["p_superiority"], f"{exp['source']}, vs v{exp['champion_version']}"
    )


def expected_summary(expected: dict[str, Any]) -> dict[str, Any]:
    """What the analysis keeps of the expected difference (the report has the whole)."""
    keep = (
        "champion_version",
        "source",
        "rows",
        "agreement",
        "p_superiority",
        "rank_correlation",
        "flag_rate",
    )
    return {k: expected.get(k) for k in keep} | {
        "abs_diff_p99": (expected.get("abs_diff") or {}).get("p99")
    }


def fold(
    state: dict[str, Any], window: dict[str, list[Sample]], cfg: CanarySettings
) -> dict[str, Any]:
    """The state machine, pure: ``(state, window, settings) -> state``, with the judge that
    ``cfg.judge`` names."""
    if cfg.judge == "windowed":
        return advance(state, judge(window, cfg), cfg)
    return advance_sequential(state, window, cfg)


def canary_tick(settings: Settings, control: ServingControl, version: str) -> dict[str, Any]:
    """Judge the next window of the canary (or wait for it with live traffic); persist; return
    the state. ``state["decision"]`` is ``promote`` or ``rollback`` once the analysis ends."""
    cfg, name = settings.canary, settings.mlflow.model_name
    state = load_state(settings, version) or new_state(settings, version)
    if state["decision"]:
        return state
    labels = labels_of(control)
    if labels.get("canary") != int(version):
        raise RolloutError(f"Version {version} is not staged as canary; run stage_canary first.")
    if labels.get("stable") == int(version):
        state = _decided(state, "promote", "first deployment: no stable to compare against")
        return _finish(settings, control, version, state)
    if state.get("expected") is None and not state["windows"]:
        # Fixed for the whole analysis (a resumed one reads it back from its state): the
        # score test is anytime-valid only against a null chosen before its first window.
        from pipelines.serving.expectation import expectation

        try:
            expected = expectation(settings, version, str(labels["stable"]))
        except Exception as exc:
            # Without it the canary cannot tell a move it was meant to make from a regression:
            # the safe side, as the shadow stage does when it cannot measure.
            log.exception("no expected difference for version %s", version)
            state = _decided(state, "rollback", f"no expected difference for the pair: {exc}")
            return _finish(settings, control, version, state)
        state["expected"] = expected_summary(expected)
        _save(settings, version, state)
    if time.time() - state["started"] > cfg.timeout_s:
        state = _decided(
            state, "rollback", f"canary analysis timed out after {cfg.timeout_s:.0f} s"
        )
        return _finish(settings, control, version, state)
    step = cfg.steps[state["step"]]
    try:
        control.ensure_running()  # a data plane that died is restarted at the stored split
        control.set_split(Split(step))
        if cfg.replay:
            # Windows of N canary requests: sticky routing over a finite set of keys lands
            # near, not exactly at, the weight, so top up (at most twice) until N is reached.
            start = time.time()
            rows = replay_rows(settings, version)
            sent: set[str] = set()
            for _ in range(3):
                state["offset"], ids = replay(
                    control.endpoint(),
                    name,
                    rows,
                    requests_for(step, cfg.min_samples),
                    cfg.replay_rate,
                    cfg.replay_concurrency,
                    state["offset"],
                )
                sent |= ids
                window = by_label(control.window(start, request_ids=sent))
                if len(window["canary"]) >= cfg.min_samples:
                    break
        else:  # live traffic: a window is the time since it opened
            if state["window_start"] is None:
                state["window_start"] = time.time()
                _save(settings, version, state)
                return state
            if time.time() - state["window_start"] < cfg.window_seconds:
                return state
            window = by_label(control.window(state["window_start"]))
    except (requests.RequestException, RolloutError, ServingUnavailable, OSError) as exc:
        log.exception("canary monitoring failed")
        state = _decided(state, "rollback", f"monitoring failed at {step}%: {exc}")
        return _finish(settings, control, version, state)
    state = fold(state, window, cfg)
    log.info("canary weight %d%%: %s", step, state["windows"][-1]["explain"])
    return _finish(settings, control, version, state)


def _finish(
    settings: Settings, control: ServingControl, version: str, state: dict[str, Any]
) -> dict[str, Any]:
    if state["decision"] == "rollback":
        try:
            control.set_split(Split(0))  # stop canary traffic at once; labels move in rollback
        except (requests.RequestException, OSError, ServingUnavailable) as exc:
            log.warning("could not zero the canary weight: %s", exc)
    _save(settings, version, state)
    if state["decision"]:
        verdict = verdict_of(state)
        save_state(open_store(settings.store), settings, version, phase="judged", verdict=verdict)
        tags = {"canary_verdict": state["decision"], "canary_reason": state["reason"][:4000]}
        if state.get("evidence"):
            tags["canary_judge"] = "sequential"
            tags["canary_requests"] = str(state["evidence"]["canary_requests"])
        Registry(settings.mlflow).set_version_tags(version, tags)
        log.info(
            "canary verdict for version %s: %s (%s)", version, state["decision"], state["reason"]
        )
    return state


def decide_early(
    settings: Settings, control: ServingControl, version: str, decision: str, reason: str
) -> dict[str, Any]:
    """Decide the analysis before its first window (the shadow stage stopped the rollout)."""
    state = load_state(settings, version) or new_state(settings, version)
    return _finish(settings, control, version, _decided(state, decision, reason))


def verdict_of(state: dict[str, Any]) -> dict[str, Any]:
    return {"decision": state["decision"], "reason": state["reason"], "windows": state["windows"]}


def monitor_canary(settings: Settings, control: ServingControl, version: str) -> dict[str, Any]:
    """Tick until a decision (the CLI and the demo; Airflow pokes :func:`canary_tick`)."""
    while True:
        state = canary_tick(settings, control, version)
        if state["decision"]:
            return verdict_of(state)
        if not settings.canary.replay:
            time.sleep(settings.canary.poke_interval_s)
