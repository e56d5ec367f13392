"""Monitoring throughput and memory: ``monitor_files`` over an hour of 1M and of 4M logged rows.

Set-up (not timed): ``--rows`` (the larger size) serving-log rows of ``transactions`` are written
as parquet files of ``--file-rows`` rows (row groups of 128Ki rows) into a temporary local store:
requests of 1-8 instances, 90% stable (v3), 5% canary (v4), 5% baseline (v3), 0.3% 503s,
lognormal latencies, features drawn like the dataset. The references come from a separate
sample of 200,000 rows: the feature profile (``PartitionStats.profile``) and the scores
(``score_reference``).

Measured: ``monitor_files`` over the first ``--rows / --factor`` rows (the baseline) and over
all ``--rows``, each run ``--reps`` times (interleaved), every run in a fresh child process
that reports its wall time, CPU time and peak RSS, so peaks do not mix; medians are reported.
The peak is the child's ``VmHWM``, not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries
ru_maxrss across ``exec``, so a child would report its parent's (data-generating) peak.

Figures: rows per second at both sizes (goal at the larger: >= 500,000) and ``rss_growth``,
the peak RSS at the larger size over the baseline's (goal < 1.3).

    .venv/bin/python bench/monitoring.py [--rows 4000000] [--factor 4] [--reps 3]
                                         [--batch-rows 500000] [--file-rows 500000]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROW_GROUP_ROWS = 131_072
REF_ROWS = 200_000
PREFIX = "serving_logs/fraud_detector/dt=2026-11-02/hour=13"


def _hour(n: int, seed: int) -> Any:
    """``n`` serving-log rows (vectorised; whole requests, cut at ``n`` instances)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines.data.spec import load_spec
    from pipelines.monitoring.schema import schema

    spec = load_spec("transactions")
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 2, 4, 8], size=n, p=[0.7, 0.15, 0.1, 0.05])
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), n)) + 1]
    req = np.repeat(np.arange(len(sizes)), sizes)[:n]
    starts = np.cumsum(sizes) - sizes
    instance = (np.arange(n) - starts[req]).astype(np.int32)
    u = rng.random(len(sizes))
    label = np.where(u < 0.9, "stable", np.where(u < 0.95, "canary", "baseline"))[req]
    version = np.where(label == "canary", 4, 3)
    status = np.where(rng.random(len(sizes)) < 0.003, 503, 200).astype(np.int32)[req]
    latency = rng.lognormal(np.log(15.0), 0.5, len(sizes))[req]
    score = rng.beta(1.2, 20.0, n)
    ids = pc.cast(pa.array(req + seed * 10_000_000), pa.string())
    cols: dict[str, Any] = {
        "request_id": ids,
        "instance": instance,
        "time": np.full(n, 1_793_624_400_000, "datetime64[ms]"),
        "key": pa.nulls(n, pa.string()),
        "label": label,
        "version": version,
        "status": status,
        "latency_ms": latency,
        "score": pa.array(score, mask=status != 200),
        "amount": np.round(rng.lognormal(3.4, 1.1, n), 2),
        "hour": rng.integers(0, 24, n).astype(float),
        "card_age_days": np.floor(rng.gamma(1.5, 500.0, n)),
        "distance_km": np.round(rng.lognormal(2.0, 1.4, n), 3),
        "txn_count_24h": rng.poisson(2.5, n).astype(float),
        "merchant_category": rng.choice(
            ["grocery", "restaurants", "gas", "travel", "electronics", "online_retail"], n
        ),
        "channel": rng.choice(["pos", "online", "atm"], n, p=[0.6, 0.3, 0.1]),
        "country": rng.choice(["US", "GB", "DE", "FR", "BR", "IN", "NG", "OTHER"], n),
    }
    return pa.table(cols).select(schema(spec).names).cast(schema(spec))


