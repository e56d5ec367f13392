"""The remote serving control: each label's state published for its TF Serving pool (versions
first, then ``<label>/models.config``) on local files and on the moto S3 server (with SSE),
nothing recorded when publishing fails; the split as the ConfigMap Envoy mounts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipelines.config import Settings, with_overrides
from pipelines.serving import model_config, rollout
from pipelines.serving.client import ServingUnavailable
from pipelines.serving.control import RemoteServing, labels_of
from pipelines.serving.dataplane.split import ConfigMapSplit, Split, SplitError
from pipelines.store import ObjectStore, open_store
from tests.serving_helpers import store_on

pytestmark = pytest.mark.integration
NAME = "fraud_detector"


REMOTE = {
    "pool_urls": {
        pool: f"http://tf-serving-{pool}:8501" for pool in ("stable", "baseline", "canary")
    }
}


@pytest.fixture(params=["file", "s3"])
def remote(request: pytest.FixtureRequest, local_settings: Settings, tmp_path: Path) -> Settings:
    overrides, root = store_on(request, tmp_path)
    overrides["serving"] = {
        "mode": "remote",
        "publish_root": f"{root}/serving",
        "model_base_path": f"/models/{NAME}",
        **REMOTE,
    }
    overrides["dataplane"] = {"url": "http://mlops-dataplane:8080", "split_propagation_s": 0}
    return with_overrides(local_settings, **overrides)


class MemorySplit:
    """A split store in memory (the ConfigMap needs a cluster)."""

    def __init__(self) -> None:
        self.value = Split()
        self.writes = 0

    def read(self) -> Split:
        return self.value

    def write(self, split: Split) -> None:
        self.value, self.writes = split, self.writes + 1


def _version_dir(settings: Settings, version: int) -> None:
    d = Path(settings.serving.base_dir) / NAME / str(version)
    (d / "variables").mkdir(parents=True)
    (d / "saved_model.pb").write_bytes(b"graph-%d" % version)
    (d / "variables" / "variables.index").write_bytes(b"index")


def _target(settings: Settings) -> ObjectStore:
    from pipelines.store import storage_options

    assert settings.serving.publish_root
    return ObjectStore(settings.serving.publish_root, storage_options(settings.store))


def test_versions_are_published_before_the_config_that_names_them(
    remote: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[str] = []
    put_file, write_bytes = ObjectStore.put_file, ObjectStore.write_bytes

    def spy_put(self: ObjectStore, local: Any, key: str) -> str:
        writes.append(key)
        return put_file(self, local, key)

    def spy_write(self: ObjectStore, key: str, data: bytes) -> str:
        writes.append(key)
        return write_bytes(self, key, data)

    monkeypatch.setattr(ObjectStore, "put_file", spy_put)
    monkeypatch.setattr(ObjectStore, "write_bytes", spy_write)
    control = RemoteServing(remote, MemorySplit())
    _version_dir(remote, 1)
    control.set_pool("stable", model_config.ModelEntry(NAME, "local", [1], {"stable": 1}))
    _version_dir(remote, 2)
    control.set_pool("canary", model_config.ModelEntry(NAME, "local", [1, 2], {"canary": 1}))
    target = _target(remote)
    published = model_config.parse(target.read_text("canary/models.config"))
    assert [(e.name, e.base_path, e.versions, e.labels) for e in published] == [
        (NAME, f"/models/{NAME}", [1, 2], {"canary": 1})
    ]
    assert target.read_bytes(f"{NAME}/2/saved_model.pb") == b"graph-2"
    config_writes = [i for i, k in enumerate(writes) if k == "canary/models.config"]
    v2_files = [i for i, k in enumerate(writes) if k.startswith(f"{NAME}/2/")]
    assert max(v2_files) < config_writes[-1]  # the config naming v2 came after all its files
    assert len([k for k in writes if k == f"{NAME}/1/saved_model.pb"]) == 1  # not re-uploaded
    # Another task (another pod, no shared disk) reads the state from what was published.
    other = RemoteServing(remote, MemorySplit())
    assert labels_of(other) == {"stable": 1, "canary": 1}
    entry = other.pool("canary")
    assert entry is not None and entry.versions == [1, 2]


def test_a_failed_publish_records_nothing(remote: Settings) -> None:
    control = RemoteServing(remote, MemorySplit())
    _version_dir(remote, 1)
    control.set_pool("canary", model_config.ModelEntry(NAME, "local", [1]))
    with pytest.raises(ServingUnavailable, match="version 9"):
        control.set_pool("canary", model_config.ModelEntry(NAME, "local", [1, 9]))  # no v9 dir
    published = model_config.parse(_target(remote).read_text("canary/models.config"))
    assert published[0].versions == [1]


def test_the_remote_split_is_validated_and_read_back(remote: Settings) -> None:
    splits = MemorySplit()
    control = RemoteServing(remote, splits)
    control.set_split(Split(25))
    assert control.split() == Split(25) and splits.writes == 1
    control.set_split(Split(25))  # re-asserted, not rewritten
    assert splits.writes == 1
    splits.value = Split()  # a `kubectl apply` of the base manifests reset it
    control.set_split(Split(25))
    assert control.split() == Split(25) and splits.writes == 2
    with pytest.raises(SplitError):
        control.set_split(Split(250))
    assert control.split() == Split(25) and splits.writes == 2


def test_the_configmap_split_patches_only_its_data() -> None:
    """ConfigMapSplit against a stand-in for the Kubernetes API: the patch carries the
    runtime keys Envoy's disk layer reads, and what it reads back is validated."""

    class FakeCore:
        def __init__(self) -> None:
            self.data: dict[str, str] = {}
            self.calls: list[tuple[str, str, Any]] = []

        def read_namespaced_config_map(self, name: str, namespace: str) -> Any:
            self.calls.append(("read", f"{namespace}/{name}", None))
            return type("CM", (), {"data": dict(self.data)})()

        def patch_namespaced_config_map(self, name: str, namespace: str, body: Any) -> None:
            self.calls.append(("patch", f"{namespace}/{name}", body))
            self.data.update(body["data"])

    core = FakeCore()
    split = ConfigMapSplit("mlops-traffic-split", "mlops", core)
    split.write(Split(5, shadow=10))
    assert core.calls[-1] == (
        "patch",
        "mlops/mlops-traffic-split",
        {
            "data": {
                "mlops.weights.stable": "90",
                "mlops.weights.baseline": "5",
                "mlops.weights.canary": "5",
                "mlops.shadow.percent": "10",
            }
        },
    )
    assert split.read() == Split(5, shadow=10)
    core.data["mlops.weights.stable"] = "abc"
    with pytest.raises(SplitError):
        split.read()


