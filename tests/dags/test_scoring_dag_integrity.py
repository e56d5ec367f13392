"""DAG integrity of ``mlops_batch_scoring``: structure, the Asset-or-time schedule, params, and
on Kubernetes one pod per chunk, rendered with the provider's own ``build_pod_request_obj``,
running the chunk entrypoint with no secret in its spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dag():  # type: ignore[no-untyped-def]
    from airflow.models import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags["mlops_batch_scoring"]


def test_structure_schedule_and_params(dag) -> None:  # type: ignore[no-untyped-def]
    assert {t.task_id: set(t.downstream_task_ids) for t in dag.tasks} == {
        "plan": {"chunk_jobs", "publish"},
        "chunk_jobs": {"score_chunk"},
        "score_chunk": {"publish"},
        "publish": set(),
    }
    # Publishes when every chunk succeeded, or when none was planned (already published).
    assert dag.get_task("publish").trigger_rule == "none_failed"
    assert [o.uri for o in dag.get_task("publish").outlets] == [
        "mlops://predictions/transactions/fraud_detector"
    ]
    assert dag.get_task("score_chunk").retries >= 1
    # Daily, or on an event of the model Asset the training DAG emits.
    assert type(dag.timetable).__name__ == "AssetOrTimeSchedule"
    tt = dag.timetable
    assert type(tt.timetable).__name__ == "CronDataIntervalTimetable"
    assert "mlflow://models/fraud_detector" in repr(tt.asset_condition)
    training = {a.uri for t in dag.tasks for a in t.outlets}
    assert "mlflow://models/fraud_detector" not in training  # it listens, it does not emit
    assert {"date", "version", "runtime", "chunk_rows", "dataset"} <= set(dag.params.keys())
    for t in dag.tasks:
        assert t.owner == "ml-platform" and t.execution_timeout is not None, t.task_id


def test_under_the_kubernetes_profile_each_chunk_is_a_mapped_pod(  # type: ignore[no-untyped-def]
    tmp_path: Path, run_python
) -> None:
    code = (
        "import json\n"
        "from airflow.models import DagBag\n"
        f"bag = DagBag(dag_folder={str(ROOT / 'dags')!r})\n"
        "dag = bag.dags['mlops_batch_scoring']\n"
        "t = {x.task_id: x for x in dag.tasks}\n"
        "w = t['score_chunk']\n"
        "print(json.dumps({'errors': {k: str(v) for k, v in bag.import_errors.items()},\n"
        "  'tasks': sorted(t), 'kind': type(w).__name__, 'op': w.operator_class.__name__\n"
        "  if hasattr(w, 'operator_class') else '', 'up': sorted(w.upstream_task_ids)}))\n"
    )
    r = run_python(code, MLOPS_PROFILE="kubernetes", MLOPS_HOME=str(tmp_path))
    assert r["errors"] == {}
    assert "chunk_pods" in r["tasks"] and r["kind"] == "MappedOperator"
    assert r["op"] == "KubernetesPodOperator" and r["up"] == ["chunk_pods"]


def test_a_chunk_pod_runs_the_chunk_line_with_no_secret_in_its_spec(tmp_path: Path) -> None:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import ApiClient
    from mlops_airflow.scoring import CHUNK_LABEL, chunk_pod_kwargs, scoring_pod_defaults

    from pipelines.batch.__main__ import main
    from pipelines.batch.plan import Chunk, ScoringJob
    from pipelines.config import load_settings, with_overrides

    s = with_overrides(
        load_settings({"MLOPS_HOME": str(tmp_path), "MLOPS_PROFILE": "kubernetes"}),
        train={"secret_env": ["mlops-s3"]},
        store={"key": "AKIA-TEST", "secret": "s3-pw-99"},
        batch={"threads": 2},
    )
    api = ApiClient()
    names = set()
    for index in range(2):
        job = ScoringJob(
            "transactions",
            "2026-11-02",
            "fraud_detector",
            "3",
            "onnx",
            "fp32",
            0.5,
            "transaction_id",
            ("amount",),
            "predictions/transactions/fraud_detector/3/dt=2026-11-02",
            Chunk(index, "landing/transactions/dt=2026-11-02/part-00000.parquet", 0, 1, 10),
        )
        score_chunk = KubernetesPodOperator(
            task_id="score_chunk",
            **scoring_pod_defaults(s),
            **chunk_pod_kwargs(s, json.loads(job.to_json())),
        )
        pod = score_chunk.build_pod_request_obj(dry_run=True)
        data = api.sanitize_for_serialization(pod)
        c = pod.spec.containers[0]
        assert c.command == ["python"] and c.args[:3] == ["-m", "pipelines.batch", "--job"]
        assert ScoringJob.from_dict(json.loads(c.args[3])) == job
        assert c.args[4:] == ["--threads", "2"]
        assert [e.secret_ref.name for e in c.env_from] == ["mlops-s3"]
        assert not c.ports  # a chunk talks to nobody: no rendezvous port
        assert pod.metadata.labels[CHUNK_LABEL] == str(index)
        assert "s3-pw-99" not in json.dumps(data)  # secrets come from env_from only
        names.add(pod.metadata.name)
    assert len(names) == 2
    assert main(["--job", "not json"]) == 2  # a bad job is bad input, exit 2
