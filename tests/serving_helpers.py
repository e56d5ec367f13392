"""Shared by the serving suites: load versions through a real ModelManager and wait; a real
model's SavedModel with a fault built in."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipelines.serving import model_config
from pipelines.serving.server import ModelManager


def load_versions(tmp_path: Path, name: str, base: Path, versions: list[int]) -> list[Any]:
    """The servables of ``versions`` once none is LOADING (each loads on its own thread)."""
    config = tmp_path / "models.config"
    model_config.write(config, [model_config.ModelEntry(name, str(base), versions)])
    manager = ModelManager(config, poll_seconds=60)
    manager.poll_once()
    servables = [manager.models[name].servables[v] for v in versions]
    deadline = time.monotonic() + 60
    while any(s.state == "LOADING" for s in servables) and time.monotonic() < deadline:
        time.sleep(0.1)
    return servables


def doctored_saved_model(model: Any, out: Path, kind: str) -> None:
    """The real model's graph with a fault built in: ``nan`` (NaN for large amounts), ``slow``
    (a matmul loop that depends on the input, so it cannot be folded away), ``drift``
    (scores pushed up by 0.25)."""
    import tensorflow as tf

    from pipelines.serving.export import OUTPUT, SIGNATURE, build_module, input_specs

    inner = build_module(model)

    class Doctored(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def __call__(self, features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            p = self.inner(features)[OUTPUT]
            if kind == "nan":
                p = tf.where(features["amount"] > 30.0, tf.fill(tf.shape(p), float("nan")), p)
            elif kind == "drift":
                p = tf.minimum(p + 0.25, 1.0)
            elif kind == "slow":
                x = tf.ones([160, 160]) * (1.0 + tf.reduce_mean(features["amount"]) * 1e-9)

                def body(i: tf.Tensor, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                    return i + 1, tf.tanh(tf.matmul(x, x) * 0.01)

                _, x = tf.while_loop(lambda i, _: i < 300, body, [tf.constant(0), x])
                p = p + 0.0 * tf.reduce_sum(x)
            return {OUTPUT: p}

    module = Doctored()
    concrete = tf.function(module.__call__).get_concrete_function(input_specs(model))
    tf.saved_model.save(module, str(out), signatures={SIGNATURE: concrete})


def store_on(request: Any, tmp_path: Path) -> tuple[dict[str, Any], str]:
    """Settings overrides putting the store on local files (``request.param`` "file") or on
    the moto S3 server with SSE ("s3"), and the root URI a test publishes under there."""
    if request.param == "s3":
        bucket, endpoint = (request.getfixturevalue(f) for f in ("s3_bucket", "moto_server"))
        store = {"root": f"s3://{bucket}/lake", "endpoint_url": endpoint}
        store |= {"key": "testing", "secret": "testing", "sse": "AES256"}
        return {"store": store}, f"s3://{bucket}"
    return {}, f"file://{tmp_path}"
