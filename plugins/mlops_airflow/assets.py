"""The Assets the DAGs emit and schedule on, defined once: a producer and its consumers must
name the same Asset, so neither spells its name or URI itself. URIs are logical and stable
across deployments; each event's extra carries the concrete manifest URI or model version.

Functions, called by each DAG file as it is parsed: the names follow the deployment's settings
at parse time (a module-level constant here would keep whatever the first import saw)."""

from __future__ import annotations

from airflow.sdk import Asset

from mlops_airflow.common import deployment


def dataset_asset() -> Asset:
    """Emitted by mlops_training_pipeline's shard_dataset."""
    dataset = deployment().data.dataset
    return Asset(name=f"{dataset}_shards", uri=f"mlops://datasets/{dataset}/shards")


def model_asset() -> Asset:
    """Emitted by mlops_training_pipeline's register_model and promote; mlops_batch_scoring
    runs on it."""
    model = deployment().mlflow.model_name
    return Asset(name=f"{model}_registered", uri=f"mlflow://models/{model}")


def predictions_asset() -> Asset:
    """Emitted by mlops_batch_scoring's publish; one per data set and model (an Asset's name
    must name one URI: Airflow deactivates the second of two Assets that share a name)."""
    s = deployment()
    return Asset(
        name=f"{s.data.dataset}_{s.mlflow.model_name}_predictions",
        uri=f"mlops://predictions/{s.data.dataset}/{s.mlflow.model_name}",
    )
