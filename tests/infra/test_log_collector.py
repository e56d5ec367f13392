"""The log collector (infra/k8s/logging): Fluent Bit on every node, shipping Envoy's access log
to the kubernetes profile's ``dataplane.evidence_uri``; and the reading side,
``RemoteServing.access_log_lines``, on objects laid out the way the collector writes them.

No cluster and no fluent-bit binary here: the manifests are validated against the
``kubernetes`` client models (as tests/infra/test_manifests.py does for base/) and Fluent Bit's
configuration is checked as data (which files it tails, what it keeps, where and how often it
uploads), against the Envoy Deployment and the profile it serves. The reader is run against
local files and the moto S3 server.
"""

from __future__ import annotations

import calendar
import copy
import fnmatch
import json
import re
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.config import Settings, with_overrides
from pipelines.serving.control import RemoteServing, evidence_partitions
from pipelines.serving.dataplane.split import Split
from pipelines.store import ObjectStore, storage_options
from tests.infra import test_manifests as tm
from tests.serving_helpers import store_on

LOGGING = tm.INFRA / "k8s" / "logging"
HEX64 = "0123456789abcdef" * 4  # a container id as the kubelet writes it in file names


# -- loading ----------------------------------------------------------------------------------
@cache
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((LOGGING / "kustomization.yaml").read_text())


@cache
def logging_objects() -> tuple[dict[str, Any], ...]:
    """``kustomize build infra/k8s/logging``: resources + namespace, like tm.base_objects."""
    k = kustomization()
    assert set(k) <= {"apiVersion", "kind", "namespace", "resources"}
    out = []
    for resource in k["resources"]:
        for doc in tm.load_docs(LOGGING / resource):
            obj = copy.deepcopy(doc)
            if obj["kind"] not in tm.CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
            out.append(obj)
    return tuple(out)


def one(kind: str) -> dict[str, Any]:
    hits = [o for o in logging_objects() if o["kind"] == kind]
    assert len(hits) == 1, f"expected one {kind} in infra/k8s/logging, found {len(hits)}"
    return hits[0]


def pod_spec() -> dict[str, Any]:
    return dict(one("DaemonSet")["spec"]["template"]["spec"])


def collector() -> dict[str, Any]:
    (c,) = pod_spec()["containers"]
    return dict(c)


