"""Serving latency and throughput: router + server vs server alone vs in-process SavedModel calls.

All three run in the same process run on the same SavedModel and the same rows, one instance
per request, so their ratios are comparable on a noisy machine. The server is a separate
``mlops serve`` process (as in production); the router runs in this process.

    .venv/bin/python bench/serving.py [--requests 2000] [--concurrency 4]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests

from pipelines.data.generate import transactions
from pipelines.data.shard import feature_stats
from pipelines.data.spec import load_spec
from pipelines.serving import model_config
from pipelines.serving.client import LocalServer, ServingClient
from pipelines.serving.export import export_saved_model, to_instances
from pipelines.serving.router import Router, WeightStore, start_router
from pipelines.train.model import TabularMLP

MODEL = "fraud_detector"


def _model() -> TabularMLP:
    spec = load_spec("transactions")
    df = transactions(dt.date(2026, 11, 1), 2000)
    cats = {c: spec.vocab(c) for c in spec.categorical_features}
    stats = feature_stats(df, spec)
    return TabularMLP(spec.numeric_features, cats, stats, (64, 32), 4, spec.log_features)


def _summary(lat_ms: list[float], wall_s: float) -> dict[str, float]:
    arr = np.asarray(lat_ms)
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
        "rps": round(len(arr) / wall_s, 1),
    }


def _http_load(url: str, instances: list[dict[str, Any]], n: int, conc: int) -> dict[str, float]:
    sessions: dict[int, requests.Session] = {}

    def one(i: int) -> float:
        import threading

        s = sessions.setdefault(threading.get_ident(), requests.Session())
        t0 = time.perf_counter()
        r = s.post(
            url,
            json={"instances": [instances[i % len(instances)]]},
            headers={"X-Request-Key": str(i)},
            timeout=30,
        )
        r.raise_for_status()
        return (time.perf_counter() - t0) * 1000

    for i in range(50):  # warm connections and the model
        one(i)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        lat = list(pool.map(one, range(n)))
    return _summary(lat, time.perf_counter() - t0)


def _direct_load(path: Path, instances: list[dict[str, Any]], n: int) -> dict[str, float]:
    import tensorflow as tf

    sig = tf.saved_model.load(str(path)).signatures["serving_default"]
    specs = sig.structured_input_signature[1]

    def one(i: int) -> float:
        inst = instances[i % len(instances)]
        t0 = time.perf_counter()
        sig(**{k: tf.constant([inst[k]], dtype=spec.dtype) for k, spec in specs.items()})
        return (time.perf_counter() - t0) * 1000

    for i in range(50):
        one(i)
    t0 = time.perf_counter()
    lat = [one(i) for i in range(n)]
    return _summary(lat, time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    model = _model()
    rows = transactions(dt.date(2026, 11, 2), 500)
    instances = to_instances(rows, model)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "serving"
        path = export_saved_model(model, base / MODEL / "1")
        model_config.write(
            base / "models.config", [model_config.ModelEntry(MODEL, str(base / MODEL), [1], {})]
        )
        server = LocalServer(base, port=0, grpc_port=0)
        url = server.ensure_running()
        router = None
        try:
            ServingClient(url).wait_available(MODEL, 1, timeout=120)
            model_config.write(
                base / "models.config",
                [
                    model_config.ModelEntry(
                        MODEL, str(base / MODEL), [1], {"stable": 1, "canary": 1}
                    )
                ],
            )
            while ServingClient(url).label_version(MODEL, "canary") != 1:
                time.sleep(0.2)
            weights = WeightStore(base / "router.json")
            weights.set(25)
            router, router_url = start_router(Router(url, MODEL, weights, "bench"))
            direct = _direct_load(path, instances, args.requests)
            alone = _http_load(
                f"{url}/v1/models/{MODEL}/labels/stable:predict",
                instances,
                args.requests,
                args.concurrency,
            )
            routed = _http_load(
                f"{router_url}/v1/models/{MODEL}:predict",
                instances,
                args.requests,
                args.concurrency,
            )
        finally:
            if router is not None:
                router.shutdown()
            server.stop()
    result = {
        "bench": "serving",
        "requests": args.requests,
        "concurrency": args.concurrency,
        "direct_savedmodel": direct,
        "server": alone,
        "router_and_server": routed,
        "server_over_direct_p50": round(alone["p50_ms"] / direct["p50_ms"], 2),
        "router_over_server_p50": round(routed["p50_ms"] / alone["p50_ms"], 2),
        "router_over_server_rps": round(routed["rps"] / alone["rps"], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
