"""
### mlops_training_pipeline

Daily, for the data interval `[day, day+1)`: **validate** the landing partition with Great
Expectations (a blocked batch is quarantined and the run stops), **shard** it into a versioned,
manifest-published data set, **train** a tabular MLP with multi-node DDP, **evaluate** it against
the `champion` with bootstrap CIs, **register** it in MLflow (alias `challenger`), then
**export** a SavedModel, **stage** it on the `canary` pool at weight 0, **shadow** it (stable's
traffic mirrored to it through Envoy, answers compared; a failed verdict stops the rollout),
**monitor** canary vs baseline through Envoy and **promote** (pools, traffic split, `champion`
alias) or **roll back**.

Backfills, and runs with `skip_rollout`, stop after registration and never move `champion`.
Trigger-form params override the `date`, `dataset`, `nodes`, `epochs`, canary weight steps, can
skip the shadow stage, and can force-bless or force-reject a candidate (with a reason, recorded
in MLflow).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import (
    CronDataIntervalTimetable,
    Param,
    PokeReturnValue,
    TriggerRule,
    dag,
    get_current_context,
    task,
)
from mlops_airflow.assets import dataset_asset, model_asset
from mlops_airflow.common import OWNER, SENSOR_POOL, TRAINING_POOL, deployment, on_failure

DATASET_ASSET = dataset_asset()
MODEL_ASSET = model_asset()

# The profile decides the training launcher: local torchrun agents or one pod per node.
TRAIN = deployment().train
CANARY = deployment().canary
# A window with live traffic plus a wait for the serving lease, beyond the analysis' timeout.
CANARY_BACKSTOP_S = (
    CANARY.timeout_s + CANARY.window_seconds + deployment().serving.lease_wait_s + 60.0
)
DEFAULT_ARGS = {
    "owner": OWNER,
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(hours=1),
    "on_failure_callback": on_failure,
}

# Every field can be left as the form opens: empty means the deployment's configuration
# (MLOPS_* settings), named in the field's description.
_D = deployment()
PARAMS = {
    "date": Param(
        None,
        type=["null", "string"],
        format="date",
        title="Partition date",
        description="The landing day to train on. Empty: the run's data interval start (an "
        "interval with no landed data is skipped; a named day without data fails).",
    ),
    "dataset": Param(
        None,
        type=["null", "string"],
        title="Dataset spec",
        description=f"Empty: {_D.data.dataset}.",
    ),
    "nodes": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        maximum=64,
        title="Training nodes",
        description=f"Empty: {_D.train.nodes}.",
    ),
    "epochs": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        maximum=500,
        title="Epochs",
        description=f"Empty: {_D.train.epochs}.",
    ),
    "force": Param(
        "none",
        enum=["none", "bless", "reject"],
        title="Override the blessing",
        description="none: evaluation decides. bless / reject overrule it (give a reason).",
    ),
    "force_reason": Param(
        None,
        type=["null", "string"],
        title="Reason for the override",
        description="Recorded in MLflow with a bless / reject override; unused with none.",
    ),
    "skip_rollout": Param(
        False,
        type="boolean",
        title="Register only; no canary",
        description="Stop after registration: nothing is staged and champion does not move.",
    ),
    "skip_shadow": Param(
        False,
        type="boolean",
        title="Skip the shadow stage (straight to the canary)",
        description="The candidate answers users without first answering mirrored traffic.",
    ),
    "reason": Param(
        None,
        type=["null", "string"],
        title="Why this run",
        description="Recorded as the training run's trigger_reason tag. A run that gives one "
        "trains a new model even for a day already trained (the monitoring DAG's retrains do).",
    ),
    "canary_steps": Param(
        list(_D.canary.steps),
        type=["null", "array"],
        items={"type": "integer", "minimum": 1, "maximum": 100},
        title="Canary weight steps (%)",
        description="Canary traffic weights in %, in order. Empty: the deployment's "
        f"{list(_D.canary.steps)}.",
    ),
}


@dag(
    dag_id="mlops_training_pipeline",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    doc_md=__doc__,
    tags=["mlops", "training", "serving"],
)
def mlops_training_pipeline() -> None:
    @task(retries=0)
    def validate_data() -> dict:
        """The data gate. An interval whose data has not landed is skipped (a named ``date``
        with no data fails instead: the user asked for that day)."""
        from mlops_airflow.common import (
            blocked,
            interval_date,
            no_landing_data,
            record,
            run_settings,
        )

        from pipelines import stages

        ctx = get_current_context()
        settings, date = run_settings(ctx["params"]), interval_date(ctx)
        if not ctx["params"].get("date") and not stages.landing_exists(settings, date):
            no_landing_data(ctx, date)
        try:
            out = stages.validate_data(settings, date)
        except stages.ValidationBlocked as exc:
            blocked(ctx, exc.summary)
        return record(ctx, out)

    @task(outlets=[DATASET_ASSET])
    def shard_dataset(_: dict) -> dict:
        from mlops_airflow.common import interval_date, record, run_settings

        from pipelines import stages

        ctx = get_current_context()
        out = stages.shard_data(run_settings(ctx["params"]), interval_date(ctx))
        ctx["outlet_events"][DATASET_ASSET].extra = {
            "manifest_uri": out["manifest_uri"],
            "data_version": out["data_version"],
        }
        return record(ctx, out)

    @task(pool=TRAINING_POOL, retries=1)
    def train_model(shards: dict) -> dict:
        from mlops_airflow.common import record, run_settings, run_tags, training_key

        from pipelines import stages

        ctx = get_current_context()
        cfg = run_settings(ctx["params"])
        out = stages.train(
            cfg,
            shards["manifest_uri"],
            run_key=training_key(ctx, cfg, shards["data_version"]),
            tags=run_tags(ctx),
            sink=print,
        )
        return record(ctx, out)

    @task
    def prepare_training(shards: dict) -> dict:
        """Kubernetes: open the MLflow run, render the rendezvous Service and each rank's pod."""
        from mlops_airflow.common import run_settings, run_tags, training_key
        from mlops_airflow.training import prepare

        ctx = get_current_context()
        cfg = run_settings(ctx["params"])
        return prepare(
            cfg,
            shards["manifest_uri"],
            training_key(ctx, cfg, shards["data_version"]),
            run_tags(ctx),
        )

    @task(trigger_rule=TriggerRule.ALL_DONE)
    def finish_training(prepared: dict) -> dict:
        """After the last attempt ran or was skipped: MLflow says whether training finished."""
        from mlops_airflow.common import record, run_settings

        from pipelines import stages

        ctx = get_current_context()
        return record(ctx, stages.finish_training(run_settings(ctx["params"]), prepared["run_id"]))

    @task
    def evaluate_model(trained: dict) -> dict:
        from mlops_airflow.common import record, run_settings

        from pipelines import stages

        ctx = get_current_context()
        p = ctx["params"]
        force = None if p["force"] == "none" else p["force"]
        return record(
            ctx,
            stages.evaluate(
                run_settings(p), trained["run_id"], force, p.get("force_reason") or None
            ),
        )

    @task(outlets=[MODEL_ASSET])
    def register_model(evaluation: dict) -> dict:
        from mlops_airflow.common import is_backfill, record, run_settings, run_tags

        from pipelines import stages

        ctx = get_current_context()
        out = stages.register(
            run_settings(ctx["params"]),
            evaluation["run_id"],
            run_tags(ctx),
        )
        out["rollout"] = stages.rollout_decision(
            out, backfill=is_backfill(ctx), skip_rollout=ctx["params"]["skip_rollout"]
        )
        ctx["outlet_events"][MODEL_ASSET].extra = {
            "model_version": out["model_version"],
            "run_id": evaluation["run_id"],
        }
        return record(ctx, out)

    @task.short_circuit
    def should_roll_out(registered: dict) -> bool:
        """The register task's roll-out decision; its reasons are in that task's log."""
        return bool(registered["rollout"]["roll_out"])

    @task
    def export_and_infra_validate(registered: dict) -> dict:
        from mlops_airflow.common import record, run_settings

        from pipelines import stages

        ctx = get_current_context()
        out = stages.export_and_infra_validate(
            run_settings(ctx["params"]), registered["model_version"]
        )
        return record(ctx, {**out, "model_version": registered["model_version"]})

    @task
    def optimize_runtime(exported: dict) -> dict:
        """ONNX fp32 / int8 candidates against the SavedModel for batch scoring (same run,
        same machine); beside the roll-out, which it never holds up."""
        from mlops_airflow.common import record, run_settings

        from pipelines import stages

        ctx = get_current_context()
        s = run_settings(ctx["params"])
        return record(ctx, stages.optimize_runtime(s, exported["model_version"]))

    @task(retries=0)
    def stage_canary(exported: dict) -> dict:
        from mlops_airflow.common import record, run_settings

        from pipelines import stages

        ctx = get_current_context()
        out = stages.stage_canary(run_settings(ctx["params"]), exported["model_version"])
        return record(ctx, {**out, "model_version": exported["model_version"]})

    @task(retries=0)
    def shadow_candidate(staged: dict) -> dict:
        """Stable's traffic mirrored to the candidate; a failed verdict decides the canary."""
        from mlops_airflow.common import record, run_settings

        from pipelines import stages

        ctx = get_current_context()
        out = stages.shadow_candidate(run_settings(ctx["params"]), staged["model_version"])
        return record(ctx, {**out, "model_version": staged["model_version"]})

    # Poke mode in a pool of its own, retried: see "Why the canary sensor pokes" in
    # docs/airflow.md. The analysis times itself out (a rollback verdict at canary.timeout_s
    # after its first window, across attempts); the sensor's own timeout is only a backstop.
    @task.sensor(
        mode=CANARY.sensor_mode,
        poke_interval=CANARY.poke_interval_s,
        timeout=CANARY_BACKSTOP_S,
        execution_timeout=timedelta(seconds=CANARY_BACKSTOP_S + 600),
        pool=SENSOR_POOL,
        retries=CANARY.sensor_retries,
        retry_delay=timedelta(seconds=10),
    )
    def monitor_canary(shadowed: dict) -> PokeReturnValue:
        """One judged canary window per poke; state persists in the lake between pokes, so a
        retried attempt resumes the analysis with its evidence."""
        from mlops_airflow.common import record, run_settings

        from pipelines import stages

        ctx = get_current_context()
        out = stages.canary_tick(run_settings(ctx["params"]), shadowed["model_version"])
        if out["done"]:
            record(ctx, {**out, "model_version": shadowed["model_version"]})
        return PokeReturnValue(is_done=out["done"], xcom_value=out)

    @task.branch(trigger_rule=TriggerRule.ALL_DONE, retries=0)
    def decide(registered: dict | None) -> list[str]:
        """Promote only on a promote verdict; a canary analysis that reached no verdict rolls
        back. Runs after failures too (``all_done``): with nothing registered there is nothing
        to do."""
        from mlops_airflow.common import recorded, run_settings

        from pipelines import stages

        ctx = get_current_context()
        if not registered or not registered.get("model_version"):
            from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

            gate = recorded(ctx, "validate_data") or {}
            if gate.get("status") == "no_data":
                raise AirflowSkipException(gate["reason"])
            # An earlier stage failed (a blocked batch, a failed training): nothing was staged.
            # Failing here (no retry) keeps the run failed; skipping would end it "success".
            raise AirflowFailException("nothing to promote or roll back: an earlier task failed")
        outcome = stages.canary_outcome(run_settings(ctx["params"]), registered["model_version"])
        return [outcome] if outcome else []  # None: never staged, nothing to promote or undo

    # A new champion is a model event too: batch scoring (scheduled on this Asset) re-scores.
    @task(outlets=[MODEL_ASSET])
    def promote(registered: dict) -> dict:
        from mlops_airflow.common import record, run_settings

        from pipelines import stages

        ctx = get_current_context()
        version = registered["model_version"]
        out = stages.promote(run_settings(ctx["params"]), version)
        ctx["outlet_events"][MODEL_ASSET].extra = {"model_version": version, "alias": "champion"}
        return record(ctx, out)

    @task
    def rollback(registered: dict) -> dict:
        from mlops_airflow.common import record, recorded, run_settings

        from pipelines import stages

        ctx = get_current_context()
        s = run_settings(ctx["params"])
        version = registered["model_version"]
        verdict = stages.canary_verdict(s, version) or {}
        reason = verdict.get("reason") or stages.undecided_reason(
            verdict, recorded(ctx, "monitor_canary.failed")
        )
        return record(ctx, stages.rollback(s, version, reason))

    validated = validate_data()
    shards = shard_dataset(validated)
    if TRAIN.launcher == "kubernetes":
        from mlops_airflow.training import kubernetes_training_group

        prepared = prepare_training(shards)
        last_teardown, _ = kubernetes_training_group(TRAIN, prepared, TRAINING_POOL)
        trained = finish_training(prepared)
        last_teardown >> trained
    else:
        trained = train_model(shards)
    registered = register_model(evaluate_model(trained))
    gate = should_roll_out(registered)
    exported = export_and_infra_validate(registered)
    gate >> exported
    staged = stage_canary(exported)
    optimize_runtime(exported)
    decision = decide(registered)
    shadowed = shadow_candidate(staged)
    monitor_canary(shadowed) >> decision >> [promote(registered), rollback(registered)]


mlops_training_pipeline()
