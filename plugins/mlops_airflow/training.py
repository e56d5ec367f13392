"""Multi-node training on Kubernetes: one KubernetesPodOperator per node, torchrun rendezvous.

A headless Service selecting only the rank-0 pod gives it a stable DNS name
(``<job>-0.<job>.<namespace>.svc``); every pod runs the same ``torchrun ... -m pipelines.train``
line as the local launcher. The Service is created before the pods and deleted after them,
on failure too. All ranks sit in the training pool and are never retried alone (a lone rank
cannot rejoin a finished rendezvous); the whole group is retried instead (see
:func:`kubernetes_training_group`), resuming from the MLflow run's checkpoints.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from airflow.sdk import XComArg
    from airflow.sdk.bases.operator import BaseOperator
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    from pipelines.config import Settings, TrainSettings

RANK_LABEL = "mlops.io/rank"
JOB_LABEL = "mlops.io/job"
ATTEMPT_LABEL = "mlops.io/attempt"


def job_name(run_id: str) -> str:
    """A DNS-1123 name for the job, stable for one MLflow run (so a re-run reuses it)."""
    return "ddp-" + hashlib.sha1(run_id.encode()).hexdigest()[:10]


def rendezvous_service(job: str, namespace: str, port: int) -> dict[str, Any]:
    """Headless Service whose selector matches the rank-0 pod only."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": job, "namespace": namespace, "labels": {JOB_LABEL: job}},
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_LABEL: job, RANK_LABEL: "0"},
            "ports": [{"name": "c10d", "port": port, "targetPort": port, "protocol": "TCP"}],
            "publishNotReadyAddresses": True,
        },
    }


def node_pod_kwargs(
    train: TrainSettings, job: str, rank: int, entry_args: list[str]
) -> dict[str, Any]:
    """The per-rank KubernetesPodOperator arguments (JSON-able, for ``expand_kwargs``);
    ``entry_args`` carry the training job (``TrainJob.argv()``), the same for every rank."""
    from pipelines.train.launch import torchrun_command

    endpoint = f"{job}-0.{job}:{train.pod_rdzv_port}"
    cmd = torchrun_command(
        train.nodes,
        train.procs_per_node,
        endpoint,
        job,
        train.max_restarts,
        entry_args,
        train.min_nodes,
        is_host=(rank == 0),
        python="python",
    )
    return {
        "name": f"{job}-{rank}",
        "hostname": f"{job}-{rank}",
        "subdomain": job,
        "labels": {JOB_LABEL: job, RANK_LABEL: str(rank)},
        "cmds": cmd[:1],
        "arguments": cmd[1:],
        # Settings travel in the job argument (torchrun gives each rank its rank); the secrets
        # come from `train.secret_env` (pod_defaults), never from the arguments.
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }


def pod_defaults(train: TrainSettings) -> dict[str, Any]:
    """Arguments shared by every rank: image, namespace, resources, scheduling, secrets."""
    from kubernetes.client import models as k8s

    resources = {"cpu": train.cpu, "memory": train.memory}
    if train.gpus:
        resources["nvidia.com/gpu"] = str(train.gpus)
    return {
        "image": train.image,
        "namespace": train.namespace,
        "service_account_name": train.service_account,
        "container_resources": k8s.V1ResourceRequirements(requests=resources, limits=resources),
        "node_selector": dict(train.node_selector),
        "tolerations": [k8s.V1Toleration(**t) for t in train.tolerations],
        "env_from": [
            k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=s)) for s in train.secret_env
        ],
        "ports": [k8s.V1ContainerPort(container_port=train.pod_rdzv_port, name="c10d")],
        "priority_class_name": train.priority_class,
        # The "restricted" Pod Security Standard: non-root, no escalation, no capabilities.
        "security_context": k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=train.run_as_user,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        "container_security_context": k8s.V1SecurityContext(
            allow_privilege_escalation=False,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
        ),
        "random_name_suffix": False,
        "get_logs": True,
        "deferrable": True,
        "on_finish_action": "delete_pod",
        "startup_timeout_seconds": 600,
    }


def attempt_pods(pods: list[dict[str, Any]], attempt: int) -> list[dict[str, Any]]:
    """The ranks' pod arguments for one attempt of the group: unique pod names (the pods of a
    failed attempt may still be terminating), the same hostnames (rank 0's DNS name)."""
    return [
        {
            **pod,
            "name": f"{pod['name']}-a{attempt}",
            "labels": {**pod["labels"], ATTEMPT_LABEL: str(attempt)},
        }
        for pod in pods
    ]


