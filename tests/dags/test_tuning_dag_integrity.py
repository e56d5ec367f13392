"""DAG integrity of ``mlops_tuning`` (parse time and imports are checked for every DAG file in
test_dag_integrity.py): its structure (storage as setup/teardown around the study), its params,
and on Kubernetes one pod per worker rendered with the provider's own ``build_pod_request_obj``,
no secret in the spec."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dag():  # type: ignore[no-untyped-def]
    from airflow.models import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags["mlops_tuning"]


def test_structure_storage_setup_and_teardown(dag) -> None:  # type: ignore[no-untyped-def]
    assert {t.task_id: set(t.downstream_task_ids) for t in dag.tasks} == {
        "start_storage": {"create_study", "stop_storage"},
        "create_study": {"tune_worker", "finish_study"},
        "tune_worker": {"finish_study"},
        "finish_study": {"stop_storage"},
        "stop_storage": set(),
    }
    assert dag.get_task("start_storage").is_setup
    assert dag.get_task("stop_storage").is_teardown
    # One dead worker is covered by the others: the summary runs after all of them, and
    # decides from the study whether the budget was spent.
    assert dag.get_task("finish_study").trigger_rule == "all_done"
    worker = dag.get_task("tune_worker")
    assert worker.pool == "mlops_training" and worker.retries >= 1
    for t in dag.tasks:
        assert t.owner == "ml-platform" and t.execution_timeout is not None, t.task_id
    # Triggered with a data set (a run a person asks for), never on a schedule.
    assert type(dag.timetable).__name__ == "NullTimetable" and dag.max_active_runs == 1


def test_params_form(dag) -> None:  # type: ignore[no-untyped-def]
    assert {"manifest_uri", "trials", "workers", "study"} <= set(dag.params.keys())
    assert dag.params["trials"] is None and dag.params["workers"] is None
    assert dag.doc_md and "mlops_tuning" in dag.doc_md


def test_under_the_kubernetes_profile_each_worker_is_a_mapped_pod(  # type: ignore[no-untyped-def]
    tmp_path: Path, run_python
) -> None:
    code = (
        "import json\n"
        "from airflow.models import DagBag\n"
        f"bag = DagBag(dag_folder={str(ROOT / 'dags')!r})\n"
        "dag = bag.dags['mlops_tuning']\n"
        "t = {x.task_id: x for x in dag.tasks}\n"
        "w = t['tune_worker']\n"
        "print(json.dumps({'errors': {k: str(v) for k, v in bag.import_errors.items()},\n"
        "  'tasks': sorted(t), 'kind': type(w).__name__, 'op': w.operator_class.__name__\n"
        "  if hasattr(w, 'operator_class') else '', 'pool': w.partial_kwargs.get('pool'),\n"
        "  'up': sorted(w.upstream_task_ids)}))\n"
    )
    r = run_python(code, MLOPS_PROFILE="kubernetes", MLOPS_HOME=str(tmp_path))
    assert r["errors"] == {}
    assert "worker_pods" in r["tasks"] and r["kind"] == "MappedOperator"
    assert r["op"] == "KubernetesPodOperator" and r["pool"] == "mlops_training"
    assert r["up"] == ["worker_pods"]


def test_a_worker_pod_runs_the_worker_line_with_no_secret_in_its_spec(tmp_path: Path) -> None:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import ApiClient
    from mlops_airflow.training import pod_defaults
    from mlops_airflow.tuning import STUDY_LABEL, WORKER_LABEL, sqlalchemy_url, worker_pod_kwargs

    from pipelines.config import load_settings, with_overrides
    from pipelines.tune.job import TuneJob

    s = with_overrides(
        load_settings({"MLOPS_HOME": str(tmp_path), "MLOPS_PROFILE": "kubernetes"}),
        tuning={"storage": "postgresql+psycopg2://optuna:db-pw-77@pg.mlops.svc:5432/optuna"},
        train={"secret_env": ["mlops-s3", "mlops-tuning-db"]},
    )
    api = ApiClient()
    names = set()
    for worker in range(2):
        job = {
            "study": "transactions-abc-123",
            "manifest_uri": "s3://lake/shards/t/v/manifest.json",
            "parent_run_id": "run-1",
            "worker": worker,
            "workers": 2,
        }
        tune_worker = KubernetesPodOperator(
            task_id="tune_worker", **pod_defaults(s.train), **worker_pod_kwargs(s, job)
        )
        pod = tune_worker.build_pod_request_obj(dry_run=True)
        data = api.sanitize_for_serialization(pod)
        assert api.sanitize_for_serialization(api._ApiClient__deserialize(data, "V1Pod")) == data
        c = pod.spec.containers[0]
        assert c.command == ["python"] and c.args[:4] == [
            "-m",
            "pipelines.tune",
            "--job",
            c.args[3],
        ]
        tune_job = TuneJob.model_validate_json(c.args[3])
        assert tune_job.worker == worker and tune_job.colocated == 1  # a pod has its own cores
        assert "db-pw-77" not in str(data)
        assert [e.secret_ref.name for e in c.env_from] == ["mlops-s3", "mlops-tuning-db"]
        assert pod.metadata.labels[WORKER_LABEL] == str(worker)
        assert pod.metadata.labels[STUDY_LABEL]
        names.add(pod.metadata.name)
    assert len(names) == 2
    assert sqlalchemy_url("postgres://u:p@h:5432/d") == "postgresql+psycopg2://u:p@h:5432/d"
