"""The composition root: one function per pipeline stage, settings in, a small JSON-able dict out.

DAG tasks, Kubernetes pods, the ``mlops`` CLI and tests all call these, so a stage behaves the
same everywhere. Heavy libraries are imported by the stage modules, only when a stage runs.
Stages that accept data or change the registry or serving record it in :mod:`pipelines.audit`.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from pipelines.config import Settings
from pipelines.data.results import ValidationBlocked

__all__ = ["ValidationBlocked"]  # callers (the DAG, the CLI) catch it without importing deeper

if TYPE_CHECKING:
    from pipelines.data.spec import DatasetSpec
    from pipelines.serving.control import ServingControl
    from pipelines.serving.lease import Lease, ServingLease
    from pipelines.store import ObjectStore

log = logging.getLogger(__name__)


def _data(settings: Settings, dataset: str | None) -> tuple[ObjectStore, DatasetSpec]:
    from pipelines.data.spec import load_spec
    from pipelines.store import open_store

    return open_store(settings.store), load_spec(
        dataset or settings.data.dataset, settings.data.spec_dir
    )


def _audit(settings: Settings, event: str, subject: str, **details: Any) -> None:
    """Append to the audit trail after an action; a failed write fails the stage (see audit)."""
    from pipelines.audit import record

    record(settings.store, event, subject, details)


def generate_data(
    settings: Settings,
    date: str,
    dataset: str | None = None,
    rows: int | None = None,
    drift: float = 0.0,
    defect: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    from pipelines.data.generate import generate_partition

    store, spec = _data(settings, dataset)
    uri = generate_partition(
        store, spec, date, rows or settings.data.rows_per_day, drift, defect, seed, overwrite
    )
    return {"landing_uri": uri}


def landing_exists(settings: Settings, date: str, dataset: str | None = None) -> bool:
    """Whether the day's landing partition holds any file."""
    from pipelines.data import layout

    store, spec = _data(settings, dataset)
    prefix = layout.landing(spec.name, date)
    return bool(store.list(prefix))


def validate_data(settings: Settings, date: str, dataset: str | None = None) -> dict[str, Any]:
    """Raises :class:`ValidationBlocked` (its summary quarantined) when the batch is blocked."""
    from pipelines.data.validate import validate_partition

    store, spec = _data(settings, dataset)
    try:
        summary = validate_partition(
            store, spec, date, settings.data.batch_rows, settings.data.late_event_tolerance_s
        )
    except ValidationBlocked as exc:
        s = exc.summary
        _audit(
            settings,
            "data.quarantined",
            f"{s.dataset}/{s.date}",
            rows=s.rows,
            quarantine_uri=s.quarantine_uri,
            report_uri=s.report_uri,
            failures=[f"{c.severity}:{c.check}:{c.column}" for c in s.failures],
        )
        raise
    _audit(
        settings,
        "data.accepted",
        f"{summary.dataset}/{summary.date}",
        status=summary.status,
        rows=summary.rows,
        report_uri=summary.report_uri,
        warnings=[f"{c.check}:{c.column}" for c in summary.failures],
    )
    return {
        "status": summary.status,
        "rows": summary.rows,
        "batches": summary.batches,
        "report_uri": summary.report_uri,
        "warnings": [f"{c.check}:{c.column}" for c in summary.failures],
    }


def shard_data(settings: Settings, date: str, dataset: str | None = None) -> dict[str, Any]:
    from pipelines.data.shard import shard_dataset

    store, spec = _data(settings, dataset)
    m = shard_dataset(
        store,
        spec,
        date,
        settings.data.shard_target_rows,
        settings.data.split_fractions,
        settings.data.batch_rows,
        settings.data.workers,
    )
    return {
        "manifest_uri": m.uri,
        "data_version": m.data_version,
        "rows": {s: m.rows(s) for s in ("train", "val", "test")},
        "shards": sum(len(m.shards(s)) for s in ("train", "val", "test")),
    }


def train(
    settings: Settings,
    manifest_uri: str,
    run_key: str | None = None,
    tags: dict[str, Any] | None = None,
    sink: Any = None,
) -> dict[str, Any]:
    """With ``train.params_from = tuning`` the study's best params replace the tuned train
    settings first (recorded as tags); the run then takes the same gates as any other."""
    from pipelines.train.run import train_model

    settings, run_key, tags = training_config(settings, manifest_uri, run_key, tags)
    return train_model(settings, manifest_uri, run_key, tags, sink)


