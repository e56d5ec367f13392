"""DAG integrity: imports clean and fast, no heavy modules at parse time, structure, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted((ROOT / "dags").glob("*.py"))
HEAVY = (
    "torch",
    "tensorflow",
    "pandas",
    "mlflow",
    "optuna",
    "great_expectations",
    "sklearn",
    "pyarrow",
)


@pytest.fixture(scope="module")
def dagbag():  # type: ignore[no-untyped-def]
    from airflow.models import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_dagbag_imports_without_errors(dagbag) -> None:  # type: ignore[no-untyped-def]
    assert dagbag.import_errors == {}
    assert "mlops_training_pipeline" in dagbag.dag_ids


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.stem)
def test_parse_is_fast_and_imports_no_heavy_module(run_python, dag_file: Path) -> None:  # type: ignore[no-untyped-def]
    """Parse each DAG file in a fresh interpreter, as the dag-processor does."""
    code = (
        "import sys, time, runpy, json\n"
        "import airflow.sdk\n"
        "t = time.perf_counter()\n"
        f"runpy.run_path({str(dag_file)!r})\n"
        "print(json.dumps({'seconds': time.perf_counter() - t,\n"
        "                  'modules': sorted(m for m in sys.modules)}))\n"
    )
    result = run_python(code)
    loaded = {m.split(".")[0] for m in result["modules"]}
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
    assert result["seconds"] < 2.0, result["seconds"]


def test_structure_and_dependencies(dagbag) -> None:  # type: ignore[no-untyped-def]
    dag = dagbag.dags["mlops_training_pipeline"]
    expected = {
        "validate_data": {"shard_dataset"},
        "shard_dataset": {"train_model"},
        "train_model": {"evaluate_model"},
        "evaluate_model": {"register_model"},
        # promote/rollback/decide read the version from register_model: XCom of a task that
        # always succeeded, even when the canary failed or timed out.
        "register_model": {
            "should_roll_out",
            "export_and_infra_validate",
            "decide",
            "promote",
            "rollback",
        },
        "should_roll_out": {"export_and_infra_validate"},
        "export_and_infra_validate": {"stage_canary", "optimize_runtime"},
        "optimize_runtime": set(),
        "stage_canary": {"shadow_candidate"},
        "shadow_candidate": {"monitor_canary"},
        "monitor_canary": {"decide"},
        "decide": {"promote", "rollback"},
        "promote": set(),
        "rollback": set(),
    }
    assert {t.task_id: set(t.downstream_task_ids) for t in dag.tasks} == expected


def test_canary_monitor_pokes_in_its_pool_is_retried_and_failures_roll_back(dagbag) -> None:  # type: ignore[no-untyped-def]
    from pipelines.config import settings

    dag = dagbag.dags["mlops_training_pipeline"]
    monitor = dag.get_task("monitor_canary")
    # Poke: a rescheduled sensor can be failed by the scheduler on a stale executor event
    # (apache/airflow#71172); one task process in a pool of its own has no such reschedule.
    assert monitor.mode == "poke" and monitor.pool == "mlops_sensors"
    # A killed or failed attempt is retried and resumes the analysis from the lake.
    assert monitor.retries >= 1
    assert 0 < monitor.poke_interval <= 60
    # The analysis times itself out (a verdict); the sensor's own limits only back it up.
    cfg = settings().canary
    assert monitor.timeout > cfg.timeout_s
    assert monitor.execution_timeout.total_seconds() > monitor.timeout
    # A failed or timed-out monitor still reaches decide, which rolls back.
    assert dag.get_task("decide").trigger_rule == "all_done"
    assert dag.get_task("promote").trigger_rule == "all_success"


def test_defaults_retries_owner_and_timeouts(dagbag) -> None:  # type: ignore[no-untyped-def]
    dag = dagbag.dags["mlops_training_pipeline"]
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    for t in dag.tasks:
        assert t.owner == "ml-platform", t.task_id
        assert t.execution_timeout is not None, t.task_id
    retries = {t.task_id: t.retries for t in dag.tasks}
    assert retries["shard_dataset"] >= 1 and retries["evaluate_model"] >= 1
    # Gates and staging must not be retried blindly: a retry would re-judge or re-stage. The
    # canary analysis is retried: each attempt resumes it from its state in the lake.
    assert retries["validate_data"] == 0 and retries["stage_canary"] == 0
    assert dag.get_task("train_model").pool == "mlops_training"


def test_params_form(dagbag) -> None:  # type: ignore[no-untyped-def]
    from pipelines.config import settings

    dag = dagbag.dags["mlops_training_pipeline"]
    params = dag.params
    assert {
        "date",
        "dataset",
        "nodes",
        "epochs",
        "force",
        "force_reason",
        "skip_rollout",
        "canary_steps",
    } <= set(params.keys())
    assert params["nodes"] is None  # empty: the configured default applies
    assert params["force"] == "none"
    # The form can be submitted as it opens: each default is valid against its own schema
    # (an empty text field reaches the schema as null, so text fields must allow null), and
    # every field says what it does.
    import jsonschema

    for name in dag.params:
        param = dag.params.get_param(name)
        jsonschema.validate(params[name], param.schema)
        if "string" in param.schema.get("type", ()):
            jsonschema.validate(None, param.schema)
        assert param.description, name
    assert params["canary_steps"] == list(settings().canary.steps)
    assert dag.doc_md and "mlops_training_pipeline" in dag.doc_md


def test_the_dag_file_imports_airflow_plugins_and_stages_only() -> None:
    """The DAG is wiring: anything deeper than the composition root belongs in a stage."""
    import ast
    from pathlib import Path

    allowed = ("airflow", "mlops_airflow", "pendulum", "datetime", "__future__")
    for dag_file in (Path(__file__).resolve().parents[2] / "dags").glob("*.py"):
        for node in ast.walk(ast.parse(dag_file.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                if node.module == "pipelines":
                    assert [a.name for a in node.names] == ["stages"], (dag_file.name, node.lineno)
                    continue
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, (
                    f"{dag_file.name}:{node.lineno} imports {name}"
                )
