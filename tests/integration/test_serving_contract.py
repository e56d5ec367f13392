"""TF Serving REST contract, run against our server, or a real TF Serving.

Set ``TF_SERVING_URL`` (and ``TF_SERVING_MODEL_CONFIG``, the config file that server polls,
with ``TF_SERVING_BASE`` its model base path) to run the same tests against tensorflow/serving.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests

from pipelines.data.generate import transactions
from pipelines.data.shard import feature_stats
from pipelines.data.spec import load_spec
from pipelines.serving import model_config
from pipelines.serving.client import LocalServer, ServingClient
from pipelines.serving.errors import ServingError
from pipelines.serving.export import export_saved_model, to_instances
from pipelines.serving.server import ModelManager, make_server
from pipelines.train.model import TabularMLP, predict_proba
from tests.serving_helpers import load_versions

pytestmark = pytest.mark.integration
MODEL = "fraud_detector"


def small_model(seed: int) -> TabularMLP:
    import datetime as dt

    import torch

    spec = load_spec("transactions")
    df = transactions(dt.date(2026, 11, 1), 500)
    torch.manual_seed(seed)
    return TabularMLP(
        spec.numeric_features,
        {c: spec.vocab(c) for c in spec.categorical_features},
        feature_stats(df, spec),
        (16,),
        3,
        spec.log_features,
    )


@pytest.fixture(scope="module")
def rows():  # type: ignore[no-untyped-def]
    import datetime as dt

    return transactions(dt.date(2026, 11, 3), 64)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, rows) -> dict:  # type: ignore[no-untyped-def]
    base = Path(os.environ.get("TF_SERVING_BASE") or tmp_path_factory.mktemp("serving")) / MODEL
    out = {}
    for version, seed in ((1, 1), (2, 2)):
        m = small_model(seed)
        export_saved_model(m, base / str(version), warmup_rows=rows)
        out[version] = m
    return {"base": base, "models": out}


@pytest.fixture(scope="module")
def server(models: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(base URL, config file) of a server polling its config file every 0.2 s."""
    if os.environ.get("TF_SERVING_URL"):
        yield os.environ["TF_SERVING_URL"], Path(os.environ["TF_SERVING_MODEL_CONFIG"])
        return
    config = tmp_path_factory.mktemp("cfg") / "models.config"
    model_config.write(config, [model_config.ModelEntry(MODEL, str(models["base"]), [1])])
    manager = ModelManager(config, poll_seconds=0.2)
    manager.start()
    httpd = make_server(manager, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    from pipelines.serving.grpc_api import make_grpc_server

    grpc_server, grpc_port = make_grpc_server(manager, "127.0.0.1", 0)
    os.environ["_TEST_GRPC_TARGET"] = f"127.0.0.1:{grpc_port}"
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    ServingClient(url).wait_available(MODEL, 1, timeout=60)
    try:
        yield url, config
    finally:
        httpd.shutdown()
        httpd.server_close()
        grpc_server.stop(grace=None)
        manager.stop()


@pytest.fixture(scope="module")
def grpc_target(server: tuple[str, Path]) -> str:
    return os.environ.get("TF_SERVING_GRPC") or os.environ["_TEST_GRPC_TARGET"]


def set_config(config: Path, base: Path, versions: list[int], labels: dict[str, int]) -> None:
    model_config.write(config, [model_config.ModelEntry(MODEL, str(base), versions, labels)])


def test_status_reports_available_version(server: tuple[str, Path]) -> None:
    url, _ = server
    r = requests.get(f"{url}/v1/models/{MODEL}", timeout=10)
    assert r.status_code == 200
    st = r.json()["model_version_status"]
    assert {"version": "1", "state": "AVAILABLE"}.items() <= st[0].items()
    assert st[0]["status"]["error_code"] == "OK"


def test_predict_row_and_columnar_formats_match_torch(server, models, rows) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    model = models["models"][1]
    instances = to_instances(rows, model)
    r = requests.post(
        f"{url}/v1/models/{MODEL}/versions/1:predict", json={"instances": instances}, timeout=10
    )
    assert r.status_code == 200, r.text
    served = np.asarray(r.json()["predictions"])
    assert np.max(np.abs(served - predict_proba(model, rows))) <= 1e-5
    columns = {k: [i[k] for i in instances] for k in instances[0]}
    r2 = requests.post(
        f"{url}/v1/models/{MODEL}:predict",
        json={"signature_name": "serving_default", "inputs": columns},
        timeout=10,
    )
    assert r2.status_code == 200, r2.text
    assert np.allclose(r2.json()["outputs"], served, atol=1e-6)


def test_metadata_describes_the_raw_feature_signature(server: tuple[str, Path]) -> None:
    url, _ = server
    r = requests.get(f"{url}/v1/models/{MODEL}/versions/1/metadata", timeout=10)
    assert r.status_code == 200
    sig = r.json()["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["channel"]["dtype"] == "DT_STRING"
    assert sig["inputs"]["amount"]["dtype"] == "DT_FLOAT"
    assert "probability" in sig["outputs"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "fragment"),
    [
        ("get", "/v1/models/nope", None, 404, "Servable not found"),
        ("post", "/v1/models/nope:predict", {"instances": [{}]}, 404, "Servable not found"),
        (
            "post",
            f"/v1/models/{MODEL}/versions/9:predict",
            {"instances": [{}]},
            404,
            "Servable not found",
        ),
        (
            "post",
            f"/v1/models/{MODEL}/labels/nope:predict",
            {"instances": [{}]},
            400,
            "Unrecognized servable version label: nope",
        ),
        ("post", f"/v1/models/{MODEL}:predict", {"instances": [{"amount": 1.0}]}, 400, ""),
        ("post", f"/v1/models/{MODEL}:predict", {"instances": [], "inputs": {}}, 400, ""),
    ],
)
def test_errors_use_tf_serving_codes_and_bodies(
    server,
    method,
    path,
    body,
    status,  # type: ignore[no-untyped-def]
    fragment,
) -> None:
    url, _ = server
    r = getattr(requests, method)(f"{url}{path}", json=body, timeout=10)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]


