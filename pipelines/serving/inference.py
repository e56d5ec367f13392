"""TF Serving's Classify and Regress: which signatures can serve them, tf.Example inputs from a
REST body or a gRPC ``Input``, and the results. Error messages begin as TF Serving's do
(classifier.cc, regressor.cc, util.cc, json_tensor.cc), so clients see the same text."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from pipelines.serving.errors import HTTP_CODES, ServingError

CLASSIFY, REGRESS = "classify", "regress"
DEFAULT_SIGNATURE = "serving_default"
METHOD_NAMES = {CLASSIFY: "tensorflow/serving/classify", REGRESS: "tensorflow/serving/regress"}
# The tensor names of tf.saved_model's classification and regression signature constants.
INPUTS, CLASSES, SCORES, OUTPUTS = "inputs", "classes", "scores", "outputs"
_NOUN = {CLASSIFY: "classification", REGRESS: "regression"}
_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1
_KINDS = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64"}


# -- which signatures serve Classify and Regress -----------------------------------------------
def signature_problem(signature: Any, method: str, check_method_name: bool = False) -> str | None:
    """Why ``signature`` (a SignatureDef) cannot serve ``method``, or None when it can.

    TF Serving's rule (``PreProcessClassification`` and ``PreProcessRegression``): unless it runs
    with ``--enable_signature_method_name_check`` (off by default, because TF2's
    ``tf.saved_model.save`` writes ``tensorflow/serving/predict`` for every signature), the method
    name is not looked at. The signature needs exactly one input, named ``inputs`` (serialized
    tf.Examples); Classify one or two outputs, among them ``classes`` or ``scores``; Regress one
    output, named ``outputs``."""
    noun = _NOUN[method]
    if check_method_name and signature.method_name != METHOD_NAMES[method]:
        return (
            f"Expected {noun} signature method_name to be {METHOD_NAMES[method]}. "
            f"Was: {signature.method_name}"
        )
    inputs, outputs = sorted(signature.inputs), sorted(signature.outputs)
    if len(inputs) != 1:
        return f"Expected one input Tensor. Found {len(inputs)}: {inputs}"
    if method == CLASSIFY and len(outputs) not in (1, 2):
        return f"Expected one or two output Tensors, found {len(outputs)}: {outputs}"
    if method == REGRESS and len(outputs) != 1:
        return f"Expected one output Tensor. Found {len(outputs)}: {outputs}"
    if INPUTS not in inputs:
        return f"No {noun} inputs found in SignatureDef: its input is {inputs[0]!r}, not {INPUTS!r}"
    if method == CLASSIFY and CLASSES not in outputs and SCORES not in outputs:
        return (
            f'Expected classification signature outputs to contain at least one of "{CLASSES}" '
            f'or "{SCORES}". Found: {outputs}'
        )
    if method == REGRESS and OUTPUTS not in outputs:
        found = outputs[0]
        return (
            f"No regression outputs found in SignatureDef: its output is {found!r}, not {OUTPUTS!r}"
        )
    return None


def callable_signatures(defs: Mapping[str, Any]) -> list[str]:
    """The signature names a request may use (``__saved_model_init_op`` is not one)."""
    return sorted(k for k in defs if not k.startswith("__"))


def supporting(defs: Mapping[str, Any], method: str) -> list[str]:
    """The signatures in ``defs`` that can serve ``method``."""
    return [k for k in callable_signatures(defs) if signature_problem(defs[k], method) is None]


def exported(defs: Mapping[str, Any], method: str) -> str:
    """What a refused request's error adds: the signatures that serve ``method``, and all."""
    usable = ", ".join(supporting(defs, method)) or "none"
    return (
        f"Signatures that support {method.title()}: {usable}; "
        f"the model exports: {', '.join(callable_signatures(defs))}"
    )


def select_signature(defs: Mapping[str, Any], signature_name: str, method: str) -> str:
    """The signature a request names (``serving_default`` when it names none), if it serves
    ``method``; else INVALID_ARGUMENT naming the signatures the model does export."""
    name = signature_name or DEFAULT_SIGNATURE
    if name not in defs:
        raise ServingError(
            "INVALID_ARGUMENT",
            f"No signature was found with the name: {name}. {exported(defs, method)}",
        )
    problem = signature_problem(defs[name], method)
    if problem is not None:
        raise ServingError(
            "INVALID_ARGUMENT",
            f"{problem} (signature {name!r} cannot serve {method.title()}). "
            f"{exported(defs, method)}",
        )
    return name


