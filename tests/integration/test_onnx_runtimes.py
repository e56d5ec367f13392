"""ONNX Runtime as the second runtime: parity with torch (NaN numerics, unseen and missing
categories) for the ONNX graph and the SavedModel, int8 quantisation, and the optimize stage end
to end on a trained, registered and exported version (published once).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipelines.config import Settings
from pipelines.data import layout
from pipelines.data.generate import transactions
from pipelines.data.shard import feature_stats
from pipelines.data.spec import load_spec
from pipelines.optimize import run as optimize_run
from pipelines.optimize.onnx_export import export_onnx, onnx_parity, quantize_int8
from pipelines.optimize.runtimes import OrtRuntime, SavedModelRuntime, load_runtime
from pipelines.registry import TAG_PREFIX, Registry
from pipelines.serving.export import export_saved_model, saved_model_predict
from pipelines.store import open_store
from pipelines.train.model import TabularMLP, predict_proba
from tests.model_helpers import exported_version

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model() -> TabularMLP:
    import torch

    spec = load_spec("transactions")
    df = transactions(dt.date(2026, 11, 1), 500)
    torch.manual_seed(3)
    m = TabularMLP(
        spec.numeric_features,
        {c: spec.vocab(c) for c in spec.categorical_features},
        feature_stats(df, spec),
        (16, 8),
        3,
        spec.log_features,
    )
    return m.eval()


@pytest.fixture(scope="module")
def rows(model: TabularMLP) -> pd.DataFrame:
    """Raw rows with every awkward value a batch brings: NaN in each numeric column, unseen
    categories, None, NaN and "" in each categorical column."""
    df = transactions(dt.date(2026, 11, 3), 200).reset_index(drop=True)
    for j, name in enumerate(model.numeric):
        df[name] = df[name].astype("float64")
        df.loc[[j, 40 + j, 80], name] = np.nan
    for j, name in enumerate(model.categorical):
        df[name] = df[name].astype(object)
        df.loc[120 + j, name] = "never-seen-in-training"
        df.loc[130 + j, name] = None
        df.loc[140 + j, name] = np.nan
        df.loc[150 + j, name] = ""
    return df


def test_onnx_fp32_matches_torch_on_nan_and_unseen_values(
    model: TabularMLP, rows: pd.DataFrame, tmp_path: Path
) -> None:
    path = export_onnx(model, tmp_path / "model.fp32.onnx")
    assert onnx_parity(model, path, rows)["max_abs_diff"] <= 1e-5
    runtime = load_runtime("onnx", path)
    assert (runtime.name, runtime.variant) == ("onnxruntime", "fp32")
    p = runtime.predict(rows)
    assert p.dtype == np.float64 and p.shape == (len(rows),)
    # An empty batch is a valid batch.
    assert runtime.predict(rows.head(0)).shape == (0,)


def test_a_tampered_onnx_model_fails_parity(
    model: TabularMLP, rows: pd.DataFrame, tmp_path: Path
) -> None:
    import copy

    import torch

    from pipelines.optimize.onnx_export import OnnxExportError

    path = export_onnx(model, tmp_path / "model.fp32.onnx")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.mlp[-1].bias.add_(0.5)  # type: ignore[operator]
    with pytest.raises(OnnxExportError, match="differs from the torch model"):
        onnx_parity(other.eval(), path, rows)


def test_savedmodel_imputes_nan_itself(
    model: TabularMLP, rows: pd.DataFrame, tmp_path: Path
) -> None:
    out = export_saved_model(model, tmp_path / "saved_model")
    runtime = SavedModelRuntime(out)  # inputs from the signature, no torch model
    p_torch = predict_proba(model, rows)
    assert float(np.max(np.abs(runtime.predict(rows) - p_torch))) <= 1e-5
    # The client-side imputation still in saved_model_predict gives the same answer.
    assert float(np.max(np.abs(saved_model_predict(out, rows, model) - p_torch))) <= 1e-5


def test_int8_runs_close_to_fp32(model: TabularMLP, rows: pd.DataFrame, tmp_path: Path) -> None:
    fp32 = export_onnx(model, tmp_path / "model.fp32.onnx")
    int8 = quantize_int8(fp32, tmp_path / "model.int8.onnx")
    runtime = OrtRuntime(int8, threads=1)
    assert runtime.variant == "int8"
    p8, p32 = runtime.predict(rows), OrtRuntime(fp32).predict(rows)
    assert np.all(np.isfinite(p8))
    assert 0 < float(np.max(np.abs(p8 - p32))) < 0.05  # quantised, but not broken


def test_an_unknown_runtime_kind_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="savedmodel, onnx"):
        load_runtime("tensorrt", tmp_path)


def test_a_missing_feature_column_is_named(
    model: TabularMLP, rows: pd.DataFrame, tmp_path: Path
) -> None:
    runtime = OrtRuntime(export_onnx(model, tmp_path / "model.fp32.onnx"))
    with pytest.raises(KeyError, match="'amount'"):
        runtime.predict(rows.drop(columns=["amount"]))


# -- the optimize stage on a registered, exported version ------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, str]]:
    """A small model trained (one node, 2 epochs), evaluated, registered and exported."""
    with exported_version(tmp_path_factory.mktemp("optimize") / "mlops") as out:
        yield out


def test_optimize_version_measures_chooses_and_publishes_once(
    exported: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    s, version = exported
    store, reg = open_store(s.store), Registry(s.mlflow)
    doc = optimize_run.optimize_version(s, version, reps=60, throughput_reps=3)
    table = {r["name"]: r for r in doc["table"]}
    assert list(table) == ["savedmodel-fp32", "onnxruntime-fp32", "onnxruntime-int8"]
    base, fp32, int8 = table.values()
    assert fp32["max_abs_diff"] <= 1e-5 and fp32["agreement"] == 1.0
    assert abs(fp32["roc_auc"] - base["roc_auc"]) < 1e-6
    assert np.isfinite(int8["roc_auc"]) and int8["reasons"]  # its AUC delta is on record
    assert doc["onnx_parity_max_abs_diff"] <= 1e-5
    chosen = [r for r in doc["table"] if r["chosen"]]
    assert len(chosen) == 1
    assert (doc["chosen_runtime"], doc["chosen_variant"]) == (
        chosen[0]["runtime"],
        chosen[0]["variant"],
    )
    print(json.dumps(doc["table"], indent=1))  # the figures, for the log of a -s run
    # Artifacts in the store match their recorded sha256, paths relative to the export.
    prefix = layout.export(s.mlflow.model_name, version)
    for variant in ("fp32", "int8"):
        art = doc["artifacts"][variant]
        assert art["path"] == f"onnx/model.{variant}.onnx"
        assert store.sha256(f"{prefix}/{art['path']}") == art["sha256"]
    key = optimize_run.optimization_key(s.mlflow.model_name, version)
    assert json.loads(store.read_text(key)) == doc
    assert json.loads(store.read_text(f"{layout.evaluation(doc['run_id'])}/optimization.json"))
    # MLflow: table and plot on the version's run, the choice as model-version tags.
    run_id = reg.version_run_id(version)
    assert json.loads(reg.read_artifact(run_id, "optimization/table.json")) == doc["table"]
    assert reg.read_artifact(run_id, "optimization/latency.png").startswith(b"\x89PNG")
    tags = reg.version(version).tags
    assert tags[f"{TAG_PREFIX}batch_runtime"] == doc["chosen_runtime"]
    assert tags[f"{TAG_PREFIX}batch_variant"] == doc["chosen_variant"]

    # Published content never changes under its version: a second call reads, never measures.
    def no_measuring(*_: Any, **__: Any) -> None:
        raise AssertionError("a published version was measured again")

    monkeypatch.setattr(optimize_run, "measure", no_measuring)
    assert optimize_run.optimize_version(s, version) == doc
    assert json.loads(store.read_text(key)) == doc


def test_optimize_refuses_a_version_that_was_not_exported(exported: tuple[Settings, str]) -> None:
    s, _ = exported
    with pytest.raises(FileNotFoundError, match="export_and_infra_validate"):
        optimize_run.optimize_version(s, "999")
