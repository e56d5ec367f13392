"""The optimize stage: ONNX fp32 and int8 built from an exported version, measured beside its
SavedModel on the test split in one run, judged by the gate, published once per version."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import Settings
from pipelines.data import layout
from pipelines.optimize.gate import GateReport, Limits, Measured, decide
from pipelines.optimize.onnx_export import export_onnx, onnx_parity, quantize_int8
from pipelines.optimize.runtimes import Feeds, OrtRuntime, Runtime, SavedModelRuntime
from pipelines.registry import Registry
from pipelines.serving.rollout import fetch_verified_export, held_out
from pipelines.store import ObjectStore, open_store

log = logging.getLogger(__name__)
ONNX_FILES = {"fp32": "model.fp32.onnx", "int8": "model.int8.onnx"}
THROUGHPUT_BATCH = 1024
WARMUP_CALLS = 20


def optimization_key(model_name: str, version: str | int) -> str:
    """The version's published optimisation report (written last, once)."""
    return f"{layout.export(model_name, version)}/optimization.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_row(feeds: Feeds, i: int) -> Feeds:
    return {k: v[i : i + 1] for k, v in feeds.items()}


def measure(
    runtimes: Sequence[Runtime],
    frame: pd.DataFrame,
    y: np.ndarray,
    threshold: float,
    reps: int = 200,
    throughput_reps: int = 7,
) -> list[Measured]:
    """Latency, throughput and scores of each runtime on the same rows; ``runtimes[0]`` is the
    reference for agreement and score differences.

    Calls are interleaved round-robin (A B C A B C ...) so a slowdown of the machine while
    measuring hits every runtime alike; the timed call is ``run`` on prepared inputs (the model,
    not pandas, which every runtime shares)."""
    from sklearn.metrics import roc_auc_score

    if len(frame) == 0:
        raise ValueError("Cannot measure runtimes on an empty test split.")
    if len(np.unique(y)) < 2:
        raise ValueError("The test split holds one class only: ROC-AUC is undefined.")
    prepared = [rt.prepare(frame) for rt in runtimes]
    singles = [[_one_row(f, i % len(frame)) for i in range(reps)] for f in prepared]
    idx = np.arange(THROUGHPUT_BATCH) % len(frame)
    batches = [rt.prepare(frame.iloc[idx]) for rt in runtimes]
    for rt, rows, batch in zip(runtimes, singles, batches, strict=True):
        for i in range(WARMUP_CALLS):  # first calls allocate and pick kernels
            rt.run(rows[i % len(rows)])
        rt.run(batch)
    lat: list[list[float]] = [[] for _ in runtimes]
    for i in range(reps):
        for k, rt in enumerate(runtimes):
            t0 = time.perf_counter()
            rt.run(singles[k][i])
            lat[k].append((time.perf_counter() - t0) * 1000)
    tput: list[list[float]] = [[] for _ in runtimes]
    for _ in range(throughput_reps):
        for k, rt in enumerate(runtimes):
            t0 = time.perf_counter()
            rt.run(batches[k])
            tput[k].append(THROUGHPUT_BATCH / (time.perf_counter() - t0))
    scores = [rt.predict(frame) for rt in runtimes]
    ref = scores[0]
    out = []
    for rt, ms, rps, p in zip(runtimes, lat, tput, scores, strict=True):
        out.append(
            Measured(
                name=f"{rt.name}-{rt.variant}",
                runtime=rt.name,
                variant=rt.variant,
                p50_ms_b1=round(float(np.percentile(ms, 50)), 4),
                p99_ms_b1=round(float(np.percentile(ms, 99)), 4),
                rows_per_s_b1024=round(float(np.median(rps)), 1),
                roc_auc=float(roc_auc_score(y, p)),
                agreement=float(np.mean((p >= threshold) == (ref >= threshold))),
                max_abs_diff=float(np.max(np.abs(p - ref))),
            )
        )
    return out


