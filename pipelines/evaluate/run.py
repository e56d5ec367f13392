"""The evaluate and register stages: candidate vs champion on the same test split, then MLflow."""

from __future__ import annotations

import json
import logging
from typing import Any

from pipelines.config import Settings
from pipelines.data import layout
from pipelines.data.shard import load_manifest, read_split
from pipelines.evaluate.gate import bless
from pipelines.evaluate.metrics import (
    classification_metrics,
    jsonable,
    paired_bootstrap,
    slice_metrics,
)
from pipelines.registry import CHALLENGER, CHAMPION, Registry
from pipelines.store import open_store
from pipelines.train.model import TabularMLP, load_model_bytes, predict_proba

log = logging.getLogger(__name__)


def load_run_model(reg: Registry, run_id: str) -> TabularMLP:
    return load_model_bytes(reg.read_artifact(run_id, "model/model.pt"))


def evaluate_candidate(
    settings: Settings, run_id: str, force: str | None = None, reason: str | None = None
) -> dict[str, Any]:
    """Evaluate the run's model and the champion on the run's test split; write the report."""
    reg, store = Registry(settings.mlflow), open_store(settings.store)
    manifest_uri = reg.run_tag(run_id, "manifest_uri")
    if not manifest_uri:
        raise ValueError(f"MLflow run {run_id} has no manifest_uri tag; was it made by `train`?")
    manifest = load_manifest(store, manifest_uri)
    test = read_split(store, manifest, "test")
    label = manifest.data["label"]
    y = test[label].to_numpy()
    cfg = settings.evaluate
    candidate = load_run_model(reg, run_id)
    p_new = predict_proba(candidate, test)
    report: dict[str, Any] = {
        "run_id": run_id,
        "data_version": manifest.data_version,
        "test_rows": len(test),
        "candidate": classification_metrics(y, p_new, cfg.threshold),
        "slices": slice_metrics(test, label, p_new, manifest.data["slices"], cfg.threshold),
    }
    champion_version = reg.alias_version(CHAMPION)
    deltas = None
    if champion_version is not None:
        champ_run = reg.version_run_id(champion_version)
        p_old = predict_proba(load_run_model(reg, champ_run), test)
        report["champion"] = {
            "version": champion_version,
            "run_id": champ_run,
            **classification_metrics(y, p_old, cfg.threshold),
        }
        deltas = paired_bootstrap(y, p_new, p_old, cfg.bootstrap_samples, seed=0)
        report["deltas"] = deltas
    blessing = bless(report["candidate"], deltas, cfg, force, reason)
    report["blessing"] = blessing.to_dict()
    report["blessed"] = blessing.blessed
    report = jsonable(report)
    key = f"{layout.evaluation(run_id)}/report.json"
    report["report_uri"] = store.write_text(key, json.dumps(report, indent=2))
    md = render_markdown(report, blessing.reasons())
    store.write_text(f"{layout.evaluation(run_id)}/report.md", md)
    reg.log_bytes(run_id, json.dumps(report, indent=2).encode(), "evaluation", "report.json")
    reg.log_bytes(run_id, md.encode(), "evaluation", "report.md")
    reg.log_metrics(
        run_id, {f"test_{k}": v for k, v in report["candidate"].items() if isinstance(v, float)}
    )
    tags = {"blessed": blessing.blessed, "evaluation_uri": report["report_uri"]}
    if force:
        tags.update({"override": force, "override_reason": reason})
    reg.set_tags(run_id, tags)
    log.info("%s", md)
    return report


def render_markdown(report: dict[str, Any], reasons: list[str]) -> str:
    c = report["candidate"]
    lines = [
        f"## Evaluation of run {report['run_id']}: "
        f"{'BLESSED' if report['blessed'] else 'REJECTED'}",
        "",
        f"Test rows {report['test_rows']}, data version {report['data_version']}.",
        "",
        "| metric | candidate | champion | delta [95% CI] |",
        "| --- | --- | --- | --- |",
    ]
    champ = report.get("champion") or {}
    for name in ("roc_auc", "pr_auc", "log_loss", "calibration_error", "precision", "recall"):
        d = (report.get("deltas") or {}).get(name)
        ci = f"{d['delta']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" if d else "-"
        cv = champ.get(name)
        lines.append(
            f"| {name} | {c.get(name, float('nan')):.4f} | "
            f"{'-' if cv is None else f'{cv:.4f}'} | {ci} |"
        )
    lines += ["", *[f"- {r}" for r in reasons]]
    b = report["blessing"]
    if b.get("override"):
        lines.append(f"- OVERRIDE {b['override']}: {b['override_reason']}")
    return "\n".join(lines) + "\n"


def register_candidate(
    settings: Settings, run_id: str, lineage: dict[str, Any] | None = None
) -> str | None:
    """Register a blessed run as a new version with alias ``challenger``; None if rejected.

    A rejected candidate stays an MLflow run tagged ``mlops.registration=rejected`` and is
    never registered, so the registry only holds versions that passed the gate."""
    reg = Registry(settings.mlflow)
    run = reg.get_run(run_id)
    t = run.data.tags
    if t.get("mlops.blessed") != "True":
        reg.set_tags(run_id, {"registration": "rejected"})
        log.info("run %s was not blessed; not registered", run_id)
        return None
    tags = {
        "data_version": t.get("mlops.data_version"),
        "manifest_uri": t.get("mlops.manifest_uri"),
        "git_sha": t.get("mlops.git_sha"),
        "run_id": run_id,
        "blessed": True,
        "evaluation_uri": t.get("mlops.evaluation_uri"),
        "test_roc_auc": run.data.metrics.get("test_roc_auc"),
        **({k: t[f"mlops.{k}"] for k in ("override", "override_reason") if f"mlops.{k}" in t}),
        **(lineage or {}),
    }
    version = reg.register(run_id, tags)
    reg.set_alias(CHALLENGER, version)
    reg.set_tags(run_id, {"registration": "registered", "model_version": version})
    return version
