"""Evaluation and registration against real MLflow backends: the embedded SQLite store and a
real ``mlflow server`` (artifacts proxied as ``mlflow-artifacts:``).

Each backend trains its models once (one node): a champion (3 epochs), a peer of the same
quality (another seed), a better one (6 epochs: about +0.012 AUC on the same test rows, paired
CI above zero), and one trained on shuffled labels. The tests then evaluate and register them;
they run in file order on the module's shared registry.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipelines import stages
from pipelines.audit import AuditLog
from pipelines.config import Settings, load_settings, settings, with_overrides
from pipelines.data import layout
from pipelines.registry import CHAMPION, Registry
from pipelines.store import open_store
from tests.ports import FREE_PORTS

# Trains models (torchrun, MLflow): minutes, so outside `make test-fast`.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAY, SHUFFLED_DAY = "2026-11-01", "2026-11-02"
ROWS = 12000  # ~1800 test rows, ~45 positives: a paired bootstrap CI of about +-0.01 AUC
LINEAGE = {"dag_id": "mlops_training_pipeline", "dag_run_id": "manual__test"}


@dataclass
class World:
    backend: str
    settings: Settings
    champion: str
    peer: str
    better: str
    shuffled: str
    first: dict[str, Any]
    first_registered: dict[str, Any]

    @property
    def reg(self) -> Registry:
        return Registry(self.settings.mlflow)

    def report(self, out: dict[str, Any]) -> dict[str, Any]:
        store = open_store(self.settings.store)
        return dict(json.loads(store.read_text(store.key_of(out["report_uri"]))))


def _publish(s: Settings, date: str, shuffle_labels: bool = False) -> str:
    stages.generate_data(s, date, rows=ROWS)
    if shuffle_labels:  # same features, labels permuted: nothing left to learn
        store = open_store(s.store)
        key = f"{layout.landing('transactions', date)}/part-00000.parquet"
        df = pd.read_parquet(io.BytesIO(store.read_bytes(key)))
        df["is_fraud"] = np.random.default_rng(1).permutation(df["is_fraud"].to_numpy())
        from pipelines.data.generate import to_parquet_bytes

        store.write_bytes(key, to_parquet_bytes(df))
    stages.validate_data(s, date)
    return str(stages.shard_data(s, date)["manifest_uri"])


@pytest.fixture(scope="module", params=["sqlite", "server"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp(f"evaluation-{request.param}") / "mlops"
        mp.setenv("MLOPS_HOME", str(home))
        for name, value in FREE_PORTS.items():
            mp.setenv(name, value)
        mp.delenv("MLOPS_PROFILE", raising=False)
        mp.delenv("MLOPS_CONFIG", raising=False)
        base = load_settings()
        if request.param == "server":
            url = request.getfixturevalue("mlflow_server")
            # The training nodes read their settings from the environment, so it carries the
            # URL too; artifact_root stays the local profile's path, which the registry must
            # not hand to a remote server (artifacts go through its mlflow-artifacts proxy).
            mp.setenv("MLOPS__MLFLOW__TRACKING_URI", url)
            base = with_overrides(base, mlflow={"tracking_uri": url})
        settings.cache_clear()
        s = with_overrides(base, train={"nodes": 1, "epochs": 3})
        manifest = _publish(s, DAY)
        shuffled_manifest = _publish(s, SHUFFLED_DAY, shuffle_labels=True)
        champion = stages.train(s, manifest)["run_id"]
        peer = stages.train(with_overrides(s, train={"seed": 8}), manifest)["run_id"]
        better = stages.train(with_overrides(s, train={"epochs": 6}), manifest)["run_id"]
        shuffled = stages.train(s, shuffled_manifest)["run_id"]
        # The first model: no champion yet. Then it becomes the champion (promote's job).
        first = stages.evaluate(s, champion)
        first_registered = stages.register(s, champion, LINEAGE)
        Registry(s.mlflow).set_alias(CHAMPION, first_registered["model_version"])
        yield World(request.param, s, champion, peer, better, shuffled, first, first_registered)
        settings.cache_clear()


def test_the_first_model_is_blessed_and_registered_with_lineage(world: World) -> None:
    assert world.first["blessed"] and world.first["champion_version"] is None
    assert "PASS no_regression: no champion yet: first model" in world.first["reasons"]
    assert world.first_registered["model_version"] == "1"
    reg = world.reg
    version = reg.version("1")
    assert version.run_id == world.champion
    tags = version.tags
    run_tags = reg.get_run(world.champion).data.tags
    for key in ("data_version", "manifest_uri", "git_sha"):
        assert tags[f"mlops.{key}"] == run_tags[f"mlops.{key}"], key
    assert tags["mlops.run_id"] == world.champion
    assert tags["mlops.dag_id"] == LINEAGE["dag_id"]
    assert tags["mlops.dag_run_id"] == LINEAGE["dag_run_id"]
    assert tags["mlops.blessed"] == "True"
    assert float(tags["mlops.test_roc_auc"]) == pytest.approx(world.first["roc_auc"])
    assert {"mlops.test_pr_auc", "mlops.test_log_loss", "mlops.test_calibration_error"} <= set(tags)
    assert tags["mlops.evaluation_uri"] == world.first["report_uri"]
    assert "mlops.override" not in tags
    # Nothing to differ from: the first model publishes no expected difference.
    assert not [k for k in (*tags, *run_tags) if k.startswith("mlops.expected_")]
    assert run_tags["mlops.registration"] == "registered"
    assert reg.aliases() == {"challenger": "1", "champion": "1"}


def test_the_version_is_a_torch_logged_model_that_loads_back_with_the_same_scores(
    world: World,
) -> None:
    import mlflow

    from pipelines.data.shard import load_manifest, read_split
    from pipelines.evaluate.run import _model_for_registry, load_run_model
    from pipelines.train.model import predict_proba

    reg = world.reg
    version = reg.version("1")
    assert version.source.startswith("models:/m-")
    logged = reg.client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == world.champion
    # With the server, artifacts live behind its proxy, not in a path this client chose.
    proxied = logged.artifact_location.startswith("mlflow-artifacts:")
    assert proxied == (world.backend == "server"), logged.artifact_location
    uri = f"models:/{world.settings.mlflow.model_name}/1"
    info = mlflow.models.get_model_info(uri)
    assert {"pytorch", "python_function"} <= set(info.flavors)
    assert info.flavors["pytorch"]["pytorch_version"]
    model = load_run_model(reg, world.champion)
    features = model.numeric + list(model.categorical)
    assert info.signature.inputs.input_names() == features
    assert info.signature.outputs.to_dict()[0]["tensor-spec"]["dtype"] == "float32"
    assert info.saved_input_example_info["type"] == "dataframe"
    store = open_store(world.settings.store)
    manifest = load_manifest(store, reg.run_tag(world.champion, "manifest_uri") or "")
    test = read_split(store, manifest, "test")
    loaded = mlflow.pytorch.load_model(uri)
    np.testing.assert_array_equal(predict_proba(loaded, test), predict_proba(model, test))
    # Registering again is idempotent: no second version, no second logged model.
    assert stages.register(world.settings, world.champion)["model_version"] == "1"
    _, example, signature = _model_for_registry(world.settings, reg, world.champion)
    assert reg.log_pytorch_model(world.champion, model, example, signature) == logged.model_id
    again = reg.client.search_logged_models(
        [logged.experiment_id], filter_string=f"source_run_id = '{world.champion}'"
    )
    assert [m.model_id for m in again] == [logged.model_id]


def test_report_plots_and_tags_land_in_the_lake_and_the_run(world: World) -> None:
    report = world.report(world.first)
    assert report["blessed"] and report["blessing"]["gate_passed"]
    assert {r["verdict"] for r in report["blessing"]["rules"]} == {"PASS"}
    assert report["slices"]["channel"] and report["slice_judgement"]
    assert report["plots"] == [
        "evaluation/plots/roc.png",
        "evaluation/plots/pr.png",
        "evaluation/plots/calibration.png",
        "evaluation/plots/loss.png",
    ]
    reg, store = world.reg, open_store(world.settings.store)
    run = reg.get_run(world.champion)
    assert run.info.artifact_uri.startswith(
        "mlflow-artifacts:" if world.backend == "server" else str(Path(world.settings.home))
    )
    for path in report["plots"]:
        png = reg.read_artifact(world.champion, path)
        assert png.startswith(b"\x89PNG") and len(png) > 5000, path
        name = path.rsplit("/", 1)[-1]
        assert store.read_bytes(f"{layout.evaluation(world.champion)}/plots/{name}") == png
    md = reg.read_artifact(world.champion, "evaluation/report.md").decode()
    assert "BLESSED" in md and "### Gate" in md and "### Behavioural tests" in md
    assert "![loss.png](plots/loss.png)" in md
    assert json.loads(reg.read_artifact(world.champion, "evaluation/report.json")) == report
    tags = run.data.tags
    assert tags["mlops.blessed"] == "True" and tags["mlops.gate_failed"] == "-"
    assert run.data.metrics["test_roc_auc"] == pytest.approx(report["candidate"]["roc_auc"])
    # The version's operating threshold: chosen on validation rows by the policy (the top 2 %
    # flagged), recorded on the run, and where its test precision and recall were counted.
    op = report["operating_threshold"]
    assert op["policy"] == "alert_rate" and op["warning"] is None
    assert op["flag_rate"] == pytest.approx(world.settings.evaluate.alert_rate, abs=0.005)
    assert float(tags["mlops.operating_threshold"]) == op["value"]
    assert report["candidate"]["threshold"] == op["value"] < world.settings.evaluate.threshold
    assert report["candidate"]["recall"] > 0 and report["candidate"]["precision"] > 0
    assert f"Operating threshold {op['value']:.4g} (alert_rate policy" in md


def test_a_trained_model_passes_the_behavioural_tests(world: World) -> None:
    report = world.report(world.first)
    results = {b["name"]: b for b in report["behaviour"]}
    assert set(results) == {
        "memo_is_ignored",
        "identifiers_are_ignored",
        "larger_amount_does_not_lower_risk",
        "online_is_not_safer_than_pos",
        "obvious_fraud_outranks_everyday_purchase",
        "obvious_fraud_is_flagged",
        "everyday_purchase_is_not_flagged",
    }
    assert all(b["passed"] and b["judged"] for b in results.values()), results
    assert results["memo_is_ignored"]["evidence"]["max_abs_delta"] == 0.0
    rules = {r["name"]: r for r in report["blessing"]["rules"]}
    assert rules["behaviour.invariance.memo_is_ignored"]["verdict"] == "PASS"
    assert rules["behaviour.directional.larger_amount_does_not_lower_risk"]["severity"] == "block"


def test_a_candidate_trained_on_shuffled_labels_is_rejected_and_not_registered(
    world: World,
) -> None:
    out = stages.evaluate(world.settings, world.shuffled)
    assert not out["blessed"] and out["champion_version"] == "1"
    assert "min_auc" in out["failed_rules"]
    assert any(r.startswith("FAIL min_auc: ROC-AUC 0.") for r in out["reasons"])
    assert out["roc_auc"] < world.settings.evaluate.min_auc
    reg = world.reg
    assert reg.get_run(world.shuffled).data.tags["mlops.gate_failed"].startswith("min_auc")
    md = reg.read_artifact(world.shuffled, "evaluation/report.md").decode()
    assert "REJECTED" in md and "- FAIL min_auc" in md
    assert stages.register(world.settings, world.shuffled)["model_version"] is None
    assert reg.get_run(world.shuffled).data.tags["mlops.registration"] == "rejected"
    assert reg.run_version(world.shuffled) is None


def test_a_candidate_of_the_same_quality_passes(world: World) -> None:
    out = stages.evaluate(world.settings, world.peer)
    assert out["blessed"], out["reasons"]
    assert out["champion_version"] == "1"
    low, high = out["auc_delta_ci"]
    assert low <= out["auc_delta"] <= high
    assert low >= -world.settings.evaluate.max_auc_regression
    # The champion's decisions are counted at its own recorded threshold, not the candidate's.
    report = world.report(out)
    champion_thr = float(world.reg.get_run(world.champion).data.tags["mlops.operating_threshold"])
    assert report["champion"]["threshold"] == champion_thr
    assert any(r.startswith("PASS no_regression: AUC delta") for r in out["reasons"])
    # The expected difference of the pair, each at its own threshold, published with the run:
    # what the shadow stage and the canary hold the served pair to.
    exp = report["expected_difference"]
    assert exp["champion_version"] == "1" and exp["rows"] == report["test_rows"]
    assert exp["thresholds"] == {
        "candidate": report["candidate"]["threshold"],
        "champion": champion_thr,
    }
    assert 0.5 < exp["agreement"] <= 1 and 0 < exp["rank_correlation"] <= 1
    assert 0 < exp["p_superiority"] < 1 and exp["abs_diff"]["p99"] >= exp["abs_diff"]["p50"]
    tags = world.reg.get_run(world.peer).data.tags
    assert tags["mlops.expected_vs_version"] == "1"
    assert float(tags["mlops.expected_agreement"]) == pytest.approx(exp["agreement"], abs=1e-6)
    assert (
        "Expected difference vs v1"
        in world.reg.read_artifact(world.peer, "evaluation/report.md").decode()
    )


def test_the_same_inputs_and_seed_give_identical_evaluations(world: World) -> None:
    first = world.report(stages.evaluate(world.settings, world.peer))
    second = world.report(stages.evaluate(world.settings, world.peer))
    for key in (
        "candidate",
        "champion",
        "deltas",
        "slices",
        "slice_judgement",
        "behaviour",
        "expected_difference",
    ):
        assert first[key] == second[key], key
    assert first["blessing"] == second["blessing"]


def test_a_better_candidate_under_a_slice_floor_is_rejected_naming_the_slice(
    world: World,
) -> None:
    s = world.settings
    plain = stages.evaluate(s, world.better)
    assert plain["blessed"], plain["reasons"]  # every overall rule passes
    assert plain["auc_delta"] > 0, plain  # and it beats the champion on the same rows
    report = world.report(plain)
    cfg = s.evaluate
    judged = [
        row
        for row in report["slice_judgement"]
        if row["rows"] >= cfg.slice_min_rows
        and min(row["positives"], row["rows"] - row["positives"]) >= cfg.slice_min_class_rows
        and row["roc_auc"] < 0.99
    ]
    assert judged, report["slice_judgement"]
    target = judged[0]
    floor = round(target["roc_auc"] + 0.005, 4)
    strict = with_overrides(
        s, evaluate={"slice_min_auc": 0.5, "slice_min_auc_by_slice": {target["slice"]: floor}}
    )
    out = stages.evaluate(strict, world.better)
    name = f"slice_min_auc[{target['slice']}]"
    assert not out["blessed"]
    assert out["failed_rules"] == [name]
    assert any(r.startswith("PASS min_auc") for r in out["reasons"])
    assert any(r.startswith("PASS no_regression") for r in out["reasons"])
    rejected = world.report(out)
    rule = next(r for r in rejected["blessing"]["rules"] if r["name"] == name)
    assert rule["verdict"] == "FAIL"
    assert rule["evidence"] == {
        "slice": target["slice"],
        "rows": target["rows"],
        "positives": target["positives"],
        "roc_auc": target["roc_auc"],
        "floor": floor,
    }
    assert f"ROC-AUC {target['roc_auc']:.4f} vs floor {floor}" in rule["detail"]
    statuses = {row["slice"]: row["status"] for row in rejected["slice_judgement"]}
    assert statuses[target["slice"]] == "failed"
    # slices too small for the global floor are reported as not judged, never as passed
    small = [row for row in rejected["slice_judgement"] if row["rows"] < cfg.slice_min_rows]
    assert small and all(statuses[row["slice"]] == "not_judged" for row in small)
    md = world.reg.read_artifact(world.better, "evaluation/report.md").decode()
    assert f"- FAIL {name}" in md and "not_judged" in md
    assert stages.register(strict, world.better)["model_version"] is None


def test_force_bless_reason_lands_on_the_version_and_in_the_audit_trail(world: World) -> None:
    s, reg = world.settings, world.reg
    reason = "INC-4711: ship the hotfix model while labels are rebuilt"
    out = stages.evaluate(s, world.shuffled, force="bless", reason=reason)
    assert out["blessed"] and out["override"] == "bless"
    assert "min_auc" in out["failed_rules"]  # the rules still failed; the override decided
    entry = AuditLog(open_store(s.store)).entries(last=1)[0]
    assert entry["event"] == "evaluation.override"
    assert entry["subject"] == f"{s.mlflow.model_name}/run/{world.shuffled}"
    details = entry["details"]
    assert details["override"] == "force-bless" and details["reason"] == reason
    assert details["blessed"] is True and details["gate_passed"] is False
    assert "min_auc" in details["failed_rules"]
    version = stages.register(s, world.shuffled, LINEAGE)["model_version"]
    assert version is not None and version != "1"
    tags = reg.version(version).tags
    assert tags["mlops.override"] == "bless" and tags["mlops.override_reason"] == reason
    assert tags["mlops.blessed"] == "True" and tags["mlops.dag_id"] == LINEAGE["dag_id"]
    md = reg.read_artifact(world.shuffled, "evaluation/report.md").decode()
    assert f"OVERRIDE force-bless: {reason} (the rules alone failed)" in md
    assert reg.alias_version(CHAMPION) == "1"  # registering never moves the champion
    # A later evaluation without an override must not inherit this one.
    stages.evaluate(s, world.shuffled)
    assert "mlops.override" not in reg.get_run(world.shuffled).data.tags


def test_force_reject_reason_lands_on_the_run(world: World) -> None:
    s, reg = world.settings, world.reg
    reason = "legal hold on the 2026-11 data"
    out = stages.evaluate(s, world.peer, force="reject", reason=reason)
    assert not out["blessed"] and out["override"] == "reject" and out["failed_rules"] == []
    tags = reg.get_run(world.peer).data.tags
    assert tags["mlops.override"] == "reject" and tags["mlops.override_reason"] == reason
    assert tags["mlops.blessed"] == "False" and tags["mlops.gate_passed"] == "True"
    entry = AuditLog(open_store(s.store)).entries(last=1)[0]
    assert entry["event"] == "evaluation.override"
    assert entry["details"]["override"] == "force-reject"
    assert entry["details"]["reason"] == reason
    assert entry["details"]["gate_passed"] is True
    assert stages.register(s, world.peer)["model_version"] is None
    assert reg.get_run(world.peer).data.tags["mlops.registration"] == "rejected"
    assert reg.run_version(world.peer) is None


def test_breast_cancer_models_pass_their_spec_behaviour(local_settings: Settings) -> None:
    s = with_overrides(
        local_settings,
        data={"dataset": "breast_cancer"},
        train={"nodes": 1, "epochs": 6},
        mlflow={"model_name": "cancer_classifier"},
    )
    stages.generate_data(s, DAY, rows=3000)
    stages.validate_data(s, DAY)
    run_id = stages.train(s, stages.shard_data(s, DAY)["manifest_uri"])["run_id"]
    out = stages.evaluate(s, run_id)
    assert out["blessed"], out["reasons"]
    behaviour = [r for r in out["reasons"] if " behaviour." in r]
    assert len(behaviour) == 5 and all(r.startswith("PASS") for r in behaviour), behaviour
    assert stages.register(s, run_id)["model_version"] == "1"
