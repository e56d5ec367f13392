"""DAG integrity of ``mlops_model_monitoring``: structure, the hourly schedule, params, and a
retraining trigger the training DAG accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bag():  # type: ignore[no-untyped-def]
    from airflow.models import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag


def test_structure_schedule_and_params(bag) -> None:  # type: ignore[no-untyped-def]
    dag = bag.dags["mlops_model_monitoring"]
    assert {t.task_id: set(t.downstream_task_ids) for t in dag.tasks} == {
        "hour_logged": {"ship_serving_log"},
        "ship_serving_log": {"monitor"},
        "monitor": {
            "alert",
            "should_retrain",
            "should_roll_back",
            "roll_back",
            "trigger_retraining",
        },
        "alert": set(),
        "should_retrain": {"trigger_retraining"},
        "trigger_retraining": set(),
        "should_roll_back": {"roll_back"},
        "roll_back": set(),
    }
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert dag.timetable.expression == "0 * * * *"  # hourly intervals
    assert dag.max_active_runs == 1  # hours in order: a streak reads the hours before
    assert {"date", "hour", "ship_open_hour"} == set(dag.params.keys())
    assert dag.params["ship_open_hour"] is False
    # The wait for the hour's log pokes in the sensors' pool (reschedule mode can be failed by
    # the scheduler on a stale executor event, apache/airflow#71172), and is retried.
    sensor = dag.get_task("hour_logged")
    assert sensor.mode == "poke" and sensor.pool == "mlops_sensors" and sensor.retries >= 1
    assert sensor.poke_interval <= 60 and sensor.execution_timeout.total_seconds() > sensor.timeout
    for t in dag.tasks:
        assert t.owner == "ml-platform" and t.execution_timeout is not None, t.task_id


def test_the_retraining_trigger_targets_the_training_dag_once_per_hour(bag) -> None:  # type: ignore[no-untyped-def]
    trigger = bag.dags["mlops_model_monitoring"].get_task("trigger_retraining")
    assert trigger.trigger_dag_id == "mlops_training_pipeline"
    assert trigger.trigger_dag_id in bag.dags
    assert trigger.skip_when_already_exists  # a rerun of the hour does not train twice
    assert not trigger.wait_for_completion
    # What the conf carries is in the training DAG's form (the e2e test checks the values).
    assert {"date", "reason"} <= set(bag.dags["mlops_training_pipeline"].params.keys())
