"""Canary monitoring as a resumable state machine: each call judges one window and returns.

State (weight step, window, failure counts, replay offset, judged windows, decision) lives in
``rollouts/<model>/<version>/canary.json`` in the store, written after every window, so the
Airflow sensor holds no worker slot between pokes and a crashed controller resumes where the
last judged window left it. A window in flight when the process died is simply judged again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import requests

from pipelines.config import Settings
from pipelines.registry import Registry
from pipelines.serving.canary import judge_window, requests_for
from pipelines.serving.client import serving_url
from pipelines.serving.export import to_instances
from pipelines.serving.rollout import (
    RolloutError,
    _held_out,
    _paths,
    _save_state,
    canary_state_key,
    current_entry,
    remote_router,
)
from pipelines.serving.router import LocalRouter, RouterClient
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


def router_client(settings: Settings) -> RouterClient:
    """The router in front of serving: the remote one, or the local one (started if needed)."""
    cfg = settings.canary
    if settings.serving.mode == "remote":
        return remote_router(settings)
    local = LocalRouter(
        settings.serving.base_dir,
        serving_url(settings),
        settings.mlflow.model_name,
        cfg.admin_token,
    )
    return RouterClient(
        local.ensure_running(settings.serving.host, cfg.router_port), cfg.admin_token
    )


def _replay(
    router_url: str,
    name: str,
    rows: list[tuple[str, dict[str, Any]]],
    n: int,
    rate: float,
    concurrency: int,
    start: int,
) -> int:
    """Send ``n`` held-out rows through the router at ``rate`` req/s; returns the next offset."""
    session_local = threading.local()

    def send(i: int) -> None:
        if not hasattr(session_local, "s"):
            session_local.s = requests.Session()
        key, inst = rows[(start + i) % len(rows)]
        try:
            session_local.s.post(
                f"{router_url}/v1/models/{name}:predict",
                json={"instances": [inst]},
                headers={"X-Request-Key": key},
                timeout=15,
            )
        except requests.RequestException:
            pass  # the router records backend failures; a dead router shows as no samples

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
    return start + n


def _replay_rows(settings: Settings, version: str) -> list[tuple[str, dict[str, Any]]]:
    """Held-out rows in a seeded order; request keys are salted by the seed, so each seed
    routes a different set of keys to the canary."""
    _, manifest, test, model = _held_out(settings, version)
    seed = settings.canary.seed
    keys = [f"{seed}:{k}" for k in test[manifest.data["key"]].astype(str)]
    rows = list(zip(keys, to_instances(test, model), strict=True))
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order]


def new_state(settings: Settings, version: str) -> dict[str, Any]:
    return {
        "version": str(version),
        "started": time.time(),
        "step": 0,
        "window": 0,
        "failed_checks": 0,
        "inconclusive_run": 0,
        "offset": 0,
        "window_start": None,
        "windows": [],
        "decision": None,
        "reason": None,
        "seed": settings.canary.seed,
    }


def _decide(state: dict[str, Any], decision: str, reason: str) -> None:
    state["decision"], state["reason"] = decision, reason


def canary_tick(settings: Settings, version: str) -> dict[str, Any]:
    """Judge the next window of the canary (or wait for it with live traffic); persist; return
    the state. ``state["decision"]`` is ``promote`` or ``rollback`` once the analysis ends."""
    cfg, name = settings.canary, settings.mlflow.model_name
    state = load_state(settings, version) or new_state(settings, version)
    if state["decision"]:
        return state
    entry = current_entry(settings)
    if entry is None or entry.labels.get("canary") != int(version):
        raise RolloutError(f"Version {version} is not staged as canary; run stage_canary first.")
    if entry.labels.get("stable") == int(version):
        _decide(state, "promote", "first deployment: no stable to compare against; smoke passed")
        return _finish(settings, version, state)
    if time.time() - state["started"] > cfg.timeout_s:
        _decide(state, "rollback", f"canary analysis timed out after {cfg.timeout_s:.0f} s")
        return _finish(settings, version, state)
    step = cfg.steps[state["step"]]
    try:
        router = router_client(settings)
        router.set(step)
        if cfg.replay:
            # Windows of N canary requests: sticky routing over a finite set of keys lands
            # near, not exactly at, the weight, so top up (at most twice) until N is reached.
            start = time.time()
            rows = _replay_rows(settings, version)
            for _ in range(3):
                state["offset"] = _replay(
                    router.url,
                    name,
                    rows,
                    requests_for(step, cfg.min_samples),
                    cfg.replay_rate,
                    cfg.replay_concurrency,
                    state["offset"],
                )
                window = router.window(start)
                if len(window["canary"]) >= cfg.min_samples:
                    break
        else:  # live traffic: a window is the time since it opened
            if state["window_start"] is None:
                state["window_start"] = time.time()
                _save(settings, version, state)
                return state
            if time.time() - state["window_start"] < cfg.window_seconds:
                return state
            window = router.window(state["window_start"])
    except (requests.RequestException, RolloutError, OSError) as exc:
        log.exception("canary monitoring failed")
        _decide(state, "rollback", f"monitoring failed at {step}%: {exc}")
        return _finish(settings, version, state)
    fold_window(state, window, step, settings)
    return _finish(settings, version, state)


def fold_window(
    state: dict[str, Any], window: dict[str, Any], step: int, settings: Settings
) -> None:
    """Judge one window and fold it into the state: counters, the next step, maybe a decision
    (the decision rules; ``bench/canary_power.py`` runs them on simulated traffic)."""
    cfg = settings.canary
    v = judge_window(window["canary"], window["stable"], cfg)
    state["windows"].append({"weight": step, **v.to_dict()})
    state["window_start"] = None
    log.info("canary weight %d%%: %s", step, v.explain())
    if v.outcome == "critical":
        _decide(state, "rollback", f"critical check failed at {step}%: {v.explain()}")
        return
    if v.outcome == "inconclusive":
        state["inconclusive_run"] += 1
        if state["inconclusive_run"] >= 3:
            _decide(state, "rollback", f"3 inconclusive windows in a row at {step}%")
        return  # judge the same step again
    state["inconclusive_run"] = 0
    state["failed_checks"] += sum(not c.passed for c in v.checks)
    if state["failed_checks"] >= cfg.failure_limit:
        _decide(
            state,
            "rollback",
            f"{state['failed_checks']} failed checks (limit {cfg.failure_limit}); "
            f"last window at {step}%: {v.explain()}",
        )
        return
    state["window"] += 1
    if state["window"] >= cfg.windows_per_step:
        state["window"], state["step"] = 0, state["step"] + 1
    if state["step"] >= len(cfg.steps):
        if v.outcome == "pass":
            _decide(state, "promote", f"every step passed ({state['failed_checks']} failed checks)")
        else:
            _decide(state, "rollback", f"the final window did not pass: {v.explain()}")


def _finish(settings: Settings, version: str, state: dict[str, Any]) -> dict[str, Any]:
    if state["decision"] == "rollback":
        try:
            _paths(settings)[2].set(0)  # stop canary traffic at once; labels move in rollback
        except (requests.RequestException, OSError) as exc:
            log.warning("could not zero the canary weight: %s", exc)
    _save(settings, version, state)
    if state["decision"]:
        verdict = verdict_of(state)
        store = open_store(settings.store)
        _save_state(store, settings, version, phase="judged", verdict=verdict)
        Registry(settings.mlflow).set_version_tags(
            version, {"canary_verdict": state["decision"], "canary_reason": state["reason"][:4000]}
        )
        log.info(
            "canary verdict for version %s: %s (%s)", version, state["decision"], state["reason"]
        )
    return state


def verdict_of(state: dict[str, Any]) -> dict[str, Any]:
    return {"decision": state["decision"], "reason": state["reason"], "windows": state["windows"]}


def monitor_canary(settings: Settings, version: str) -> dict[str, Any]:
    """Tick until a decision (the CLI and the demo; Airflow pokes :func:`canary_tick`)."""
    while True:
        state = canary_tick(settings, version)
        if state["decision"]:
            return verdict_of(state)
        if not settings.canary.replay:
            time.sleep(settings.canary.poke_interval_s)
