"""Deployment files under infra/, checked without a cluster, Docker, kustomize or helm.

Every Kubernetes object is validated against the ``kubernetes`` client models (deserialized
with client-side validation, then serialized back and compared, which catches misspelled or
misplaced fields that plain deserialization drops). The rest checks that the files agree with
the code: the training pods the DAG renders (built with the provider's own
``build_pod_request_obj``) land in the namespace, service account, RBAC, quota and network
policies of the manifests; the profile's URLs point at real Services; the router's command
really starts the router; the Helm values name the pool and service accounts the code and the
RoleBinding use; the images' requirement files are subsets of the pinned stack.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pytest
import requests
import yaml

if TYPE_CHECKING:
    from pipelines.config import Settings, TrainSettings

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
BASE = INFRA / "k8s" / "base"
EXAMPLES = INFRA / "k8s" / "examples"
HELM_VALUES = INFRA / "helm" / "airflow-values.yaml"
DOCKER = INFRA / "docker"

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
    router = find("Deployment", "mlops-router")["spec"]["template"]["metadata"]["labels"]
    serving = find("Deployment", "tf-serving")["spec"]["template"]["metadata"]["labels"]
    mlflow = find("Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    airflow_task = {"tier": "airflow", "component": "worker", "release": "airflow"}
    airflow = airflow_namespace()

    # torchrun: every rank reaches the c10d store on rank 0; gloo/NCCL use ephemeral ports
    assert ingress_allowed(ns, rank1, rank0, k8s_train.pod_rdzv_port)
    assert ingress_allowed(ns, rank0, rank1, 41234)
    # serving path: ingress controller -> router -> TF Serving (REST and gRPC)
    assert ingress_allowed("ingress-nginx", {"app": "ingress-nginx"}, router, 8080)
    assert ingress_allowed(ns, router, serving, 8501)
    assert ingress_allowed(ns, router, serving, 8500)
    # the rollout tasks call serving.url from Airflow's task pods
    assert ingress_allowed(airflow, airflow_task, serving, 8501)
    # MLflow from the trainers and from Airflow's task pods
    assert ingress_allowed(ns, rank0, mlflow, 5000)
    assert ingress_allowed(airflow, airflow_task, mlflow, 5000)
    # and nothing else
    assert not ingress_allowed("ingress-nginx", {"app": "ingress-nginx"}, serving, 8501)
    assert not ingress_allowed(ns, rank0, serving, 8501)
    assert not ingress_allowed(ns, router, mlflow, 5000)
    assert not ingress_allowed(ns, router, rank0, k8s_train.pod_rdzv_port)
    assert not ingress_allowed(airflow, airflow_task, rank0, k8s_train.pod_rdzv_port)
    assert not ingress_allowed("default", {"app": "x"}, router, 8080)


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
    router_image = find("Deployment", "mlops-router")["spec"]["template"]["spec"]["containers"][0]
    assert training_pods[0]["spec"]["containers"][0]["image"] == router_image["image"], (
        "the router runs the trainer image (it has the package and no TensorFlow)"
    )


def test_the_role_grants_exactly_what_the_pod_operator_needs() -> None:
    import airflow.providers.cncf.kubernetes as provider

    provider_dir = Path(provider.__file__).parent
    for _, _, source, call in OPERATOR_NEEDS:
        assert call in (provider_dir / source).read_text(), f"{call} no longer in {source}"

    namespace = kustomization()["namespace"]
    worker = helm_values()["workers"]["serviceAccount"]["name"]
    triggerer = helm_values()["triggerer"]["serviceAccount"]["name"]
    airflow = airflow_namespace()
    for account in (worker, triggerer):
        bindings = [
            b
            for b in of_kind("RoleBinding")
            if {"kind": "ServiceAccount", "name": account, "namespace": airflow} in b["subjects"]
        ]
        assert len(bindings) == 1, f"{airflow}/{account} is bound {len(bindings)} times"
        binding = bindings[0]
        assert binding["metadata"]["namespace"] == namespace
        assert binding["roleRef"]["kind"] == "Role"
        role = find("Role", binding["roleRef"]["name"])
        granted = {
            (resource, verb)
            for rule in role["rules"]
            if rule["apiGroups"] == [""]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
        assert all(rule["apiGroups"] == [""] for rule in role["rules"])
        assert granted == {(r, v) for r, v, _, _ in OPERATOR_NEEDS}, "least privilege"
        assert ("pods/exec", "create") not in granted and ("secrets", "get") not in granted


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


# -- 6. the profile's URLs, TF Serving and the router -------------------------------------------
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


def test_profile_urls_point_at_the_services(tmp_path: Path) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    s = k8s_settings(tmp_path)
    service_for(s.mlflow.tracking_uri)
    service_for(s.serving.url or "")
    service_for(s.canary.router_url or "")
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


def test_tf_serving_configuration_lines_up(tmp_path: Path) -> None:
    from pipelines.serving import model_config

    s = k8s_settings(tmp_path)
    deployment = find("Deployment", "tf-serving")
    spec = deployment["spec"]["template"]["spec"]
    server = container("tf-serving", "tf-serving")
    sync = container("tf-serving", "model-sync")
    args = dict(a.removeprefix("--").split("=", 1) for a in server["args"] if "=" in a)
    assert server["args"] == dockerfile_cmd("serving.Dockerfile"), "Deployment args = image CMD"
    assert (args["port"], args["rest_api_port"]) == ("8500", "8501")

    # The controller publishes to serving.publish_root (versions, then models.config); the init
    # container and the sidecar copy that prefix to the volume the server reads.
    (init,) = spec["initContainers"]
    init_env = {e["name"]: e.get("value") for e in init["env"]}
    env = {e["name"]: e.get("value") for e in sync["env"]}
    assert env["SOURCE"] == init_env["SOURCE"] == s.serving.publish_root
    assert env["TARGET"] == init_env["TARGET"]
    assert args["model_config_file"] == f"{env['TARGET']}/models.config"
    assert s.serving.model_base_path == f"{env['TARGET']}/{s.mlflow.model_name}"
    models_mount = next(m for m in server["volumeMounts"] if m["name"] == "models")
    assert models_mount["mountPath"] == env["TARGET"] and models_mount.get("readOnly") is True
    # the sidecar: version directories first, then the config by an atomic rename
    loop = " ".join(sync["args"])
    assert loop.index("--exclude models.config") < loop.index('"$SOURCE/models.config"')
    assert 'mv "$TARGET/models.config.tmp" "$TARGET/models.config"' in loop
    # the server can start before the first rollout: an empty config when none is published
    assert "model_config_list" in " ".join(init["args"])
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_router_command_starts_the_router(tmp_path: Path) -> None:
    """Run the Deployment's exact command line (``mlops router`` from the venv)."""
    router = container("mlops-router")
    assert router["command"] == ["mlops", "router"]
    args = router["args"]
    env = {e["name"]: e.get("value") for e in router["env"]}
    token_ref = next(e for e in router["env"] if e["name"] == "MLOPS__CANARY__ADMIN_TOKEN")
    secret = token_ref["valueFrom"]["secretKeyRef"]
    assert secret["key"] in example_secrets()[(kustomization()["namespace"], secret["name"])]
    assert int(args[args.index("--port") + 1]) in {p["containerPort"] for p in router["ports"]}
    weights = Path(args[args.index("--weights-file") + 1])
    mounts = {m["mountPath"] for m in router["volumeMounts"]}
    assert str(weights.parent) in mounts, "the weight file sits on a writable volume"

    port, token = free_port(), "0a1b2c3d4e5f"
    local_args = [a for a in args]
    local_args[local_args.index("--host") + 1] = "127.0.0.1"
    local_args[local_args.index("--port") + 1] = str(port)
    local_args[local_args.index("--weights-file") + 1] = str(tmp_path / weights.name)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlops"), "router", *local_args],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "MLOPS_PROFILE": env["MLOPS_PROFILE"],
            "MLOPS_HOME": str(tmp_path / "home"),
            "MLOPS__CANARY__ADMIN_TOKEN": token,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(
                    f"{base}{router['readinessProbe']['httpGet']['path']}", timeout=2
                ).ok:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stdout.read() if proc.stdout else ""
            )
            time.sleep(0.2)
        assert requests.get(f"{base}/metrics", timeout=5).status_code == 200
        assert requests.get(f"{base}/admin/weights", timeout=5).status_code == 401
        r = requests.post(
            f"{base}/admin/weights",
            json={"canary": 5},
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
        assert r.status_code == 200 and r.json() == {"canary": 5.0}
        assert (tmp_path / weights.name).is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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
    from mlops_airflow.common import TRAINING_POOL

    values = helm_values()
    airflow = airflow_namespace()
    secrets = example_secrets()
    assert values["executor"] == "KubernetesExecutor"
    assert values["postgresql"]["enabled"] is False
    assert "connection" in secrets[(airflow, values["data"]["metadataSecretName"])]
    assert values["images"]["airflow"]["repository"] and values["images"]["airflow"]["tag"]
    assert deployment_env()["MLOPS_PROFILE"] == "kubernetes"
    assert k8s_train.image == container("mlops-router")["image"]

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

    # the pool: created by the migration job with Airflow's own CLI
    script = values["migrateDatabaseJob"]["args"][2]
    commands = [shlex.split(c) for c in script.split("&&")]
    assert commands[0] == ["airflow", "db", "migrate"]
    (pools_set,) = [c for c in commands if c[1:3] == ["pools", "set"]]
    parsed = get_parser().parse_args(pools_set[1:])
    assert parsed.pool == TRAINING_POOL
    assert int(parsed.slots) >= k8s_train.nodes, "all ranks of a job must fit in the pool"
    assert parsed.include_deferred, "deferred ranks keep their slot while they train"


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


def test_readme_documents_apply_build_and_limits() -> None:
    readme = (INFRA / "README.md").read_text()
    for needle in (
        "kubectl apply -k infra/k8s/base",
        "helm install airflow apache-airflow/airflow",
        f"--namespace {airflow_namespace()}",
        "docker build -f infra/docker/trainer.Dockerfile",
        "not verified",
    ):
        assert needle in readme, needle
