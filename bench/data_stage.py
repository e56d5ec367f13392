"""Data stage throughput and memory: validate + shard against plain pyarrow read + write.

For N and 4N rows of ``transactions`` (a small earlier day is validated first, so the drift
checks run against a reference), each measured step runs in a fresh child process that reports
its own wall time and peak RSS (``VmHWM``):

- ``pyarrow``: ``pq.read_table`` of the landing files, then ``pq.write_table`` of the same rows
  (zstd) to local disk: the raw rate, with no checks at all;
- ``validate``: ``validate_partition`` (the GE suite over record batches, leakage, drift);
- ``shard``: ``shard_dataset`` (hash split, spill, sorted zstd shards written on threads,
  sha256, manifest).

Figures: rows per second of validate + shard run one after the other over the pyarrow rate
(goal >= 0.5), each stage's own rate over the pyarrow rate, and the peak RSS of validate and
of shard at 4N over N (goal < 1.3). A step's peak RSS is its process's ``VmHWM``; CPU
seconds of each step show how many cores it kept busy. ``--workers`` as ``data.workers``
(shard writer threads; default one per CPU).

    .venv/bin/python bench/data_stage.py [--rows 2000000] [--factor 4] [--batch-rows 500000]
                                         [--workers N]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

DATE, REF_DATE = "2026-11-02", "2026-11-01"


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(
    step: str, lake: str, rows: int, batch_rows: int, target_rows: int, workers: int | None
) -> dict[str, Any]:
    """One measured step in this (fresh) process; heavy imports happen before the clock starts."""
    import pyarrow.parquet as pq

    from pipelines.data import layout
    from pipelines.data.expectations import SuiteRunner
    from pipelines.data.generate import generate_partition
    from pipelines.data.shard import shard_dataset
    from pipelines.data.spec import load_spec
    from pipelines.data.validate import validate_partition
    from pipelines.store import ObjectStore

    store, spec = ObjectStore(f"file://{lake}"), load_spec("transactions")
    if step == "generate":
        generate_partition(store, spec, REF_DATE, 20_000)
        validate_partition(store, spec, REF_DATE)  # the reference profile for the drift checks
        generate_partition(store, spec, DATE, rows)
        return {"rss_mb": _peak_rss_mb()}
    SuiteRunner(spec)  # GE's import and first-context cost is not the stage's per-row cost
    rss_before = _peak_rss_mb()
    c0 = os.times()
    t0 = time.perf_counter()
    if step == "pyarrow":
        keys = store.list(layout.landing(spec.name, DATE))
        table = pq.read_table([os.path.join(lake, k) for k in keys if k.endswith(".parquet")])
        with tempfile.TemporaryDirectory() as tmp:
            pq.write_table(table, f"{tmp}/copy.parquet", compression="zstd")
        n = table.num_rows
    elif step == "validate":
        n = validate_partition(store, spec, DATE, batch_rows).rows
    elif step == "shard":
        m = shard_dataset(store, spec, DATE, target_rows, batch_rows=batch_rows, workers=workers)
        n = sum(m.rows(s) for s in ("train", "val", "test"))
    else:
        raise SystemExit(f"unknown step {step}")
    seconds = time.perf_counter() - t0
    c1 = os.times()
    cpu_s = sum(getattr(c1, f) - getattr(c0, f) for f in ("user", "system"))
    cpu_s += sum(getattr(c1, f) - getattr(c0, f) for f in ("children_user", "children_system"))
    return {
        "rows": n,
        "seconds": seconds,
        "cpu_s": cpu_s,
        "rss_mb": _peak_rss_mb(),
        "rss_before_mb": rss_before,
    }


def _run(step: str, lake: str, rows: int, args: argparse.Namespace) -> dict[str, Any]:
    knobs = ["--batch-rows", str(args.batch_rows), "--target-rows", str(args.target_rows)]
    if args.workers is not None:
        knobs += ["--workers", str(args.workers)]
    out = subprocess.run(
        [sys.executable, __file__, "--child", step, "--lake", lake, "--rows", str(rows), *knobs],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--batch-rows", type=int, default=500_000)
    ap.add_argument("--target-rows", type=int, default=250_000)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--child")
    ap.add_argument("--lake")
    args = ap.parse_args()
    if args.child:
        print(
            json.dumps(
                _child(
                    args.child,
                    args.lake,
                    args.rows,
                    args.batch_rows,
                    args.target_rows,
                    args.workers,
                )
            )
        )
        return
    figures: dict[str, Any] = {"bench": "data_stage", "batch_rows": args.batch_rows}
    peaks: dict[str, dict[int, float]] = {"validate": {}, "shard": {}, "pyarrow": {}}
    for rows in (args.rows, args.rows * args.factor):
        with tempfile.TemporaryDirectory(prefix="bench-data-") as home:
            lake = os.path.join(home, "lake")
            _run("generate", lake, rows, args)
            raw = _run("pyarrow", lake, rows, args)
            val = _run("validate", lake, rows, args)
            shard = _run("shard", lake, rows, args)
        assert raw["rows"] == val["rows"] == shard["rows"] == rows, (raw, val, shard)
        stage_s = val["seconds"] + shard["seconds"]
        figures[f"rows_{rows}"] = {
            "pyarrow_rows_per_s": round(rows / raw["seconds"]),
            "validate_rows_per_s": round(rows / val["seconds"]),
            "shard_rows_per_s": round(rows / shard["seconds"]),
            "stage_rows_per_s": round(rows / stage_s),
            "stage_over_pyarrow": round(raw["seconds"] / stage_s, 3),
            "validate_over_pyarrow": round(raw["seconds"] / val["seconds"], 3),
            "shard_over_pyarrow": round(raw["seconds"] / shard["seconds"], 3),
            "cpu_s": {
                k: round(v["cpu_s"], 2)
                for k, v in [("pyarrow", raw), ("validate", val), ("shard", shard)]
            },
            "peak_rss_mb": {
                k: round(v["rss_mb"])
                for k, v in [("pyarrow", raw), ("validate", val), ("shard", shard)]
            },
        }
        for name, r in (("pyarrow", raw), ("validate", val), ("shard", shard)):
            peaks[name][rows] = r["rss_mb"]
        print(json.dumps(figures[f"rows_{rows}"]), flush=True)
    n, big = args.rows, args.rows * args.factor
    figures["rows"] = n
    figures["factor"] = args.factor
    figures["stage_over_pyarrow"] = figures[f"rows_{n}"]["stage_over_pyarrow"]
    for name in peaks:
        figures[f"{name}_rss_growth"] = round(peaks[name][big] / peaks[name][n], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