def training_config(
    settings: Settings,
    manifest_uri: str,
    run_key: str | None = None,
    tags: dict[str, Any] | None = None,
) -> tuple[Settings, str | None, dict[str, Any]]:
    """The settings, run key and tags a training run starts with, whichever launcher runs it
    (local torchrun agents or pods): with ``train.params_from = tuning`` the study's best
    params replace the tuned train settings (recorded as tags), and the run key names the
    trial, so a new best trial is a new run and never reuses the old one."""
    tags = dict(tags or {})
    if settings.train.params_from != "tuning":
        return settings, run_key, tags
    settings, provenance = tuned_settings(settings, manifest_uri)
    tags.update(provenance)
    if run_key:
        run_key = f"{run_key}/tuned-{provenance['tuning_study']}-{provenance['tuning_trial']}"
    return settings, run_key, tags


def tuned_settings(settings: Settings, manifest_uri: str) -> tuple[Settings, dict[str, Any]]:
    """``settings`` with the best trial's params of the data set's study (``tuning.study``, or
    the latest finished one), and the tags that say where they came from."""
    from pipelines.config import with_overrides
    from pipelines.data.shard import load_manifest
    from pipelines.store import open_store
    from pipelines.tune.storage import study_storage
    from pipelines.tune.study import best_params

    dataset = load_manifest(open_store(settings.store), manifest_uri).data["dataset"]
    with study_storage(settings) as storage:
        overrides, provenance = best_params(settings, storage.url, dataset)
    log.info(
        "train params from study %s trial %s: %s",
        provenance["tuning_study"],
        provenance["tuning_trial"],
        overrides,
    )
    return with_overrides(settings, train=overrides), provenance


def tune(
    settings: Settings,
    manifest_uri: str,
    trials: int | None = None,
    workers: int | None = None,
    study: str | None = None,
    sink: Any = None,
) -> dict[str, Any]:
    """One study with local worker processes (``mlops tune``); its summary."""
    from pipelines.tune.run import tune as run_tuning

    return run_tuning(settings, manifest_uri, trials, workers, study, sink)


def default_study_name(settings: Settings, manifest_uri: str, key: str) -> str:
    """The study of one tuning run (``key``: the DAG run id): a retry finds the same one."""
    from pipelines.tune.run import default_study_name as name

    return name(settings, manifest_uri, key)


def start_tuning_storage(settings: Settings) -> dict[str, Any]:
    """The study storage for a tuning DAG run: the local PostgreSQL started unless it runs
    (``owned`` says this run started it, so its teardown stops it); nothing for a URL."""
    from pipelines.tune.storage import acquire

    storage = acquire(settings)
    return {"storage": storage.masked, "owned": storage.owned}


def stop_tuning_storage(settings: Settings, owned: bool) -> dict[str, Any]:
    """Stop the local PostgreSQL only if this run started it."""
    from pipelines.tune.storage import Storage, release

    release(settings, Storage("", owned=owned))
    return {"stopped": owned}


def create_study(
    settings: Settings, manifest_uri: str, study: str, workers: int
) -> list[dict[str, Any]]:
    """Create (or continue) the study and its parent MLflow run; one job per worker."""
    from pipelines.tune.storage import local_url
    from pipelines.tune.study import create_study as create

    created = create(
        settings, local_url(settings), manifest_uri, study, settings.tuning.trials, workers
    )
    return [
        {**created, "manifest_uri": manifest_uri, "worker": i, "workers": workers}
        for i in range(workers)
    ]


def worker_job(settings: Settings, job: dict[str, Any], colocated: int) -> Any:
    """The :class:`~pipelines.tune.job.TuneJob` of one worker of a created study."""
    from pipelines.tune.job import TuneJob

    return TuneJob.for_worker(
        settings, job["study"], job["manifest_uri"], job["parent_run_id"], job["worker"], colocated
    )


def tune_worker(settings: Settings, job: dict[str, Any]) -> dict[str, Any]:
    """Run one worker in this process until the study's budget is spent."""
    import os

    from pipelines.train.job import secret_env
    from pipelines.tune.storage import local_url
    from pipelines.tune.study import run_worker

    return run_worker(
        worker_job(settings, job, colocated=job["workers"]),
        local_url(settings),
        {**os.environ, **secret_env(settings)},
    )


