"""
### mlops_model_monitoring

Watches the champion in production, one hour at a time (the interval `[H, H+1)`):

- **hour_logged** waits (a poking sensor in the `mlops_sensors` pool) until the hour is over
  plus `monitoring.ship_delay_s`, the time the data plane's log needs to arrive.
- **ship_serving_log** publishes the hour's routed requests, as the data plane logged them
  (request id, time, key, pool, version, status, latency, features, score), to
  `serving_logs/<model>/dt=D/hour=HH/`: parts first, `_manifest.json` last, once.
- **monitor** judges the hour: volume, errors and latency p50/p99 of the champion against the
  SLOs in config; feature drift of its live requests against its training reference (the data
  gate's PSI/KS) and drift of its scores against evaluation-time scores; realised ROC-AUC and
  precision once late labels have landed (`outcomes/<dataset>/dt=D/`). The canary is never
  judged. It writes the report (JSON, markdown) and the hour's decision, once.
- The decision's actions follow the policy (`monitoring.on_*`): **alert** (one log line per
  alert and the audit trail), **retrain** (a `mlops_training_pipeline` run on the latest landing
  day, at most once per cooldown), **roll back** to the previous champion (pools, traffic and
  the `champion` alias together) on an SLO breach soon after a promotion. During a rollout
  nothing is rolled back or retrained; the finding alerts instead.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import (
    CronDataIntervalTimetable,
    Param,
    PokeReturnValue,
    dag,
    get_current_context,
    task,
)
from mlops_airflow.common import OWNER, SENSOR_POOL, on_failure

DEFAULT_ARGS = {
    "owner": OWNER,
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "execution_timeout": timedelta(minutes=30),
    "on_failure_callback": on_failure,
}

PARAMS = {
    "date": Param(
        None,
        type=["null", "string"],
        format="date",
        title="Day",
        description="Empty: the data interval's day.",
    ),
    "hour": Param(
        None,
        type=["null", "integer"],
        minimum=0,
        maximum=23,
        title="Hour (UTC)",
        description="Empty: the data interval's hour.",
    ),
    "ship_open_hour": Param(
        False,
        type="boolean",
        title="Ship an hour that is not over",
        description="Demos and tests: publish what is logged so far; later requests of that "
        "hour are never added.",
    ),
}


@dag(
    dag_id="mlops_model_monitoring",
    schedule=CronDataIntervalTimetable("0 * * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # hours are judged in order: sustained drift reads the hours before
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    doc_md=__doc__,
    tags=["mlops", "monitoring", "serving"],
)
def mlops_model_monitoring() -> None:
    # Poke mode in the sensors' pool (the wait is the ship delay, minutes): a rescheduled
    # sensor can be failed by the scheduler on a stale executor event (docs/airflow.md).
    @task.sensor(
        mode="poke",
        poke_interval=30,
        timeout=2 * 3600,
        execution_timeout=timedelta(hours=2, minutes=10),
        pool=SENSOR_POOL,
    )
    def hour_logged() -> PokeReturnValue:
        """Done once the hour is over plus ``monitoring.ship_delay_s`` (at once with
        ``ship_open_hour``, or when the run starts late, as a catch-up or backfill does)."""
        from mlops_airflow.common import interval_hour, run_settings

        from pipelines import stages

        ctx = get_current_context()
        date, hour = interval_hour(ctx)
        done = stages.serving_log_ready(
            run_settings(ctx["params"]), date, hour, bool(ctx["params"]["ship_open_hour"])
        )
        return PokeReturnValue(is_done=done, xcom_value={"date": date, "hour": hour})

    @task
    def ship_serving_log(hour: dict) -> dict:
        from mlops_airflow.common import record, run_settings

        from pipelines import stages

        ctx = get_current_context()
        s = run_settings(ctx["params"])
        out = stages.ship_serving_log(
            s, hour["date"], hour["hour"], bool(ctx["params"]["ship_open_hour"])
        )
        return record(ctx, out)

    @task(multiple_outputs=True)
    def monitor(shipped: dict) -> dict:
        from mlops_airflow.common import record, run_settings

        from pipelines import stages

        ctx = get_current_context()
        out = stages.monitor_hour(run_settings(ctx["params"]), shipped["date"], shipped["hour"])
        return record(ctx, out)

    @task
    def alert(decision: dict) -> list:
        from mlops_airflow.common import run_settings

        from pipelines import stages

        ctx = get_current_context()
        return stages.send_alerts(run_settings(ctx["params"]), decision)

    @task.short_circuit
    def should_retrain(retrain: dict | None) -> bool:
        return bool(retrain)

    @task.short_circuit
    def should_roll_back(rollback: dict | None) -> bool:
        return bool(rollback)

    @task
    def roll_back(rollback: dict) -> dict:
        from mlops_airflow.common import record, run_settings

        from pipelines import stages

        ctx = get_current_context()
        out = stages.restore_champion(
            run_settings(ctx["params"]),
            rollback["from_version"],
            rollback["to_version"],
            rollback["reason"],
        )
        return record(ctx, out)

    judged = monitor(ship_serving_log(hour_logged()))
    alert(judged["decision"])
    trigger_retraining = TriggerDagRunOperator(
        task_id="trigger_retraining",
        trigger_dag_id="mlops_training_pipeline",
        trigger_run_id=judged["retrain_run_id"],
        conf=judged["retrain_conf"],
        logical_date=None,  # the conf names the day; no data interval of its own
        skip_when_already_exists=True,  # a rerun of the hour does not train twice
        openlineage_inject_parent_info=False,
    )
    should_retrain(judged["retrain"]) >> trigger_retraining
    roll = should_roll_back(judged["rollback"])
    roll >> roll_back(judged["rollback"])


mlops_model_monitoring()
