"""The evaluate and register stages: candidate vs champion on the same test split, then MLflow."""

from __future__ import annotations

import json
import logging
from typing import Any

import pandas as pd

from pipelines.config import Settings
from pipelines.data import layout
from pipelines.data.shard import load_manifest, read_shards, read_split
from pipelines.data.spec import load_spec
from pipelines.evaluate.behaviour import BehaviourResult, run_behaviour
from pipelines.evaluate.expected import describe, expected_difference, summary_tags
from pipelines.evaluate.gate import bless, judge_slices
from pipelines.evaluate.metrics import (
    classification_metrics,
    jsonable,
    paired_bootstrap,
    slice_metrics,
)
from pipelines.evaluate.plots import evaluation_plots
from pipelines.evaluate.threshold import POLICY_TAG, TAG, operating_threshold, recorded
from pipelines.registry import CHALLENGER, CHAMPION, Registry
from pipelines.store import open_store
from pipelines.train.model import TabularMLP, load_model_bytes, predict_proba

log = logging.getLogger(__name__)


def load_run_model(reg: Registry, run_id: str) -> TabularMLP:
    return load_model_bytes(reg.read_artifact(run_id, "model/model.pt"))


def evaluate_candidate(
    settings: Settings, run_id: str, force: str | None = None, reason: str | None = None
) -> dict[str, Any]:
    """Evaluate the run's model and the champion on the run's test split; write the report.

    The report (lake and MLflow run) holds metrics, bootstrap CIs of the deltas, slice metrics
    and their judgement, behavioural test results, plots, and every gate rule with its verdict.
    """
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
    # The candidate's decision threshold, chosen on its validation rows (never the test rows
    # it is judged on); its decisions below are counted there.
    val = read_split(store, manifest, "val")
    y_val = val[label].to_numpy()
    op = operating_threshold(y_val, predict_proba(candidate, val), cfg)
    thr = op["value"]
    slice_cols = manifest.data["slices"]
    report: dict[str, Any] = {
        "run_id": run_id,
        "data_version": manifest.data_version,
        "test_rows": len(test),
        "operating_threshold": op,
        "candidate": {**classification_metrics(y, p_new, thr), "threshold": thr},
        "slices": slice_metrics(test, label, p_new, slice_cols, thr),
    }
    champion_version = reg.alias_version(CHAMPION)
    deltas, champion_slices, p_old = None, None, None
    if champion_version is not None:
        champ_run = reg.version_run_id(champion_version)
        champion = load_run_model(reg, champ_run)
        p_old = predict_proba(champion, test)
        # The champion's decisions at its own threshold: how it flags in production.
        champ_thr = recorded(reg.get_run(champ_run).data.tags)
        if champ_thr is None:  # evaluated before thresholds were recorded: its policy now
            champ_thr = operating_threshold(y_val, predict_proba(champion, val), cfg)["value"]
        report["champion"] = {
            "version": champion_version,
            "run_id": champ_run,
            **classification_metrics(y, p_old, champ_thr),
            "threshold": champ_thr,
        }
        deltas = paired_bootstrap(y, p_new, p_old, cfg.bootstrap_samples, seed=0)
        report["deltas"] = deltas
        champion_slices = slice_metrics(test, label, p_old, slice_cols, champ_thr)
        report["champion_slices"] = champion_slices
        # What the serving checks hold the served pair to: the two models on the same rows.
        report["expected_difference"] = expected_difference(
            p_new, p_old, thr, champ_thr, champion_version
        )
    report["slice_judgement"] = judge_slices(report["slices"], champion_slices, cfg)[1]
    behaviour = _behaviour(settings, manifest.data["dataset"], test, candidate, thr)
    report["behaviour"] = [r.to_dict() for r in behaviour]
    blessing = bless(
        report["candidate"],
        deltas,
        cfg,
        force,
        reason,
        slices=report["slices"],
        champion_slices=champion_slices,
        behaviour=behaviour,
    )
    report["blessing"] = blessing.to_dict()
    report["blessed"] = blessing.blessed
    report["plots"] = []
    if cfg.plots:
        scores = {"candidate": p_new}
        if p_old is not None:
            scores[f"champion v{champion_version}"] = p_old
        for name, png in evaluation_plots(y, scores, reg.metric_history(run_id, "loss")).items():
            store.write_bytes(f"{layout.evaluation(run_id)}/plots/{name}", png)
            reg.log_bytes(run_id, png, "evaluation/plots", name)
            report["plots"].append(f"evaluation/plots/{name}")
    report = jsonable(report)
    key = f"{layout.evaluation(run_id)}/report.json"
    report["report_uri"] = store.uri(key)  # the lake and the run hold the same document
    text = json.dumps(report, indent=2)
    store.write_text(key, text)
    md = render_markdown(report)
    store.write_text(f"{layout.evaluation(run_id)}/report.md", md)
    reg.log_bytes(run_id, text.encode(), "evaluation", "report.json")
    reg.log_bytes(run_id, md.encode(), "evaluation", "report.md")
    reg.log_metrics(
        run_id, {f"test_{k}": v for k, v in report["candidate"].items() if isinstance(v, float)}
    )
    tags = {
        "blessed": blessing.blessed,
        "evaluation_uri": report["report_uri"],
        "gate_passed": blessing.gate_passed,
        "gate_failed": ",".join(blessing.failed) or "-",
        TAG: thr,
        POLICY_TAG: op["policy"],
    }
    if report.get("expected_difference"):
        # A figure the pair has none of (a constant model's rank correlation) is no tag.
        tags.update(
            {k: v for k, v in summary_tags(report["expected_difference"]).items() if v is not None}
        )
    else:  # no champion now: an earlier evaluation's expectation must not stay on the run
        stale = [k for k in reg.get_run(run_id).data.tags if k.startswith("mlops.expected_")]
        reg.delete_tags(run_id, [k.removeprefix("mlops.") for k in stale])
    if force:
        tags.update({"override": force, "override_reason": reason})
    else:  # a re-evaluation without an override must not inherit an earlier one
        reg.delete_tags(run_id, ["override", "override_reason"])
    reg.set_tags(run_id, tags)
    log.info("%s", md)
    return report


