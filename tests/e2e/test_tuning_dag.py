"""The ``mlops_tuning`` DAG end to end with ``dag.test()``: storage set up and torn down, a
study created, mapped workers spending its budget on the real trainer, the summary on MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines import stages
from pipelines.config import Settings, settings
from pipelines.registry import Registry

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPACE = {
    "lr": {"kind": "float", "low": 1e-3, "high": 3e-2, "log": True},
    "hidden": {"kind": "categorical", "choices": [[16], [32, 16]]},
    "epochs": {"kind": "int", "low": 1, "high": 2},
}


def test_the_tuning_dag_runs_one_study_with_mapped_workers(  # type: ignore[no-untyped-def]
    airflow_db: None, local_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna
    from airflow.models import DagBag
    from airflow.utils.state import DagRunState, TaskInstanceState

    from pipelines.tune.storage import local_server, open_storage
    from pipelines.tune.study import tuning_mlflow

    monkeypatch.setenv("MLOPS__TUNING__SPACE", json.dumps(SPACE))
    monkeypatch.setenv("MLOPS__TUNING__STARTUP_TRIALS", "2")
    settings.cache_clear()
    s = settings()
    stages.generate_data(s, "2026-11-01", rows=3000)
    stages.validate_data(s, "2026-11-01")
    manifest = stages.shard_data(s, "2026-11-01")["manifest_uri"]
    pg = local_server(s)
    assert pg.daemon.pid() is None
    dag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags")).dags["mlops_tuning"]
    try:
        dr = dag.test(run_conf={"manifest_uri": manifest, "trials": 3, "workers": 2})
        assert dr.state == DagRunState.SUCCESS
        tis = {(ti.task_id, ti.map_index): ti for ti in dr.get_task_instances()}
        assert {k for k in tis if k[0] == "tune_worker"} == {("tune_worker", 0), ("tune_worker", 1)}
        assert all(ti.state == TaskInstanceState.SUCCESS for ti in tis.values())
        summary = tis[("finish_study", -1)].xcom_pull(task_ids="finish_study")
        assert summary["complete"] + summary["pruned"] == 3 and summary["failed"] == 0
        assert tis[("start_storage", -1)].xcom_pull(task_ids="start_storage")["owned"] is True
        # The teardown stopped the server the setup started.
        assert pg.daemon.pid() is None
        with local_server(s) as running:
            study = optuna.load_study(
                study_name=summary["study"],
                storage=open_storage(s.tuning, running.url(s.tuning.database)),
            )
            assert sorted(t.number for t in study.get_trials()) == [0, 1, 2]
        reg = Registry(tuning_mlflow(s))
        parent = reg.get_run(summary["parent_run_id"])
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["mlops.best_trial"] == str(summary["best_trial"])
        children = reg.client.search_runs(
            [reg.experiment_id()],
            filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'",
        )
        assert len(children) == 3
    finally:
        pg.stop()
