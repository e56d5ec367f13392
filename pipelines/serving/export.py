"""Torch -> TensorFlow SavedModel whose ``serving_default`` signature takes raw named features.

The tf.Module re-implements :class:`TabularMLP` and ``encode_frame`` (NaN -> training mean,
log1p, normalisation, vocabulary lookup, embeddings, dense layers) with the torch weights copied
in, so serving needs no Python preprocessing. Parity with torch is checked on held-out rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.serving.server import WARMUP_FILE

if TYPE_CHECKING:  # torch is imported where a model is used, not by importing this module
    from pipelines.train.model import TabularMLP

SIGNATURE = "serving_default"
OUTPUT = "probability"


class ExportError(RuntimeError):
    """The SavedModel could not be built or does not match the torch model."""


def build_module(model: TabularMLP, unit_skew: bool = False) -> Any:
    """The serving module; ``unit_skew`` builds in a deliberate fault for drills (see
    :func:`skewed_column`): that column is read x100, a broken preprocessing step that still
    loads and answers."""
    import tensorflow as tf

    cfg = model.config()
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    scale = np.ones(len(cfg["numeric"]), dtype=np.float32)
    if unit_skew:
        scale[cfg["numeric"].index(skewed_column(model))] = 100.0

    class FraudServing(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="tabular_mlp")
            self.numeric = cfg["numeric"]
            self.categorical = list(cfg["categorical"])
            self.log_mask = tf.constant(sd["log_mask"].astype(bool))
            # Raw training means (``encode_frame``'s fill value): a caller that sends NaN gets
            # the torch answer without imputing client-side.
            self.fill = tf.constant([cfg["stats"][n]["mean"] for n in cfg["numeric"]], tf.float32)
            self.mean = tf.constant(sd["mean"], tf.float32)
            self.std = tf.constant(sd["std"], tf.float32)
            self.scale = tf.constant(scale, tf.float32) if unit_skew else None
            self.tables = []
            self.embeddings = []
            for i, (name, vocab) in enumerate(cfg["categorical"].items()):
                init = tf.lookup.KeyValueTensorInitializer(
                    tf.constant(vocab, tf.string), tf.range(1, len(vocab) + 1, dtype=tf.int64)
                )
                self.tables.append(
                    tf.lookup.StaticHashTable(init, default_value=0, name=f"vocab_{name}")
                )
                self.embeddings.append(
                    tf.Variable(sd[f"embeddings.{i}.weight"], trainable=False, name=f"emb_{name}")
                )
            linear = sorted(
                {k.rsplit(".", 1)[0] for k in sd if k.startswith("mlp.")},
                key=lambda k: int(k.split(".")[1]),
            )
            self.weights_ = [tf.Variable(sd[f"{k}.weight"].T, trainable=False) for k in linear]
            self.biases = [tf.Variable(sd[f"{k}.bias"], trainable=False) for k in linear]

        def __call__(self, features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            num = tf.stack([tf.cast(features[n], tf.float32) for n in self.numeric], axis=1)
            num = tf.where(tf.math.is_nan(num), self.fill[tf.newaxis, :], num)
            if self.scale is not None:  # the drill's unit mix-up
                num = num * self.scale[tf.newaxis, :]
            num = tf.where(self.log_mask, tf.math.log1p(tf.maximum(num, 0.0)), num)
            parts = [(num - self.mean) / self.std]
            for name, table, emb in zip(
                self.categorical, self.tables, self.embeddings, strict=True
            ):
                parts.append(tf.gather(emb, table.lookup(features[name])))
            h = tf.concat(parts, axis=1)
            for i, (w, b) in enumerate(zip(self.weights_, self.biases, strict=True)):
                h = tf.matmul(h, w) + b
                if i < len(self.weights_) - 1:
                    h = tf.nn.relu(h)
            return {OUTPUT: tf.sigmoid(tf.squeeze(h, axis=1))}

    return FraudServing()


def skewed_column(model: TabularMLP) -> str:
    """The column a ``unit_skew`` export misreads: the first log-scaled numeric one (an amount,
    read in cents rather than dollars), else the first numeric one."""
    mask = model.state_dict()["log_mask"].detach().cpu().numpy().astype(bool)
    logged = [n for n, m in zip(model.numeric, mask, strict=True) if m]
    return (logged or list(model.numeric))[0]


def input_specs(model: TabularMLP) -> dict[str, Any]:
    import tensorflow as tf

    specs = {n: tf.TensorSpec([None], tf.float32, name=n) for n in model.numeric}
    specs.update({n: tf.TensorSpec([None], tf.string, name=n) for n in model.categorical})
    return specs


def export_saved_model(
    model: TabularMLP,
    out_dir: str | Path,
    warmup_rows: pd.DataFrame | None = None,
    unit_skew: bool = False,
) -> Path:
    """Write a SavedModel to ``out_dir`` (tag ``serve``, signature ``serving_default``)."""
    import tensorflow as tf

    module = build_module(model, unit_skew)
    fn = tf.function(module.__call__)
    concrete = fn.get_concrete_function(input_specs(model))
    out = Path(out_dir)
    tf.saved_model.save(module, str(out), signatures={SIGNATURE: concrete})
    if warmup_rows is not None and len(warmup_rows):
        write_warmup(out, model, warmup_rows)
    return out


def to_instances(df: pd.DataFrame, model: TabularMLP) -> list[dict[str, Any]]:
    """Raw rows as TF Serving JSON instances (the only shape clients need to send)."""
    cols = [*model.numeric, *model.categorical]
    out = []
    for rec in df[cols].to_dict("records"):
        row: dict[str, Any] = {}
        for n in model.numeric:
            v = rec[n]
            row[n] = None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)
        for n in model.categorical:
            row[n] = str(rec[n])
        out.append(row)
    return out


def columns_to_tensors(columns: dict[str, list[Any]], specs: dict[str, Any]) -> dict[str, Any]:
    import tensorflow as tf

    return {name: tf.constant(columns[name], dtype=spec.dtype) for name, spec in specs.items()}


def saved_model_predict(path: str | Path, df: pd.DataFrame, model: TabularMLP) -> np.ndarray:
    """Probabilities from the SavedModel for raw rows (used for parity and infra checks)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    sig = loaded.signatures[SIGNATURE]
    specs = sig.structured_input_signature[1]
    instances = to_instances(df, model)
    cols = {
        name: [
            r[name] if r[name] is not None else float(model.config()["stats"][name]["mean"])
            for r in instances
        ]
        for name in specs
    }
    return sig(**columns_to_tensors(cols, specs))[OUTPUT].numpy()


