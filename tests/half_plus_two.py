"""TF Serving's ``half_plus_two`` test model rebuilt with TF2 (y = x/2 + 2), in two zero-padded
versions with a config serving both. ``python -m tests.half_plus_two OUT_DIR`` writes
``OUT_DIR/half_plus_two/{00000123,00000124}`` and ``OUT_DIR/models.config`` for TF Serving."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

MODEL = "half_plus_two"
VERSIONS = (123, 124)
LABELS = {"stable": 123, "canary": 124}
# Only version 124 exports this one, so a request shows which version answered it.
ONLY_IN_124 = "regress_x_to_y2"


def _module(version: int) -> Any:
    """The signatures of TF Serving's own model (saved_model_half_plus_two.py, ``tf2=True``),
    plus ``classify_x_to_terms``, a classifier with ``classes`` as well as ``scores``."""
    import tensorflow as tf

    examples = tf.TensorSpec([None], tf.string, name="inputs")  # serialized tf.Examples

    def parse_x(serialized: tf.Tensor) -> tf.Tensor:  # [batch, 1]
        spec = {"x": tf.io.FixedLenFeature([1], tf.float32)}
        return tf.io.parse_example(serialized, spec)["x"]

    class HalfPlusTwo(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = tf.Variable(0.5), tf.Variable(2.0), tf.Variable(3.0)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def predict(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": self.a * x + self.b}

        @tf.function(input_signature=[examples])
        def classify_x_to_y(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"scores": self.a * parse_x(serialized) + self.b}

        @tf.function(input_signature=[examples])
        def classify_x_to_terms(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
            half = self.a * parse_x(serialized)
            two = tf.fill(tf.shape(half), self.b)
            labels = tf.fill(tf.shape(half), "half_x")
            return {
                "classes": tf.concat([labels, tf.fill(tf.shape(half), "two")], axis=1),
                "scores": tf.concat([half, two], axis=1),
            }

        @tf.function(input_signature=[examples])
        def regress_x_to_y(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"outputs": self.a * parse_x(serialized) + self.b}

        @tf.function(input_signature=[examples])
        def regress_x_to_y2(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"outputs": self.a * parse_x(serialized) + self.c}

    m = HalfPlusTwo()
    signatures = {
        "serving_default": m.predict,
        "classify_x_to_y": m.classify_x_to_y,
        "classify_x_to_terms": m.classify_x_to_terms,
        "regress_x_to_y": m.regress_x_to_y,
    }
    if version == 124:
        signatures[ONLY_IN_124] = m.regress_x_to_y2
    return m, signatures


def write_model(out_dir: str | Path) -> Path:
    """Save both versions under ``out_dir/half_plus_two/<8-digit version>``; returns that base
    path. ``tf.saved_model.save`` writes method_name ``tensorflow/serving/predict`` for every
    signature, so a real TF Serving must run without ``--enable_signature_method_name_check``."""
    import tensorflow as tf

    base = Path(out_dir).resolve() / MODEL
    for version in VERSIONS:
        module, signatures = _module(version)
        tf.saved_model.save(module, str(base / f"{version:08d}"), signatures=signatures)
    return base


def write_config(out_dir: str | Path, base: Path, labels: dict[str, int] | None = None) -> Path:
    """``out_dir/models.config``: both versions (the default policy serves only the latest)."""
    from pipelines.serving import model_config

    path = Path(out_dir).resolve() / "models.config"
    entry = model_config.ModelEntry(MODEL, str(base), list(VERSIONS), dict(labels or {}))
    model_config.write(path, [entry])
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.half_plus_two OUT_DIR", file=sys.stderr)
        return 2
    base = write_model(argv[0])
    config = write_config(argv[0], base, LABELS)
    print(f"model: {base}\nconfig: {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
