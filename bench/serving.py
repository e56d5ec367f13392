"""Serving latency and throughput: Envoy in front of the replicas vs one server alone vs
in-process SavedModel calls.

All run in one process on the same SavedModel and the same rows, one instance per request, in
interleaved rounds (medians reported), so their ratios are comparable on a noisy machine. The
server is an ``mlops serve`` replica process; "plane" is the same replica behind the project's
Envoy (Lua request gate and score tap, access log, retries, health checks: as shipped). A
concurrency-1 pass gives the added latency, a concurrency-N pass the throughput ratio.

    .venv/bin/python bench/serving.py [--requests 2000] [--concurrency 4] [--rounds 3]

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

from pipelines.config import load_settings
from pipelines.data.generate import transactions
from pipelines.data.shard import feature_stats
from pipelines.data.spec import load_spec
from pipelines.serving.control import LocalServing
from pipelines.serving.dataplane.envoy import POOLS
from pipelines.serving.dataplane.split import Split
from pipelines.serving.export import export_saved_model, to_instances
from pipelines.serving.model_config import ModelEntry
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


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(float(np.median([r[k] for r in runs])), 3) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported")
    ap.add_argument("--replicas", type=int, default=1, help="replicas per pool behind Envoy")
    args = ap.parse_args()
    model = _model()
    rows = transactions(dt.date(2026, 11, 2), 500)
    instances = to_instances(rows, model)
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            "MLOPS_HOME": str(Path(tmp) / "mlops"),
            "MLOPS__SERVING__REST_PORT": "0",
            "MLOPS__SERVING__POLL_SECONDS": "0.3",
            "MLOPS__DATAPLANE__PORT": "0",
            "MLOPS__DATAPLANE__ADMIN_PORT": "0",
            "MLOPS__DATAPLANE__SHADOW_PORT": "0",
            "MLOPS__DATAPLANE__REPLICAS": str(args.replicas),
        }
        s = load_settings(env)
        control = LocalServing(s)
        path = export_saved_model(model, control.model_dir / "1")
        try:
            for pool in POOLS:
                control.set_pool(pool, ModelEntry(MODEL, str(control.model_dir), [1], {}))
            control.ensure_running()
            for pool in POOLS:
                control.wait_version(pool, 1, 120)
            control.set_split(Split(0))  # every request through Envoy to the stable pool
            replica = control.clients("stable")[0].base_url
            server_url = f"{replica}/v1/models/{MODEL}:predict"
            plane_url = f"{control.endpoint()}/v1/models/{MODEL}:predict"
            passes: dict[str, list[dict[str, float]]] = {}
            for _ in range(args.rounds):  # interleaved, so a noisy moment hits every mode
                passes.setdefault("direct", []).append(_direct_load(path, instances, args.requests))
                for conc in (1, args.concurrency):
                    for name, url in (("server", server_url), ("plane", plane_url)):
                        passes.setdefault(f"{name}_c{conc}", []).append(
                            _http_load(url, instances, args.requests, conc)
                        )
        finally:
            control.plane.stop()
    med = {k: _median(v) for k, v in passes.items()}
    c = args.concurrency
    result = {
        "bench": "serving",
        "requests": args.requests,
        "concurrency": c,
        "rounds": args.rounds,
        "replicas_per_pool": args.replicas,
        **med,
        "server_p50_ms": med["server_c1"]["p50_ms"],
        "plane_p50_ms": med["plane_c1"]["p50_ms"],
        "plane_added_p50_ms": round(med["plane_c1"]["p50_ms"] - med["server_c1"]["p50_ms"], 3),
        "plane_added_p99_ms": round(med["plane_c1"]["p99_ms"] - med["server_c1"]["p99_ms"], 3),
        "plane_over_server_rps": round(med[f"plane_c{c}"]["rps"] / med[f"server_c{c}"]["rps"], 3),
        "server_over_direct_p50": round(med["server_c1"]["p50_ms"] / med["direct"]["p50_ms"], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
