"""TF Serving's contract on its own ``half_plus_two`` test model (y = x/2 + 2), REST and gRPC:
status, metadata, predict, classify and regress by version and label, and the errors.

By default the suite builds the model (``tests/half_plus_two.py``) and starts ``mlops serve`` on
it. To run the same assertions against a real TF Serving, serve the same model there:

    python -m tests.half_plus_two /tmp/tfs   # half_plus_two/00000123, 00000124, models.config
    tensorflow_model_server --port=8500 --rest_api_port=8501 \\
        --model_config_file=/tmp/tfs/models.config --allow_version_labels_for_unavailable_models
    # or: docker run --rm -p 8500:8500 -p 8501:8501 -v /tmp/tfs:/tmp/tfs \\
    #   --entrypoint tensorflow_model_server tensorflow/serving --port=8500 --rest_api_port=8501 \\
    #   --model_config_file=/tmp/tfs/models.config --allow_version_labels_for_unavailable_models
    MLOPS_CONTRACT_REST_URL=http://localhost:8501 MLOPS_CONTRACT_GRPC_TARGET=localhost:8500 \\
        .venv/bin/python -m pytest tests/integration/test_tfserving_contract.py -q

The config file lists both versions (``--model_base_path`` alone serves only the latest) and the
labels ``stable``: 123 and ``canary``: 124, which TF Serving accepts in its first config only with
``--allow_version_labels_for_unavailable_models``. Keep ``--enable_signature_method_name_check``
off (the default): TF2 writes method_name ``tensorflow/serving/predict`` on every signature.
Without ``MLOPS_CONTRACT_GRPC_TARGET`` the gRPC tests are skipped; tests marked ours-only (what
the error text adds, warmup counts) are skipped against another server.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests

from pipelines.serving.client import LocalServer, ServingClient
from tests import half_plus_two
from tests.half_plus_two import MODEL, ONLY_IN_124
from tests.serving_helpers import load_versions

pytestmark = pytest.mark.integration
SIGNATURES = {"serving_default", "classify_x_to_y", "classify_x_to_terms", "regress_x_to_y"}


@dataclass(frozen=True)
class Endpoints:
    rest: str
    grpc: str | None
    ours: bool  # our `mlops serve`, started here
    base: Path | None  # the model's base path, when built here


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    url = os.environ.get("MLOPS_CONTRACT_REST_URL")
    if url:
        yield Endpoints(url.rstrip("/"), os.environ.get("MLOPS_CONTRACT_GRPC_TARGET"), False, None)
        return
    out = tmp_path_factory.mktemp("tfserving")
    base = half_plus_two.write_model(out)
    config = half_plus_two.write_config(out, base, half_plus_two.LABELS)
    local = LocalServer(out / "serving", port=0, grpc_port=0, config_file=config)
    try:
        rest = local.ensure_running(timeout=180)
        for version in half_plus_two.VERSIONS:
            ServingClient(rest).wait_available(MODEL, version, timeout=120)
        yield Endpoints(rest, local.grpc_target(), True, base)
    finally:
        local.stop()


@pytest.fixture(scope="module")
def grpc_channel(server: Endpoints) -> Iterator[grpc.Channel]:
    if not server.grpc:
        pytest.skip("MLOPS_CONTRACT_GRPC_TARGET is not set")
    with grpc.insecure_channel(server.grpc) as channel:
        yield channel


@pytest.fixture
def ours(server: Endpoints) -> Endpoints:
    if not server.ours:
        pytest.skip("asserts what only our server adds")
    return server


def post(server: Endpoints, path: str, body: Any) -> requests.Response:
    return requests.post(f"{server.rest}/v1/models/{MODEL}{path}", json=body, timeout=30)


def ok(response: requests.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


# -- REST --------------------------------------------------------------------------------------
def test_model_status_lists_both_versions_available(server: Endpoints) -> None:
    r = requests.get(f"{server.rest}/v1/models/{MODEL}", timeout=10)
    statuses = ok(r)["model_version_status"]
    assert {s["version"]: s["state"] for s in statuses} == {"123": "AVAILABLE", "124": "AVAILABLE"}
    assert {s["status"]["error_code"] for s in statuses} == {"OK"}
    one = ok(requests.get(f"{server.rest}/v1/models/{MODEL}/versions/123", timeout=10))
    assert one == {
        "model_version_status": [
            {
                "version": "123",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    canary = ok(requests.get(f"{server.rest}/v1/models/{MODEL}/labels/canary", timeout=10))
    assert [s["version"] for s in canary["model_version_status"]] == ["124"]


@pytest.mark.parametrize("path", ["", "/versions/123", "/versions/124", "/labels/stable"])
def test_predict_answers_the_documented_example(server: Endpoints, path: str) -> None:
    body = {"instances": [1.0, 2.0, 5.0]}
    assert ok(post(server, f"{path}:predict", body)) == {"predictions": [2.5, 3.0, 4.5]}


def test_predict_columnar_format(server: Endpoints) -> None:
    body = {"signature_name": "serving_default", "inputs": [1.0, 2.0, 5.0]}
    assert ok(post(server, ":predict", body)) == {"outputs": [2.5, 3.0, 4.5]}


@pytest.mark.parametrize("path", ["", "/versions/123", "/labels/canary"])
def test_regress_returns_one_value_per_example(server: Endpoints, path: str) -> None:
    body = {"signature_name": "regress_x_to_y", "examples": [{"x": 80.0}]}
    assert ok(post(server, f"{path}:regress", body)) == {"results": [42.0]}
    body = {"signature_name": "regress_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}]}
    assert ok(post(server, f"{path}:regress", body)) == {"results": [2.5, 3.0]}


@pytest.mark.parametrize("path", ["", "/versions/124", "/labels/stable"])
def test_classify_returns_label_score_pairs_per_example(server: Endpoints, path: str) -> None:
    """A signature with only ``scores`` gives empty labels (TF Serving's handler test: x=20 ->
    12, x=10 -> 7); one with ``classes`` too gives each score its label."""
    body = {"signature_name": "classify_x_to_y", "examples": [{"x": 20.0}, {"x": 10.0}]}
    assert ok(post(server, f"{path}:classify", body)) == {"results": [[["", 12.0]], [["", 7.0]]]}
    body = {"signature_name": "classify_x_to_terms", "examples": [{"x": 20.0}]}
    assert ok(post(server, f"{path}:classify", body)) == {
        "results": [[["half_x", 10.0], ["two", 2.0]]]
    }


def test_context_is_merged_into_every_example(server: Endpoints) -> None:
    body = {
        "signature_name": "regress_x_to_y",
        "context": {"x": 80.0},
        "examples": [{"id": "a", "blob": {"b64": "aGVsbG8="}}, {"id": "b", "n": [1, 2]}],
    }
    assert ok(post(server, ":regress", body)) == {"results": [42.0, 42.0]}


def test_each_version_answers_with_its_own_signatures(server: Endpoints) -> None:
    """Only version 124 exports ``regress_x_to_y2`` (y = x/2 + 3): the version in the URL, or
    the label's, is the one that answers."""
    body = {"signature_name": ONLY_IN_124, "examples": [{"x": 1.0}]}
    for path in ("", "/versions/124", "/labels/canary"):
        assert ok(post(server, f"{path}:regress", body)) == {"results": [3.5]}, path
    for path in ("/versions/123", "/labels/stable"):
        r = post(server, f"{path}:regress", body)
        assert r.status_code == 400, r.text
        assert f"No signature was found with the name: {ONLY_IN_124}" in r.json()["error"]


