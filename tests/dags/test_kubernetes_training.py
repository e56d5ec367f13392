"""Kubernetes training without a cluster: render the pods with the provider's own
``build_pod_request_obj``, validate them against the Kubernetes models, check the Service."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlops_airflow.training import (
    RANK_LABEL,
    job_name,
    node_pod_kwargs,
    pod_defaults,
    rendezvous_service,
)

from pipelines.config import load_settings, with_overrides
from pipelines.train.job import TrainJob

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = "s3://lake/shards/t/v/manifest.json"
S3_SECRET, MLFLOW_TOKEN = "wJalr9XUtnFEMIK7MDENG", "tok-3f9a1c77e2"


@pytest.fixture
def settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = load_settings({"MLOPS_HOME": str(tmp_path), "MLOPS_PROFILE": "kubernetes"})
    return with_overrides(
        s,
        store={"key": "AKIA7Q2EXAMPLE", "secret": S3_SECRET},
        mlflow={"token": MLFLOW_TOKEN},
        train={
            "nodes": 3,
            "min_nodes": 2,
            "gpus": 1,
            "cpu": "4",
            "memory": "16Gi",
            "node_selector": {"pool": "gpu"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "secret_env": ["mlops-s3", "mlops-mlflow"],
        },
    )


@pytest.fixture
def train(settings):  # type: ignore[no-untyped-def]
    return settings.train


def render(train, rank: int, job: str, args: list[str] | None = None):  # type: ignore[no-untyped-def]
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    args = args or ["--job", "{}"]
    kpo = KubernetesPodOperator(
        task_id=f"train_node_{rank}",
        **pod_defaults(train),
        **node_pod_kwargs(train, job, rank, args),
    )
    return kpo.build_pod_request_obj(dry_run=True)


def test_three_node_pods_carry_ranks_rendezvous_and_resources(settings, train) -> None:  # type: ignore[no-untyped-def]
    from kubernetes.client import ApiClient

    job = job_name("abc")
    train_job = TrainJob.for_run(settings, MANIFEST, "abc")
    api = ApiClient()
    for rank in range(3):
        pod = render(train, rank, job, train_job.argv())
        # Round-trip through the Kubernetes models: the spec is well-formed.
        data = api.sanitize_for_serialization(pod)
        again = api._ApiClient__deserialize(data, "V1Pod")
        assert api.sanitize_for_serialization(again) == data
        spec = pod.spec
        assert (spec.hostname, spec.subdomain) == (f"{job}-{rank}", job)
        assert pod.metadata.labels[RANK_LABEL] == str(rank)
        assert pod.metadata.namespace == train.namespace
        assert spec.service_account_name == train.service_account
        assert spec.node_selector == {"pool": "gpu"}
        assert spec.tolerations[0].key == "nvidia.com/gpu"
        c = spec.containers[0]
        assert c.image == train.image
        assert c.command == ["python"]
        line = " ".join(c.args)
        assert "-m torch.distributed.run --nnodes=2:3 --nproc-per-node=1" in line
        assert f"--rdzv-endpoint={job}-0.{job}:29500" in line and f"--rdzv-id={job}" in line
        assert f"is_host={'true' if rank == 0 else 'false'}" in line
        # Every rank gets the same one job argument, and it walks the settings across whole.
        assert c.args[-4:-1] == ["-m", "pipelines.train", "--job"]
        assert TrainJob.model_validate_json(c.args[-1]) == train_job
        assert train_job.train == train and train_job.store.root == settings.store.root
        # Secrets stay out of the pod spec: they come from the secrets mounted as env.
        assert S3_SECRET not in line and MLFLOW_TOKEN not in line
        env = {e.name: e.value for e in c.env}
        assert env == {"PYTHONUNBUFFERED": "1"}  # torchrun gives the rank; nothing else is read
        assert [e.secret_ref.name for e in c.env_from] == ["mlops-s3", "mlops-mlflow"]
        assert c.resources.limits == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
        assert c.resources.requests == c.resources.limits


def test_headless_service_selects_only_the_rank_zero_pod(train) -> None:  # type: ignore[no-untyped-def]
    from kubernetes.client import ApiClient

    job = job_name("abc")
    svc = ApiClient()._ApiClient__deserialize(
        rendezvous_service(job, train.namespace, train.pod_rdzv_port), "V1Service"
    )
    assert svc.spec.cluster_ip == "None" and svc.metadata.name == job
    assert svc.spec.ports[0].port == 29500
    selected = [
        r
        for r in range(3)
        if svc.spec.selector.items() <= render(train, r, job).metadata.labels.items()
    ]
    assert selected == [0]


def test_dag_under_the_kubernetes_profile_maps_one_pod_per_node(  # type: ignore[no-untyped-def]
    tmp_path: Path, run_python
) -> None:
    code = (
        "import json\n"
        "from airflow.models import DagBag\n"
        f"bag = DagBag(dag_folder={str(ROOT / 'dags')!r})\n"
        "dag = bag.dags['mlops_training_pipeline']\n"
        "t = {x.task_id: x for x in dag.tasks}\n"
        "node = t['train_on_kubernetes.train_node']\n"
        "delete = t['train_on_kubernetes.delete_rendezvous_service']\n"
        "gate = t['retry_group_2']\n"
        "print(json.dumps({'errors': {k: str(v) for k, v in bag.import_errors.items()},\n"
        "  'tasks': sorted(t), 'pool': node.partial_kwargs.get('pool'),\n"
        "  'retries': node.partial_kwargs.get('retries'),\n"
        "  'teardown': delete.is_teardown, 'setups': sorted(delete.upstream_task_ids),\n"
        "  'gate_rule': gate.trigger_rule.value, 'gate_up': sorted(gate.upstream_task_ids),\n"
        "  'gate_down': sorted(gate.downstream_task_ids),\n"
        "  'finish_rule': t['finish_training'].trigger_rule.value,\n"
        "  'up': sorted(t['finish_training'].upstream_task_ids)}))\n"
    )
    r = run_python(code, MLOPS_PROFILE="kubernetes", MLOPS_HOME=str(tmp_path))
    assert r["errors"] == {}
    assert {
        "prepare_training",
        "train_on_kubernetes.create_rendezvous_service",
        "train_on_kubernetes.train_node",
        "train_on_kubernetes.delete_rendezvous_service",
        "retry_group_2",
        "train_on_kubernetes_2.create_rendezvous_service",
        "train_on_kubernetes_2.train_node",
        "train_on_kubernetes_2.delete_rendezvous_service",
        "finish_training",
    } <= set(r["tasks"])
    assert "train_model" not in r["tasks"]
    assert r["pool"] == "mlops_training" and r["retries"] == 0
    # The Service is a setup/teardown pair: deleted after the pods, on failure too.
    assert r["teardown"] is True
    assert "train_on_kubernetes.create_rendezvous_service" in r["setups"]
    # The group retry: after attempt 1 (whatever its outcome) a gate decides on attempt 2.
    assert r["gate_rule"] == "all_done"
    assert r["gate_up"] == ["prepare_training", "train_on_kubernetes.delete_rendezvous_service"]
    assert "train_on_kubernetes_2.create_rendezvous_service" in r["gate_down"]
    assert r["finish_rule"] == "all_done"
    assert "train_on_kubernetes_2.delete_rendezvous_service" in r["up"]


def test_each_attempt_gets_its_own_pod_names_and_the_same_rank_zero_dns(train) -> None:  # type: ignore[no-untyped-def]
    from mlops_airflow.training import ATTEMPT_LABEL, attempt_pods

    job = job_name("abc")
    pods = [node_pod_kwargs(train, job, r, ["--run-id", "abc"]) for r in range(3)]
    first, second = attempt_pods(pods, 1), attempt_pods(pods, 2)
    assert {p["name"] for p in first}.isdisjoint({p["name"] for p in second})
    assert [p["hostname"] for p in first] == [p["hostname"] for p in second]
    assert [p["labels"][ATTEMPT_LABEL] for p in second] == ["2", "2", "2"]
    assert [p["labels"][RANK_LABEL] for p in second] == ["0", "1", "2"]


def test_the_retry_gate_asks_mlflow_whether_rank_zero_finished(local_settings) -> None:  # type: ignore[no-untyped-def]
    from pipelines.registry import Registry
    from pipelines.train.run import training_finished

    reg = Registry(local_settings.mlflow)
    run_id = reg.client.create_run(reg.experiment_id()).info.run_id
    assert not training_finished(local_settings, run_id)  # nothing logged: run the group again
    reg.client.log_metric(run_id, "val_auc", 0.9)
    assert not training_finished(local_settings, run_id)  # metrics without a model
    reg.log_bytes(run_id, b"weights", "model", "model.pt")
    assert training_finished(local_settings, run_id)