def mount(path: str) -> dict[str, Any]:
    """The container's mount that holds ``path``, the deepest one."""
    hits = [m for m in collector()["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert hits, f"nothing mounted over {path}"
    return max(hits, key=lambda m: len(m["mountPath"]))


def volume(name: str) -> dict[str, Any]:
    (v,) = [v for v in pod_spec()["volumes"] if v["name"] == name]
    return dict(v)


def config_path() -> str:
    args = collector()["args"]
    return str(args[args.index("-c") + 1])


@cache
def fluent_bit() -> dict[str, Any]:
    """Fluent Bit's configuration, the file the container is started with."""
    path = config_path()
    m = mount(path)
    assert m.get("readOnly") is True
    source = volume(m["name"])["configMap"]["name"]
    cm = one("ConfigMap")
    assert cm["metadata"]["name"] == source
    return dict(yaml.safe_load(cm["data"][path[len(m["mountPath"]) + 1 :]]))


def plugins(kind: str, name: str) -> list[dict[str, Any]]:
    return [p for p in fluent_bit()["pipeline"][kind] if p["name"] == name]


def tail() -> dict[str, Any]:
    (t,) = plugins("inputs", "tail")
    return t


def s3_output() -> dict[str, Any]:
    (o,) = plugins("outputs", "s3")
    return o


def grep_rules() -> dict[str, list[str]]:
    """Record key -> the regexes the grep filters keep it by (one rule per filter)."""
    rules: dict[str, list[str]] = {}
    for f in plugins("filters", "grep"):
        assert set(f) <= {"name", "match", "regex"}, "only keep-rules, one filter each"
        key, regex = str(f["regex"]).split(" ", 1)
        rules.setdefault(key, []).append(regex)
    return rules


def seconds(value: str | int) -> float:
    """A Fluent Bit time value (``60``, ``60s``, ``1m``, ``1h``, ``1d``) in seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", str(value).strip().lower())
    assert m, value
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def size(value: str | int) -> float:
    """A Fluent Bit size (``10M``, ``512k``, ``1G``) in bytes."""
    m = re.fullmatch(r"(\d+)([kmg]?)b?", str(value).strip().lower())
    assert m, value
    return int(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def envoy() -> tuple[str, str, str]:
    """(Deployment, namespace, container) of the data plane, as base/envoy.yaml declares it."""
    (dep,) = [
        o
        for o in tm.base_objects()
        if o["kind"] == "Deployment" and o["metadata"]["annotations"]["test/source"] == "envoy.yaml"
    ]
    (c,) = [
        c
        for c in dep["spec"]["template"]["spec"]["containers"]
        if c["image"].startswith("envoyproxy/envoy:")
    ]
    return dep["metadata"]["name"], dep["metadata"]["namespace"], c["name"]


def kubelet_file(pod: str, namespace: str, container: str) -> str:
    return f"/var/log/containers/{pod}_{namespace}_{container}-{HEX64}.log"


def shipped(path: str) -> bool:
    """Whether the collector tails the file at ``path`` and keeps its records."""
    if not fnmatch.fnmatchcase(path, tail()["path"]):
        return False
    key = tail()["path_key"]
    return all(re.search(r, path) for r in grep_rules().get(key, []))


# -- the objects ------------------------------------------------------------------------------
def test_kustomization_lists_every_file_and_stays_out_of_base() -> None:
    k = kustomization()
    present = {p.name for p in LOGGING.glob("*.y*ml")} - {"kustomization.yaml"}
    assert sorted(k["resources"]) == sorted(present)
    # Its own namespace, not mlops (restricted) and not applied with base.
    assert k["namespace"] != tm.kustomization()["namespace"]
    assert [o["metadata"]["name"] for o in logging_objects() if o["kind"] == "Namespace"] == [
        k["namespace"]
    ]
    assert not any("logging" in r for r in tm.kustomization()["resources"])
    assert not any(o["metadata"].get("namespace") == k["namespace"] for o in tm.base_objects())


@pytest.mark.parametrize(
    "obj", logging_objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}"
)
def test_object_round_trips_through_the_kubernetes_models(obj: dict[str, Any]) -> None:
    tm.test_object_round_trips_through_the_kubernetes_models("logging", obj)


def test_namespace_pod_security_admits_exactly_what_the_collector_needs() -> None:
    labels = one("Namespace")["metadata"]["labels"]
    # hostPath volumes are forbidden from "baseline" up: only "privileged" admits the pod.
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    spec = pod_spec()
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert host_paths == {"varlog": "/var/log", "state": "/var/lib/mlops-log-collector"}
    # Apart from hostPath, the one departure from "restricted" is uid 0 (files owned by root).
    assert tm.restricted_problems(spec) == [
        "fluent-bit: runAsNonRoot is not true",
        "fluent-bit: runAsUser 0",
    ]
    assert collector()["securityContext"]["privileged"] is False
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))


def test_collector_is_locked_down_sized_and_pinned() -> None:
    spec, c = pod_spec(), collector()
    assert spec["automountServiceAccountToken"] is False
    assert one("ServiceAccount")["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    repo, tag = c["image"].rsplit(":", 1)
    assert repo == "fluent/fluent-bit" and re.fullmatch(r"\d+\.\d+\.\d+", tag), c["image"]
    assert {m["name"] for m in c["volumeMounts"]} <= {v["name"] for v in spec["volumes"]}
    # A DaemonSet's pods are its own.
    ds = one("DaemonSet")
    assert tm.selector_matches(ds["spec"]["selector"], ds["spec"]["template"]["metadata"]["labels"])
    # Fluent Bit uploads what it buffered within its grace time, inside the pod's.
    assert seconds(fluent_bit()["service"]["grace"]) < spec["terminationGracePeriodSeconds"]


def test_the_node_logs_are_mounted_read_only_and_state_survives_the_pod() -> None:
    spec = pod_spec()
    for m in collector()["volumeMounts"]:
        v = volume(m["name"])
        if "hostPath" in v and v["hostPath"]["path"] == "/var/log":
            assert m["mountPath"] == "/var/log" and m["readOnly"] is True, m
    assert mount(tail()["path"])["name"] == "varlog"
    # Offsets and the upload buffer: on the node (a new pod resumes), writable.
    for path in (tail()["db"], s3_output()["store_dir"] + "/x"):
        m = mount(path)
        assert "hostPath" in volume(m["name"]) and not m.get("readOnly"), path
        assert volume(m["name"])["hostPath"]["type"] == "DirectoryOrCreate"
    # A read-only root filesystem: Fluent Bit must write nowhere else.
    writable = {m["mountPath"] for m in collector()["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/var/lib/mlops-log-collector", "/tmp"}
    assert volume("tmp")["emptyDir"]["sizeLimit"]
    assert len(spec["volumes"]) == len({v["name"] for v in spec["volumes"]})


def test_tail_selects_exactly_the_envoy_containers_log() -> None:
    deployment, namespace, container = envoy()
    pod = f"{deployment}-5d8c7f9b6b-x2k4q"  # <deployment>-<pod-template-hash>-<suffix>
    assert shipped(kubelet_file(pod, namespace, container))
    assert shipped(kubelet_file(f"{deployment}-7f9c-bq2zw", namespace, container))
    others = [
        kubelet_file(pod, namespace, f"{container}-sidecar"),  # another container of the pod
        kubelet_file(pod, namespace, "istio-proxy"),
        kubelet_file(pod, "default", container),  # the same names in another namespace
        kubelet_file(pod, f"{namespace}-staging", container),
        kubelet_file(f"{deployment}-admin-5d8c7f9b6b-x2k4q", namespace, container),
        kubelet_file("tf-serving-stable-5d8c7f9b6b-x2k4q", namespace, "tf-serving"),
        kubelet_file(pod, namespace, container).replace(".log", ".log.20260101-000000"),
    ]
    for path in others:
        assert not shipped(path), path
    # The path glob alone already narrows the reads to that container's files.
    assert tail()["path"].startswith(f"/var/log/containers/{deployment}-")
    assert f"_{namespace}_{container}-" in tail()["path"]


def test_only_envoys_stdout_lines_leave_the_node_as_they_were_written() -> None:
    t, out = tail(), s3_output()
    # CRI records: the built-in `cri` parser joins split lines and yields stream and log.
    assert t["multiline.parser"] == "cri"
    assert not {"parser", "docker_mode", "multiline"} & set(t), "no second parser"
    (stream,) = grep_rules()["stream"]
    assert re.search(stream, "stdout") and not re.search(stream, "stderr")
    assert set(grep_rules()) == {"stream", t["path_key"]}
    # The object body is the log field alone, one record per line: Envoy's JSON lines.
    assert out["log_key"] == "log"
    assert "format" not in out and "compression" not in out
    # Everything the tail tags reaches the output, nothing else does.
    assert t["tag"].endswith("*") and out["match"] == t["tag"]
    assert all(f["match"] == t["tag"] for f in fluent_bit()["pipeline"]["filters"])


def test_uploads_land_under_the_profiles_evidence_uri(tmp_path: Path) -> None:
    uri = str(tm.k8s_settings(tmp_path).dataplane.evidence_uri).rstrip("/")
    m = re.fullmatch(r"s3://([^/]+)/(.+)", uri)
    assert m, uri
    bucket, prefix = m.groups()
    out = s3_output()
    assert out["bucket"] == bucket
    key_format = out["s3_key_format"]
    assert key_format.startswith(f"/{prefix}/dt=%Y-%m-%d/hour=%H/"), key_format
    # PutObject keys need $UUID to keep their suffix, and keys of nodes must never collide.
    assert "$UUID" in key_format and "$INDEX" not in key_format and key_format.endswith(".log")
    # The partitions are the ones the reader lists (Fluent Bit formats the key in UTC).
    t = calendar.timegm((2026, 3, 31, 23, 59, 30))
    key = time.strftime(key_format.replace("$UUID", "abcd1234"), time.gmtime(t))
    (partition,) = evidence_partitions(t, t, lookback_s=0)
    assert key == f"/{prefix}/{partition}/5930-abcd1234.log"


def test_uploads_come_well_within_the_ship_delay(tmp_path: Path) -> None:
    s = tm.k8s_settings(tmp_path)
    out = s3_output()
    upload = seconds(out["upload_timeout"])
    # An object is put upload_timeout after it opened, checked every upload_timeout/6, its last
    # line flushed to it within `flush`: all well inside the wait before an hour is shipped.
    worst = upload * 7 / 6 + seconds(fluent_bit()["service"]["flush"])
    assert worst * 5 < s.monitoring.ship_delay_s, (worst, s.monitoring.ship_delay_s)
    # Small objects: PutObject (multipart parts are at least 5 MiB); 1M..1G for PutObject.
    assert out["use_put_object"] is True
    assert 1e6 <= size(out["total_file_size"]) <= 1e9
    assert size(out["store_dir_limit_size"]) > size(out["total_file_size"])


def test_credentials_come_from_a_secret() -> None:
    c = collector()
    assert "envFrom" not in c
    env = {e["name"]: e for e in c["env"]}
    documented = tm.example_secrets()[(tm.kustomization()["namespace"], "mlops-s3")]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[name], f"{name} is a literal"
    for name, e in env.items():
        ref = e["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "mlops-s3" and ref["key"] in documented, name
        assert not ref.get("optional"), name
    # The configuration names variables only, every one set from that Secret.
    text = one("ConfigMap")["data"][Path(config_path()).name]
    assert set(re.findall(r"\$\{(\w+)\}", text)) <= set(env)
    assert not re.search(r"(?i)secret|access_key|passw|token", text)
    assert fluent_bit()["pipeline"]["outputs"][0]["region"] == "${AWS_REGION}"


def test_readme_says_how_to_apply_the_collector() -> None:
    readme = (tm.INFRA / "README.md").read_text()
    for needle in (
        "kubectl apply -k infra/k8s/logging",
        f"kubectl -n {kustomization()['namespace']} create secret generic mlops-s3",
        "infra/k8s/logging",
    ):
        assert needle in readme, needle


# -- the reader: which partitions it lists ---------------------------------------------------
def utc(*fields: int) -> float:
    return float(calendar.timegm(fields + (0,) * (6 - len(fields))))


def test_partitions_run_from_an_hour_before_since_to_now_across_days() -> None:
    since, now = utc(2026, 3, 31, 23, 30), utc(2026, 4, 1, 1, 5)
    assert evidence_partitions(since, now) == [
        "dt=2026-03-31/hour=22",  # an object opened then can hold lines from `since` on
        "dt=2026-03-31/hour=23",
        "dt=2026-04-01/hour=00",
        "dt=2026-04-01/hour=01",
    ]
    assert evidence_partitions(since, now, lookback_s=0)[0] == "dt=2026-03-31/hour=23"
    # Year boundary, and `since` exactly on the hour.
    assert evidence_partitions(utc(2027, 1, 1, 0, 0), utc(2027, 1, 1, 0, 0, 1)) == [
        "dt=2026-12-31/hour=23",
        "dt=2027-01-01/hour=00",
    ]


def test_partitions_for_a_since_in_the_future() -> None:
    now = utc(2026, 4, 1, 10, 0, 5)
    # Within the lookback: the hours up to now (the node's clock may be ahead of this one).
    assert evidence_partitions(now + 600, now) == [
        "dt=2026-04-01/hour=09",
        "dt=2026-04-01/hour=10",
    ]
    # Further ahead: no object can hold such lines yet.
    assert evidence_partitions(now + 2 * 3600, now) == []


def test_partitions_of_a_long_window_fall_back_to_listing_everything() -> None:
    now = utc(2026, 4, 1, 10, 30)
    # Up to max_hours hour listings; beyond, None: the caller lists every key (nothing lost).
    week = evidence_partitions(now - 166 * 3600, now)
    assert week is not None and len(week) == 168
    assert week[0] == "dt=2026-03-25/hour=11" and week[-1] == "dt=2026-04-01/hour=10"
    assert evidence_partitions(now - 167 * 3600, now) is None
    assert evidence_partitions(0, now) is None
    assert evidence_partitions(now - 3600, now, max_hours=2) is None


# -- the reader against the store --------------------------------------------------------------
class _Splits:
    def read(self) -> Split:
        return Split()

    def write(self, split: Split) -> None:
        raise AssertionError("not written here")


def _line(t: float, request_id: str) -> str:
    return json.dumps(
        {
            "time": f"{t:.3f}",
            "listener": "primary",
            "cluster": "canary",
            "replica": "10.0.0.7:8501",
            "code": 200,
            "duration_us": 1500,
            "path": "/v1/models/fraud_detector:predict",
            "request_id": request_id,
            "key": "k",
            "scores": "[0.25]",
        }
    )


def _partition(t: float) -> str:
    return time.strftime("dt=%Y-%m-%d/hour=%H", time.gmtime(t))


@pytest.fixture(params=["file", "s3"])
def remote(request: pytest.FixtureRequest, local_settings: Settings, tmp_path: Path) -> Settings:
    overrides, root = store_on(request, tmp_path)
    overrides["serving"] = {
        "mode": "remote",
        "publish_root": f"{root}/serving",
        "pool_urls": {p: f"http://tf-serving-{p}:8501" for p in ("stable", "baseline", "canary")},
    }
    overrides["dataplane"] = {
        "url": "http://mlops-dataplane:8080",
        "evidence_uri": f"{root}/prod/access_logs/envoy",
    }
    return with_overrides(local_settings, **overrides)


@pytest.mark.integration
def test_access_log_lines_reads_the_collectors_partitions(remote: Settings) -> None:
    assert remote.dataplane.evidence_uri
    # The collector is another process: its uploads go through a filesystem of their own,
    # leaving the reader's listing cache as it was.
    options = {**storage_options(remote.store), "skip_instance_cache": True}
    shipped_to = ObjectStore(remote.dataplane.evidence_uri, options)
    control = RemoteServing(remote, _Splits())
    now = time.time()
    since = now - 60

    def put(key: str, *ids: str, t: float = now) -> None:
        shipped_to.write_text(key, "".join(_line(t, i) + "\n" for i in ids))

    # Every object below is fresh (modified now): only its partition decides whether it is read.
    put(f"{_partition(now - 3 * 3600)}/0000-stale.log", "stale")  # before since's hour - 1 h
    put(f"{_partition(now - 3600)}/5959-opened.log", "opened-before")  # first line an hour ago
    put("envoy-0.log", "legacy")  # not partitioned: read as before
    # The fallback for an old window lists everything (and fills s3fs's listing cache).
    assert {json.loads(x)["request_id"] for x in control.access_log_lines(0)} == {
        "stale",
        "opened-before",
        "legacy",
    }
    # Partitions created after that listing are seen (the cache is dropped on each call).
    put(f"{_partition(now)}/0000-aaaa.log", "a1", "a2")
    put(f"{_partition(now)}/0100-bbbb.log", "b1")
    lines = list(control.access_log_lines(since))
    assert sorted(json.loads(x)["request_id"] for x in lines) == [
        "a1",
        "a2",
        "b1",
        "legacy",
        "opened-before",
    ]
    assert all(x and not x.endswith("\n") for x in lines)  # one line per record, no envelope
    # What the canary judge sees: the window's requests, parsed.
    assert sorted(s.request_id for s in control.window(since)) == sorted(
        json.loads(x)["request_id"] for x in lines
    )
    # An object uploaded before `since` holds none of the window's lines: not read.
    assert list(control.access_log_lines(time.time() + 5)) == []
