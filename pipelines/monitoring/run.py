"""One monitored hour, end to end: the published serving log judged against the SLOs, the
champion's reference and the matured labels; the report written; the decision taken by the
policy and published once (``monitoring/<model>/decisions/dt=D/hour=HH.json``).

A rerun of a decided hour returns the published decision: nothing is judged or acted on twice.
The canary is never judged: SLOs are the champion version's, drift is read from the ``stable``
pool's traffic, and realised performance is the champion's answers."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import Any

from pipelines.config import Settings
from pipelines.data import layout
from pipelines.data.spec import load_spec
from pipelines.monitoring import logs, metrics, outcomes, policy
from pipelines.monitoring.reference import reference_for
from pipelines.registry import CHAMPION, Registry
from pipelines.serving.control import ServingControl, labels_of
from pipelines.store import ObjectStore, open_store

log = logging.getLogger(__name__)


class MonitoringError(RuntimeError):
    """An hour that cannot be judged (not shipped, no champion)."""


def decision_key(model: str, date: str, hour: int) -> str:
    return (
        f"monitoring/{model}/decisions/{layout.partition(date)}/{layout.hour_partition(hour)}.json"
    )


def _hour_id(date: str, hour: int) -> str:
    return f"{layout.partition(date)[3:]}T{int(hour):02d}"


def previous_decisions(store: ObjectStore, model: str, date: str, hour: int, days: int) -> list:
    """The published decisions of the ``days`` days up to (not including) this hour, oldest
    first."""
    day = dt.date.fromisoformat(layout.partition(date)[3:])
    this = decision_key(model, date, hour)
    keys: list[str] = []
    for back in range(days, -1, -1):
        d = (day - dt.timedelta(days=back)).isoformat()
        keys += [
            k
            for k in store.list(f"monitoring/{model}/decisions/{layout.partition(d)}")
            if k.endswith(".json")
        ]
    return [json.loads(store.read_text(k)) for k in sorted(keys) if k < this]


def serving_context(settings: Settings, control: ServingControl, now: float) -> policy.Context:
    """Who the champion is, since when, what it replaced, and whether a rollout is running."""
    from pipelines.serving.rollout import previous_champion

    reg = Registry(settings.mlflow)
    champion = reg.alias_version(CHAMPION)
    labels = labels_of(control)
    split = control.split()
    moving = []
    if labels.get("canary") not in (None, labels.get("stable")):
        moving.append(f"canary v{labels['canary']} staged")
    if split.canary:
        moving.append(f"canary weight {split.canary}%")
    if split.shadow:
        moving.append(f"shadow {split.shadow}%")
    promoted_at = None
    previous = None
    if champion is not None:
        tag = reg.version(champion).tags.get("mlops.promoted_at")
        promoted_at = float(tag) if tag else None
        previous = previous_champion(settings, champion)
    return policy.Context(
        now=now,
        champion=champion,
        previous_champion=previous,
        promoted_at=promoted_at,
        rollout_in_progress=bool(moving),
        rollout_detail=", ".join(moving),
    )


def _slo_finding(hour_metrics: dict[str, Any], champion: str) -> dict[str, Any]:
    """The champion's SLOs on the stable and baseline routes (its canary rows are not)."""
    entry = hour_metrics["versions"].get(champion) or {}
    checks = entry.get("served_slo_checks") or []
    return {
        "version": champion,
        "status": entry.get("served_slo", "no traffic"),
        "breached": entry.get("served_slo") == "breach",
        "reasons": [c["detail"] for c in checks if not c["passed"]],
    }


def _log_finding(manifest: dict[str, Any]) -> dict[str, Any]:
    """Whether the published hour is what was served: the heartbeats' coverage (an hour
    published before coverage was recorded is ``unknown``)."""
    cov = manifest.get("coverage") or {"status": "unknown", "gaps": []}
    gaps = [g for g in cov.get("gaps", []) if g.get("cause") != "not_started"]
    return {
        "status": cov["status"],
        "observed_s": cov.get("observed_s"),
        "unobserved_s": cov.get("unobserved_s"),
        "reasons": [g["detail"] for g in gaps],
    }


def _drift_finding(hour_metrics: dict[str, Any]) -> dict[str, Any]:
    feats, pred = hour_metrics["features"], hour_metrics["prediction"]
    reasons = [
        f"{name}: {feats['columns'][name].get('detail') or 'drift'}" for name in feats["drifted"]
    ]
    if pred.get("drifted"):
        reasons.append(pred["detail"])
    return {
        "judged": feats.get("status") == "judged" or pred.get("status") == "judged",
        "drifted": bool(hour_metrics["drift"]),
        "reasons": reasons,
        "features": feats.get("status"),
        "prediction": pred.get("status"),
    }


