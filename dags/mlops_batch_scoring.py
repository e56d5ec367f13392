"""
### mlops_batch_scoring

Scores a day's landing partition with the **champion**'s exported artifact (the SavedModel
that serves online, or the ONNX variant the optimisation gate chose for it), with the same
raw-feature signature and preprocessing as serving.

- **Schedule:** daily (the interval `[D, D+1)` scores day D), and whenever the model Asset
  `mlflow://models/<model>` has a new event (a version registered or promoted). An
  Asset-triggered run scores the latest landing partition unless `date` is given.
- **plan** cuts the partition into a few chunks of whole parquet row groups (`batch.chunk_rows`);
  **score_chunk** is mapped over them (one pod each on Kubernetes), and a failed chunk is
  retried alone; **publish** checks every part and that the input did not change, then writes
  `predictions/<dataset>/<model>/<version>/dt=D/manifest.json` last and emits the predictions
  Asset. A rerun of a published day and version publishes nothing new; a backfill with a
  pinned `version` re-scores history with that version.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import (
    CronDataIntervalTimetable,
    Param,
    TriggerRule,
    dag,
    get_current_context,
    task,
)
from airflow.sdk.definitions.timetables.assets import AssetOrTimeSchedule
from mlops_airflow.assets import model_asset, predictions_asset
from mlops_airflow.common import OWNER, deployment, on_failure

MODEL_ASSET = model_asset()
PREDICTIONS_ASSET = predictions_asset()

TRAIN = deployment().train
DEFAULT_ARGS = {
    "owner": OWNER,
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "execution_timeout": timedelta(hours=2),
    "on_failure_callback": on_failure,
}

_CFG = "Empty: the configured default."
PARAMS = {
    "date": Param(
        None,
        type=["null", "string"],
        format="date",
        title="Partition date",
        description="Empty: the data interval's day (time runs) or the latest landing day.",
    ),
    "version": Param(
        None,
        type=["null", "string"],
        title="Model version",
        description="Pin a registered version (backfills). Empty: the champion.",
    ),
    "runtime": Param(
        None,
        type=["null", "string"],
        enum=[None, "auto", "savedmodel", "onnx"],
        title="Runtime",
        description="auto: the version's optimisation-gate choice. " + _CFG,
    ),
    "chunk_rows": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        title="Rows per chunk",
        description=_CFG,
    ),
    "dataset": Param(None, type=["null", "string"], title="Dataset spec", description=_CFG),
}


@dag(
    dag_id="mlops_batch_scoring",
    schedule=AssetOrTimeSchedule(
        timetable=CronDataIntervalTimetable("@daily", timezone="UTC"), assets=MODEL_ASSET
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    doc_md=__doc__,
    tags=["mlops", "inference", "batch"],
)
def mlops_batch_scoring() -> None:
    @task
    def plan() -> dict:
        """Version, runtime and chunks of the day, or the manifest already published."""
        from mlops_airflow.common import run_settings
        from mlops_airflow.scoring import scoring_date

        from pipelines import stages

        ctx = get_current_context()
        s = run_settings(ctx["params"])
        date = scoring_date(ctx, s)
        return stages.plan_scoring(s, date, ctx["params"].get("version") or None)

    @task
    def chunk_jobs(p: dict) -> list[dict]:
        return list(p["jobs"])

    @task(retries=3)
    def score_chunk(job: dict) -> dict:
        """One chunk: its part written atomically under its fixed name (a retry rewrites the
        same bytes)."""
        from mlops_airflow.common import run_settings

        from pipelines import stages

        return stages.score_chunk(run_settings(get_current_context()["params"]), job)

    @task
    def chunk_pods(jobs: list[dict]) -> list[dict]:
        """Kubernetes: each chunk's pod arguments."""
        from mlops_airflow.common import run_settings
        from mlops_airflow.scoring import chunk_pod_kwargs

        s = run_settings(get_current_context()["params"])
        return [chunk_pod_kwargs(s, job) for job in jobs]

    # Runs when every chunk succeeded, or none was planned (the day was already published).
    @task(outlets=[PREDICTIONS_ASSET], trigger_rule=TriggerRule.NONE_FAILED)
    def publish(p: dict) -> dict:
        from mlops_airflow.common import record, run_settings

        from pipelines import stages

        ctx = get_current_context()
        out = stages.publish_predictions(run_settings(ctx["params"]), p)
        ctx["outlet_events"][PREDICTIONS_ASSET].extra = {
            "manifest_uri": out["manifest_uri"],
            "model_version": out["version"],
            "date": out["date"],
        }
        return record(ctx, out, date=out["date"])

    planned = plan()
    jobs = chunk_jobs(planned)
    if TRAIN.launcher == "kubernetes":
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from mlops_airflow.scoring import scoring_pod_defaults

        scored = KubernetesPodOperator.partial(
            task_id="score_chunk", retries=3, **scoring_pod_defaults(deployment())
        ).expand_kwargs(chunk_pods(jobs))  # type: ignore[arg-type]  # resolved at run time
    else:
        scored = score_chunk.expand(job=jobs)
    scored >> publish(planned)


mlops_batch_scoring()
