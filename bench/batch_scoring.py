"""Batch scoring: the shipped ``mlops score`` against one in-process runtime call, 1 worker vs
2, and the SavedModel vs ONNX Runtime fp32 vs int8, all over the same day of ``--rows`` rows.

Set-up (not timed): a small model is trained, registered, exported, put through the
optimisation gate and made champion in a temporary home; then one landing day of ``--rows``
rows is generated (row groups of 128Ki rows, so ``batch.chunk_rows`` 500,000 makes 4 chunks).

- **in-process**: the rows are read once into a DataFrame; each runtime's ``predict`` over all
  of them is timed (``--reps``, median). ``inprocess_rows_per_s`` is the runtime the gate chose
  (what ``mlops score`` uses), ``ort_over_savedmodel`` and ``int8_over_fp32`` are ratios of
  rows/s, and ``int8_auc_delta`` is int8's ROC-AUC minus fp32's on the day's labels.
- **cli**: ``python -m pipelines.cli score --date D --workers W`` as a user runs it (interpreter
  start, imports, champion lookup, reads, scoring, writes, manifest), its output deleted
  between runs; W = 1 and 2 in ``--rounds`` interleaved rounds. ``cli_rows_per_s_1w`` is the
  median over rounds, ``workers_speedup`` the median of the paired 1w/2w time ratios. Each round
  also scores a day of 1,000 rows: ``cli_fixed_s`` is what a run costs before its rows, and
  ``cli_marginal_rows_per_s_1w`` the rows over the 1-worker time less that (reads, scoring and
  writes only).

    .venv/bin/python bench/batch_scoring.py [--rows 2000000] [--reps 3] [--rounds 3]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN_DAY, SCORE_DAY, SMALL_DAY = "2026-11-01", "2026-11-02", "2026-11-03"
# The fixed cost of one ``mlops score`` (interpreter, imports, the champion looked up in MLflow,
# a manifest) is measured on a day this small: its rows cost next to nothing.
SMALL_ROWS = 1000


def setup(home: Path, rows: int) -> tuple[Any, str, dict[str, Any]]:
    from pipelines import stages
    from pipelines.config import settings, with_overrides
    from pipelines.registry import Registry

    os.environ["MLOPS_HOME"] = str(home)
    os.environ["MLOPS__TRAIN__NODES"] = "1"
    os.environ["MLOPS__TRAIN__EPOCHS"] = "3"
    settings.cache_clear()
    s = with_overrides(
        settings(), evaluate={"behaviour": False, "plots": False, "bootstrap_samples": 10}
    )
    stages.generate_data(s, TRAIN_DAY, rows=20000)
    stages.validate_data(s, TRAIN_DAY)
    run_id = stages.train(s, stages.shard_data(s, TRAIN_DAY)["manifest_uri"])["run_id"]
    stages.evaluate(s, run_id, force="bless", reason="bench: any model will do")
    version = stages.register(s, run_id)["model_version"]
    stages.export_and_infra_validate(s, version)
    gate = stages.optimize_runtime(s, version)
    Registry(s.mlflow).set_alias("champion", version)
    stages.generate_data(s, SCORE_DAY, rows=rows, seed=1)
    stages.generate_data(s, SMALL_DAY, rows=SMALL_ROWS, seed=2)
    return s, version, gate


def runtimes(s: Any, version: str) -> dict[str, Any]:
    """The three runtimes on the version's verified artifacts, one thread each as ``mlops
    score`` gives a lone worker all cores: threads None (the library default)."""
    from pipelines.batch.score import fetch_artifact
    from pipelines.optimize.runtimes import load_runtime
    from pipelines.store import open_store

    store = open_store(s.store)
    out = {}
    for name, kind, variant in (
        ("savedmodel", "savedmodel", "fp32"),
        ("ort_fp32", "onnx", "fp32"),
        ("ort_int8", "onnx", "int8"),
    ):
        path = fetch_artifact(store, s.mlflow.model_name, version, kind, variant)
        out[name] = load_runtime(kind, path, variant=variant)
    return out


def in_process(s: Any, version: str, reps: int) -> dict[str, Any]:
    import io

    import pyarrow.parquet as pq
    from sklearn.metrics import roc_auc_score

    from pipelines.data import layout
    from pipelines.data.spec import load_spec
    from pipelines.store import open_store

    spec = load_spec("transactions")
    store = open_store(s.store)
    key = f"{layout.landing('transactions', SCORE_DAY)}/part-00000.parquet"
    table = pq.read_table(io.BytesIO(store.read_bytes(key)))
    frame = table.select(list(spec.features)).to_pandas()
    y = table.column(spec.label).to_numpy()
    out: dict[str, Any] = {"rows": len(frame)}
    scores = {}
    for name, rt in runtimes(s, version).items():
        rt.predict(frame.head(1000))  # warm
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            scores[name] = rt.predict(frame)
            times.append(time.perf_counter() - t)
        out[f"{name}_rows_per_s"] = len(frame) / statistics.median(times)
        out[f"{name}_auc"] = float(roc_auc_score(y, scores[name]))
        print(f"in-process {name}: {out[f'{name}_rows_per_s']:,.0f} rows/s", flush=True)
    return out


def cli(home: Path, s: Any, version: str, workers: int, day: str = SCORE_DAY) -> float:
    from pipelines.data import layout
    from pipelines.store import open_store

    open_store(s.store).delete(
        layout.predictions("transactions", s.mlflow.model_name, version, day), True
    )
    env = {**os.environ, "MLOPS_HOME": str(home)}
    t = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "score",
            "--date",
            day,
            "--workers",
            str(workers),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"mlops score failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout)
    assert out["published_now"] and out["workers"] == workers, out
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        home = Path(tmp) / "mlops"
        s, version, gate = setup(home, a.rows)
        chosen = {"savedmodel": "savedmodel", "onnxruntime": "ort"}[gate["batch_runtime"]]
        chosen = chosen if chosen == "savedmodel" else f"ort_{gate['batch_variant']}"
        print(f"gate chose {gate['chosen']}", flush=True)
        for row in gate["table"]:
            print(f"  gate: {row}", flush=True)
        inproc = in_process(s, version, a.reps)
        one, two, fixed = [], [], []
        for r in range(a.rounds):
            one.append(cli(home, s, version, 1))
            two.append(cli(home, s, version, 2))
            fixed.append(cli(home, s, version, 1, SMALL_DAY))
            print(
                f"round {r}: 1 worker {one[-1]:.2f} s, 2 workers {two[-1]:.2f} s, "
                f"{SMALL_ROWS} rows {fixed[-1]:.2f} s",
                flush=True,
            )
    rows = inproc["rows"]
    cli_1w = rows / statistics.median(one)
    # What the command costs per row once started: its time less the small day's.
    marginal = rows / max(statistics.median(one) - statistics.median(fixed), 1e-9)
    result = {
        "rows": rows,
        "runtime": gate["chosen"],
        "gate": gate["table"],
        "inprocess_rows_per_s": round(inproc[f"{chosen}_rows_per_s"]),
        "cli_rows_per_s_1w": round(cli_1w),
        "cli_rows_per_s_2w": round(rows / statistics.median(two)),
        "cli_over_inprocess": round(cli_1w / inproc[f"{chosen}_rows_per_s"], 3),
        "workers_speedup": round(
            statistics.median(o / t for o, t in zip(one, two, strict=True)), 3
        ),
        "savedmodel_rows_per_s": round(inproc["savedmodel_rows_per_s"]),
        "ort_over_savedmodel": round(
            inproc["ort_fp32_rows_per_s"] / inproc["savedmodel_rows_per_s"], 3
        ),
        "int8_over_fp32": round(inproc["ort_int8_rows_per_s"] / inproc["ort_fp32_rows_per_s"], 3),
        "int8_auc_delta": round(inproc["ort_int8_auc"] - inproc["ort_fp32_auc"], 6),
        "cli_fixed_s": round(statistics.median(fixed), 2),
        "cli_marginal_rows_per_s_1w": round(marginal),
        "cli_marginal_over_inprocess": round(marginal / inproc[f"{chosen}_rows_per_s"], 3),
        "cli_seconds_1w": [round(x, 2) for x in one],
        "cli_seconds_2w": [round(x, 2) for x in two],
        "cli_seconds_small_day": [round(x, 2) for x in fixed],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