def judge_performance(
    settings: Settings, store: ObjectStore, spec: Any, ref: dict[str, Any], date: str
) -> dict[str, Any] | None:
    """Realised performance of the champion over the labels landed in the trailing
    ``label_window_days``, joined to the answers of those days and the ``label_delay_days``
    before them; None when no labels landed in the window."""
    cfg = settings.monitoring
    day = dt.date.fromisoformat(layout.partition(date)[3:])
    label_days = [day - dt.timedelta(days=i) for i in range(cfg.label_window_days)]
    landed = [d for d in label_days if outcomes.outcome_files(store, spec.name, d)]
    if not landed:
        return None
    first = min(landed) - dt.timedelta(days=cfg.label_delay_days)
    served_days = [first + dt.timedelta(days=i) for i in range((day - first).days + 1)]
    try:
        labels = outcomes.read_outcomes(store, spec, landed)
        # Only the answers the labels are for: weeks of serving logs never sit in memory.
        served = outcomes.served_scores(
            store, settings.mlflow.model_name, served_days, keys=labels.column("key")
        )
        perf = outcomes.realised_performance(
            served, labels, float(ref["threshold"]), spec, ref.get("evaluation") or {}, cfg
        )
    except (outcomes.OutcomeError, metrics.ServingLogError) as exc:
        # A broken labels feed must not stop the SLO and drift checks: it is refused and
        # alerted on, and nothing is judged from it.
        log.error("labels refused: %s", exc)
        return {"judged": False, "decayed": False, "refused": str(exc), "reasons": []}
    champ = perf["versions"].get(str(ref["version"])) or {}
    perf["judged"] = champ.get("status") in ("ok", "decayed")
    perf["decayed"] = champ.get("status") == "decayed"
    perf["reasons"] = (
        [f"version {ref['version']}: {champ.get('detail')}"] if perf["decayed"] else []
    )
    perf["label_days"] = [d.isoformat() for d in sorted(landed)]
    return perf


