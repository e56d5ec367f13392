"""Torch weights -> ONNX graph that takes raw named features, plus its int8 dynamic quantisation.

Built with ``onnx.helper`` from the state dict, as ``serving.export`` builds the TF module:
``torch.onnx.export`` cannot take string inputs, and the vocabulary lookup belongs in the graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.train.model import TabularMLP, predict_proba

OUTPUT = "probability"
# ORT 1.32 runs both; ai.onnx.ml 3 has LabelEncoder-2 (keys_strings / values_int64s).
OPSET = 17
ML_OPSET = 3


class OnnxExportError(RuntimeError):
    """The ONNX model could not be built or does not match the torch model."""


def linear_layers(state_dict: dict[str, Any]) -> list[str]:
    """``mlp.<i>`` prefixes of the Linear layers in forward order (Dropout/ReLU hold no weights,
    so the indices have gaps)."""
    return sorted(
        {k.rsplit(".", 1)[0] for k in state_dict if k.startswith("mlp.")},
        key=lambda k: int(k.split(".")[1]),
    )


def build_onnx(model: TabularMLP) -> Any:
    """The ``onnx.ModelProto``: one 1-D input per raw feature, output ``probability`` [N]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cfg = model.config()
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    numeric, categorical = list(cfg["numeric"]), dict(cfg["categorical"])
    nodes: list[Any] = []
    inits: list[Any] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        domain = "ai.onnx.ml" if op == "LabelEncoder" else ""
        nodes.append(helper.make_node(op, inputs, [output], name=output, domain=domain, **attrs))
        return output

    axis1 = const("axis1", np.array([1], np.int64))
    parts: list[str] = []
    if numeric:
        cols = [node("Unsqueeze", [n, axis1], f"{n}_col") for n in numeric]
        x = node("Concat", cols, "num_raw", axis=1)
        # encode_frame's order: NaN -> raw training mean, then log1p, then normalisation.
        fill = const("fill", np.array([cfg["stats"][n]["mean"] for n in numeric], np.float32))
        x = node("Where", [node("IsNaN", [x], "num_isnan"), fill, x], "num_filled")
        zero = const("zero", np.array(0.0, np.float32))
        one = const("one", np.array(1.0, np.float32))
        logged = node(
            "Log", [node("Add", [node("Max", [x, zero], "num_pos"), one], "num_plus1")], "num_log"
        )
        mask = const("log_mask", sd["log_mask"].astype(bool))
        x = node("Where", [mask, logged, x], "num_log1p")
        x = node("Sub", [x, const("mean", sd["mean"].astype(np.float32))], "num_centred")
        parts.append(node("Div", [x, const("std", sd["std"].astype(np.float32))], "num_norm"))
    for i, (name, vocab) in enumerate(categorical.items()):
        # Vocabulary position + 1; unseen, missing ("") -> 0, as in encode_frame and the TF table.
        idx = node(
            "LabelEncoder",
            [name],
            f"{name}_idx",
            keys_strings=list(vocab),
            values_int64s=list(range(1, len(vocab) + 1)),
            default_int64=0,
        )
        emb = const(f"emb_{name}", sd[f"embeddings.{i}.weight"].astype(np.float32))
        parts.append(node("Gather", [emb, idx], f"{name}_emb", axis=0))
    h = node("Concat", parts, "features", axis=1)
    layers = linear_layers(sd)
    for j, key in enumerate(layers):
        w = const(f"{key}.weight_t", np.ascontiguousarray(sd[f"{key}.weight"].T, np.float32))
        h = node("MatMul", [h, w], f"{key}.matmul")
        h = node("Add", [h, const(f"{key}.bias", sd[f"{key}.bias"].astype(np.float32))], key)
        if j < len(layers) - 1:
            h = node("Relu", [h], f"{key}.relu")
    p = node("Sigmoid", [h], "prob_col")
    node("Squeeze", [p, axis1], OUTPUT)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N"]) for n in numeric]
    inputs += [helper.make_tensor_value_info(n, TensorProto.STRING, ["N"]) for n in categorical]
    graph = helper.make_graph(
        nodes,
        "tabular_mlp",
        inputs,
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N"])],
        initializer=inits,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)],
        producer_name="mlops-pipeline",
    )
    proto.ir_version = 8  # the IR of opset 17: readable by older runtimes too
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model: TabularMLP, path: Path) -> Path:
    """Write the fp32 ONNX model to ``path`` (checked by ``onnx.checker``)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(build_onnx(model), str(path))
    onnx.checker.check_model(str(path))
    return path


def quantize_int8(fp32_path: Path, out_path: Path) -> Path:
    """Dynamic int8 quantisation of the MatMul weights (activations quantised per call): the
    embeddings and preprocessing stay fp32, so only the dense layers trade accuracy for speed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_path.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        str(fp32_path),
        str(out_path),
        op_types_to_quantize=["MatMul", "Gemm"],
        weight_type=QuantType.QInt8,
    )
    if not out_path.exists():
        raise OnnxExportError(f"Quantising {fp32_path} wrote nothing to {out_path}.")
    return out_path


def onnx_parity(
    model: TabularMLP, path: Path, frame: pd.DataFrame, atol: float = 1e-5
) -> dict[str, float]:
    """Largest absolute difference between torch and ONNX Runtime probabilities on raw rows
    (NaN numerics and unseen categories included); raises above ``atol``."""
    from pipelines.optimize.runtimes import OrtRuntime

    torch_p = predict_proba(model, frame).astype(np.float64)
    ort_p = OrtRuntime(path).predict(frame)
    diff = float(np.max(np.abs(torch_p - ort_p))) if len(frame) else 0.0
    if not np.isfinite(diff) or diff > atol:
        raise OnnxExportError(
            f"ONNX model at {path} differs from the torch model by {diff:.2e} "
            f"(> {atol:.0e}) on {len(frame)} rows."
        )
    return {"max_abs_diff": diff, "rows": float(len(frame))}