def finish_study(settings: Settings, study: str) -> dict[str, Any]:
    """Best params and plots on the parent run; fails if the budget was not spent."""
    from pipelines.tune.storage import local_url
    from pipelines.tune.study import finish_study as finish

    return finish(settings, local_url(settings), study)


def finish_training(settings: Settings, run_id: str) -> dict[str, Any]:
    """Close a training run whose nodes ran elsewhere (one pod per node); it must hold rank 0's
    final metrics and model."""
    from pipelines.train.run import finish_training_run

    return finish_training_run(settings, run_id)


def evaluate(
    settings: Settings, run_id: str, force: str | None = None, reason: str | None = None
) -> dict[str, Any]:
    from pipelines.evaluate.run import evaluate_candidate

    r = evaluate_candidate(settings, run_id, force, reason)
    if force:
        _audit(
            settings,
            "evaluation.override",
            f"{settings.mlflow.model_name}/run/{run_id}",
            override=f"force-{force}",
            reason=reason,
            blessed=r["blessed"],
            gate_passed=r["blessing"]["gate_passed"],
            failed_rules=r["blessing"]["failed"],
            report_uri=r["report_uri"],
        )
    return {
        "run_id": run_id,
        "blessed": r["blessed"],
        "report_uri": r["report_uri"],
        "roc_auc": r["candidate"].get("roc_auc"),
        "champion_version": (r.get("champion") or {}).get("version"),
        "auc_delta": ((r.get("deltas") or {}).get("roc_auc") or {}).get("delta"),
        "auc_delta_ci": [
            ((r.get("deltas") or {}).get("roc_auc") or {}).get(k) for k in ("ci_low", "ci_high")
        ],
        "reasons": r["blessing"]["reasons"],
        "failed_rules": r["blessing"]["failed"],
        "override": r["blessing"].get("override"),
    }


def register(
    settings: Settings, run_id: str, lineage: dict[str, Any] | None = None
) -> dict[str, Any]:
    from pipelines.evaluate.run import register_candidate
    from pipelines.registry import Registry

    reg = Registry(settings.mlflow)
    version = register_candidate(settings, run_id, lineage)
    champion = reg.alias_version("champion")
    data_date = reg.run_tag(run_id, "data_date")
    champion_date = reg.run_tag(reg.version_run_id(champion), "data_date") if champion else None
    if version is not None:
        _audit(
            settings,
            "model.registered",
            f"{settings.mlflow.model_name}/{version}",
            run_id=run_id,
            data_version=reg.run_tag(run_id, "data_version"),
            data_date=data_date,
            lineage=lineage or {},
        )
    return {
        "model_version": version,
        "aliases": reg.aliases(),
        "data_date": data_date,
        "champion_data_date": champion_date,
        # An older interval (a late rerun) never replaces a model trained on newer data.
        "newer_than_champion": champion_date is None or (data_date or "") >= champion_date,
        "is_champion": version is not None and version == champion,
    }


def serving_control(settings: Settings) -> ServingControl:
    """The profile's serving control (local replicas and Envoy, or the cluster's); built here
    and passed down, so the serving code never builds adapters of its own."""
    from pipelines.serving.control import build

    return build(settings)


def serving_lease(settings: Settings) -> ServingLease:
    """The lease every change of the model's serving holds (built here, as the control)."""
    from pipelines.serving.lease import ServingLease
    from pipelines.store import open_store

    cfg = settings.serving
    return ServingLease(
        open_store(settings.store), settings.mlflow.model_name, cfg.lease_ttl_s, cfg.lease_wait_s
    )


def _changing_serving(settings: Settings, what: str) -> AbstractContextManager[Lease]:
    from pipelines.serving.lease import whoami

    return serving_lease(settings).hold(whoami(what))


def export_and_infra_validate(settings: Settings, version: str) -> dict[str, Any]:
    from pipelines.serving import rollout

    return rollout.export_and_infra_validate(settings, version)