def parity(
    model: TabularMLP, path: str | Path, df: pd.DataFrame, atol: float = 1e-5
) -> dict[str, float]:
    """Largest absolute difference between torch and SavedModel probabilities."""
    from pipelines.train.model import predict_proba

    torch_p = predict_proba(model, df)
    tf_p = saved_model_predict(path, df, model)
    diff = float(np.max(np.abs(torch_p - tf_p))) if len(df) else 0.0
    if diff > atol:
        raise ExportError(
            f"SavedModel at {path} differs from the torch model by {diff:.2e} "
            f"(> {atol:.0e}) on {len(df)} held-out rows."
        )
    return {"max_abs_diff": diff, "rows": float(len(df))}


def write_warmup(path: Path, model: TabularMLP, rows: pd.DataFrame) -> None:
    """TF Serving warmup records (PredictionLog) in ``assets.extra``."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    instances = to_instances(rows.head(16), model)
    req = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name=SIGNATURE))
    for n in model.numeric:
        vals = [r[n] if r[n] is not None else 0.0 for r in instances]
        req.inputs[n].CopyFrom(tf.make_tensor_proto(vals, dtype=tf.float32))
    for n in model.categorical:
        req.inputs[n].CopyFrom(tf.make_tensor_proto([r[n] for r in instances], dtype=tf.string))
    target = path / WARMUP_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(target)) as writer:
        log = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=req)
        )
        writer.write(log.SerializeToString())
