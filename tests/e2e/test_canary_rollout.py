"""Canary rollouts end to end on real components: Envoy in front of two local
TF-Serving-compatible replicas per label, real SavedModels, MLflow aliases, replayed held-out
traffic judged from Envoy's access log.

One model is trained and deployed as ``stable`` (and ``champion``) once for the module; each test
then stages a new version of it as the canary: an identical copy (A/A, crash-resume), or a
copy doctored in its SavedModel graph to answer NaN, to be slow, or to shift its scores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from pipelines import stages
from pipelines.config import Settings, with_overrides
from pipelines.data import layout
from pipelines.registry import CHALLENGER, CHAMPION, Registry
from pipelines.serving import monitor
from pipelines.serving.daemon import stop_all
from pipelines.serving.rollout import canary_state_key
from pipelines.store import open_store
from tests.envoy_helpers import kill_envoy
from tests.model_helpers import home_settings
from tests.ports import FREE_PORTS
from tests.serving_helpers import doctored_saved_model

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ENV = {
    **FREE_PORTS,
    "MLOPS__CANARY__REPLAY_RATE": "500",
    "MLOPS__CANARY__REPLAY_CONCURRENCY": "8",
    "MLOPS__TRAIN__NODES": "1",
    "MLOPS__TRAIN__EPOCHS": "3",
}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """v1 trained, registered, exported, staged and promoted: stable, canary and champion."""
    home = tmp_path_factory.mktemp("canary") / "mlops"
    with home_settings(home, ENV) as s:
        try:
            stages.generate_data(s, "2026-11-01", rows=6000)
            stages.validate_data(s, "2026-11-01")
            manifest = stages.shard_data(s, "2026-11-01")["manifest_uri"]
            run_id = stages.train(s, manifest)["run_id"]
            assert stages.evaluate(s, run_id)["blessed"]
            v1 = stages.register(s, run_id)["model_version"]
            stages.export_and_infra_validate(s, v1)
            stages.stage_canary(s, v1)
            assert stages.monitor_canary(s, v1)["decision"] == "promote"
            stages.promote(s, v1)
            yield {"settings": s, "run_id": run_id, "v1": v1, "home": home}
        finally:
            stop_all(home / "serving")


def new_version(deployed: dict[str, Any], kind: str = "same") -> str:
    """Another registered version of the deployed run, exported as-is or doctored; its
    ``export.json`` records the served bytes' sha256, as the export stage does."""
    import tempfile

    from pipelines.evaluate.run import load_run_model
    from pipelines.serving.export import export_saved_model
    from pipelines.serving.rollout import _tree_sha256

    s, run_id = deployed["settings"], deployed["run_id"]
    reg, store, name = Registry(s.mlflow), open_store(s.store), s.mlflow.model_name
    mv = reg.client.create_model_version(
        name, source=f"runs:/{run_id}/model", run_id=run_id, tags={"mlops.test_kind": kind}
    )
    version = str(mv.version)
    reg.set_alias(CHALLENGER, version)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "saved_model"
        if kind == "same":
            store.get_dir(f"{layout.export(name, deployed['v1'])}/saved_model", out)
        elif kind == "skew":  # the export drill's fault (serving.inject_export_skew)
            export_saved_model(load_run_model(reg, run_id), out, unit_skew=True)
        else:
            doctored_saved_model(load_run_model(reg, run_id), out, kind)
        store.put_dir(out, f"{layout.export(name, version)}/saved_model")
        meta = {"version": version, "run_id": run_id, "files": _tree_sha256(out)}
        store.write_text(f"{layout.export(name, version)}/export.json", json.dumps(meta))
    return version


def serving_snapshot(s: Settings) -> dict[str, Any]:
    state = stages.serving_state(s)
    return {"labels": state["labels"], "weight": state["canary_weight"]}