def _behaviour(
    settings: Settings, dataset: str, test: pd.DataFrame, model: TabularMLP, threshold: float
) -> list[BehaviourResult]:
    """The dataset spec's behavioural tests on the first ``behaviour_rows`` test rows."""
    cfg = settings.evaluate
    if not cfg.behaviour:
        return []
    spec = load_spec(dataset, settings.data.spec_dir)
    if spec.behaviour is None:
        return []
    return run_behaviour(
        spec.behaviour,
        spec,
        test.head(cfg.behaviour_rows),
        lambda frame: predict_proba(model, frame),
        threshold,
        cfg.behaviour_severity,
        cfg.behaviour_seed,
    )


def _num(v: Any, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _threshold_line(report: dict[str, Any]) -> str:
    op = report.get("operating_threshold") or {}
    if not op:
        return "Operating threshold: not recorded."
    line = (
        f"Operating threshold {op['value']:.4g} ({op['policy']} policy; on validation: "
        f"{op['flag_rate']:.2%} flagged, precision {op['precision']:.3f}, recall "
        f"{op['recall']:.3f})."
    )
    champ = report.get("champion") or {}
    if champ.get("threshold") is not None:
        line += f" Champion v{champ['version']} at its own, {champ['threshold']:.4g}."
    if op.get("warning"):
        line += f" WARNING: {op['warning']}."
    return line


def render_markdown(report: dict[str, Any]) -> str:
    c = report["candidate"]
    b = report["blessing"]
    lines = [
        f"## Evaluation of run {report['run_id']}: "
        f"{'BLESSED' if report['blessed'] else 'REJECTED'}",
        "",
        f"Test rows {report['test_rows']}, data version {report['data_version']}.",
        "",
        _threshold_line(report),
        "",
        *(
            [f"Expected difference {describe(report['expected_difference'])}.", ""]
            if report.get("expected_difference")
            else []
        ),
        "| metric | candidate | champion | delta [95% CI] |",
        "| --- | --- | --- | --- |",
    ]
    champ = report.get("champion") or {}
    for name in ("roc_auc", "pr_auc", "log_loss", "calibration_error", "precision", "recall"):
        d = (report.get("deltas") or {}).get(name)
        ci = f"{d['delta']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" if d else "-"
        lines.append(f"| {name} | {_num(c.get(name))} | {_num(champ.get(name))} | {ci} |")
    lines += ["", "### Gate", ""]
    lines += [f"- {r}" for r in b["reasons"]]
    if b.get("override"):
        lines.append(
            f"- OVERRIDE force-{b['override']}: {b['override_reason']} "
            f"(the rules alone {'passed' if b['gate_passed'] else 'failed'})"
        )
    if report.get("slice_judgement"):
        lines += [
            "",
            "### Slices",
            "",
            "| slice | rows | positives | ROC-AUC | champion | floor | status |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for s in report["slice_judgement"]:
            status = s["status"] + (f" ({s['reason']})" if s["status"] == "not_judged" else "")
            lines.append(
                f"| {s['slice']} | {s['rows']} | {s['positives']} | {_num(s['roc_auc'])} | "
                f"{_num(s['champion_roc_auc'])} | {_num(s['floor'], '')} | {status} |"
            )
    if report.get("behaviour"):
        lines += [
            "",
            "### Behavioural tests",
            "",
            "| test | kind | severity | result | detail |",
            "| --- | --- | --- | --- | --- |",
        ]
        for t in report["behaviour"]:
            result = "not judged" if not t["judged"] else "pass" if t["passed"] else "FAIL"
            lines.append(
                f"| {t['name']} | {t['kind']} | {t['severity']} | {result} | {t['detail']} |"
            )
    if report.get("plots"):
        lines += ["", "### Plots", ""]
        names = [p.rsplit("/", 1)[-1] for p in report["plots"]]
        lines += [f"![{name}](plots/{name})" for name in names]
    return "\n".join(lines) + "\n"


def register_candidate(
    settings: Settings, run_id: str, lineage: dict[str, Any] | None = None
) -> str | None:
    """Register a blessed run as a new version with alias ``challenger``; None if rejected.

    The version's source is a LoggedModel of the run in the torch flavour, with a signature
    (raw feature columns in, probabilities out) and an input example of raw test rows.
    A rejected candidate stays an MLflow run tagged ``mlops.registration=rejected`` and is
    never registered, so the registry only holds versions that passed the gate (or were
    force-blessed, which the version's ``mlops.override*`` tags record)."""
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
        **{
            f"test_{m}": run.data.metrics[f"test_{m}"]
            for m in ("roc_auc", "pr_auc", "log_loss", "calibration_error")
            if f"test_{m}" in run.data.metrics
        },
        **({k: t[f"mlops.{k}"] for k in ("override", "override_reason") if f"mlops.{k}" in t}),
        # What evaluation expects of it against the champion (the report has the whole of it).
        **{k[len("mlops.") :]: v for k, v in t.items() if k.startswith("mlops.expected_")},
        **(lineage or {}),
    }
    version = reg.run_version(run_id)
    if version is None:
        model, example, signature = _model_for_registry(settings, reg, run_id)
        model_id = reg.log_pytorch_model(
            run_id,
            model,
            example,
            signature,
            tags={"data_version": tags["data_version"], "run_id": run_id},
        )
        version = reg.register(run_id, tags, model_id)
    reg.set_alias(CHALLENGER, version)
    reg.set_tags(run_id, {"registration": "registered", "model_version": version})
    return version


def _model_for_registry(
    settings: Settings, reg: Registry, run_id: str, example_rows: int = 5
) -> tuple[TabularMLP, pd.DataFrame, Any]:
    """The run's model, a few raw test rows (features only, numbers as float64, as the
    serving signature takes them) and the signature inferred from them and their scores."""
    from mlflow.models import infer_signature

    store = open_store(settings.store)
    manifest = load_manifest(store, reg.run_tag(run_id, "manifest_uri") or "")
    model = load_run_model(reg, run_id)
    rows = read_shards(store, manifest, manifest.shards("test")[:1]).head(example_rows)
    example = rows[model.numeric + list(model.categorical)].copy()
    example[model.numeric] = example[model.numeric].astype("float64")
    for name in model.categorical:
        example[name] = example[name].astype(str)
    return model, example, infer_signature(example, predict_proba(model, example))