def optimize_runtime(settings: Settings, version: str) -> dict[str, Any]:
    """The exported version's batch-scoring runtime: ONNX Runtime fp32 or int8 only where the
    gate measured it faster (batch 1 and 1024) and within the accuracy limits; the online
    servers keep the SavedModel. Published once per version (a rerun reads it back)."""
    from pipelines.optimize.run import optimize_version

    doc = optimize_version(settings, version)  # logs each candidate's reasons
    return {
        "model_version": str(version),
        "chosen": doc["chosen"],
        "batch_runtime": doc["chosen_runtime"],
        "batch_variant": doc["chosen_variant"],
        "report_uri": doc["report_uri"],
        "table": [
            {k: r.get(k) for k in ("name", "p50_ms_b1", "rows_per_s_b1024", "roc_auc", "kept")}
            for r in doc["table"]
        ],
    }


def stage_canary(settings: Settings, version: str) -> dict[str, Any]:
    from pipelines.serving import rollout

    with _changing_serving(settings, f"stage_canary v{version}") as lease:
        out = rollout.stage_canary(settings, serving_control(settings), version)
    _audit(
        settings,
        "rollout.canary_staged",
        f"{settings.mlflow.model_name}/{version}",
        lease=lease.generation,
        stable=out["stable"],
        canary=out["canary"],
        first_deployment=out["first_deployment"],
    )
    return out


def shadow_candidate(settings: Settings, version: str) -> dict[str, Any]:
    """Mirror stable's traffic to the staged candidate and judge the answers; a failed verdict
    decides the canary as rollback before any user gets the candidate's answer."""
    from pipelines.serving import shadow

    with _changing_serving(settings, f"shadow_candidate v{version}") as lease:
        out = shadow.shadow_candidate(settings, serving_control(settings), version)
    _audit(
        settings,
        "rollout.shadowed",
        f"{settings.mlflow.model_name}/{version}",
        lease=lease.generation,
        verdict=out["verdict"],
        reasons=out["reasons"],
        pairs=out["pairs"],
    )
    return out


def canary_tick(settings: Settings, version: str) -> dict[str, Any]:
    """One judged window of the canary (the Airflow sensor's poke); ``done`` once decided."""
    from pipelines.serving import monitor

    with _changing_serving(settings, f"canary window of v{version}"):  # it moves the weight
        state = monitor.canary_tick(settings, serving_control(settings), version)
    last = state["windows"][-1] if state["windows"] else None
    return {
        "done": state["decision"] is not None,
        "decision": state["decision"],
        "reason": state["reason"],
        "windows": len(state["windows"]),
        "weight": settings.canary.steps[min(state["step"], len(settings.canary.steps) - 1)],
        "last_window": last,
    }


def canary_verdict(settings: Settings, version: str) -> dict[str, Any] | None:
    """The persisted canary analysis of a version (None if it never started)."""
    from pipelines.serving import monitor

    state = monitor.load_state(settings, version)
    if state is None:
        return None
    return {"phase": "decided" if state["decision"] else "judging", **monitor.verdict_of(state)}


def canary_outcome(settings: Settings, version: str) -> str | None:
    """What ends a rollout once its canary task is done, whichever way: ``promote`` only on a
    promote verdict; ``rollback`` on any other verdict, on an analysis that never reached one,
    and on a version still staged as canary with no analysis at all; None when the version
    was never staged (or staging undid itself)."""
    verdict = canary_verdict(settings, version)
    if verdict is not None:
        return "promote" if verdict["decision"] == "promote" else "rollback"
    from pipelines.serving.control import labels_of

    staged = labels_of(serving_control(settings)).get("canary") == int(version)
    return "rollback" if staged else None


def undecided_reason(verdict: dict[str, Any], failure: dict[str, Any] | None) -> str:
    """The rollback reason of a canary analysis that reached no verdict: how far it got, and
    why its last attempt ended (the task's failure record), never a bare "failed"."""
    windows = len(verdict.get("windows") or [])
    why = (
        f"monitor_canary attempt {failure.get('try_number')} failed: {failure.get('error')}"
        if failure
        else "monitor_canary did not finish (no failure was recorded)"
    )
    return f"the canary analysis reached no verdict after {windows} judged window(s); {why}"


def monitor_canary(settings: Settings, version: str) -> dict[str, Any]:
    from pipelines.serving import monitor

    with _changing_serving(settings, f"canary analysis of v{version}"):
        v = monitor.monitor_canary(settings, serving_control(settings), version)
    return {
        "decision": v["decision"],
        "reason": v["reason"],
        "windows": len(v["windows"]),
        "last_window": v["windows"][-1] if v["windows"] else None,
    }


