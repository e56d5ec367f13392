"""What live traffic is compared with: the champion's training reference, built once per model
version and kept in the lake (``monitoring/reference/<model>/<version>.json``).

It is made from the rows the version was evaluated on (its manifest's held-out split, drawn
like its training data): their feature profile (the data gate's format, so the gate's PSI/KS
code judges live requests), the version's scores on them (prediction drift), and its
evaluation-time metrics (what realised performance is held to)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow as pa

from pipelines.config import Settings
from pipelines.data.profile import PartitionStats
from pipelines.data.spec import load_spec
from pipelines.store import open_store

log = logging.getLogger(__name__)


def reference_key(model: str, version: str | int) -> str:
    return f"monitoring/reference/{model}/{version}.json"


def build_reference(settings: Settings, version: str) -> dict[str, Any]:
    """The version's reference (computed; see :func:`reference_for` for the kept one)."""
    from pipelines.evaluate.threshold import version_threshold
    from pipelines.monitoring.metrics import score_reference
    from pipelines.registry import Registry
    from pipelines.serving.rollout import held_out
    from pipelines.train.model import predict_proba

    run_id, manifest, test, model = held_out(settings, version)
    spec = load_spec(manifest.data["dataset"], settings.data.spec_dir)
    stats = PartitionStats(spec, None)
    stats.add(pa.Table.from_pandas(test[spec.features], preserve_index=False))
    report = _evaluation(settings, run_id)
    return {
        "version": str(version),
        "run_id": run_id,
        "dataset": spec.name,
        "data_version": manifest.data.get("data_version"),
        "rows": len(test),
        "features": stats.profile(),
        "scores": score_reference(predict_proba(model, test)),
        "evaluation": {k: report.get(k) for k in ("roc_auc", "precision", "recall")},
        # Realised precision and recall count the version's decisions at its own threshold,
        # as its evaluation did.
        "threshold": version_threshold(
            Registry(settings.mlflow), version, settings.evaluate.threshold
        ),
    }


def _evaluation(settings: Settings, run_id: str) -> dict[str, Any]:
    from pipelines.data import layout

    store = open_store(settings.store)
    key = f"{layout.evaluation(run_id)}/report.json"
    if not store.exists(key):
        return {}
    candidate = json.loads(store.read_text(key)).get("candidate") or {}
    return {k: v for k, v in candidate.items() if isinstance(v, (int, float))}


def reference_for(settings: Settings, version: str) -> dict[str, Any]:
    """The version's reference, built and published on first use (create-once: a version's
    reference never changes)."""
    store = open_store(settings.store)
    key = reference_key(settings.mlflow.model_name, version)
    if not store.exists(key):
        ref = build_reference(settings, version)
        if store.create_bytes(key, json.dumps(ref, sort_keys=True).encode()):
            log.info("published the monitoring reference of version %s: %s", version, key)
    return dict(json.loads(store.read_text(key)))
