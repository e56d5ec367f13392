"""The monitoring policy: findings and earlier decisions in, one hour's actions out."""

from __future__ import annotations

from typing import Any

from pipelines.config import MonitoringSettings
from pipelines.monitoring.policy import Context, decide, drift_streak

CFG = MonitoringSettings()
NOW = 1_800_000_000.0
CTX = Context(now=NOW, champion="3", previous_champion="2", promoted_at=NOW - 2 * 3600)
HEALTHY: dict[str, Any] = {
    "slo": {"breached": False, "reasons": []},
    "drift": {"judged": True, "drifted": False, "reasons": []},
}
DRIFTED = {**HEALTHY, "drift": {"judged": True, "drifted": True, "reasons": ["amount PSI 1.2"]}}
BREACHED = {**HEALTHY, "slo": {"breached": True, "reasons": ["p99 900 ms > 500 ms"]}}


HOUR = "2026-11-03T14"


def past(*flags: bool | None, champion: str = "3") -> list[dict[str, Any]]:
    """The hours before HOUR, oldest first: True drifted, False judged healthy, None not
    judged (too little traffic)."""
    n = len(flags)
    return [
        {
            "hour": f"2026-11-03T{14 - n + i:02d}",
            "champion": champion,
            "judged": f is not None,
            "drifted": bool(f),
            "actions": [],
        }
        for i, f in enumerate(flags)
    ]


def test_healthy_traffic_takes_no_action() -> None:
    d = decide(HOUR, HEALTHY, past(False, False), CTX, CFG)
    assert d.actions == [] and d.drift_streak == 0


def test_one_drifted_hour_is_noted_and_a_sustained_run_retrains() -> None:
    first = decide(HOUR, DRIFTED, past(False), CTX, CFG)
    assert first.actions == [] and first.drift_streak == 1 and "streak 1 of 2" in first.notes[0]
    second = decide(HOUR, DRIFTED, past(False, True), CTX, CFG)
    assert second.kinds() == ["retrain"] and second.drift_streak == 2
    assert "2 judged hour(s) in a row" in second.actions[0].reason
    assert "amount PSI 1.2" in second.actions[0].reason
    assert second.actions[0].evidence["decided_at"] == NOW


def test_an_hour_without_enough_traffic_neither_extends_nor_breaks_the_streak() -> None:
    assert drift_streak(past(True, None), True, True, HOUR, "3") == 2
    assert drift_streak(past(True, None, False), True, True, HOUR, "3") == 1
    assert drift_streak(past(True), False, False, HOUR, "3") == 1
    assert drift_streak(past(True), False, True, HOUR, "3") == 0


def test_the_streak_ends_at_a_gap_and_at_another_champion() -> None:
    gap = past(True, True)[:1]  # T12 decided, T13 never: the monitor did not run
    assert drift_streak(gap, True, True, HOUR, "3") == 1
    assert drift_streak(past(True, True), True, True, HOUR, "3") == 3
    before = past(True, True, champion="2")  # judged against v2's reference
    assert drift_streak(before, True, True, HOUR, "3") == 1


def test_a_second_retrain_within_the_cooldown_alerts_instead() -> None:
    prev = past(True, True)
    prev[-1]["actions"] = [{"kind": "retrain", "evidence": {"decided_at": NOW - 3600}}]
    d = decide(HOUR, DRIFTED, prev, CTX, CFG)
    assert d.kinds() == ["alert"] and "1.0 h ago" in d.actions[0].reason
    later = Context(now=NOW + 25 * 3600, champion="3")
    assert decide(HOUR, DRIFTED, prev, later, CFG).kinds() == ["retrain"]


def test_an_slo_breach_soon_after_promotion_rolls_back_and_later_only_alerts() -> None:
    d = decide(HOUR, BREACHED, [], CTX, CFG)
    assert d.kinds() == ["rollback"] and d.actions[0].evidence["to_version"] == "2"
    assert "promoted 2.0 h ago" in d.actions[0].reason and "p99 900 ms" in d.actions[0].reason
    old = Context(now=NOW, champion="3", previous_champion="2", promoted_at=NOW - 48 * 3600)
    late = decide(HOUR, BREACHED, [], old, CFG)
    assert (
        late.kinds() == ["alert"] and "not within rollback_within_hours" in late.actions[0].reason
    )
    first = Context(now=NOW, champion="1", promoted_at=NOW - 3600)
    assert "no previous champion" in decide(HOUR, BREACHED, [], first, CFG).actions[0].reason


def test_during_a_rollout_nothing_is_rolled_back_or_retrained() -> None:
    ctx = Context(
        now=NOW,
        champion="3",
        previous_champion="2",
        promoted_at=NOW - 3600,
        rollout_in_progress=True,
        rollout_detail="canary v4 at 25%",
    )
    d = decide(HOUR, {**BREACHED, "drift": DRIFTED["drift"]}, past(True), ctx, CFG)
    assert d.kinds() == ["alert", "alert"]
    assert all("canary v4 at 25%" in a.reason for a in d.actions)


def test_decay_retrains_and_drift_with_decay_is_one_run() -> None:
    decayed = {**HEALTHY, "performance": {"decayed": True, "reasons": ["AUC 0.61 < 0.80 - 0.05"]}}
    assert decide(HOUR, decayed, [], CTX, CFG).kinds() == ["retrain"]
    both = {**decayed, "drift": DRIFTED["drift"]}
    d = decide(HOUR, both, past(True), CTX, CFG)
    assert d.kinds() == ["retrain"] and "performance" in d.actions[0].evidence


def test_the_policy_can_only_alert() -> None:
    cfg = MonitoringSettings(on_drift="alert", on_slo_breach="alert")
    assert decide(HOUR, DRIFTED, past(True), CTX, cfg).kinds() == ["alert"]
    d = decide(HOUR, BREACHED, [], CTX, cfg)
    assert d.kinds() == ["alert"] and "on_slo_breach=alert" in d.actions[0].reason
    off = MonitoringSettings(on_drift="none", on_slo_breach="none", on_decay="none")
    assert decide(HOUR, {**BREACHED, "drift": DRIFTED["drift"]}, past(True), CTX, off).actions == []


def test_refused_labels_alert_and_the_rest_is_still_judged() -> None:
    refused = {**BREACHED, "performance": {"judged": False, "refused": "x.parquet: key twice"}}
    d = decide(HOUR, refused, [], CTX, CFG)
    assert d.kinds() == ["rollback", "alert"]
    assert d.actions[1].reason == "labels refused: x.parquet: key twice"


def test_a_missing_or_incomplete_serving_log_alerts_and_the_rest_is_still_judged() -> None:
    gap = "14:10:00 to 14:20:00: no heartbeat: the data plane was down or its log did not arrive"
    partial = {**DRIFTED, "log": {"status": "partial", "reasons": [gap]}}
    d = decide(HOUR, partial, past(True), CTX, CFG)
    assert d.kinds() == ["alert", "retrain"]
    assert d.actions[0].reason == f"serving log incomplete (the data plane's heartbeat): {gap}"
    missing = {**HEALTHY, "log": {"status": "missing", "reasons": []}}
    assert decide(HOUR, missing, [], CTX, CFG).actions[0].reason.startswith("serving log missing")
    for fine in ("complete", "unknown"):
        assert decide(HOUR, {**HEALTHY, "log": {"status": fine}}, [], CTX, CFG).actions == []