def test_malformed_json_is_a_400(server: tuple[str, Path]) -> None:
    url, _ = server
    r = requests.post(f"{url}/v1/models/{MODEL}:predict", data=b"{not json", timeout=10)
    assert r.status_code == 400 and "error" in r.json()


def test_a_deeply_nested_body_is_a_400_with_an_error_body(server: tuple[str, Path]) -> None:
    url, _ = server
    for body in (b"[" * 100_000, b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}"):
        r = requests.post(f"{url}/v1/models/{MODEL}:predict", data=body, timeout=30)
        assert r.status_code == 400, r.text[:200]
        assert "error" in r.json()
    assert requests.get(f"{url}/v1/models/{MODEL}", timeout=10).status_code == 200  # still up


def _padded_labelled(models: dict, tmp_path: Path) -> Path:
    import shutil

    base = tmp_path / MODEL
    shutil.copytree(models["base"] / "1", base / "00000123")
    shutil.copytree(models["base"] / "2", base / "00000124")
    config = tmp_path / "models.config"
    entry = model_config.ModelEntry(MODEL, str(base), [123, 124], {"stable": 123, "canary": 124})
    model_config.write(config, [entry])
    return config


def test_a_labelled_first_config_is_refused_as_tf_serving_refuses_it(
    models: dict, tmp_path: Path
) -> None:
    """TF Serving checks labels before it adds any version, on the first config too
    (server_core.cc): without --allow_version_labels_for_unavailable_models it does not start."""
    manager = ModelManager(_padded_labelled(models, tmp_path), poll_seconds=0)
    with pytest.raises(ServingError) as err:
        manager.start()
    assert err.value.code == "FAILED_PRECONDITION"
    # Either label may be checked first (TF Serving walks a proto map).
    assert re.match(
        rf"Request to assign label to version 12[34] of model {MODEL}, which is not currently "
        r"available for inference \(first config ",
        err.value.message,
    ), err.value.message
    assert "--allow_version_labels_for_unavailable_models" in err.value.message
    assert MODEL not in manager.models  # refused whole: nothing was added


def test_zero_padded_version_directories_and_a_labelled_startup_config(
    models: dict, tmp_path: Path
) -> None:
    """TF Serving's own test models live in ``00000123``-style directories; with the flag a
    config that labels its versions at start-up comes up labelled (how every replica runs)."""
    manager = ModelManager(
        _padded_labelled(models, tmp_path), poll_seconds=0, allow_labels_for_unavailable=True
    )
    manager.start()
    try:
        assert manager.models[MODEL].labels == {"stable": 123, "canary": 124}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(
            s.state == "LOADING" for s in manager.models[MODEL].servables.values()
        ):
            time.sleep(0.1)
        assert {v: s.state for v, s in manager.models[MODEL].servables.items()} == {
            123: "AVAILABLE",
            124: "AVAILABLE",
        }
        assert manager.resolve(MODEL, label="canary").version == 124
        # The flag allows a label on a loading version only if the label is new or kept: a
        # label moved onto a version that is not AVAILABLE is refused, as in TF Serving.
        base = str(tmp_path / MODEL)
        moved = model_config.ModelEntry(MODEL, base, [123, 124, 125], {"stable": 125})
        with pytest.raises(ServingError, match="version 125 of model"):
            manager.apply([moved])
    finally:
        manager.stop()