def walked_the_ramp(verdict: dict[str, Any], cfg: Any) -> bool:
    """The weights the analysis judged windows at, as the configured judge walks them: the
    windowed judge every step once (5, 25, 50, 100); the sequential judge up the steps below
    100 % (5, 25, 50), then holding at the lowest (5) until it decides."""
    weights = [w["weight"] for w in verdict["windows"]]
    if cfg.judge == "windowed":
        return weights == list(cfg.steps)
    ramp = [w for w in cfg.steps if w < 100]
    head = weights[: len(ramp)]
    return head == ramp[: len(head)] and all(w == min(ramp) for w in weights[len(ramp) :])


# A plumbing test's canary budget (the statistical tests keep the shipped one): an analysis
# that carries on after its controller, Envoy or a replica was killed needs windows on both
# sides of the kill, not a thousand canary requests.
PLUMBING_BUDGET = 300


def a_a_verdict_ok(verdict: dict[str, Any]) -> bool:
    """An A/A analysis promotes, or (issue #14, open) is rolled back on latency alone: on this
    2-core machine one pool's replica processes can run slower than the other's for minutes
    (CI: ratios 1.11-1.15 against the baseline pool, same SavedModel bytes), and the judge
    cannot tell a slow pool from a slow model. Errors and scores must never roll it back."""
    if verdict["decision"] == "promote":
        return True
    reason = verdict["reason"]
    latency_alone = "errors_vs_stable:" not in reason and "score_drift:" not in reason
    if reason.startswith("budget of"):  # the budget spent with latency alone off its margin
        return "with latency_vs_stable not within" in reason and latency_alone
    return (
        reason.startswith("worse than stable") and "latency_vs_stable" in reason and latency_alone
    )


def canary_then_decide(s: Settings, version: str) -> dict[str, Any]:
    stages.stage_canary(s, version)
    verdict = monitor.monitor_canary(s, stages.serving_control(s), version)
    if verdict["decision"] == "promote":
        stages.promote(s, version)
    else:
        stages.rollback(s, version, verdict["reason"])
    return verdict


@pytest.mark.parametrize(
    ("kind", "failed_check"),
    [("nan", "finite_outputs"), ("slow", "latency_vs_stable"), ("skew", "score_drift")],
)
def test_a_bad_canary_is_rolled_back_and_nothing_else_moves(
    deployed: dict[str, Any], kind: str, failed_check: str
) -> None:
    s = deployed["settings"]
    reg = Registry(s.mlflow)
    champion, before = reg.alias_version(CHAMPION), serving_snapshot(s)
    version = new_version(deployed, kind)
    verdict = canary_then_decide(s, version)
    assert verdict["decision"] == "rollback", verdict["reason"]
    failed = {c["name"] for w in verdict["windows"] for c in w["checks"] if not c["passed"]}
    assert failed_check in failed, verdict["reason"]
    assert reg.alias_version(CHAMPION) == champion
    assert reg.alias_version(CHALLENGER) is None
    assert serving_snapshot(s) == before
    assert reg.version(version).tags["mlops.rollout"] == "rolled_back"


# 20 analyses of several thousand replayed requests each: about 12 minutes here, so more than
# the suite's 15-minute default on a busier machine.
@pytest.mark.timeout(2400)
def test_a_a_canary_is_never_shown_worse_over_20_seeds(deployed: dict[str, Any]) -> None:
    """The same model as canary and stable: 20 full analyses, each with its own replay order
    and routing salt. None is rolled back by an anytime-valid test or a critical check. On this
    2-core machine the canary's and the baseline's replicas are different processes, and one
    of them can run slower for part of an analysis: before latency was judged per replica too,
    CI rolled back 1 of 20 that way (e=6,590 against the 1,500 boundary) and, in a later run,
    2 of 20 (e=3,130 at 174 canary requests). A slow process that lasts the whole analysis can
    still leave the pooled latency estimate over its margin at the budget, where the judge
    takes the safe side: at most two such budget rollbacks, on latency alone, are accepted, and
    each is reported as a warning (20 of 20 promoted in this session's run)."""
    s = deployed["settings"]
    version = new_version(deployed, "same")
    stages.stage_canary(s, version)
    store = open_store(s.store)
    outcomes = []
    try:
        for seed in range(20):
            store.delete(canary_state_key(s, version))
            seeded = with_overrides(s, canary={"seed": seed})
            verdict = monitor.monitor_canary(seeded, stages.serving_control(seeded), version)
            failed = [
                (w["weight"], c["name"], c["detail"])
                for w in verdict["windows"]
                for c in w["checks"]
                if not c["passed"]
            ]
            outcomes.append((seed, verdict["decision"], verdict["reason"], failed))
            assert walked_the_ramp(verdict, s.canary), [w["weight"] for w in verdict["windows"]]
    finally:  # the module's next tests start from a clean serving state, whatever happened
        stages.rollback(s, version, "A/A test done")
    rolled_back = [o for o in outcomes if o[1] != "promote"]
    if rolled_back:
        warnings.warn(f"A/A: {len(rolled_back)} of 20 rolled back: {rolled_back}", stacklevel=1)
    assert len(rolled_back) <= 2, rolled_back
    for _, _, reason, _ in rolled_back:
        # latency alone off its margin at the budget: nothing shown worse, errors and scores fine
        assert reason.startswith("budget of") and "with latency_vs_stable not within" in reason