@pytest.mark.parametrize("version", [123, 124])
def test_metadata_describes_each_versions_signatures(server: Endpoints, version: int) -> None:
    r = requests.get(f"{server.rest}/v1/models/{MODEL}/versions/{version}/metadata", timeout=10)
    meta = ok(r)
    assert meta["model_spec"] == {"name": MODEL, "signature_name": "", "version": str(version)}
    defs = meta["metadata"]["signature_def"]["signature_def"]
    assert set(defs) >= SIGNATURES
    assert (ONLY_IN_124 in defs) == (version == 124)
    assert defs["serving_default"]["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert set(defs["serving_default"]["outputs"]) == {"y"}
    assert defs["classify_x_to_y"]["inputs"]["inputs"]["dtype"] == "DT_STRING"
    assert set(defs["classify_x_to_y"]["outputs"]) == {"scores"}
    assert set(defs["classify_x_to_terms"]["outputs"]) == {"classes", "scores"}
    assert set(defs["regress_x_to_y"]["outputs"]) == {"outputs"}


EXAMPLE = [{"x": 1.0}]


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        # serving_default (predict) is the default signature; it cannot classify or regress
        (":classify", {"examples": EXAMPLE}, 400, "No classification inputs found"),
        (":regress", {"examples": EXAMPLE}, 400, "No regression inputs found"),
        (
            ":regress",
            {"signature_name": "classify_x_to_y", "examples": EXAMPLE},
            400,
            "No regression outputs found",
        ),
        (
            ":classify",
            {"signature_name": "regress_x_to_y", "examples": EXAMPLE},
            400,
            'at least one of "classes" or "scores"',
        ),
        (
            ":classify",
            {"signature_name": "nope", "examples": EXAMPLE},
            400,
            "No signature was found with the name: nope",
        ),
        (
            ":predict",
            {"signature_name": "nope", "instances": [1.0]},
            400,
            'Serving signature name: "nope" not found',
        ),
        (
            "/versions/99:classify",
            {"signature_name": "classify_x_to_y", "examples": EXAMPLE},
            404,
            f"Servable not found for request: Specific({MODEL}, 99)",
        ),
        (
            "/labels/nope:regress",
            {"signature_name": "regress_x_to_y", "examples": EXAMPLE},
            400,
            "Unrecognized servable version label: nope",
        ),
        (":regress", {"signature_name": "regress_x_to_y"}, 400, "'examples' is expected"),
        (
            ":regress",
            {"signature_name": "regress_x_to_y", "examples": []},
            400,
            "'examples' value is an empty array",
        ),
        (  # a whole number is an int64 feature; the signature parses x as float
            ":regress",
            {"signature_name": "regress_x_to_y", "examples": [{"x": 1}]},
            400,
            "Data types don't match",
        ),
        (
            ":regress",
            {"signature_name": "regress_x_to_y", "examples": [{"x": [1.0, "a"]}]},
            400,
            "Unexpected element type in feature: x expecting type: float",
        ),
        (
            ":regress",
            {"signature_name": "regress_x_to_y", "examples": [{"y": 1.0}]},
            400,
            "Feature: x (data type: float) is required but could not be found",
        ),
    ],
)
def test_errors_use_tf_serving_codes_and_messages(
    server: Endpoints, path: str, body: Any, status: int, fragment: str
) -> None:
    r = post(server, path, body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]


def test_an_unknown_model_is_a_404(server: Endpoints) -> None:
    body = {"signature_name": "classify_x_to_y", "examples": EXAMPLE}
    r = requests.post(f"{server.rest}/v1/models/nope:classify", json=body, timeout=10)
    assert r.status_code == 404, r.text
    assert "Servable not found for request: Latest(nope)" in r.json()["error"]


def test_a_refusal_names_the_signatures_the_model_exports(ours: Endpoints) -> None:
    """Ours only: TF Serving's message stops at the signature; ours says what would work."""
    error = post(ours, "/versions/124:classify", {"examples": EXAMPLE}).json()["error"]
    assert "Signatures that support Classify: classify_x_to_terms, classify_x_to_y;" in error
    exported = ", ".join(sorted(SIGNATURES | {ONLY_IN_124}))
    assert f"the model exports: {exported}" in error
    error = post(ours, "/versions/123:regress", {"signature_name": "x", "examples": EXAMPLE})
    assert "Signatures that support Regress: regress_x_to_y;" in error.json()["error"]


# -- gRPC (tensorflow-serving-api) ------------------------------------------------------------
def _examples(*xs: float) -> list[Any]:
    from tensorflow.core.example import example_pb2

    out = []
    for x in xs:
        example = example_pb2.Example()
        example.features.feature["x"].float_list.value.append(x)
        out.append(example)
    return out


def _spec(request: Any, signature: str = "", version: int | None = None, label: str = "") -> Any:
    request.model_spec.name = MODEL
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    return request


def _stub(channel: grpc.Channel) -> Any:
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def test_grpc_predict(grpc_channel: grpc.Channel) -> None:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = _spec(predict_pb2.PredictRequest())
    request.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0, 2.0, 5.0], dtype=tf.float32))
    response = _stub(grpc_channel).Predict(request, timeout=30)
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [2.5, 3.0, 4.5]
    assert (response.model_spec.name, response.model_spec.version.value) == (MODEL, 124)
    assert response.model_spec.signature_name == "serving_default"


@pytest.mark.parametrize("version", [123, 124])
def test_grpc_classify(grpc_channel: grpc.Channel, version: int) -> None:
    from tensorflow_serving.apis import classification_pb2

    request = _spec(classification_pb2.ClassificationRequest(), "classify_x_to_y", version)
    request.input.example_list.examples.extend(_examples(20.0, 10.0))
    response = _stub(grpc_channel).Classify(request, timeout=30)
    got = [[(c.label, c.score) for c in cl.classes] for cl in response.result.classifications]
    assert got == [[("", 12.0)], [("", 7.0)]]
    spec = response.model_spec
    assert (spec.name, spec.version.value, spec.signature_name) == (
        MODEL,
        version,
        "classify_x_to_y",
    )
    request = _spec(classification_pb2.ClassificationRequest(), "classify_x_to_terms", version)
    request.input.example_list.examples.extend(_examples(20.0))
    response = _stub(grpc_channel).Classify(request, timeout=30)
    got = [[(c.label, c.score) for c in cl.classes] for cl in response.result.classifications]
    assert got == [[("half_x", 10.0), ("two", 2.0)]]


def test_grpc_regress_with_a_context_by_label(grpc_channel: grpc.Channel) -> None:
    from tensorflow.core.example import example_pb2
    from tensorflow_serving.apis import regression_pb2

    request = _spec(regression_pb2.RegressionRequest(), ONLY_IN_124, label="canary")
    listed = request.input.example_list_with_context
    listed.context.CopyFrom(_examples(1.0)[0])
    listed.examples.extend([example_pb2.Example(), example_pb2.Example()])
    response = _stub(grpc_channel).Regress(request, timeout=30)
    assert [r.value for r in response.result.regressions] == [3.5, 3.5]
    spec = response.model_spec
    assert (spec.name, spec.version.value, spec.signature_name) == (MODEL, 124, ONLY_IN_124)


def _grpc_error(call: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value


def test_grpc_errors_use_tf_serving_codes(grpc_channel: grpc.Channel) -> None:
    from tensorflow_serving.apis import classification_pb2, regression_pb2

    stub = _stub(grpc_channel)

    def classify(signature: str = "", version: int | None = None, label: str = "") -> Any:
        request = _spec(classification_pb2.ClassificationRequest(), signature, version, label)
        request.input.example_list.examples.extend(_examples(1.0))
        return request

    cases = [
        (classify(), grpc.StatusCode.INVALID_ARGUMENT, "No classification inputs found"),
        (classify("nope"), grpc.StatusCode.INVALID_ARGUMENT, "No signature was found"),
        (classify("classify_x_to_y", 99), grpc.StatusCode.NOT_FOUND, "Servable not found"),
        (
            classify("classify_x_to_y", label="nope"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Unrecognized servable version label: nope",
        ),
        (
            _spec(classification_pb2.ClassificationRequest(), "classify_x_to_y"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Input is empty",
        ),
    ]
    for request, code, fragment in cases:
        error = _grpc_error(stub.Classify, request)
        assert error.code() == code, error
        assert fragment in (error.details() or ""), error
    request = _spec(regression_pb2.RegressionRequest(), ONLY_IN_124, 123)
    request.input.example_list.examples.extend(_examples(1.0))
    error = _grpc_error(stub.Regress, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"No signature was found with the name: {ONLY_IN_124}" in (error.details() or "")


def test_grpc_model_status_and_metadata(grpc_channel: grpc.Channel) -> None:
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
    )

    request = _spec(get_model_status_pb2.GetModelStatusRequest())
    status = model_service_pb2_grpc.ModelServiceStub(grpc_channel).GetModelStatus(
        request, timeout=30
    )
    state = get_model_status_pb2.ModelVersionStatus.State.Name
    assert {s.version: state(s.state) for s in status.model_version_status} == {
        123: "AVAILABLE",
        124: "AVAILABLE",
    }
    for version in (123, 124):
        request = _spec(get_model_metadata_pb2.GetModelMetadataRequest(), version=version)
        request.metadata_field.append("signature_def")
        meta = _stub(grpc_channel).GetModelMetadata(request, timeout=30)
        assert (meta.model_spec.name, meta.model_spec.version.value) == (MODEL, version)
        defs = get_model_metadata_pb2.SignatureDefMap()
        meta.metadata["signature_def"].Unpack(defs)
        assert set(defs.signature_def) >= SIGNATURES
        assert (ONLY_IN_124 in defs.signature_def) == (version == 124)
        assert defs.signature_def["classify_x_to_y"].inputs["inputs"].dtype == 7  # DT_STRING


def test_grpc_refusal_names_the_signatures_the_model_exports(
    ours: Endpoints, grpc_channel: grpc.Channel
) -> None:
    from tensorflow_serving.apis import regression_pb2

    request = _spec(regression_pb2.RegressionRequest(), "classify_x_to_y", 124)
    request.input.example_list.examples.extend(_examples(1.0))
    error = _grpc_error(_stub(grpc_channel).Regress, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"Signatures that support Regress: regress_x_to_y, {ONLY_IN_124};" in (
        error.details() or ""
    )


# -- ours only: warmup ----------------------------------------------------------------------------
def test_classify_and_regress_warmup_records_are_replayed(ours: Endpoints, tmp_path: Path) -> None:
    """As TF Serving does, Classify and Regress warmup records run before a version is
    AVAILABLE, and one the signature cannot serve fails the load (the count is internal)."""
    import tensorflow as tf
    from tensorflow_serving.apis import classification_pb2, prediction_log_pb2, regression_pb2

    from pipelines.serving.server import WARMUP_FILE

    assert ours.base is not None
    base = tmp_path / MODEL
    for version, classify_signature in ((1, "classify_x_to_y"), (2, "regress_x_to_y")):
        shutil.copytree(ours.base / "00000123", base / str(version))
        classify = _spec(classification_pb2.ClassificationRequest(), classify_signature)
        classify.input.example_list.examples.extend(_examples(1.0))
        regress = _spec(regression_pb2.RegressionRequest(), "regress_x_to_y")
        regress.input.example_list.examples.extend(_examples(2.0))
        records = base / str(version) / WARMUP_FILE
        records.parent.mkdir(parents=True)
        with tf.io.TFRecordWriter(str(records)) as writer:
            for log in (
                prediction_log_pb2.PredictionLog(
                    classify_log=prediction_log_pb2.ClassifyLog(request=classify)
                ),
                prediction_log_pb2.PredictionLog(
                    regress_log=prediction_log_pb2.RegressLog(request=regress)
                ),
            ):
                writer.write(log.SerializeToString())
    good, bad = load_versions(tmp_path, MODEL, base, [1, 2])
    assert (good.state, good.warmup_requests) == ("AVAILABLE", 2)
    assert bad.state == "END" and "at least one of" in bad.error_message
