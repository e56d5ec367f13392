"""Serving latency and throughput: Envoy in front of the replicas vs one server alone vs
in-process SavedModel calls.

All run in one process on the same SavedModel and the same rows, one instance per request, in
interleaved rounds (medians reported), so their ratios are comparable on a noisy machine. The
server is an ``mlops serve`` replica process; "plane" is the same replica behind the project's
Envoy (Lua request gate and score tap, access log, retries, health checks: as shipped). A
concurrency-1 pass gives the added latency, a concurrency-N pass the throughput ratio.

Request batching (TF Serving's --enable_batching, as the pods run it) is measured on the same
server path at ``--batching-concurrency`` (16): the batching-off replica above against one of a
second home whose replicas run with ``serving.enable_batching`` and ``--batching-file`` (default
infra/tf-serving/batching.config, production's file), in the same interleaved rounds.

    .venv/bin/python bench/serving.py [--requests 2000] [--concurrency 4] [--rounds 3]
        [--batching-concurrency 16] [--batching-file F]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
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


def _batching_counts(base_url: str) -> dict[str, int]:
    """The batching replica's own counters (batches, tasks, rows, padding_rows), summed."""
    text = requests.get(f"{base_url}/monitoring/prometheus/metrics", timeout=10).text
    out = {"batches": 0, "tasks": 0, "rows": 0, "padding_rows": 0}
    for line in text.splitlines():
        for key in out:
            if line.startswith(f"mlops_serving_batching_{key}_total{{"):
                out[key] += int(line.rsplit(" ", 1)[1])
    return out


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(float(np.median([r[k] for r in runs])), 3) for k in runs[0]}


def _start(env: dict[str, str], model: TabularMLP | None, path: Path | None) -> LocalServing:
    """A home's replicas and Envoy serving version 1 (exported from ``model``, or copied from
    ``path``) in every pool, every request to the stable pool."""
    control = LocalServing(load_settings(env))
    if path is None:
        assert model is not None
        export_saved_model(model, control.model_dir / "1")
    else:
        shutil.copytree(path, control.model_dir / "1")
    for pool in POOLS:
        control.set_pool(pool, ModelEntry(MODEL, str(control.model_dir), [1], {}))
    control.ensure_running()
    for pool in POOLS:
        control.wait_version(pool, 1, 120)
    control.set_split(Split(0))
    return control


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported")
    ap.add_argument("--replicas", type=int, default=1, help="replicas per pool behind Envoy")
    ap.add_argument(
        "--batching-concurrency", type=int, default=16, help="client threads, batching on vs off"
    )
    ap.add_argument(
        "--batching-file",
        help="BatchingParameters of the batching-on replica (default: the repository's "
        "infra/tf-serving/batching.config)",
    )
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
        batching_env = {
            **env,
            "MLOPS_HOME": str(Path(tmp) / "mlops-batching"),
            "MLOPS__SERVING__ENABLE_BATCHING": "true",
        }
        if args.batching_file:
            batching_env["MLOPS__SERVING__BATCHING_PARAMETERS_FILE"] = args.batching_file
        started: list[LocalServing] = []
        try:
            control = _start(env, model, None)
            started.append(control)
            path = control.model_dir / "1"
            batching = _start(batching_env, None, path)
            started.append(batching)
            replica = control.clients("stable")[0].base_url
            server_url = f"{replica}/v1/models/{MODEL}:predict"
            plane_url = f"{control.endpoint()}/v1/models/{MODEL}:predict"
            batching_replica = batching.clients("stable")[0].base_url
            batching_url = f"{batching_replica}/v1/models/{MODEL}:predict"
            bc = args.batching_concurrency
            passes: dict[str, list[dict[str, float]]] = {}
            for _ in range(args.rounds):  # interleaved, so a noisy moment hits every mode
                passes.setdefault("direct", []).append(_direct_load(path, instances, args.requests))
                for conc in (1, args.concurrency):
                    for name, url in (("server", server_url), ("plane", plane_url)):
                        passes.setdefault(f"{name}_c{conc}", []).append(
                            _http_load(url, instances, args.requests, conc)
                        )
                for name, url in (("batching_off", server_url), ("batching_on", batching_url)):
                    passes.setdefault(f"{name}_c{bc}", []).append(
                        _http_load(url, instances, args.requests, bc)
                    )
            counts = _batching_counts(batching_replica)
        finally:
            for home in started:
                home.plane.stop()
    med = {k: _median(v) for k, v in passes.items()}
    c = args.concurrency
    on, off = med[f"batching_on_c{bc}"], med[f"batching_off_c{bc}"]
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
        "batching_concurrency": bc,
        "batching_file": args.batching_file or "infra/tf-serving/batching.config",
        "batching_off_rps": off["rps"],
        "batching_on_rps": on["rps"],
        "batching_off_p50_ms": off["p50_ms"],
        "batching_on_p50_ms": on["p50_ms"],
        "batching_off_p99_ms": off["p99_ms"],
        "batching_on_p99_ms": on["p99_ms"],
        "batching_on_over_off_rps": round(on["rps"] / off["rps"], 3),
        # Warm-up requests included: how many requests each batch the replica ran held.
        "batching_on_requests_per_batch": round(counts["tasks"] / max(counts["batches"], 1), 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
