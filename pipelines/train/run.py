"""The train stage: an MLflow run around a multi-node launch (local agents here; pods on k8s)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pipelines.config import Settings
from pipelines.data.shard import load_manifest
from pipelines.registry import Registry, code_version
from pipelines.store import open_store
from pipelines.train.job import TrainJob, secret_env
from pipelines.train.launch import launch_local

log = logging.getLogger(__name__)


def start_training_run(
    settings: Settings, manifest_uri: str, run_key: str | None, tags: dict[str, Any] | None = None
) -> tuple[str, bool]:
    """(run id, already finished). A retried task with the same key reuses its run, so it
    resumes from that run's checkpoints instead of starting from step 0."""
    reg = Registry(settings.mlflow)
    if run_key:
        prior = reg.find_run(run_key)
        if prior is not None:
            done = prior.info.status == "FINISHED"
            log.info(
                "reusing MLflow run %s for %s (status %s)",
                prior.info.run_id,
                run_key,
                prior.info.status,
            )
            return str(prior.info.run_id), done
    manifest = load_manifest(open_store(settings.store), manifest_uri)
    run_tags = {
        "data_version": manifest.data_version,
        "manifest_uri": manifest_uri,
        "dataset": manifest.data["dataset"],
        "data_date": manifest.data["date"],
        "git_sha": code_version(settings.mlflow.code_version),
        **({"run_key": run_key} if run_key else {}),
        **(tags or {}),
    }
    run_id = reg.create_run(f"train-{manifest.data['dataset']}-{manifest.data['date']}", run_tags)
    reg.log_params(
        run_id,
        {
            **settings.train.model_dump(exclude={"image", "namespace"}),
            "world_size": settings.train.nodes * settings.train.procs_per_node,
        },
    )
    return run_id, False


def train_model(
    settings: Settings,
    manifest_uri: str,
    run_key: str | None = None,
    tags: dict[str, Any] | None = None,
    sink: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train on a published data set with the local launcher; returns run id and metrics."""
    reg = Registry(settings.mlflow)
    run_id, done = start_training_run(settings, manifest_uri, run_key, tags)
    if done:
        return {"run_id": run_id, "metrics": dict(reg.get_run(run_id).data.metrics), "reused": True}
    t = settings.train
    try:
        result = launch_local(
            TrainJob.for_run(settings, manifest_uri, run_id).argv(),
            nodes=t.nodes,
            procs_per_node=t.procs_per_node,
            max_restarts=t.max_restarts,
            min_nodes=t.min_nodes,
            rdzv_port=t.rdzv_port,
            env=secret_env(settings),
            sink=sink,
        )
    except BaseException:
        reg.end_run(run_id, ok=False)
        raise
    reg.end_run(run_id, ok=True)
    return {"run_id": run_id, "metrics": result, "reused": False}


def training_finished(settings: Settings, run_id: str) -> bool:
    """Whether rank 0 of the run logged its final metrics and model (pods report nothing else)."""
    reg = Registry(settings.mlflow)
    if "val_auc" not in reg.get_run(run_id).data.metrics:
        return False
    try:
        reg.read_artifact(run_id, "model/model.pt")
    except Exception:  # noqa: BLE001 - any failure to read means no usable model
        return False
    return True


def finish_training_run(settings: Settings, run_id: str) -> dict[str, Any]:
    """Close a run whose nodes ran elsewhere (pods): it must hold rank 0's summary and model."""
    reg = Registry(settings.mlflow)
    metrics = dict(reg.get_run(run_id).data.metrics)
    if "val_auc" not in metrics:
        reg.end_run(run_id, ok=False)
        raise RuntimeError(f"Training run {run_id} has no final metrics: rank 0 did not finish.")
    reg.read_artifact(run_id, "model/model.pt")  # raises if the model is missing
    reg.end_run(run_id, ok=True)
    return {"run_id": run_id, "metrics": metrics, "reused": False}