def setup(home: str, rows: int, file_rows: int) -> list[str]:
    """Write the log files and the references under ``home``; return the files' keys."""
    import pyarrow.parquet as pq

    from pipelines.data.profile import PartitionStats
    from pipelines.data.spec import load_spec
    from pipelines.monitoring.metrics import score_reference
    from pipelines.store import ObjectStore

    store = ObjectStore(f"file://{home}/lake")
    keys = []
    for i, start in enumerate(range(0, rows, file_rows)):
        buf = io.BytesIO()
        pq.write_table(_hour(min(file_rows, rows - start), seed=i + 1), buf, ROW_GROUP_ROWS)
        keys.append(f"{PREFIX}/part-{i:05d}.parquet")
        store.write_bytes(keys[-1], buf.getvalue())
    ref = _hour(REF_ROWS, seed=0)
    stats = PartitionStats(load_spec("transactions"), None)
    stats.add(ref)
    scores = ref.column("score").to_numpy(zero_copy_only=False)
    refs = {"features": stats.profile(), "scores": score_reference(scores)}
    Path(home, "refs.json").write_text(json.dumps(refs))
    return keys


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(home: str, keys: list[str], batch_rows: int) -> dict[str, Any]:
    """One measured run in this (fresh) process; imports and reference loading are not timed."""
    from pipelines.config import MonitoringSettings
    from pipelines.data.spec import load_spec
    from pipelines.monitoring.metrics import monitor_files
    from pipelines.store import ObjectStore

    store, spec = ObjectStore(f"file://{home}/lake"), load_spec("transactions")
    refs = json.loads(Path(home, "refs.json").read_text())
    rss_before = _peak_rss_mb()
    c0, t0 = os.times(), time.perf_counter()
    out = monitor_files(
        store,
        keys,
        spec,
        refs["features"],
        refs["scores"],
        MonitoringSettings(),
        batch_rows=batch_rows,
    )
    seconds = time.perf_counter() - t0
    c1 = os.times()
    return {
        "rows": out["rows"],
        "seconds": seconds,
        "cpu_s": (c1.user - c0.user) + (c1.system - c0.system),
        "rss_mb": _peak_rss_mb(),
        "rss_before_mb": rss_before,
        "drift": out["drift"],
        "slo_breaches": len(out["slo_breaches"]),
    }


def _run(home: str, keys: list[str], batch_rows: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", home, "--batch-rows", str(batch_rows), *keys]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-rows", type=int, default=500_000)
    ap.add_argument("--file-rows", type=int, default=500_000)
    ap.add_argument("--child")
    ap.add_argument("keys", nargs="*")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.keys, args.batch_rows)))
        return
    small = args.rows // args.factor
    if small % args.file_rows:
        raise SystemExit("--rows / --factor must be a multiple of --file-rows")
    figures: dict[str, Any] = {"bench": "monitoring", "batch_rows": args.batch_rows}
    with tempfile.TemporaryDirectory(prefix="bench-monitoring-") as home:
        keys = setup(home, args.rows, args.file_rows)
        sizes = {small: keys[: small // args.file_rows], args.rows: keys}
        runs: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
        for _ in range(args.reps):  # interleaved, so drifting machine load hits both sizes
            for n, subset in sizes.items():
                r = _run(home, subset, args.batch_rows)
                assert r["rows"] == n, (r, n)
                runs[n].append(r)
    for n, rs in runs.items():
        seconds = statistics.median(r["seconds"] for r in rs)
        figures[f"rows_{n}"] = {
            "rows_per_s": round(n / seconds),
            "seconds": round(seconds, 3),
            "cpu_s": round(statistics.median(r["cpu_s"] for r in rs), 2),
            "peak_rss_mb": round(statistics.median(r["rss_mb"] for r in rs), 1),
            "rss_after_imports_mb": round(statistics.median(r["rss_before_mb"] for r in rs), 1),
            "drift": rs[0]["drift"],
            "slo_breaches": rs[0]["slo_breaches"],
        }
        print(json.dumps(figures[f"rows_{n}"]), flush=True)
    big, base = figures[f"rows_{args.rows}"], figures[f"rows_{small}"]
    figures.update(
        rows=args.rows,
        rows_per_s=big["rows_per_s"],
        rss_growth=round(big["peak_rss_mb"] / base["peak_rss_mb"], 3),
        rows_per_s_1m=base["rows_per_s"],
        peak_rss_mb_1m=base["peak_rss_mb"],
        peak_rss_mb_4m=big["peak_rss_mb"],
        reps=args.reps,
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