def test_a_killed_controller_resumes_from_its_last_window(deployed: dict[str, Any]) -> None:
    s = with_overrides(deployed["settings"], canary={"max_canary_requests": PLUMBING_BUDGET})
    version = new_version(deployed, "same")
    stages.stage_canary(s, version)
    store, key = open_store(s.store), canary_state_key(s, version)
    code = (
        "from pipelines import stages\nfrom pipelines.config import settings\n"
        f"while not stages.canary_tick(settings(), {version!r})['done']: pass\n"
    )
    budget = {"MLOPS__CANARY__MAX_CANARY_REQUESTS": str(PLUMBING_BUDGET)}
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **budget})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if store.exists(key) and len(json.loads(store.read_text(key))["windows"]) >= 1:
                break
            time.sleep(0.05)
        time.sleep(0.2)  # inside the next window's replay
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    crashed = json.loads(store.read_text(key))
    assert crashed["decision"] is None and len(crashed["windows"]) >= 1
    # A new controller picks the state up.
    verdict = monitor.monitor_canary(s, stages.serving_control(s), version)
    if verdict["decision"] != "promote":
        stages.rollback(s, version, verdict["reason"])  # the next tests start clean
    assert a_a_verdict_ok(verdict), verdict["reason"]
    assert walked_the_ramp(verdict, s.canary)
    assert verdict["windows"][: len(crashed["windows"])] == crashed["windows"]
    if verdict["decision"] == "promote":
        stages.promote(s, version)
        assert Registry(s.mlflow).alias_version(CHAMPION) == version
        assert serving_snapshot(s)["labels"] == {"stable": int(version), "canary": int(version)}


def test_a_stable_replica_killed_mid_canary_costs_no_request_and_the_a_a_canary_passes(
    deployed: dict[str, Any],
) -> None:
    s = with_overrides(deployed["settings"], canary={"max_canary_requests": PLUMBING_BUDGET})
    control = stages.serving_control(s)
    version = new_version(deployed, "same")
    stages.stage_canary(s, version)
    result: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: result.update(monitor.monitor_canary(s, control, version)), daemon=True
    )
    worker.start()
    store, key = open_store(s.store), canary_state_key(s, version)
    while not (store.exists(key) and json.loads(store.read_text(key))["windows"]):
        time.sleep(0.05)
    time.sleep(0.3)  # inside the next window's replay
    victim = control.plane.replica_pid("stable-0")
    assert victim is not None
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    worker.join(timeout=300)
    assert not worker.is_alive(), "the canary hung after a replica died"
    try:
        assert a_a_verdict_ok(result), result["reason"]
        settle = killed_at + 2 * s.dataplane.health_interval_s + 0.5
        after = [x for x in control.window(settle) if x.listener == "primary"]
        assert len(after) > 100
        assert [x for x in after if x.code != 200] == [], "a client request failed after ejection"
    finally:  # the next tests start from a clean serving state
        stages.rollback(s, version, "replica-kill test done")
    assert control.plane.replica_pid("stable-0") is not None  # the controller restarted it


