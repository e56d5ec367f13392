"""
### mlops_tuning

Hyperparameter tuning of the training job: one **Optuna study** on PostgreSQL, trials pulled by
`workers` parallel **mapped tasks** (one pod each on Kubernetes) until `trials` ran to the end or
were pruned. Each trial runs the real trainer; a pruner stops a trial whose per-epoch validation
loss trails the others. Every trial is a nested MLflow run under one parent tuning run, which
gets the best params and the optimisation-history and parameter-importance plots.

A worker that dies stops beating: its trial is failed and retried by another worker.
Locally the study lives on the home's PostgreSQL (started by `start_storage` if it is not
running, and stopped by `stop_storage` only then); in production `tuning.storage` (a secret) or
the Airflow connection `tuning.storage_conn_id` names the database.

The best params reach training when a training run has `params_from = tuning`
(`MLOPS__TRAIN__PARAMS_FROM=tuning` or the run conf): it then takes the same gates as any run.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, TriggerRule, dag, get_current_context, task
from mlops_airflow.common import OWNER, TRAINING_POOL, deployment, on_failure

# The profile decides where workers run: tasks on this Airflow's workers, or one pod each.
TRAIN = deployment().train

DEFAULT_ARGS = {
    "owner": OWNER,
    "retries": 1,
    "retry_delay": timedelta(seconds=30),
    "execution_timeout": timedelta(hours=6),
    "on_failure_callback": on_failure,
}

_CFG = "Empty: the configured default."
PARAMS = {
    "manifest_uri": Param(
        "",
        type="string",
        title="Data set manifest",
        description="URI of a published manifest.json (`mlops data shard` prints it).",
    ),
    "trials": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        maximum=1000,
        title="Trial budget",
        description=_CFG,
    ),
    "workers": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        maximum=64,
        title="Parallel workers",
        description=_CFG,
    ),
    "study": Param(
        None,
        type=["null", "string"],
        title="Study name",
        description="An existing study is continued. Empty: one study per DAG run.",
    ),
}


@dag(
    dag_id="mlops_tuning",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    doc_md=__doc__,
    tags=["mlops", "training", "tuning"],
)
def mlops_tuning() -> None:
    @task(retries=0)
    def start_storage() -> dict:
        from mlops_airflow.tuning import tuning_settings

        from pipelines import stages

        return stages.start_tuning_storage(tuning_settings(get_current_context()["params"]))

    @task
    def create_study(storage: dict) -> list[dict]:
        """The study and its parent MLflow run; one job per worker."""
        from mlops_airflow.tuning import tuning_settings

        from pipelines import stages

        ctx = get_current_context()
        if not ctx["params"].get("manifest_uri"):
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException("mlops_tuning needs the manifest_uri param of a data set.")
        s = tuning_settings(ctx["params"])
        name = ctx["params"].get("study") or stages.default_study_name(
            s, ctx["params"]["manifest_uri"], ctx["run_id"]
        )
        return stages.create_study(s, ctx["params"]["manifest_uri"], name, s.tuning.workers)

    @task(pool=TRAINING_POOL)
    def tune_worker(job: dict) -> dict:
        """Trials until the budget is spent; a retry rejoins the same study."""
        from mlops_airflow.tuning import tuning_settings

        from pipelines import stages

        return stages.tune_worker(tuning_settings(get_current_context()["params"]), job)

    @task
    def worker_pods(jobs: list[dict]) -> list[dict]:
        """Kubernetes: each worker's pod arguments."""
        from mlops_airflow.tuning import tuning_settings, worker_pod_kwargs

        s = tuning_settings(get_current_context()["params"])
        return [worker_pod_kwargs(s, job) for job in jobs]

    @task(trigger_rule=TriggerRule.ALL_DONE)
    def finish_study(jobs: list[dict]) -> dict:
        """After every worker ran (one that died is covered by the others): best params and
        plots on the parent run; fails if the budget was not spent."""
        from mlops_airflow.tuning import tuning_settings

        from pipelines import stages

        s = tuning_settings(get_current_context()["params"])
        return stages.finish_study(s, jobs[0]["study"])

    @task(retries=0)
    def stop_storage(storage: dict) -> dict:
        from mlops_airflow.tuning import tuning_settings

        from pipelines import stages

        s = tuning_settings(get_current_context()["params"])
        return stages.stop_tuning_storage(s, storage["owned"])

    storage = start_storage()
    jobs = create_study(storage)
    if TRAIN.launcher == "kubernetes":
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from mlops_airflow.training import pod_defaults

        workers = KubernetesPodOperator.partial(
            task_id="tune_worker", pool=TRAINING_POOL, retries=1, **pod_defaults(TRAIN)
        ).expand_kwargs(worker_pods(jobs))  # type: ignore[arg-type]  # resolved at run time
    else:
        workers = tune_worker.expand(job=jobs)
    finished = finish_study(jobs)
    workers >> finished
    # Setup/teardown: the storage is stopped after the study, on failure too (if started here).
    finished >> stop_storage(storage).as_teardown(setups=storage)


mlops_tuning()