def monitor_hour(
    settings: Settings,
    control: ServingControl,
    date: str,
    hour: int,
    latest_day: str | None,
    now: float | None = None,
) -> dict[str, Any]:
    """Judge the published hour and decide (once); the decision, the report's URI, and what
    the DAG's action tasks need (``retrain``, ``retrain_conf``, ``retrain_run_id``,
    ``rollback``; empty when the decision does not call for them)."""
    store, model, cfg = open_store(settings.store), settings.mlflow.model_name, settings.monitoring
    key = decision_key(model, date, hour)
    if store.exists(key):
        decided = json.loads(store.read_text(key))
        log.info("hour %s is already decided: %s", decided["hour"], decided["kinds"] or "no action")
        return _outputs(settings, decided, latest_day, already=True)
    manifest = logs.published(store, model, date, hour)
    if manifest is None:
        raise MonitoringError(
            f"The serving log of {date} hour {int(hour):02d} is not published; ship it first."
        )
    now = time.time() if now is None else now
    ctx = serving_context(settings, control, now)
    if ctx.champion is None:
        raise MonitoringError("No champion version: there is nothing in production to monitor.")
    ref = reference_for(settings, ctx.champion)
    spec = load_spec(ref["dataset"], settings.data.spec_dir)
    hour_metrics = metrics.monitor_files(
        store,
        logs.part_keys(store, model, date, hour),
        spec,
        ref["features"],
        ref["scores"],
        cfg,
    )
    findings = {
        "log": _log_finding(manifest),
        "slo": _slo_finding(hour_metrics, ctx.champion),
        "drift": _drift_finding(hour_metrics),
        "performance": judge_performance(settings, store, spec, ref, date),
    }
    previous = previous_decisions(
        store, model, date, hour, days=max(2, int(cfg.retrain_cooldown_hours // 24) + 1)
    )
    decision = policy.decide(_hour_id(date, hour), findings, previous, ctx, cfg)
    if latest_day is None and "retrain" in decision.kinds():
        # Decided before it is published: an hour whose decision cannot be acted on would
        # fail for ever after it was published.
        decision.actions = [
            policy.Action("alert", f"{a.reason} (no retraining: no landing day to train on)")
            if a.kind == "retrain"
            else a
            for a in decision.actions
        ]
    prefix = layout.monitoring(model, date, hour)
    report = {
        "hour": decision.hour,
        "champion": ctx.champion,
        "context": ctx.__dict__,
        "manifest": {k: manifest.get(k) for k in ("rows", "parts", "labels", "coverage")},
        "metrics": hour_metrics,
        "findings": findings,
        "decision": decision.to_dict(),
    }
    # Report, plots and the day's MLflow run before the decision is published: a retry after
    # a failure here redoes them; once the decision exists, nothing is redone.
    store.write_text(f"{prefix}/report.json", json.dumps(report, indent=2, default=str))
    store.write_text(f"{prefix}/report.md", render_markdown(report))
    pngs = _plots(settings, store, model, date, report, ref)
    for name, png in pngs.items():
        store.write_bytes(f"{prefix}/plots/{name}", png)
    mlflow_run = _log_to_mlflow(settings, model, date, hour, report, pngs)
    record = {
        **decision.to_dict(),
        "kinds": decision.kinds(),
        "champion": ctx.champion,
        "report_uri": store.uri(f"{prefix}/report.json"),
        "mlflow_run_id": mlflow_run,
    }
    if not store.create_bytes(key, json.dumps(record, indent=2, default=str).encode()):
        record = json.loads(store.read_text(key))  # another run decided first: its decision
        return _outputs(settings, record, latest_day, already=True)
    for note in decision.notes:
        log.info("monitoring %s: %s", decision.hour, note)
    log.info(
        "monitoring %s: champion v%s, %d rows; decision: %s",
        decision.hour,
        ctx.champion,
        manifest["rows"],
        ", ".join(decision.kinds()) or "no action",
    )
    return _outputs(settings, record, latest_day, already=False)


def _day_reports(store: ObjectStore, model: str, date: str) -> list[dict[str, Any]]:
    """The day's monitoring reports so far, in hour order."""
    day = f"monitoring/{model}/{layout.partition(date)}"
    keys = sorted(k for k in store.list(day, recursive=True) if k.endswith("/report.json"))
    return [json.loads(store.read_text(k)) for k in keys]


def _plots(
    settings: Settings,
    store: ObjectStore,
    model: str,
    date: str,
    report: dict[str, Any],
    ref: dict[str, Any],
) -> dict[str, bytes]:
    """Drift per feature and latency over the day's hours (this one included), and this
    hour's scores against the reference's."""
    from pipelines.monitoring import plots

    day = [r for r in _day_reports(store, model, date) if r["hour"] != report["hour"]]
    day = sorted([*day, report], key=lambda r: r["hour"])
    hours = [r["hour"] for r in day]
    names = sorted({n for r in day for n in r["metrics"]["features"].get("columns", {})})
    psi: dict[str, list[float | None]] = {
        n: [r["metrics"]["features"].get("columns", {}).get(n, {}).get("psi") for r in day]
        for n in names
    }
    psi["score"] = [r["metrics"]["prediction"].get("psi") for r in day]
    lat = [(r["metrics"]["versions"].get(str(r["champion"])) or {}).get("latency_ms") for r in day]
    out = {
        "drift.png": plots.drift_png(hours, psi, settings.monitoring.feature_psi),
        "latency.png": plots.latency_png(
            hours,
            [(x or {}).get("p50") for x in lat],
            [(x or {}).get("p99") for x in lat],
            settings.monitoring,
        ),
    }
    pred = report["metrics"]["prediction"]
    if pred.get("bins"):
        out["scores.png"] = plots.scores_png(
            ref["scores"]["edges"], ref["scores"]["sample"], pred["bins"]
        )
    return out


def _log_to_mlflow(
    settings: Settings,
    model: str,
    date: str,
    hour: int,
    report: dict[str, Any],
    pngs: dict[str, bytes],
) -> str:
    """The hour into the day's monitoring run (experiment ``monitoring.experiment``, one run
    per model and day, found by its key): metrics with the hour as step, the report and plots
    under ``hour=HH/``; its run id."""
    reg = Registry(
        settings.mlflow.model_copy(update={"experiment": settings.monitoring.experiment})
    )
    key = f"monitoring:{model}:{layout.partition(date)[3:]}"
    run = reg.find_run(key)
    run_id = (
        run.info.run_id
        if run is not None
        else reg.create_run(
            f"{model} {layout.partition(date)[3:]}", {"run_key": key, "model": model}
        )
    )
    m = report["metrics"]
    champ = m["versions"].get(str(report["champion"])) or {}
    lat = champ.get("latency_ms") or {}
    cols = m["features"].get("columns") or {}
    values = {
        "requests": champ.get("requests"),
        "error_rate": champ.get("error_rate"),
        "p50_ms": lat.get("p50"),
        "p99_ms": lat.get("p99"),
        "max_feature_psi": max((c.get("psi") or 0.0 for c in cols.values()), default=None),
        "score_psi": m["prediction"].get("psi"),
        "drifted": float(bool(report["findings"]["drift"]["drifted"])),
        "actions": float(len(report["decision"]["actions"])),
    }
    reg.log_metrics(run_id, {k: v for k, v in values.items() if v is not None}, step=int(hour))
    folder = f"hour={int(hour):02d}"
    reg.log_bytes(run_id, json.dumps(report, indent=2, default=str).encode(), folder, "report.json")
    reg.log_bytes(run_id, render_markdown(report).encode(), folder, "report.md")
    for name, png in pngs.items():
        reg.log_bytes(run_id, png, folder, name)
    reg.end_run(run_id, ok=True)
    return run_id


def _outputs(
    settings: Settings, record: dict[str, Any], latest_day: str | None, already: bool
) -> dict[str, Any]:
    model = settings.mlflow.model_name
    retrain = next((a for a in record["actions"] if a["kind"] == "retrain"), None)
    rollback = next((a for a in record["actions"] if a["kind"] == "rollback"), None)
    conf: dict[str, Any] = {}
    if retrain is not None:
        conf = {"date": latest_day, "reason": f"monitoring {record['hour']}: {retrain['reason']}"}
    return {
        "hour": record["hour"],
        "already_decided": already,
        "decision": record,
        "report_uri": record.get("report_uri"),
        "retrain": retrain,
        "retrain_conf": conf,
        "retrain_run_id": f"retrain__{model}__{record['hour']}",
        "rollback": None
        if rollback is None
        else {
            "from_version": record["champion"],
            "to_version": rollback["evidence"]["to_version"],
            "reason": rollback["reason"],
        },
    }


def render_markdown(report: dict[str, Any]) -> str:
    m, f, d = report["metrics"], report["findings"], report["decision"]
    out = [
        f"# Monitoring {report['hour']}: champion v{report['champion']}",
        "",
        f"**Decision:** {', '.join(a['kind'] for a in d['actions']) or 'no action'}",
        "",
    ]
    out += [f"- **{a['kind']}**: {a['reason']}" for a in d["actions"]]
    out += [f"- {n}" for n in d["notes"]]
    logged = f.get("log") or {}
    out += ["", f"Serving log: {logged.get('status', 'unknown')}"]
    if logged.get("observed_s") is not None:
        out[-1] += f" ({logged['observed_s']:.0f} s observed, {logged['unobserved_s']:.0f} s not)"
    out += [f"- {r}" for r in logged.get("reasons", [])]
    out += [
        "",
        "## Traffic per version",
        "",
        "| version | instances | errors | p50 ms | p99 ms | SLO |",
    ]
    out += ["|---|---|---|---|---|---|"]
    for v, e in m["versions"].items():
        lat = e["latency_ms"]
        out.append(
            f"| {v} | {e['instances']} | {e['errors']} | {lat.get('p50')} | {lat.get('p99')} "
            f"| {e['slo']} |"
        )
    out += ["", "## Drift (stable traffic vs the champion's training reference)", ""]
    out += ["| feature | PSI | KS p | status |", "|---|---|---|---|"]
    for name, c in (m["features"].get("columns") or {}).items():
        out.append(f"| {name} | {c.get('psi')} | {c.get('ks_pvalue', '')} | {c['status']} |")
    pred = m["prediction"]
    out += ["", f"Scores: {pred.get('detail') or pred.get('status')}", ""]
    perf = f.get("performance")
    out += ["## Realised performance", ""]
    if perf is None:
        out.append("No labels landed in the window.")
    elif perf.get("refused"):
        out.append(f"Labels refused, nothing judged from them: {perf['refused']}")
    else:
        o = perf["overall"]
        out.append(
            f"{perf['labelled']} matured labels (landed {', '.join(perf['label_days'])}): "
            f"ROC-AUC {o.get('roc_auc')}, precision {o.get('precision')}, recall "
            f"{o.get('recall')}; {o.get('detail')}"
        )
    return "\n".join(out) + "\n"
