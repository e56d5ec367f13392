"""Batch scoring on Kubernetes: one KubernetesPodOperator per chunk (dynamic task mapping), each
running ``python -m pipelines.batch --job ...``, the line a local mapped task runs in-process.

The pods use the training image, namespace, secrets and security context (``train.*``); the
job on the command line carries no secret. The publish task reads each part back from the
store, so a pod's result does not need to travel through XCom.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.config import Settings

CHUNK_LABEL = "mlops.io/scoring-chunk"
RUN_LABEL = "mlops.io/scoring"


def pod_name(job: dict[str, Any]) -> str:
    """A DNS-1123 name, stable for one day, version and chunk (a retried task reuses it)."""
    key = f"{job['dataset']}/{job['version']}/{job['date']}"
    return f"score-{hashlib.sha1(key.encode()).hexdigest()[:10]}-{job['chunk']['index']}"


def chunk_pod_kwargs(settings: Settings, job: dict[str, Any]) -> dict[str, Any]:
    """The per-chunk KubernetesPodOperator arguments (JSON-able, for ``expand_kwargs``)."""
    threads = settings.batch.threads
    key = f"{job['dataset']}/{job['version']}/{job['date']}"
    return {
        "name": pod_name(job),
        "labels": {
            RUN_LABEL: hashlib.sha1(key.encode()).hexdigest()[:10],
            CHUNK_LABEL: str(job["chunk"]["index"]),
        },
        "cmds": ["python"],
        "arguments": [
            "-m",
            "pipelines.batch",
            "--job",
            json.dumps(job, sort_keys=True),
            *(["--threads", str(threads)] if threads else []),
        ],
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }


def scoring_pod_defaults(settings: Settings) -> dict[str, Any]:
    """The training pods' defaults without the rendezvous port (a chunk talks to nobody)."""
    from mlops_airflow.training import pod_defaults

    out = pod_defaults(settings.train)
    out.pop("ports", None)
    return out


def scoring_date(context: dict[str, Any], settings: Settings) -> str:
    """The ``date`` param; else a time run's data-interval day; else (an Asset-triggered run,
    which has no interval of its own) the latest landing partition."""
    from mlops_airflow.common import interval_date
    from pipelines import stages

    explicit = (context.get("params") or {}).get("date")
    if explicit:
        return str(explicit)[:10]
    run_type = getattr(context.get("dag_run"), "run_type", None)
    if str(getattr(run_type, "value", run_type)) != "asset_triggered":
        return interval_date(context)
    return stages.latest_landing_date(settings)