def test_shadow_passes_an_identical_candidate_and_stops_a_shifted_one_before_users(
    deployed: dict[str, Any],
) -> None:
    """Evaluation expects the served candidate to answer as its run's model does (the same
    run: no difference at all). The same bytes pass; scores shifted by 0.25, and the export
    drill's broken preprocessing step (``serving.inject_export_skew``), are stopped before any
    user gets an answer."""
    s = deployed["settings"]
    control = stages.serving_control(s)
    before = serving_snapshot(s)
    same = new_version(deployed, "same")
    stages.stage_canary(s, same)
    report = stages.shadow_candidate(s, same)
    assert report["verdict"] == "pass", report
    assert report["pairs"] >= s.shadow.min_pairs
    assert report["stats"]["agreement"] == 1.0
    assert report["stats"]["score_diff"]["max"] <= 1e-6  # the same SavedModel bytes
    stages.rollback(s, same, "shadow test: identical candidate done")

    shifted = new_version(deployed, "drift")
    stages.stage_canary(s, shifted)
    since = time.time()
    report = stages.shadow_candidate(s, shifted)
    assert report["verdict"] == "fail", report
    assert any(r.startswith("score_difference") for r in report["reasons"]), report["reasons"]
    seen = control.window(since)
    assert any(x.listener == "shadow" for x in seen)  # the candidate answered mirrored copies...
    served = [x for x in seen if x.listener == "primary" and x.label == "canary"]
    assert served == [], "a user got the candidate's answer"  # ...and no user request
    verdict = stages.canary_verdict(s, shifted)
    assert verdict is not None and verdict["decision"] == "rollback" and verdict["windows"] == []
    assert verdict["reason"].startswith("shadow: ")
    assert stages.canary_tick(s, shifted)["done"]  # the analysis never sends a window
    tags = Registry(s.mlflow).version(shifted).tags
    assert tags["mlops.shadow_verdict"] == "fail"
    stages.rollback(s, shifted, verdict["reason"])
    assert serving_snapshot(s) == before

    skewed = new_version(deployed, "skew")
    stages.stage_canary(s, skewed)
    report = stages.shadow_candidate(s, skewed)
    assert report["verdict"] == "fail", report
    assert report["stats"]["expected"]["agreement"] == 1.0  # one run: the same model
    failed = {r.split(":")[0] for r in report["reasons"]}
    assert {"decision_agreement", "score_difference"} <= failed, report["reasons"]
    stages.rollback(s, skewed, "shadow test: skewed export stopped")
    assert serving_snapshot(s) == before


def test_envoy_killed_mid_canary_comes_back_at_the_stored_weight(
    deployed: dict[str, Any],
) -> None:
    """The split lives in the rollout's state (Envoy's runtime directory), not in Envoy: a
    killed Envoy is restarted by the next tick at the weight the controller stored, and the
    A/A analysis carries on through every step (a plumbing budget: the verdict's power is the
    A/A test's)."""
    s = with_overrides(deployed["settings"], canary={"max_canary_requests": PLUMBING_BUDGET})
    control = stages.serving_control(s)
    version = new_version(deployed, "same")
    stages.stage_canary(s, version)
    store, key = open_store(s.store), canary_state_key(s, version)
    first = stages.canary_tick(s, version)  # the 5 % window
    assert not first["done"] and control.split().canary == s.canary.steps[0]
    pid = kill_envoy(control)
    assert control.split().canary == s.canary.steps[0]  # still stored while Envoy is down
    control.ensure_running()  # what the next tick does first
    runtime = requests.get(f"{control.plane.admin_url()}/runtime", timeout=5).json()["entries"]
    assert runtime["mlops.weights.canary"]["final_value"] == str(s.canary.steps[0])
    verdict = monitor.monitor_canary(s, control, version)
    assert control.plane.envoy_pid() not in (None, pid)
    assert a_a_verdict_ok(verdict), verdict["reason"]
    assert walked_the_ramp(verdict, s.canary)
    state = json.loads(store.read_text(key))
    assert state["decision"] == verdict["decision"]
    stages.rollback(s, version, "envoy-restart test done")