def test_labels_only_point_at_available_versions(server, models) -> None:  # type: ignore[no-untyped-def]
    """One step that adds version 2 and labels it is refused whole; two phases work."""
    url, config = server
    client = ServingClient(url)
    try:
        set_config(config, models["base"], [1], {"stable": 1})
        deadline = time.monotonic() + 30
        while client.label_version(MODEL, "stable") != 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        set_config(config, models["base"], [1, 2], {"stable": 1, "canary": 2})
        time.sleep(1.5)
        assert client.label_version(MODEL, "canary") is None
        assert client.version_state(MODEL, 2)[0] in ("UNKNOWN", "END")
        set_config(config, models["base"], [1, 2], {"stable": 1, "canary": 1})  # phase 1
        client.wait_available(MODEL, 2, timeout=60)
        set_config(config, models["base"], [1, 2], {"stable": 1, "canary": 2})  # phase 2
        deadline = time.monotonic() + 30
        while client.label_version(MODEL, "canary") != 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.label_version(MODEL, "canary") == 2
        inst = to_instances(_rows(), models["models"][2])[:3]
        via_label = client.predict(MODEL, inst, label="canary")
        via_version = client.predict(MODEL, inst, version=2)
        assert via_label == via_version
    finally:  # the module's server, as the other tests expect it: version 1 only
        set_config(config, models["base"], [1], {})
        deadline = time.monotonic() + 30
        while client.version_state(MODEL, 2)[0] == "AVAILABLE" and time.monotonic() < deadline:
            time.sleep(0.2)


def _rows():  # type: ignore[no-untyped-def]
    import datetime as dt

    return transactions(dt.date(2026, 11, 4), 8)


def test_warmup_records_are_replayed_before_a_version_is_available(
    models: dict, tmp_path: Path
) -> None:
    """As TF Serving does: the export's PredictLog warmup record runs before AVAILABLE, and a
    record the signature cannot run fails the load (our server only: the count is internal)."""
    import shutil

    from tensorflow_serving.apis import prediction_log_pb2

    from pipelines.serving.server import WARMUP_FILE

    base = tmp_path / MODEL
    shutil.copytree(models["base"] / "1", base / "1")
    shutil.copytree(models["base"] / "1", base / "2")
    records = base / "2" / WARMUP_FILE
    entry = prediction_log_pb2.PredictionLog.FromString(_first_record(records))
    del entry.predict_log.request.inputs["amount"]  # the signature needs every feature
    _write_record(records, entry.SerializeToString())
    good, bad = load_versions(tmp_path, MODEL, base, [1, 2])
    assert (good.state, good.warmup_requests) == ("AVAILABLE", 1)
    assert bad.state == "END" and "amount" in bad.error_message


def _first_record(path: Path) -> bytes:
    import tensorflow as tf

    return bytes(next(iter(tf.data.TFRecordDataset(str(path)))).numpy())


def _write_record(path: Path, record: bytes) -> None:
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(record)


def test_prometheus_endpoint_counts_requests(server, models, rows) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    ServingClient(url).predict(MODEL, to_instances(rows, models["models"][1])[:1])
    r = requests.get(f"{url}/monitoring/prometheus/metrics", timeout=10)
    assert r.status_code == 200
    assert f':tensorflow:serving:request_count{{model_name="{MODEL}",status="OK"}}' in r.text


