"""The Assets the DAGs emit and schedule on, defined once: a producer and its consumers must
name the same Asset, so neither spells its name or URI itself. URIs are logical and stable
across deployments; each event's extra carries the concrete manifest URI or model version."""

from __future__ import annotations

from airflow.sdk import Asset

from mlops_airflow.common import deployment

_DATASET = deployment().data.dataset
_MODEL = deployment().mlflow.model_name

# mlops_training_pipeline's shard_dataset emits it.
DATASET_ASSET = Asset(name=f"{_DATASET}_shards", uri=f"mlops://datasets/{_DATASET}/shards")
# mlops_training_pipeline's register_model and promote emit it; mlops_batch_scoring runs on it.
MODEL_ASSET = Asset(name=f"{_MODEL}_registered", uri=f"mlflow://models/{_MODEL}")
# mlops_batch_scoring's publish emits it.
PREDICTIONS_ASSET = Asset(
    name=f"{_DATASET}_predictions", uri=f"mlops://predictions/{_DATASET}/{_MODEL}"
)
