"""Tuning workers on Kubernetes: one KubernetesPodOperator per worker (dynamic task mapping),
each running the same ``python -m pipelines.tune --job ...`` line as a local worker process.

The pods share the training pods' image, resources and secrets (``train.secret_env``); the
study's storage URL reaches them as ``MLOPS__TUNING__STORAGE`` from one of those secrets,
never in the pod spec. Locally, DAG tasks may take the URL from an Airflow connection.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.config import Settings

WORKER_LABEL = "mlops.io/tuning-worker"
STUDY_LABEL = "mlops.io/study"


def tuning_settings(params: dict[str, Any]) -> Settings:
    """The run's settings, ``tuning.storage`` filled from the Airflow connection
    ``tuning.storage_conn_id`` when no URL is configured (masked in task logs)."""
    from mlops_airflow.common import run_settings
    from pipelines.config import with_overrides

    s = run_settings(params)
    conn_id = s.tuning.storage_conn_id
    if s.tuning.storage is not None or not conn_id:
        return s
    from airflow.sdk import Connection
    from airflow.sdk.log import mask_secret

    url = sqlalchemy_url(Connection.get(conn_id).get_uri())
    mask_secret(url)
    return with_overrides(s, tuning={"storage": url})


def sqlalchemy_url(uri: str) -> str:
    """An Airflow connection URI (``postgres://`` or ``postgresql://``) as the psycopg2
    SQLAlchemy URL Optuna takes."""
    scheme, sep, rest = uri.partition("://")
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg2{sep}{rest}"
    return uri


def study_key(study: str) -> str:
    """A label-safe, stable key of a study name."""
    return hashlib.sha1(study.encode()).hexdigest()[:10]


def pod_name(study: str, worker: int) -> str:
    """A DNS-1123 pod name, stable for one study and worker (a retried task reuses it)."""
    return f"tune-{study_key(study)}-{worker}"


def worker_pod_kwargs(settings: Settings, job: dict[str, Any]) -> dict[str, Any]:
    """The per-worker KubernetesPodOperator arguments (JSON-able, for ``expand_kwargs``): the
    worker's job on the command line, no secret in it. Each pod has its own cores, so its
    torch threads are not divided among the workers (``colocated`` 1)."""
    from pipelines import stages

    tune_job = stages.worker_job(settings, job, colocated=1)
    name = pod_name(job["study"], job["worker"])
    return {
        "name": name,
        "labels": {STUDY_LABEL: study_key(job["study"]), WORKER_LABEL: str(job["worker"])},
        "cmds": ["python"],
        "arguments": ["-m", "pipelines.tune", *tune_job.argv()],
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }
