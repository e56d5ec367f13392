"""Classify/Regress without a server: TF Serving's signature rule, JSON examples to tf.Example,
context merging, and the result checks, each with its failure path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pipelines.serving import inference
from pipelines.serving.errors import ServingError


def sigdef(inputs: dict[str, int], outputs: dict[str, int], method: str = "predict") -> Any:
    """A SignatureDef with the given tensor names and dtypes (1 float, 7 string)."""
    from tensorflow.core.protobuf import meta_graph_pb2

    sig = meta_graph_pb2.SignatureDef(method_name=f"tensorflow/serving/{method}")
    for name, dtype in inputs.items():
        sig.inputs[name].dtype = dtype
    for name, dtype in outputs.items():
        sig.outputs[name].dtype = dtype
    return sig


DEFS = {
    "serving_default": sigdef({"x": 1}, {"y": 1}),
    "classify_x_to_y": sigdef({"inputs": 7}, {"scores": 1}),
    "classify_labelled": sigdef({"inputs": 7}, {"classes": 7, "scores": 1}),
    "regress_x_to_y": sigdef({"inputs": 7}, {"outputs": 1}),
    "__saved_model_init_op": sigdef({}, {"__saved_model_init_op": 0}),
}


@pytest.mark.parametrize(
    ("sig", "method", "fragment"),
    [
        (DEFS["classify_x_to_y"], "classify", None),
        (DEFS["classify_labelled"], "classify", None),
        (sigdef({"inputs": 7}, {"classes": 7}), "classify", None),
        (DEFS["regress_x_to_y"], "regress", None),
        (DEFS["serving_default"], "classify", "No classification inputs found"),
        (DEFS["serving_default"], "regress", "No regression inputs found"),
        (DEFS["classify_x_to_y"], "regress", "No regression outputs found"),
        (DEFS["regress_x_to_y"], "classify", 'at least one of "classes" or "scores"'),
        (sigdef({"inputs": 7, "x": 1}, {"scores": 1}), "classify", "Expected one input Tensor"),
        (
            sigdef({"inputs": 7}, {"classes": 7, "scores": 1, "z": 1}),
            "classify",
            "Expected one or two output Tensors, found 3",
        ),
        (DEFS["classify_labelled"], "regress", "Expected one output Tensor"),
    ],
)
def test_signature_rule_is_tf_servings_structural_check(
    sig: Any, method: str, fragment: str | None
) -> None:
    problem = inference.signature_problem(sig, method)
    assert problem is None if fragment is None else fragment in (problem or "")


def test_the_method_name_is_checked_only_when_asked() -> None:
    """TF2 writes method_name tensorflow/serving/predict on every signature, so TF Serving checks
    it only with --enable_signature_method_name_check."""
    tf2 = DEFS["classify_x_to_y"]
    assert inference.signature_problem(tf2, "classify") is None
    problem = inference.signature_problem(tf2, "classify", check_method_name=True)
    assert problem == (
        "Expected classification signature method_name to be tensorflow/serving/classify. "
        "Was: tensorflow/serving/predict"
    )
    tf1 = sigdef({"inputs": 7}, {"outputs": 1}, method="regress")
    assert inference.signature_problem(tf1, "regress", check_method_name=True) is None


def test_select_signature_defaults_and_names_what_the_model_exports() -> None:
    assert inference.select_signature(DEFS, "classify_x_to_y", "classify") == "classify_x_to_y"
    with pytest.raises(ServingError) as info:
        inference.select_signature(DEFS, "", "classify")  # serving_default
    assert info.value.code == "INVALID_ARGUMENT" and info.value.http_status == 400
    assert info.value.message.startswith("No classification inputs found in SignatureDef")
    assert "Signatures that support Classify: classify_labelled, classify_x_to_y;" in (
        info.value.message
    )
    assert info.value.message.endswith(
        "the model exports: classify_labelled, classify_x_to_y, regress_x_to_y, serving_default"
    )
    with pytest.raises(ServingError) as info:
        inference.select_signature(DEFS, "nope", "regress")
    assert info.value.message.startswith("No signature was found with the name: nope.")
    assert "Signatures that support Regress: regress_x_to_y;" in info.value.message
    no_regress = {"serving_default": DEFS["serving_default"]}
    with pytest.raises(ServingError, match="support Regress: none;"):
        inference.select_signature(no_regress, "", "regress")


def _features(example: Any) -> dict[str, tuple[str | None, list[Any]]]:
    out = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        out[name] = (kind, list(getattr(feature, kind).value) if kind else [])
    return out


def test_json_examples_are_typed_as_tf_serving_types_them() -> None:
    body = {
        "signature_name": "classify_x_to_y",
        "examples": [
            {
                "f": 1.5,
                "i": 3,
                "b": True,
                "s": "héllo",
                "raw": {"b64": "aGVsbG8"},  # padding may be left out
                "fs": [1.0, 2.0],
                "is": [1, -2],
                "empty": [],
            }
        ],
    }
    name, request_input = inference.input_from_json(body)
    assert name == "classify_x_to_y"
    assert request_input.WhichOneof("kind") == "example_list"
    (example,) = request_input.example_list.examples
    assert _features(example) == {
        "f": ("float_list", [1.5]),
        "i": ("int64_list", [3]),
        "b": ("int64_list", [1]),
        "s": ("bytes_list", ["héllo".encode()]),
        "raw": ("bytes_list", [b"hello"]),
        "fs": ("float_list", [1.0, 2.0]),
        "is": ("int64_list", [1, -2]),
        "empty": (None, []),
    }
    assert inference.input_from_json({"examples": [{}]})[0] == ""


def test_context_goes_first_so_an_example_feature_of_the_same_name_wins() -> None:
    from tensorflow.core.example import example_pb2

    body = {"context": {"x": 80.0, "c": "shared"}, "examples": [{"id": 1}, {"x": 2.0}]}
    _, request_input = inference.input_from_json(body)
    assert request_input.WhichOneof("kind") == "example_list_with_context"
    merged = [
        _features(example_pb2.Example.FromString(raw))
        for raw in inference.serialized_examples(request_input)
    ]
    assert merged == [
        {"x": ("float_list", [80.0]), "c": ("bytes_list", [b"shared"]), "id": ("int64_list", [1])},
        {"x": ("float_list", [2.0]), "c": ("bytes_list", [b"shared"])},
    ]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ([{"x": 1.0}], "request body is not an object"),
        ({"signature_name": 3, "examples": [{}]}, "'signature_name' key must be a string value"),
        ({"signature_name": "s"}, "key 'examples' is expected and was not found"),
        ({"examples": {"x": 1.0}}, "Expecting 'examples' value to be an list/array"),
        ({"examples": []}, "'examples' value is an empty array"),
        ({"examples": [[1.0]]}, "Example must be JSON object but got JSON array"),
        ({"context": 1, "examples": [{}]}, "Example must be JSON object but got JSON number"),
        ({"examples": [{"x": None}]}, "Feature: x has element with unexpected JSON type: null"),
        ({"examples": [{"x": [[1.0]]}]}, "Feature: x has element with unexpected JSON type: array"),
        (
            {"examples": [{"x": {"a": 1}}]},
            "Feature: x has element with unexpected JSON type: object",
        ),
        (
            {"examples": [{"x": [1.0, 2]}]},
            "Unexpected element type in feature: x expecting type: float",
        ),
        (
            {"examples": [{"x": ["a", 1.0]}]},
            "Unexpected element type in feature: x expecting type: bytes",
        ),
        ({"examples": [{"x": [1, True, 2.0]}]}, "expecting type: int64"),
        (
            {"examples": [{"x": 2**63}]},
            "Feature: x has uint64_t element. Only int64_t is supported.",
        ),
        ({"examples": [{"x": {"b64": "!!"}}]}, "Unable to base64 decode"),
    ],
)
def test_malformed_bodies_are_invalid_arguments(body: Any, fragment: str) -> None:
    with pytest.raises(ServingError) as info:
        inference.input_from_json(body)
    assert info.value.code == "INVALID_ARGUMENT"
    assert fragment in info.value.message


def test_a_number_beyond_64_bits_is_a_float_as_in_rapidjson() -> None:
    _, request_input = inference.input_from_json({"examples": [{"x": 2**64}]})
    assert _features(request_input.example_list.examples[0]) == {"x": ("float_list", [2.0**64])}


def test_an_input_without_examples_is_empty() -> None:
    from tensorflow_serving.apis import input_pb2

    for request_input in (input_pb2.Input(), input_pb2.Input(example_list={})):
        with pytest.raises(ServingError, match=r"^Input is empty\.$"):
            inference.serialized_examples(request_input)


def _classes(*rows: list[str]) -> np.ndarray:
    return np.array([[c.encode() for c in row] for row in rows], dtype=object)


def test_classification_results_pair_labels_with_scores() -> None:
    scores = np.array([[0.25, 0.75], [1.0, 0.0]], dtype=np.float32)
    both = inference.classification_result(
        {"classes": _classes(["a", "b"], ["c", "d"]), "scores": scores}, 2
    )
    assert inference.result_json(both) == [[["a", 0.25], ["b", 0.75]], [["c", 1.0], ["d", 0.0]]]
    only_scores = inference.classification_result({"scores": scores[:1]}, 1)
    assert inference.result_json(only_scores) == [[["", 0.25], ["", 0.75]]]
    only_classes = inference.classification_result({"classes": _classes(["a"])}, 1)
    assert inference.result_json(only_classes) == [[["a", 0.0]]]


@pytest.mark.parametrize(
    ("outputs", "n", "fragment"),
    [
        ({"scores": np.zeros(2, np.float32)}, 2, "[batch_size num_classes] but got [2]"),
        ({"scores": np.zeros((2, 1), np.float64)}, 2, "Expected scores Tensor of DT_FLOAT"),
        ({"classes": np.zeros((2, 1), np.float32)}, 2, "Expected classes Tensor of DT_STRING"),
        ({"scores": np.zeros((3, 1), np.float32)}, 2, "Expected scores output batch size of 2"),
        (
            {"classes": _classes(["a", "b"]), "scores": np.zeros((1, 3), np.float32)},
            1,
            "Tensors class and score should match in dim_size(1). Got 2 vs. 3",
        ),
        ({"y": np.zeros((1, 1), np.float32)}, 1, 'an output named "classes" or "scores"'),
    ],
)
def test_classification_outputs_of_the_wrong_shape_are_refused(
    outputs: dict[str, Any], n: int, fragment: str
) -> None:
    with pytest.raises(ServingError) as info:
        inference.classification_result(outputs, n)
    assert info.value.code == "INVALID_ARGUMENT" and fragment in info.value.message


def test_regression_results_take_batch_or_batch_by_one() -> None:
    flat = inference.regression_result({"outputs": np.array([1.5, 2.0], np.float32)}, 2)
    column = inference.regression_result({"outputs": np.array([[1.5], [2.0]], np.float32)}, 2)
    assert inference.result_json(flat) == inference.result_json(column) == [1.5, 2.0]


@pytest.mark.parametrize(
    ("outputs", "n", "fragment"),
    [
        ({"outputs": np.zeros((2, 2), np.float32)}, 2, "[batch_size] or [batch_size, 1]"),
        ({"outputs": np.zeros(3, np.float32)}, 2, "did not match output batch size: 2 vs. 3"),
        ({"outputs": np.zeros(2, np.int64)}, 2, "Expected output Tensor of DT_FLOAT"),
        ({"scores": np.zeros(2, np.float32)}, 2, "No regression outputs found"),
    ],
)
def test_regression_outputs_of_the_wrong_shape_are_refused(
    outputs: dict[str, Any], n: int, fragment: str
) -> None:
    with pytest.raises(ServingError) as info:
        inference.regression_result(outputs, n)
    assert fragment in info.value.message
