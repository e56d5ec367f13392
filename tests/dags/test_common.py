"""The Airflow glue: which partition a run processes, backfill detection, per-run settings."""

from __future__ import annotations

from types import SimpleNamespace

import pendulum
import pytest
from mlops_airflow.common import (
    interval_date,
    interval_hour,
    is_backfill,
    run_settings,
    run_tags,
    training_key,
)

from pipelines.config import load_settings, with_overrides


def test_interval_date_prefers_the_param_then_the_interval_start() -> None:
    start = pendulum.datetime(2026, 3, 1, tz="UTC")
    assert interval_date({"params": {"date": "2026-02-14"}, "data_interval_start": start}) == (
        "2026-02-14"
    )
    assert interval_date({"params": {"date": None}, "data_interval_start": start}) == "2026-03-01"
    with pytest.raises(ValueError, match="no data interval"):
        interval_date({"params": {}})


def test_interval_hour_prefers_the_params_then_the_interval_start() -> None:
    start = pendulum.datetime(2026, 3, 1, 17, tz="UTC")
    assert interval_hour({"params": {}, "data_interval_start": start}) == ("2026-03-01", 17)
    got = interval_hour({"params": {"date": "2026-02-14", "hour": 0}, "data_interval_start": start})
    assert got == ("2026-02-14", 0)
    assert interval_hour({"params": {"date": "2026-02-14"}, "data_interval_start": start}) == (
        "2026-02-14",
        17,
    )
    assert interval_hour({"params": {"date": "2026-02-14", "hour": 3}}) == ("2026-02-14", 3)
    with pytest.raises(ValueError, match="'date' and 'hour'"):
        interval_hour({"params": {"date": "2026-02-14"}})


def test_run_tags_carry_the_trigger_reason_only_when_given() -> None:
    ctx = {"dag": SimpleNamespace(dag_id="d"), "run_id": "r", "params": {"reason": ""}}
    assert run_tags(ctx) == {"dag_id": "d", "dag_run_id": "r"}
    ctx["params"] = {"reason": "monitoring: drift"}
    assert run_tags(ctx)["trigger_reason"] == "monitoring: drift"


def test_backfill_runs_are_recognised() -> None:
    from airflow.utils.types import DagRunType

    assert is_backfill({"dag_run": SimpleNamespace(run_type=DagRunType.BACKFILL_JOB)})
    assert is_backfill({"dag_run": SimpleNamespace(run_type="backfill")})
    assert not is_backfill({"dag_run": SimpleNamespace(run_type=DagRunType.SCHEDULED)})
    assert not is_backfill({"dag_run": SimpleNamespace(run_type=DagRunType.MANUAL)})
    assert not is_backfill({})


def test_run_settings_apply_the_trigger_form(mlops_env) -> None:  # type: ignore[no-untyped-def]
    s = run_settings({"nodes": 3, "epochs": 2, "canary_steps": [10, 100], "dataset": "x"})
    assert (s.train.nodes, s.train.epochs) == (3, 2)
    assert s.canary.steps == (10, 100)
    assert s.data.dataset == "x"
    assert str(mlops_env) in s.home


def test_the_training_key_follows_the_configured_code_version(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Images set ``mlflow.code_version`` at build time; new code must not reuse a run."""
    ctx = {"dag": SimpleNamespace(dag_id="mlops_training_pipeline")}
    s = load_settings({"MLOPS_HOME": str(tmp_path), "MLOPS__MLFLOW__CODE_VERSION": "abc123"})
    assert s.mlflow.code_version == "abc123"
    key = training_key(ctx, s, "dv1")
    assert key.startswith("mlops_training_pipeline/dv1/")
    assert training_key(ctx, s, "dv1") == key
    newer = with_overrides(s, mlflow={"code_version": "def456"})
    assert training_key(ctx, newer, "dv1") != key
    assert training_key(ctx, with_overrides(s, train={"epochs": 1}), "dv1") != key


def test_a_run_that_says_why_it_trains_never_reuses_another_runs_training(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A monitoring retrain names a day that an earlier run already trained on: it must train a
    new model, while its own retries (the same run id) still find their run."""
    s = load_settings({"MLOPS_HOME": str(tmp_path)})
    dag = SimpleNamespace(dag_id="mlops_training_pipeline")

    def key(run_id: str, reason: str = "") -> str:
        return training_key({"dag": dag, "run_id": run_id, "params": {"reason": reason}}, s, "dv")

    # Without a reason: a rerun or backfill of the interval reuses the training run.
    assert key("manual__1") == key("scheduled__2")
    retrain = key("retrain__fraud_detector__2026-11-03T10", "monitoring: drift")
    assert retrain != key("manual__1")
    assert retrain == key("retrain__fraud_detector__2026-11-03T10", "monitoring: drift")
    assert retrain != key("retrain__fraud_detector__2026-11-03T11", "monitoring: drift")
