"""Whole DAG runs with ``dag.test()``: another dataset through the same DAG, and a rerun of its
day. (The demo's test checks the three days of the main dataset: deploy, canary, a blocked
batch.)"""

from __future__ import annotations

import json
from pathlib import Path

import pendulum
import pytest

from pipelines import stages
from pipelines.config import Settings
from pipelines.data import layout
from pipelines.registry import Registry
from pipelines.store import open_store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DAG_ID = "mlops_training_pipeline"


def run_day(date: str, **conf: object):  # type: ignore[no-untyped-def]
    from airflow.models import DagBag

    dag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags")).dags[DAG_ID]
    return dag.test(
        logical_date=pendulum.parse(f"{date}T00:00:00+00:00"),
        run_conf={"date": date, "epochs": 4, **conf},
    )


def reports(settings: Settings, date: str, run_id: str, dag_id: str = DAG_ID) -> dict:
    store = open_store(settings.store)
    prefix = f"{layout.run_report(dag_id, date)}/{run_id}"
    return {
        k.rsplit("/", 1)[-1].removesuffix(".json"): json.loads(store.read_text(k))
        for k in store.list(prefix)
    }


def test_a_second_dataset_runs_through_the_same_dag(
    airflow_db: None, mlops_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scikit-learn's breast-cancer data (numeric only, another label and keys) with a new spec
    and a model name from configuration: no code changes."""
    from airflow.utils.state import DagRunState

    from pipelines.config import settings

    monkeypatch.setenv("MLOPS__MLFLOW__MODEL_NAME", "cancer_classifier")
    # Four record batches, validated and sharded batch by batch inside the Airflow task.
    monkeypatch.setenv("MLOPS__DATA__BATCH_ROWS", "1000")
    settings.cache_clear()
    s = settings()
    stages.generate_data(s, "2026-11-01", dataset="breast_cancer", rows=4000)
    dr = run_day("2026-11-01", dataset="breast_cancer", canary_steps=[50, 100])
    assert dr.state == DagRunState.SUCCESS
    r = reports(s, "2026-11-01", dr.run_id)
    assert r["validate_data"]["status"] == "accepted"
    assert r["validate_data"]["batches"] == 4
    assert r["evaluate_model"]["roc_auc"] > 0.9
    assert r["register_model"]["model_version"] == "1"
    assert r["promote"]["decision"] == "promoted"
    reg = Registry(s.mlflow)
    assert reg.model_name == "cancer_classifier" and reg.alias_version("champion") == "1"
    assert stages.serving_state(s)["labels"] == {"stable": 1, "canary": 1}
    manifest = open_store(s.store).read_text(
        open_store(s.store).key_of(r["shard_dataset"]["manifest_uri"])
    )
    assert '"categorical": {}' in manifest and '"label": "malignant"' in manifest

    # A rerun of the day (same data, code and config) reuses the training run: no new
    # version, no rollout, the champion stays.
    again = run_day("2026-11-01", dataset="breast_cancer", canary_steps=[50, 100])
    assert again.state == DagRunState.SUCCESS
    rerun = reports(s, "2026-11-01", again.run_id)
    assert rerun["train_model"]["reused"] is True
    assert rerun["train_model"]["run_id"] == r["train_model"]["run_id"]
    assert rerun["register_model"]["model_version"] == "1"
    assert rerun["register_model"]["rollout"]["roll_out"] is False
    assert (
        "NO: version 1 already serves as champion: nothing to roll out"
        in rerun["register_model"]["rollout"]["reasons"]
    )
    assert "stage_canary" not in rerun and "promote" not in rerun
    assert reg.alias_version("champion") == "1"