# -- tf.Example inputs --------------------------------------------------------------------------
def input_from_json(body: Any) -> tuple[str, Any]:
    """The signature name and gRPC ``Input`` of a REST ``:classify``/``:regress`` body
    (``{"signature_name"?, "context"?, "examples": [...]}``), typed as TF Serving types it:
    decimals float, whole numbers and booleans int64, strings and ``{"b64": ...}`` bytes."""
    from tensorflow_serving.apis import input_pb2

    if not isinstance(body, dict):
        raise ServingError("INVALID_ARGUMENT", "JSON Value: request body is not an object")
    signature_name = body.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise ServingError(
            "INVALID_ARGUMENT",
            "JSON Value: not formatted correctly. 'signature_name' key must be a string value.",
        )
    request_input = input_pb2.Input()
    if "context" in body:
        _fill_example(body["context"], request_input.example_list_with_context.context)
        examples = request_input.example_list_with_context.examples
    else:
        examples = request_input.example_list.examples
    items = body.get("examples")
    if items is None:
        raise ServingError(
            "INVALID_ARGUMENT", "JSON Value: key 'examples' is expected and was not found"
        )
    if not isinstance(items, list):
        raise ServingError(
            "INVALID_ARGUMENT", "JSON Value: Expecting 'examples' value to be an list/array"
        )
    if not items:
        raise ServingError("INVALID_ARGUMENT", "JSON Value: 'examples' value is an empty array")
    for item in items:
        _fill_example(item, examples.add())
    return signature_name, request_input


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    names: dict[type, str] = {str: "string", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _fill_example(value: Any, example: Any) -> None:
    if not isinstance(value, dict):
        raise ServingError(
            "INVALID_ARGUMENT", f"Example must be JSON object but got JSON {_json_type(value)}"
        )
    for name, content in value.items():
        feature = example.features.feature[name]
        for item in content if isinstance(content, list) else [content]:
            _add_value(item, name, feature)


def _add_value(value: Any, name: str, feature: Any) -> None:
    """Append one JSON value to a Feature; every value of a feature must be of one kind."""
    kind: str
    item: Any
    if isinstance(value, bool):
        kind, item = "int64_list", int(value)
    elif isinstance(value, int) and _INT64_MIN <= value <= _UINT64_MAX:
        if value > _INT64_MAX:
            raise ServingError(
                "INVALID_ARGUMENT",
                f"Feature: {name} has uint64_t element. Only int64_t is supported.",
            )
        kind, item = "int64_list", value
    elif isinstance(value, int | float):  # a whole number beyond 64 bits parses as a double
        kind, item = "float_list", float(value)
    elif isinstance(value, str):
        kind, item = "bytes_list", value.encode()
    elif isinstance(value, dict) and list(value) == ["b64"] and isinstance(value["b64"], str):
        kind, item = "bytes_list", _b64decode(value["b64"])
    else:
        raise ServingError(
            "INVALID_ARGUMENT",
            f"Feature: {name} has element with unexpected JSON type: {_json_type(value)}",
        )
    current = feature.WhichOneof("kind")
    if current is not None and current != kind:
        raise ServingError(
            "INVALID_ARGUMENT",
            f"Unexpected element type in feature: {name} expecting type: {_KINDS[current]}",
        )
    getattr(feature, kind).value.append(item)


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServingError("INVALID_ARGUMENT", "Unable to base64 decode") from exc


def serialized_examples(request_input: Any) -> list[bytes]:
    """One serialized tf.Example per example of a gRPC ``Input``. A context's bytes go first, so
    parsing merges it into each example and an example's own feature of that name wins (as TF
    Serving's ``InputToSerializedExampleTensor`` concatenates them)."""
    kind = request_input.WhichOneof("kind")
    out: list[bytes] = []
    if kind == "example_list":
        out = [e.SerializeToString() for e in request_input.example_list.examples]
    elif kind == "example_list_with_context":
        listed = request_input.example_list_with_context
        context = listed.context.SerializeToString()
        out = [context + e.SerializeToString() for e in listed.examples]
    if not out:
        raise ServingError("INVALID_ARGUMENT", "Input is empty.")
    return out


# -- running and results -----------------------------------------------------------------------
def run(
    method: str,
    defs: Mapping[str, Any],
    signatures: Mapping[str, Any],
    signature_name: str,
    request_input: Any,
) -> tuple[str, Any]:
    """Classify or Regress ``request_input`` with a loaded SavedModel's signature functions;
    returns the signature used and a ``ClassificationResult`` or ``RegressionResult``."""
    import tensorflow as tf

    name = select_signature(defs, signature_name, method)
    examples = serialized_examples(request_input)
    try:
        out = signatures[name](**{INPUTS: tf.constant(examples, dtype=tf.string)})
    except tf.errors.OpError as exc:  # e.g. a feature the signature parses is missing
        code = next((c for c in HTTP_CODES if getattr(tf.errors, c, None) == exc.error_code), "")
        raise ServingError(code or "UNKNOWN", exc.message) from exc
    except (TypeError, ValueError) as exc:
        raise ServingError("INVALID_ARGUMENT", str(exc)) from exc
    outputs = {k: v.numpy() for k, v in out.items()}
    if method == CLASSIFY:
        return name, classification_result(outputs, len(examples))
    return name, regression_result(outputs, len(examples))


def _invalid(message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", message)


def classification_result(outputs: Mapping[str, Any], num_examples: int) -> Any:
    """A ``ClassificationResult`` from ``classes`` (string) and/or ``scores`` (float) outputs of
    shape [batch_size, num_classes]; a missing one leaves labels empty or scores 0."""
    import numpy as np
    from tensorflow_serving.apis import classification_pb2

    classes, scores = outputs.get(CLASSES), outputs.get(SCORES)
    if classes is None and scores is None:
        raise _invalid(f'Expected an output named "{CLASSES}" or "{SCORES}"')
    for key, arr, dtype in ((CLASSES, classes, "DT_STRING"), (SCORES, scores, "DT_FLOAT")):
        if arr is None:
            continue
        if arr.ndim != 2:
            raise _invalid(
                f"Expected Tensor shape: [batch_size num_classes] but got {list(arr.shape)}"
            )
        if (arr.dtype.kind not in "SO") if key == CLASSES else (arr.dtype != np.float32):
            raise _invalid(f"Expected {key} Tensor of {dtype}. Got: {arr.dtype}")
        if arr.shape[0] != num_examples:
            raise _invalid(
                f"Expected {key} output batch size of {num_examples}. Got: {arr.shape[0]}"
            )
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise _invalid(
            "Tensors class and score should match in dim_size(1). "
            f"Got {classes.shape[1]} vs. {scores.shape[1]}"
        )
    either: Any = classes if classes is not None else scores
    num_classes = int(either.shape[1])
    result = classification_pb2.ClassificationResult()
    for i in range(num_examples):
        per_example = result.classifications.add()
        for j in range(num_classes):
            entry = per_example.classes.add()
            if classes is not None:
                label = classes[i, j]
                entry.label = label.decode(errors="replace") if isinstance(label, bytes) else label
            if scores is not None:
                entry.score = float(scores[i, j])
    return result


def regression_result(outputs: Mapping[str, Any], num_examples: int) -> Any:
    """A ``RegressionResult`` from the float ``outputs`` of shape [batch_size] or
    [batch_size, 1]."""
    import numpy as np
    from tensorflow_serving.apis import regression_pb2

    out = outputs.get(OUTPUTS)
    if out is None:
        raise ServingError("FAILED_PRECONDITION", "No regression outputs found in SignatureDef")
    if not (out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1)):
        raise _invalid(
            "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] "
            f"but got {list(out.shape)}"
        )
    if out.shape[0] != num_examples:
        raise _invalid(
            f"Input batch size did not match output batch size: {num_examples} vs. {out.shape[0]}"
        )
    if out.dtype != np.float32:
        raise _invalid(f"Expected output Tensor of DT_FLOAT.  Got: {out.dtype}")
    result = regression_pb2.RegressionResult()
    for value in out.reshape(-1):
        result.regressions.add().value = float(value)
    return result


def result_json(result: Any) -> list[Any]:
    """The REST ``results`` value: per example ``[[label, score], ...]``, or one regression
    value each (json_tensor.cc's ``MakeJsonFrom{Classification,Regression}Result``)."""
    if result.DESCRIPTOR.name == "ClassificationResult":
        return [[[c.label, c.score] for c in cls.classes] for cls in result.classifications]
    return [r.value for r in result.regressions]