def latency_png(table: list[dict[str, Any]]) -> bytes:
    """Bars of p50/p99 ms at batch 1 and rows/s at batch 1024 per runtime, the chosen one
    marked: the MLflow run shows at a glance why the gate chose it."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    lat_ax, tput_ax = fig.subplots(1, 2)
    names = [r["name"] + (" *" if r["chosen"] else "") for r in table]
    x = np.arange(len(table))
    lat_ax.bar(x - 0.2, [r["p50_ms_b1"] for r in table], 0.4, label="p50")
    lat_ax.bar(x + 0.2, [r["p99_ms_b1"] for r in table], 0.4, label="p99")
    lat_ax.set(ylabel="ms", title="Latency, batch 1")
    lat_ax.set_xticks(x, names, rotation=15)
    lat_ax.legend(loc="upper right")
    tput_ax.bar(x, [r["rows_per_s_b1024"] for r in table], 0.6, color="tab:green")
    tput_ax.set(ylabel="rows/s", title=f"Throughput, batch {THROUGHPUT_BATCH}")
    tput_ax.set_xticks(x, names, rotation=15)
    fig.suptitle("Runtimes on the test split (* = chosen for batch scoring)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _record(store: ObjectStore, reg: Registry, doc: dict[str, Any]) -> None:
    """The report next to the evaluation report, the table and plot on the version's run, the
    choice as model-version tags (all idempotent: a rerun rewrites them with the same doc)."""
    run_id, version = doc["run_id"], doc["version"]
    text = json.dumps(doc, indent=2)
    store.write_text(f"{layout.evaluation(run_id)}/optimization.json", text)
    reg.log_bytes(run_id, json.dumps(doc["table"], indent=2).encode(), "optimization", "table.json")
    reg.log_bytes(run_id, latency_png(doc["table"]), "optimization", "latency.png")
    reg.log_metrics(
        run_id,
        {
            f"optimization.{r['name']}.{k}": r[k]
            for r in doc["table"]
            for k in ("p50_ms_b1", "p99_ms_b1", "rows_per_s_b1024", "roc_auc")
        },
    )
    reg.set_version_tags(
        version,
        {
            "batch_runtime": doc["chosen_runtime"],
            "batch_variant": doc["chosen_variant"],
            "optimization_uri": doc["report_uri"],
        },
    )


def optimize_version(
    settings: Settings,
    version: str,
    reps: int = 200,
    throughput_reps: int = 7,
    threads: int | None = None,
    limits: Limits | None = None,
) -> dict[str, Any]:
    """Pick the batch-scoring runtime of an exported version: SavedModel, ONNX fp32 or int8.

    Builds ONNX fp32 from the torch weights (parity with torch within 1e-5) and its int8
    dynamic quantisation, measures them beside the verified SavedModel on the test split, and
    lets :func:`~pipelines.optimize.gate.decide` choose. The ONNX files are uploaded next to the
    export, the table and plot logged to the version's MLflow run, the choice set as the
    version's ``batch_runtime``/``batch_variant`` tags; ``optimization.json`` is written last
    and once: a later call returns it unchanged (published content never changes under its
    version). The choice is for batch scoring only: the online server keeps serving the
    SavedModel.
    """
    reg, store = Registry(settings.mlflow), open_store(settings.store)
    name, version = settings.mlflow.model_name, str(version)
    key = optimization_key(name, version)
    if store.exists(key):
        return dict(json.loads(store.read_text(key)))
    prefix = layout.export(name, version)
    if not store.exists(f"{prefix}/export.json"):
        raise FileNotFoundError(
            f"Version {version} has no export at {store.uri(prefix)}; run "
            "export_and_infra_validate first."
        )
    run_id, manifest, test, model = held_out(settings, version)
    y = test[manifest.data["label"]].to_numpy()
    with tempfile.TemporaryDirectory(prefix="optimize-") as tmp:
        saved_model = Path(tmp) / "saved_model"
        fetch_verified_export(store, name, version, saved_model)
        fp32 = export_onnx(model, Path(tmp) / ONNX_FILES["fp32"])
        parity = onnx_parity(model, fp32, test)
        int8 = quantize_int8(fp32, Path(tmp) / ONNX_FILES["int8"])
        runtimes: list[Runtime] = [
            SavedModelRuntime(saved_model),
            OrtRuntime(fp32, threads, "fp32"),
            OrtRuntime(int8, threads, "int8"),
        ]
        measured = measure(runtimes, test, y, settings.evaluate.threshold, reps, throughput_reps)
        report: GateReport = decide(measured[0], measured[1:], limits)
        # Paths relative to the export prefix, as batch scoring reads them, with their sha256.
        artifacts: dict[str, dict[str, str]] = {}
        for variant, path in (("fp32", fp32), ("int8", int8)):
            rel = f"onnx/{path.name}"
            uri = store.put_file(path, f"{prefix}/{rel}")
            artifacts[variant] = {"path": rel, "sha256": _sha256(path), "uri": uri}
    doc: dict[str, Any] = {
        "version": version,
        "run_id": run_id,
        **report.to_dict(),
        "threshold": settings.evaluate.threshold,
        "test_rows": len(test),
        "onnx_parity_max_abs_diff": parity["max_abs_diff"],
        "measured": {"reps_b1": reps, "reps_b1024": throughput_reps, "threads": threads},
        "cpus": os.cpu_count(),
        "artifacts": artifacts,
        "report_uri": store.uri(key),
        "created": time.time(),
    }
    for row in report.table():
        log.info("%s: %s", row["name"], "; ".join(row["reasons"]))
    _record(store, reg, doc)
    if not store.create_bytes(key, json.dumps(doc, indent=2).encode()):
        doc = dict(json.loads(store.read_text(key)))  # another run published first: its word holds
        _record(store, reg, doc)
    return doc