def test_published_objects_carry_sse_on_s3(
    local_settings: Settings, s3_bucket: str, moto_server: str
) -> None:
    import boto3

    store = {"root": f"s3://{s3_bucket}/lake", "endpoint_url": moto_server, "key": "testing"}
    store |= {"secret": "testing", "sse": "AES256"}
    s = with_overrides(
        local_settings,
        store=store,
        serving={"mode": "remote", "publish_root": f"s3://{s3_bucket}/srv", **REMOTE},
        dataplane={"url": "http://mlops-dataplane:8080"},
    )
    _version_dir(s, 3)
    RemoteServing(s, MemorySplit()).set_pool("stable", model_config.ModelEntry(NAME, "local", [3]))
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="srv/")["Contents"]]
    assert "srv/stable/models.config" in keys and f"srv/{NAME}/3/saved_model.pb" in keys
    for key in keys:
        assert s3.head_object(Bucket=s3_bucket, Key=key)["ServerSideEncryption"] == "AES256"
    assert open_store(s.store).uri("x").startswith("s3://")


def test_an_export_is_served_only_if_every_file_matches_its_sha256(
    store: ObjectStore, tmp_path: Path
) -> None:
    """Staging downloads the export and checks each file against export.json: a swapped or
    added file is refused before anything is copied under the serving base path."""
    import json

    from pipelines.data import layout

    src = tmp_path / "export"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"graph")
    (src / "variables" / "variables.index").write_bytes(b"index")
    prefix = layout.export(NAME, 7)
    store.put_dir(src, f"{prefix}/saved_model")
    meta = {"version": "7", "files": rollout._tree_sha256(src)}
    store.write_text(f"{prefix}/export.json", json.dumps(meta))
    rollout.fetch_verified_export(store, NAME, "7", tmp_path / "ok")
    assert (tmp_path / "ok" / "saved_model.pb").read_bytes() == b"graph"
    store.write_bytes(f"{prefix}/saved_model/saved_model.pb", b"tampered graph")
    with pytest.raises(rollout.RolloutError, match=r"sha256 check: \['saved_model.pb'\]"):
        rollout.fetch_verified_export(store, NAME, "7", tmp_path / "bad")
    store.write_bytes(f"{prefix}/saved_model/saved_model.pb", b"graph")
    store.write_bytes(f"{prefix}/saved_model/extra.pb", b"smuggled")
    with pytest.raises(rollout.RolloutError, match=r"extra\.pb"):
        rollout.fetch_verified_export(store, NAME, "7", tmp_path / "extra")