def promote(settings: Settings, version: str) -> dict[str, Any]:
    from pipelines.serving import rollout

    with _changing_serving(settings, f"promote v{version}") as lease:
        out = rollout.promote(settings, serving_control(settings), version)
    _audit(
        settings,
        "rollout.promoted",
        f"{settings.mlflow.model_name}/{version}",
        lease=lease.generation,
        previous_stable=out["previous_stable"],
        aliases=out["aliases"],
    )
    return out


def rollback(settings: Settings, version: str, reason: str = "") -> dict[str, Any]:
    from pipelines.serving import rollout

    with _changing_serving(settings, f"rollback v{version}") as lease:
        out = rollout.rollback(settings, serving_control(settings), version, reason)
    _audit(
        settings,
        "rollout.rolled_back",
        f"{settings.mlflow.model_name}/{version}",
        lease=lease.generation,
        reason=reason,
        stable=out["stable"],
        aliases=out["aliases"],
    )
    return out


def serving_state(settings: Settings) -> dict[str, Any]:
    from pipelines.serving import rollout

    return rollout.serving_labels(serving_control(settings))


def stop_local_serving(settings: Settings) -> list[str]:
    """Stop every local serving process of this home (replicas, Envoy, and whatever an earlier
    run left there); returns their names. Nothing to do in the remote profile."""
    from pipelines.serving.daemon import stop_all

    return stop_all(settings.serving.base_dir)


def rollout_decision(
    registered: dict[str, Any], *, backfill: bool, skip_rollout: bool
) -> dict[str, Any]:
    """Whether the registered version goes on to the canary, with one reason per check."""
    from pipelines.serving.admission import decide_rollout

    decision = decide_rollout(registered, backfill=backfill, skip_rollout=skip_rollout)
    for line in decision.reasons:
        log.info("roll-out: %s", line)
    return decision.to_dict()


# -- batch scoring -----------------------------------------------------------------------------
def plan_scoring(
    settings: Settings, date: str, version: str | None = None, dataset: str | None = None
) -> dict[str, Any]:
    """The day's chunk jobs for the champion (or a pinned version), or the manifest already
    published for that day and version (then nothing is planned)."""
    from pipelines.batch.score import plan_scoring as plan

    return plan(settings, date, version, dataset)


def latest_landing_date(settings: Settings, dataset: str | None = None) -> str:
    from pipelines.batch.score import latest_landing_date as latest

    return latest(settings, dataset)


def score_chunk(settings: Settings, job: dict[str, Any]) -> dict[str, Any]:
    from pipelines.batch.plan import ScoringJob
    from pipelines.batch.score import score_chunk as score_one

    return score_one(settings, ScoringJob.from_dict(job), settings.batch.threads)


def publish_predictions(
    settings: Settings, plan: dict[str, Any], parts: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The day's manifest, last and once; ``parts`` (the chunk tasks' results) are checked
    against what is in the store when given (pods report through the store alone)."""
    from pipelines.batch.score import publish

    out = publish(settings, plan, parts)
    if out["published_now"]:
        _predictions_audit(settings, out)
    return out


def score(
    settings: Settings,
    date: str,
    version: str | None = None,
    workers: int | None = None,
    dataset: str | None = None,
) -> dict[str, Any]:
    """``mlops score``: plan, score in local worker processes, publish."""
    from pipelines.batch.run import score as run

    out = run(settings, date, version, workers, dataset)
    if out["published_now"]:
        _predictions_audit(settings, out)
    return out


def _predictions_audit(settings: Settings, out: dict[str, Any]) -> None:
    _audit(
        settings,
        "predictions.published",
        f"{out['dataset']}/{out['date']}",
        model=f"{settings.mlflow.model_name}/{out['version']}",
        runtime=f"{out['runtime']}-{out['variant']}",
        rows=out["rows"],
        manifest_uri=out["manifest_uri"],
    )


# -- production monitoring -------------------------------------------------------------------
def ship_serving_log(
    settings: Settings, date: str, hour: int, open_hour: bool = False
) -> dict[str, Any]:
    """Publish one hour of the data plane's access log as the serving log (once); an open
    hour only with ``open_hour`` (see :func:`pipelines.monitoring.logs.ship_hour`). It never
    waits: the DAG's ``hour_logged`` sensor waits for :func:`serving_log_ready_at`."""
    from pipelines.monitoring import logs
    from pipelines.serving.dataplane.envoy import POOLS

    store, spec = _data(settings, None)
    control = serving_control(settings)
    versions = {}
    for label in POOLS:
        entry = control.pool(label)
        if entry is not None and label in entry.labels:
            versions[label] = int(entry.labels[label])
    start, _ = logs.hour_bounds(date, hour)
    out = logs.ship_hour(
        store,
        spec,
        settings.mlflow.model_name,
        date,
        hour,
        control.access_log_lines(start - 3600),
        versions,
        grace_s=_ship_delay(settings),
        open_hour=open_hour,
        heartbeat_s=settings.dataplane.heartbeat_s,
    )
    return {**out, "date": date, "hour": int(hour)}


