"""Where things live in the lake: one function per kind of key, so no stage invents paths."""

from __future__ import annotations

import datetime as dt


def partition(date: str | dt.date) -> str:
    """``dt=YYYY-MM-DD`` for a date or an ISO date string (validated)."""
    if isinstance(date, str):
        try:
            date = dt.date.fromisoformat(date[:10])
        except ValueError as exc:
            raise ValueError(f"Date {date!r} is not an ISO date (YYYY-MM-DD).") from exc
    return f"dt={date.isoformat()}"


def landing(dataset: str, date: str | dt.date) -> str:
    return f"landing/{dataset}/{partition(date)}"


def quarantine(dataset: str, date: str | dt.date) -> str:
    return f"quarantine/{dataset}/{partition(date)}"


def validation_report(dataset: str, date: str | dt.date) -> str:
    """Report kept next to the batch (it moves with the batch into quarantine)."""
    return f"{landing(dataset, date)}/_validation"


def reference(dataset: str, date: str | dt.date | None = None) -> str:
    return f"reference/{dataset}" + (f"/{partition(date)}" if date else "")


def shards(dataset: str, data_version: str | None = None) -> str:
    return f"shards/{dataset}" + (f"/{data_version}" if data_version else "")


def checkpoints(run_id: str) -> str:
    return f"checkpoints/{run_id}"


def evaluation(run_id: str) -> str:
    return f"evaluations/{run_id}"


def export(model_name: str, version: str | int) -> str:
    return f"exports/{model_name}/{version}"


def rollout(model_name: str, version: str | int) -> str:
    return f"rollouts/{model_name}/{version}"


def run_report(dag_id: str, run_id: str) -> str:
    return f"reports/{dag_id}/{run_id}"


def predictions(dataset: str, model_name: str, version: str | int, date: str | dt.date) -> str:
    """Batch scores of one day by one model version: ``part-*.parquet`` and a manifest."""
    return f"predictions/{dataset}/{model_name}/{version}/{partition(date)}"


def hour_partition(hour: int) -> str:
    if not 0 <= int(hour) <= 23:
        raise ValueError(f"Hour {hour!r} is not in 0..23.")
    return f"hour={int(hour):02d}"


def serving_logs(
    model_name: str, date: str | dt.date | None = None, hour: int | None = None
) -> str:
    """The serving log of one hour: ``part-*.parquet`` and a ``_manifest.json`` written last."""
    out = f"serving_logs/{model_name}"
    if date is not None:
        out += f"/{partition(date)}"
        if hour is not None:
            out += f"/{hour_partition(hour)}"
    return out


def outcomes(dataset: str, date: str | dt.date | None = None) -> str:
    """Late labels (outcomes) landing per day, keyed like the requests: key, label."""
    return f"outcomes/{dataset}" + (f"/{partition(date)}" if date is not None else "")


def monitoring(model_name: str, date: str | dt.date, hour: int) -> str:
    """One monitoring run's report (JSON, markdown, plots)."""
    return f"monitoring/{model_name}/{partition(date)}/{hour_partition(hour)}"
