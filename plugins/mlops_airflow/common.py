"""Airflow glue shared by the DAGs: per-run settings, the interval's date, run reports.

Imports of ``pipelines`` happen inside functions so DAG parsing stays light.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from pipelines.config import Settings
    from pipelines.data.results import ValidationSummary

log = logging.getLogger(__name__)

OWNER = "ml-platform"
TRAINING_POOL = "mlops_training"
SENSOR_POOL = "mlops_sensors"
"""Long-poking sensors (the canary analysis, the wait for an hour's serving log): a pool of their
own, so they never take the slots other tasks need."""


def deployment() -> Settings:
    """The deployment's settings (profile and environment, read once per process): what the DAG
    needs at parse time, such as the training launcher and the sensor's timing."""
    from pipelines.config import settings

    return settings()


def run_settings(params: dict[str, Any]) -> Settings:
    """Settings of this run: the profile from the environment plus the trigger form's params."""
    import os

    from pipelines.params import apply_params

    # MLflow's download progress bars are written to stderr, which task logs show as ERROR.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    base = deployment()
    _mask_secrets(base)
    return apply_params(base, params)


def _mask_secrets(settings: Settings) -> None:
    """Airflow's secrets masker hides the settings' secrets in task logs and rendered fields, in
    the supervisor too (it masks the task's captured stdout, where training nodes print)."""
    from airflow.sdk.log import mask_secret

    from pipelines.config import secret_values

    for value in secret_values(settings):
        mask_secret(value)


def interval_date(context: dict[str, Any]) -> str:
    """The partition this run processes: the ``date`` param, else the data interval's start."""
    explicit = (context.get("params") or {}).get("date")
    if explicit:
        return str(explicit)[:10]
    start = context.get("data_interval_start") or context.get("logical_date")
    if start is None:
        raise ValueError("This run has no data interval and no 'date' param; pass a date.")
    return start.date().isoformat()


def run_tags(context: dict[str, Any]) -> dict[str, str]:
    """Lineage tags of a run's MLflow run and model version: the DAG run, and why it was
    triggered when its ``reason`` param says (the monitoring DAG's retraining runs do)."""
    tags = {"dag_id": context["dag"].dag_id, "dag_run_id": context["run_id"]}
    reason = (context.get("params") or {}).get("reason")
    if reason:
        tags["trigger_reason"] = str(reason)[:4000]
    return tags


def interval_hour(context: dict[str, Any]) -> tuple[str, int]:
    """The hour this run processes: the ``date``/``hour`` params, else the data interval's
    start (an hourly DAG)."""
    params = context.get("params") or {}
    start = context.get("data_interval_start") or context.get("logical_date")
    date = str(params["date"])[:10] if params.get("date") else None
    hour = params.get("hour")
    if date is None or hour is None:
        if start is None:
            raise ValueError("This run has no data interval; pass the 'date' and 'hour' params.")
        date = date or start.date().isoformat()
        hour = start.hour if hour is None else hour
    return date, int(hour)


def is_backfill(context: dict[str, Any]) -> bool:
    dag_run = context.get("dag_run")
    run_type = getattr(dag_run, "run_type", None)
    return str(getattr(run_type, "value", run_type)) == "backfill"


def training_key(context: dict[str, Any], settings: Settings, data_version: str) -> str:
    """Idempotency key of a training run: DAG, data version, code version and training config.

    A retry, a rerun of the same interval or a backfill over it finds the same key, so it
    resumes (or reuses) that run instead of training, and registering, a duplicate. A run that
    says why it trains (its ``reason`` param: the monitoring DAG's retrains do) is a new
    training run: its DAG run id joins the key, so it never reuses another run's result, while
    its own retries and reruns still resume it."""
    import hashlib

    from pipelines.registry import code_version

    cfg = settings.train.model_dump_json(exclude={"image", "namespace"})
    code = code_version(settings.mlflow.code_version)
    reason = (context.get("params") or {}).get("reason")
    own = f"|{context['run_id']}" if reason else ""
    digest = hashlib.sha256(f"{code}|{cfg}{own}".encode()).hexdigest()[:12]
    return f"{context['dag'].dag_id}/{data_version}/{digest}"


def _record_key(context: dict[str, Any], name: str, date: str | None = None) -> str:
    from pipelines.data import layout

    return (
        f"{layout.run_report(context['dag'].dag_id, date or interval_date(context))}/"
        f"{context['run_id']}/{name}.json"
    )


def record(
    context: dict[str, Any],
    payload: dict[str, Any],
    name: str | None = None,
    date: str | None = None,
) -> dict[str, Any]:
    """Store the task's result under ``reports/<dag>/<date>/<run>/<task>.json`` and log it;
    ``date`` for a run whose day is not its interval's (an Asset-triggered scoring run)."""
    from pipelines.store import open_store

    settings = run_settings(context.get("params") or {})
    key = _record_key(context, name or context["task"].task_id, date)
    open_store(settings.store).write_text(key, json.dumps(payload, indent=2, default=str))
    log.info("%s: %s", context["task"].task_id, json.dumps(payload, default=str))
    return payload


def recorded(context: dict[str, Any], name: str) -> dict[str, Any] | None:
    """What :func:`record` stored under ``name`` for this run (None if nothing)."""
    from pipelines.store import open_store

    store = open_store(run_settings(context.get("params") or {}).store)
    key = _record_key(context, name)
    return dict(json.loads(store.read_text(key))) if store.exists(key) else None


def blocked(context: dict[str, Any], summary: ValidationSummary) -> NoReturn:
    """A batch the gate blocked: its report, readable, in the task log (what a user opening
    the failed run in the UI looks for), stored as the task's result, and the task failed
    without a retry (the same batch would be blocked again)."""
    log.error("The data gate blocked this batch:\n%s", summary.message())
    record(context, summary.to_dict())
    # A gate's decision, not a crash: the task exits failed with the verdict's first line
    # (Airflow logs "Task exited" with it), where an exception would add a traceback that
    # repeats the report. validate_data has no retries, so it is not run again.
    raise SystemExit(summary.message().splitlines()[0])


def no_landing_data(context: dict[str, Any], date: str) -> NoReturn:
    """A run for an interval whose data has not landed (a scheduled run, or one triggered
    without a ``date``): skipped with its reason, recorded, never a red run, and never holding
    up a run triggered for a day that has its data."""
    from airflow.sdk.exceptions import AirflowSkipException

    reason = (
        f"no landing data for {date}: nothing to validate, train or roll out; once the day "
        "lands, trigger a run with that date (or clear this one)"
    )
    log.warning("%s", reason)
    record(context, {"status": "no_data", "date": date, "reason": reason})
    raise AirflowSkipException(reason)


def on_failure(context: dict[str, Any]) -> None:
    """Failure callback: one short, clear line in the task log (and in the run report)."""
    ti = context.get("task_instance")
    err = context.get("exception")
    # Without an exception the attempt did not fail by itself: its process was killed, or the
    # scheduler failed it (a task instance whose executor event did not match its state).
    error = (
        str(err)
        if err is not None
        else "the attempt ended without an exception of its own (its process was killed, or "
        "the scheduler failed it); the task log and the scheduler log say which"
    )
    summary = {
        "failed_task": getattr(ti, "task_id", "?"),
        "try_number": getattr(ti, "try_number", None),
        "error": error[:2000],
    }
    dag_id = getattr(context.get("dag"), "dag_id", None) or getattr(ti, "dag_id", "the DAG")
    log.error("%s failed in %s: %s", dag_id, summary["failed_task"], summary["error"])
    try:
        record(context, summary, name=f"{summary['failed_task']}.failed")
    except Exception:
        log.exception("could not write the failure report")
