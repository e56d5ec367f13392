"""Whole DAG runs with ``dag.test()`` on embedded defaults: deploy, canary, and a blocked batch."""

from __future__ import annotations

import json
from pathlib import Path

import pendulum
import pytest

from pipelines import stages
from pipelines.config import Settings
from pipelines.data import layout
from pipelines.registry import Registry
from pipelines.serving.dataplane.envoy import POOLS
from pipelines.store import open_store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DAG_ID = "mlops_training_pipeline"
SCORING_DAG_ID = "mlops_batch_scoring"


def run_day(date: str, **conf: object):  # type: ignore[no-untyped-def]
    from airflow.models import DagBag

    dag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags")).dags[DAG_ID]
    return dag.test(
        logical_date=pendulum.parse(f"{date}T00:00:00+00:00"),
        run_conf={"date": date, "epochs": 4, **conf},
    )


def run_scoring(date: str):  # type: ignore[no-untyped-def]
    from airflow.models import DagBag

    dags = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags")).dags
    return dags[SCORING_DAG_ID].test(
        logical_date=pendulum.parse(f"{date}T00:00:00+00:00"), run_conf={"date": date}
    )


def asset_events() -> dict[str, list[dict]]:
    """Asset name -> extras of its events, read from the metadata DB (the test is no task)."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    out: dict[str, list[dict]] = {}
    with create_session() as session:
        rows = session.execute(
            select(AssetModel.name, AssetEvent.extra).join(
                AssetModel, AssetModel.id == AssetEvent.asset_id
            )
        ).all()
    for name, extra in rows:
        out.setdefault(name, []).append(dict(extra or {}))
    return out


def reports(settings: Settings, date: str, run_id: str, dag_id: str = DAG_ID) -> dict:
    store = open_store(settings.store)
    prefix = f"{layout.run_report(dag_id, date)}/{run_id}"
    return {
        k.rsplit("/", 1)[-1].removesuffix(".json"): json.loads(store.read_text(k))
        for k in store.list(prefix)
    }


def test_two_days_then_a_bad_batch(airflow_db: None, local_settings: Settings) -> None:
    from airflow.utils.state import DagRunState

    s = local_settings
    store = open_store(s.store)
    reg = Registry(s.mlflow)

    # Day 1: the first model is trained, registered and deployed as stable.
    stages.generate_data(s, "2026-11-01", rows=20000)
    dr = run_day("2026-11-01")
    assert dr.state == DagRunState.SUCCESS
    r1 = reports(s, "2026-11-01", dr.run_id)
    assert r1["validate_data"]["status"] == "accepted"
    assert store.exists(store.key_of(r1["validate_data"]["report_uri"]))
    manifest = r1["shard_dataset"]["manifest_uri"]
    assert store.exists(store.key_of(manifest))
    run = reg.get_run(r1["train_model"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["world_size"] == 2.0
    assert store.exists(store.key_of(r1["evaluate_model"]["report_uri"]))
    assert r1["register_model"]["model_version"] == "1"
    version = reg.version("1")
    for tag in ("data_version", "git_sha", "run_id", "manifest_uri", "dag_run_id"):
        assert version.tags.get(f"mlops.{tag}"), tag
    assert store.exists(
        store.key_of(r1["export_and_infra_validate"]["export_uri"]) + "/saved_model.pb"
    )
    assert r1["monitor_canary"]["decision"] == "promote"
    assert r1["promote"]["decision"] == "promoted"
    assert reg.alias_version("champion") == "1"
    assert stages.serving_state(s)["labels"] == {"stable": 1, "canary": 1}

    # Day 2: drifted data; a challenger goes through evaluation, registration and the canary.
    stages.generate_data(s, "2026-11-02", rows=20000, drift=0.5)
    dr = run_day("2026-11-02")
    assert dr.state == DagRunState.SUCCESS
    r2 = reports(s, "2026-11-02", dr.run_id)
    assert r2["shard_dataset"]["data_version"] != r1["shard_dataset"]["data_version"]
    assert r2["evaluate_model"]["champion_version"] == "1"
    assert r2["register_model"]["model_version"] == "2"
    assert r2["shadow_candidate"]["verdict"] == "pass", r2["shadow_candidate"]
    assert r2["monitor_canary"]["windows"] >= 4
    assert r2["promote"]["decision"] == "promoted", r2["monitor_canary"]
    assert reg.alias_version("champion") == "2"
    assert stages.serving_state(s)["labels"] == {"stable": 2, "canary": 2}
    assert stages.serving_state(s)["canary_weight"] == 0

    # Each exported version got its batch runtime from the optimisation gate.
    assert r2["optimize_runtime"]["batch_runtime"] in ("savedmodel", "onnxruntime")
    assert reg.version("2").tags["mlops.batch_runtime"] == r2["optimize_runtime"]["batch_runtime"]

    # Batch scoring, after the training run: the champion scores day 2's landing partition.
    scoring = run_scoring("2026-11-02")
    assert scoring.state == DagRunState.SUCCESS
    published = reports(s, "2026-11-02", scoring.run_id, SCORING_DAG_ID)["publish"]
    assert published["published_now"] and published["rows"] == 20000
    assert published["version"] == "2"
    # The gate's choice: its tag says "onnxruntime", the runtime kind of scoring is "onnx".
    gate = r2["optimize_runtime"]
    kind = "onnx" if gate["batch_runtime"] == "onnxruntime" else "savedmodel"
    assert (published["runtime"], published["variant"]) == (kind, gate["batch_variant"])
    pred_prefix = layout.predictions("transactions", s.mlflow.model_name, "2", "2026-11-02")
    assert store.exists(f"{pred_prefix}/manifest.json")
    # The same run again publishes nothing new.
    again = run_scoring("2026-11-02")
    assert again.state == DagRunState.SUCCESS
    assert (
        reports(s, "2026-11-02", again.run_id, SCORING_DAG_ID)["publish"]["published_now"] is False
    )

    # A rerun of day 2 (same data, code and config) reuses the training run: no new version,
    # no rollout, the champion stays.
    dr = run_day("2026-11-02")
    assert dr.state == DagRunState.SUCCESS
    rerun = reports(s, "2026-11-02", dr.run_id)
    assert rerun["train_model"]["reused"] is True
    assert rerun["train_model"]["run_id"] == r2["train_model"]["run_id"]
    assert rerun["register_model"]["model_version"] == "2"
    assert rerun["register_model"]["rollout"]["roll_out"] is False
    assert (
        "NO: version 2 already serves as champion: nothing to roll out"
        in (rerun["register_model"]["rollout"]["reasons"])
    )
    assert "stage_canary" not in rerun
    assert reg.alias_version("champion") == "2"

    # Other DAGs can subscribe: the run emitted Asset events with the data and model versions.
    events = asset_events()
    assert {
        "data_version": r2["shard_dataset"]["data_version"],
        "manifest_uri": r2["shard_dataset"]["manifest_uri"],
    } in events["transactions_shards"]
    assert {"model_version": "2", "run_id": r2["train_model"]["run_id"]} in events[
        "fraud_detector_registered"
    ]

    # Day 3: a batch with PII is blocked; nothing downstream changes.
    pools = [Path(s.serving.base_dir) / pool / "models.config" for pool in POOLS]
    config_before = [p.read_text() for p in pools]
    shards_before = store.list(layout.shards("transactions"))
    stages.generate_data(s, "2026-11-03", rows=4000, defect="pii")
    dr = run_day("2026-11-03")
    assert dr.state == DagRunState.FAILED
    r3 = reports(s, "2026-11-03", dr.run_id)
    assert r3["validate_data"]["status"] == "blocked"
    assert "shard_dataset" not in r3 and "train_model" not in r3
    # decide runs after failures (all_done) and fails at once (no retries) when nothing was
    # registered, so the run ends failed; nothing else ran.
    assert sorted(k for k in r3 if k.endswith(".failed")) == [
        "decide.failed",
        "validate_data.failed",
    ], sorted(r3)
    assert "earlier task failed" in r3["decide.failed"]["error"]
    assert store.list(layout.quarantine("transactions", "2026-11-03"))
    assert not store.exists(layout.landing("transactions", "2026-11-03"))
    assert store.list(layout.shards("transactions")) == shards_before
    assert [p.read_text() for p in pools] == config_before
    assert reg.alias_version("champion") == "2"
    assert len(reg.client.search_model_versions(f"name = '{s.mlflow.model_name}'")) == 2


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