def _ship_delay(settings: Settings) -> float:
    return max(settings.monitoring.ship_delay_s, settings.dataplane.log_flush_ms / 1000)


def serving_log_ready_at(settings: Settings, date: str, hour: int) -> float:
    """When the hour's serving log can be shipped whole: the hour's end plus
    ``monitoring.ship_delay_s`` (the log flush and the collector's uploads)."""
    from pipelines.monitoring.logs import hour_bounds

    return hour_bounds(date, hour)[1] + _ship_delay(settings)


def serving_log_ready(settings: Settings, date: str, hour: int, open_hour: bool = False) -> bool:
    """The hour can be shipped now: whole (:func:`serving_log_ready_at` has passed), or open
    on purpose (``open_hour``)."""
    return open_hour or time.time() >= serving_log_ready_at(settings, date, hour)


def monitor_hour(settings: Settings, date: str, hour: int) -> dict[str, Any]:
    """Judge one published hour and decide its actions (once); audited when it acts."""
    from pipelines.batch.score import ScoringError
    from pipelines.monitoring.run import monitor_hour as judge

    try:
        latest: str | None = latest_landing_date(settings)
    except ScoringError:  # nothing landed: a retraining decision says so when it is taken
        latest = None
    out = judge(settings, serving_control(settings), date, hour, latest)
    decision = out["decision"]
    # Also when a retry finds the hour decided: its first attempt may have failed before
    # this entry was written (a duplicate entry rather than a missing one, as every stage).
    if decision["actions"]:
        _audit(
            settings,
            "monitoring.decided",
            f"{settings.mlflow.model_name}/{decision['hour']}",
            champion=decision.get("champion"),
            actions=[{"kind": a["kind"], "reason": a["reason"]} for a in decision["actions"]],
            report_uri=out["report_uri"],
        )
    return out


def send_alerts(settings: Settings, decision: dict[str, Any]) -> list[str]:
    """A monitoring decision's alerts: an ERROR line each, and to the configured webhook."""
    from pipelines.monitoring.alerts import notifiers
    from pipelines.monitoring.alerts import send_alerts as send

    return send(decision, notifiers(settings))


def restore_champion(
    settings: Settings, from_version: str, to_version: str, reason: str
) -> dict[str, Any]:
    """Roll the promotion of ``from_version`` back: serving and the champion alias to
    ``to_version`` together. Refused, with one ERROR line and nothing changed, when the
    champion or serving moved since the decision, or another change of serving holds the
    lease past ``serving.lease_wait_s`` (a retry of a done restore finishes it)."""
    from pipelines.serving import rollout
    from pipelines.serving.lease import LeaseBusy

    try:
        # Under the lease, so no staging or promotion interleaves with the checks and moves.
        with _changing_serving(settings, f"monitoring rollback of v{from_version}") as lease:
            out = rollout.restore_champion(
                settings, serving_control(settings), from_version, to_version, reason
            )
    except (rollout.ServingMoved, LeaseBusy) as exc:
        log.error("MONITORING ALERT rollback of v%s refused: %s", from_version, exc)
        return {"decision": "refused", "reason": str(exc), "demoted": None}
    # "already_restored": a retry after the restore itself succeeded; recorded again.
    _audit(
        settings,
        "rollout.champion_restored",
        f"{settings.mlflow.model_name}/{to_version}",
        outcome=out["decision"],
        lease=lease.generation,
        demoted=out["demoted"],
        reason=reason,
        aliases=out["aliases"],
    )
    return out