def kubernetes_training_group(
    train: TrainSettings, prepared: XComArg, pool: str
) -> tuple[BaseOperator, list[MappedOperator]]:
    """Up to ``train.group_attempts`` attempts of: Service (setup) -> one pod per node (mapped)
    -> Service deleted (teardown, on failure too). Returns (the last teardown, all node tasks).

    Ranks are never retried alone (a lone rank cannot rejoin a finished rendezvous) and Airflow
    3.3 has no task-group retries, so the group retry is unrolled: after each attempt a gate
    asks MLflow whether the run finished (rank 0 logs the final metrics and model) and skips the
    next attempt if so; otherwise the whole group runs again and resumes from the checkpoints.

    ``prepared`` is the XCom of a task returning ``{"run_id", "service_yaml", "pods": [...]}``."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.providers.cncf.kubernetes.operators.resource import (
        KubernetesCreateResourceOperator,
        KubernetesDeleteResourceOperator,
    )
    from airflow.sdk import TaskGroup, TriggerRule, task

    service_yaml = "{{ ti.xcom_pull(task_ids='prepare_training')['service_yaml'] }}"
    previous, all_nodes = None, []
    for attempt in range(1, train.group_attempts + 1):
        group_id = "train_on_kubernetes" if attempt == 1 else f"train_on_kubernetes_{attempt}"
        with TaskGroup(group_id) as group:
            create_rendezvous_service = KubernetesCreateResourceOperator(
                task_id="create_rendezvous_service",
                yaml_conf=service_yaml,
                namespace=train.namespace,
            )

            @task
            def node_specs(p: dict[str, Any], attempt: int = attempt) -> list[dict[str, Any]]:
                return attempt_pods(p["pods"], attempt)

            nodes = KubernetesPodOperator.partial(
                task_id="train_node", pool=pool, retries=0, **pod_defaults(train)
            ).expand_kwargs(node_specs(prepared))  # type: ignore[arg-type]  # resolved at run time
            delete_rendezvous_service = KubernetesDeleteResourceOperator(
                task_id="delete_rendezvous_service",
                yaml_conf=service_yaml,
                namespace=train.namespace,
            )
            # Setup/teardown: the Service goes away after the pods, on failure too, and a
            # skipped attempt (the run already finished) neither creates nor deletes it.
            (
                create_rendezvous_service
                >> nodes
                >> delete_rendezvous_service.as_teardown(setups=create_rendezvous_service)
            )
        if previous is None:
            prepared >> group
        else:

            @task.short_circuit(
                task_id=f"retry_group_{attempt}",
                trigger_rule=TriggerRule.ALL_DONE,
                ignore_downstream_trigger_rules=False,
            )
            def retry_group(p: dict[str, Any]) -> bool:
                """Run the group again only if the training run has not finished."""
                from airflow.sdk import get_current_context

                from mlops_airflow.common import run_settings
                from pipelines.train.run import training_finished

                return not training_finished(
                    run_settings(get_current_context()["params"]), p["run_id"]
                )

            previous >> retry_group(prepared) >> group  # type: ignore[arg-type]
        previous = delete_rendezvous_service
        all_nodes.append(nodes)
    assert previous is not None, "train.group_attempts is at least 1"
    return previous, all_nodes


def prepare(
    settings: Settings, manifest_uri: str, run_key: str, tags: dict[str, Any]
) -> dict[str, Any]:
    """Open (or reuse) the MLflow run and render the Service and every rank's pod arguments
    (with ``train.params_from = tuning``, the best trial's params, as a local run gets)."""
    from pipelines import stages
    from pipelines.train.job import TrainJob
    from pipelines.train.run import start_training_run

    settings, key, tags = stages.training_config(settings, manifest_uri, run_key, tags)
    run_id, done = start_training_run(settings, manifest_uri, key or run_key, tags)
    job = job_name(run_id)
    args = TrainJob.for_run(settings, manifest_uri, run_id).argv()
    service = rendezvous_service(job, settings.train.namespace, settings.train.pod_rdzv_port)
    return {
        "run_id": run_id,
        "done": done,
        "job": job,
        "service_yaml": yaml.safe_dump(service),
        "pods": [
            node_pod_kwargs(settings.train, job, r, args) for r in range(settings.train.nodes)
        ],
    }
