"""One interface for scoring raw rows, whatever runs the model: the SavedModel or ONNX Runtime.

Inputs are read from the artifact's own signature (batch scoring has the exported file, not the
torch model); missing numbers stay NaN (both graphs impute the training mean) and missing
categories become "" (mapped to index 0 like an unseen value).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

BATCH = 65_536
KINDS = ("savedmodel", "onnx")
Feeds = dict[str, np.ndarray]


class Runtime(Protocol):
    """A loaded model scoring raw feature rows: ``predict(frame) == run(prepare(frame))``.

    ``prepare``/``run`` are split so a benchmark times the model call, not pandas."""

    name: str
    variant: str

    def prepare(self, frame: pd.DataFrame) -> Feeds: ...

    def run(self, feeds: Feeds) -> np.ndarray: ...

    def predict(self, frame: pd.DataFrame) -> np.ndarray: ...


def _column(frame: pd.DataFrame, name: str, is_string: bool) -> np.ndarray:
    if name not in frame.columns:
        raise KeyError(f"Feature column {name!r} is missing from the rows to score.")
    col = frame[name]
    if is_string:
        missing = col.isna().to_numpy()
        values = col.astype(str).to_numpy(dtype=object)
        values[missing] = ""
        return values
    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float32, na_value=np.nan)


def _slice(feeds: Feeds, start: int, stop: int) -> Feeds:
    return {k: v[start:stop] for k, v in feeds.items()}


class _Batched(ABC):
    """``predict`` in batches of ``BATCH`` rows on top of a subclass's ``prepare``/``run``."""

    inputs: dict[str, bool]  # input name -> takes strings

    def prepare(self, frame: pd.DataFrame) -> Feeds:
        return {n: _column(frame, n, s) for n, s in self.inputs.items()}

    @abstractmethod
    def run(self, feeds: Feeds) -> np.ndarray:
        """The model on prepared inputs: one probability per row."""

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        feeds, n = self.prepare(frame), len(frame)
        out = [self.run(_slice(feeds, i, i + BATCH)) for i in range(0, n, BATCH)]
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0, np.float64)


class SavedModelRuntime(_Batched):
    """The ``serving_default`` signature of a SavedModel, loaded once, called in-process."""

    name = "savedmodel"

    def __init__(self, path: Path, variant: str = "fp32", threads: int | None = None):
        import tensorflow as tf

        from pipelines.serving.export import OUTPUT, SIGNATURE

        if threads:  # two scoring workers on two cores: one thread each, not two
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:  # TensorFlow already started in this process: keep its pools
                pass

        self.path, self.variant, self._output = Path(path), variant, OUTPUT
        self._loaded = tf.saved_model.load(str(path))  # keeps the variables alive
        if SIGNATURE not in self._loaded.signatures:
            raise ValueError(f"SavedModel at {path} has no {SIGNATURE!r} signature.")
        self._fn = self._loaded.signatures[SIGNATURE]
        specs = self._fn.structured_input_signature[1]
        self._dtypes = {n: spec.dtype for n, spec in specs.items()}
        self.inputs = {n: d == tf.string for n, d in self._dtypes.items()}
        self._tf = tf

    def run(self, feeds: Feeds) -> np.ndarray:
        tensors = {n: self._tf.constant(feeds[n], self._dtypes[n]) for n in self._dtypes}
        return np.asarray(self._fn(**tensors)[self._output].numpy())


class OrtRuntime(_Batched):
    """An ONNX model in an ONNX Runtime CPU session (all graph optimisations on)."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None, variant: str | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.variant = variant or ("int8" if "int8" in self.path.name else "fp32")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self._session = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name: i.type == "tensor(string)" for i in self._session.get_inputs()}
        bad = [
            f"{i.name}: {i.type}"
            for i in self._session.get_inputs()
            if i.type not in ("tensor(string)", "tensor(float)")
        ]
        if bad:
            raise ValueError(f"ONNX model at {path} has inputs of unsupported types: {bad}.")
        self._output = self._session.get_outputs()[0].name

    def run(self, feeds: Feeds) -> np.ndarray:
        return np.asarray(self._session.run([self._output], feeds)[0])


def load_runtime(
    kind: str, path: Path, threads: int | None = None, variant: str | None = None
) -> Runtime:
    """``kind`` is ``savedmodel`` (a SavedModel directory) or ``onnx`` (a ``.onnx`` file)."""
    if kind == "savedmodel":
        return SavedModelRuntime(path, variant or "fp32", threads)
    if kind == "onnx":
        return OrtRuntime(path, threads, variant)
    raise ValueError(f"Unknown runtime kind {kind!r}; choose one of {', '.join(KINDS)}.")
