"""What one monitored hour leads to: alert, retrain or roll back, by the policy in config.

Pure: the hour's findings, the decisions of the hours before it and the serving context in, the
decision (its actions, each with its reason and evidence) out. The monitor publishes each hour's
decision once (``monitoring/<model>/decisions/dt=D/hour=HH.json``), so a rerun of an hour never
acts twice, and sustained drift and the retraining cooldown are read from those records, not
from a mutable state two runs could race on.

- An **SLO breach** of the champion rolls back to the previous champion when it comes within
  ``rollback_within_hours`` of its promotion (what changed is the new version), else alerts.
- **Sustained drift** (``drift_hours`` judged hours in a row) and **decayed realised
  performance** retrain; a retraining trigger within ``retrain_cooldown_hours`` of the last
  alerts instead.
- **A serving log that is missing or incomplete** (the data plane's heartbeats have gaps)
  alerts, naming each gap: zero rows from an hour nobody saw are not an hour without traffic.
- **During a rollout** (a canary is staged or takes traffic) the canary is not judged, and
  nothing is rolled back or retrained: the finding alerts, naming the rollout.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.config import MonitoringSettings


@dataclass(frozen=True)
class Context:
    """The serving side when the hour is judged."""

    now: float
    champion: str | None
    previous_champion: str | None = None
    promoted_at: float | None = None  # when the champion was promoted (epoch s)
    rollout_in_progress: bool = False
    rollout_detail: str = ""


@dataclass(frozen=True)
class Action:
    kind: str  # alert | retrain | rollback
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class Decision:
    hour: str  # "YYYY-MM-DDTHH"
    drifted: bool  # this hour judged drifted (feeds the next hours' streak)
    judged: bool  # this hour had enough traffic to judge drift
    drift_streak: int
    actions: list[Action] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def kinds(self) -> list[str]:
        return [a.kind for a in self.actions]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _hour(hour_id: str) -> dt.datetime:
    return dt.datetime.strptime(hour_id, "%Y-%m-%dT%H")


def drift_streak(
    previous: list[dict[str, Any]],
    drifted_now: bool,
    judged_now: bool,
    hour: str | None = None,
    champion: str | None = None,
) -> int:
    """Judged hours in a row with drift, ending with this one (``hour``); an hour without
    enough traffic neither extends nor breaks the run. It ends at an hour that was never
    decided (a gap: the monitor did not run) and at one judged against another champion's
    reference. ``previous``: earlier decisions, oldest first."""
    if judged_now and not drifted_now:
        return 0
    streak = 1 if judged_now else 0
    expected = _hour(hour) if hour else None
    for d in reversed(previous):
        if expected is not None and d.get("hour"):
            if _hour(d["hour"]) != expected - dt.timedelta(hours=1):
                break
            expected = _hour(d["hour"])
        if champion is not None and d.get("champion") not in (None, champion):
            break
        if not d.get("judged"):
            continue
        if not d.get("drifted"):
            break
        streak += 1
    return streak


def last_retrain(previous: list[dict[str, Any]]) -> float | None:
    """When the latest retraining trigger among ``previous`` was decided (epoch s)."""
    times = [
        float(a["evidence"].get("decided_at", 0))
        for d in previous
        for a in d.get("actions", [])
        if a.get("kind") == "retrain"
    ]
    return max(times) if times else None


def _no_rollback(
    cfg: MonitoringSettings, recent: bool, has_previous: bool, blocked: bool, during: str
) -> str:
    if cfg.on_slo_breach != "rollback":
        return f"policy on_slo_breach={cfg.on_slo_breach}"
    if not recent:
        return f"not within rollback_within_hours {cfg.rollback_within_hours:g} of a promotion"
    if not has_previous:
        return "no previous champion"
    return during if blocked else "not decided"


def decide(
    hour: str,
    findings: dict[str, Any],
    previous: list[dict[str, Any]],
    ctx: Context,
    cfg: MonitoringSettings,
) -> Decision:
    """The hour's actions. ``findings``: ``slo`` (the champion's SLO judgement: ``breached``,
    ``reasons``), ``drift`` (``judged``, ``drifted``, ``reasons``), ``performance``
    (``judged``, ``decayed``, ``reasons``) and ``log`` (the serving log's coverage: ``status``,
    ``reasons``), each possibly absent."""
    slo = findings.get("slo") or {}
    drift = findings.get("drift") or {}
    perf = findings.get("performance") or {}
    judged, drifted = bool(drift.get("judged")), bool(drift.get("drifted"))
    streak = drift_streak(previous, drifted, judged, hour, ctx.champion)
    out = Decision(hour, drifted, judged, streak)
    blocked = ctx.rollout_in_progress
    during = f"a rollout is in progress ({ctx.rollout_detail or 'canary staged'})"
    logged = findings.get("log") or {}
    if logged.get("status") in ("missing", "partial"):  # what was not seen was not judged
        what = "missing" if logged["status"] == "missing" else "incomplete"
        out.actions.append(
            Action(
                "alert",
                f"serving log {what} (the data plane's heartbeat): "
                + "; ".join(logged.get("reasons") or ["no heartbeat"]),
                {"log": logged},
            )
        )

    if slo.get("breached") and cfg.on_slo_breach != "none":
        reason = f"SLO breach of champion v{ctx.champion}: " + "; ".join(slo["reasons"])
        since = None if ctx.promoted_at is None else (ctx.now - ctx.promoted_at) / 3600
        recent = since is not None and since <= cfg.rollback_within_hours
        evidence = {"slo": slo, "hours_since_promotion": since}
        if cfg.on_slo_breach == "rollback" and recent and ctx.previous_champion and not blocked:
            out.actions.append(
                Action(
                    "rollback",
                    f"{reason}; promoted {since:.1f} h ago (within "
                    f"{cfg.rollback_within_hours:g} h): back to v{ctx.previous_champion}",
                    {**evidence, "to_version": ctx.previous_champion},
                )
            )
        else:
            why = _no_rollback(cfg, recent, bool(ctx.previous_champion), blocked, during)
            out.actions.append(Action("alert", f"{reason} (no rollback: {why})", evidence))

    wants: list[tuple[str, str, dict[str, Any]]] = []
    if streak >= cfg.drift_hours and cfg.on_drift != "none":
        wants.append(
            (
                cfg.on_drift,
                f"sustained drift: {streak} judged hour(s) in a row (drift_hours "
                f"{cfg.drift_hours}): " + "; ".join(drift.get("reasons", [])),
                {"drift": drift, "streak": streak},
            )
        )
    elif drifted:
        out.notes.append(f"drift this hour (streak {streak} of {cfg.drift_hours})")
    if perf.get("refused"):  # the labels feed is broken: say so, judge the rest
        out.actions.append(Action("alert", f"labels refused: {perf['refused']}", {}))
    if perf.get("decayed") and cfg.on_decay != "none":
        wants.append(
            (
                cfg.on_decay,
                "decayed realised performance: " + "; ".join(perf.get("reasons", [])),
                {"performance": perf},
            )
        )
    last = last_retrain(previous)
    for kind, reason, evidence in wants:
        if kind == "alert":
            out.actions.append(Action("alert", reason, evidence))
            continue
        if blocked:
            out.actions.append(Action("alert", f"{reason} (no retraining: {during})", evidence))
        elif last is not None and ctx.now - last < cfg.retrain_cooldown_hours * 3600:
            ago = (ctx.now - last) / 3600
            out.actions.append(
                Action(
                    "alert",
                    f"{reason} (no retraining: the last trigger was {ago:.1f} h ago, within "
                    f"retrain_cooldown_hours {cfg.retrain_cooldown_hours:g})",
                    evidence,
                )
            )
        elif "retrain" in out.kinds():  # drift and decay together: one retraining run
            next(a for a in out.actions if a.kind == "retrain").evidence.update(evidence)
        else:
            out.actions.append(Action("retrain", reason, {**evidence, "decided_at": ctx.now}))
    return out