def test_local_server_process_starts_and_stops(tmp_path: Path) -> None:
    server = LocalServer(tmp_path / "serving", port=0, grpc_port=0)
    url = server.ensure_running(timeout=120)
    assert ServingClient(url).healthy()
    target = server.grpc_target()
    assert target is not None
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = MODEL
        with pytest.raises(grpc.RpcError) as info:
            stub.GetModelStatus(req, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert server.ensure_running() == url  # reused, not restarted
    pid = server.pid()
    assert pid is not None
    server.stop()
    assert not ServingClient(url).healthy()
    with pytest.raises(OSError):
        os.kill(pid, 0)


# -- gRPC: the tensorflow-serving-api stubs ----------------------------------------------------
def _predict_request(instances: list[dict], version: int | None = None, label: str | None = None):  # type: ignore[no-untyped-def]
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    req = predict_pb2.PredictRequest()
    req.model_spec.name = MODEL
    req.model_spec.signature_name = "serving_default"
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    for key in instances[0]:
        values = [i[key] for i in instances]
        dtype = tf.string if isinstance(values[0], str) else tf.float32
        req.inputs[key].CopyFrom(tf.make_tensor_proto(values, dtype=dtype))
    return req


def test_grpc_predict_matches_rest_and_torch(server, grpc_target, models, rows) -> None:  # type: ignore[no-untyped-def]
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    url, _ = server
    model = models["models"][1]
    instances = to_instances(rows, model)
    with grpc.insecure_channel(grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        resp = stub.Predict(_predict_request(instances, version=1), timeout=10)
    assert resp.model_spec.version.value == 1
    via_grpc = tf.make_ndarray(resp.outputs["probability"])
    via_rest = np.asarray(ServingClient(url).predict(MODEL, instances, version=1))
    assert np.allclose(via_grpc, via_rest, atol=1e-7)
    assert np.max(np.abs(via_grpc - predict_proba(model, rows))) <= 1e-5


def test_grpc_errors_use_tf_serving_codes(server, grpc_target, models, rows) -> None:  # type: ignore[no-untyped-def]
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    instances = to_instances(rows.head(2), models["models"][1])
    with grpc.insecure_channel(grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(_predict_request(instances, version=99), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(_predict_request(instances, label="nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Unrecognized servable version label" in info.value.details()


def test_grpc_model_status_and_metadata(server, grpc_target) -> None:  # type: ignore[no-untyped-def]
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        prediction_service_pb2_grpc,
    )

    with grpc.insecure_channel(grpc_target) as channel:
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = MODEL
        req.model_spec.version.value = 1
        st = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(req, timeout=10)
        assert st.model_version_status[0].version == 1
        assert (
            get_model_status_pb2.ModelVersionStatus.State.Name(st.model_version_status[0].state)
            == "AVAILABLE"
        )
        meta_req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        meta_req.model_spec.name = MODEL
        meta_req.model_spec.version.value = 1
        meta = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
            meta_req, timeout=10
        )
        defs = get_model_metadata_pb2.SignatureDefMap()
        meta.metadata["signature_def"].Unpack(defs)
        assert defs.signature_def["serving_default"].inputs["channel"].dtype == 7  # DT_STRING


def test_grpc_reload_config_refuses_a_label_on_an_unloaded_version(  # type: ignore[no-untyped-def]
    server, grpc_target, models
) -> None:
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc

    req = model_management_pb2.ReloadConfigRequest()
    mc = req.config.model_config_list.config.add()
    mc.name, mc.base_path, mc.model_platform = MODEL, str(models["base"]), "tensorflow"
    mc.model_version_policy.specific.versions.extend([1, 3])
    mc.version_labels["canary"] = 3
    with grpc.insecure_channel(grpc_target) as channel:
        resp = model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
            req, timeout=10
        )
    assert resp.status.error_code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "not currently available" in resp.status.error_message


@pytest.mark.skipif(bool(os.environ.get("TF_SERVING_URL")), reason="mlops serve's own log")
def test_each_call_logs_one_json_line_with_the_request_id_and_the_version(  # type: ignore[no-untyped-def]
    server, models, rows, caplog
) -> None:
    url, _ = server
    instances = to_instances(rows, models["models"][1])[:2]
    with caplog.at_level(logging.INFO, logger="pipelines.serving.requests"):
        ok = requests.post(
            f"{url}/v1/models/{MODEL}/versions/1:predict",
            json={"instances": instances},
            headers={"x-request-id": "req-ok"},
            timeout=10,
        )
        bad = requests.post(
            f"{url}/v1/models/{MODEL}/versions/9:predict",
            json={"instances": instances},
            headers={"x-request-id": "req-404"},
            timeout=10,
        )
    assert ok.headers["x-model-version"] == "1" and bad.status_code == 404
    lines = {
        r["request_id"]: r
        for r in (json.loads(x.getMessage()) for x in caplog.records)
        if r["request_id"].startswith("req-")
    }
    assert lines["req-ok"]["status"] == 200 and lines["req-ok"]["version"] == "1"
    assert lines["req-ok"]["path"] == f"/v1/models/{MODEL}/versions/1:predict"
    assert lines["req-404"]["status"] == 404 and lines["req-404"]["version"] is None
    assert lines["req-ok"]["duration_ms"] > 0
