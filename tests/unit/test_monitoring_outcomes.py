"""Realised performance: served scores from published serving-log hours joined with outcomes."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import MonitoringSettings
from pipelines.data import layout
from pipelines.data.spec import DatasetSpec, load_spec
from pipelines.monitoring.metrics import ServingLogError
from pipelines.monitoring.outcomes import (
    OutcomeError,
    first_answers,
    read_outcomes,
    realised_performance,
    served_scores,
)
from pipelines.monitoring.schema import schema
from pipelines.store import ObjectStore

MODEL = "fraud_detector"
DAY = "2026-11-01"
LANDED = ("2026-11-20", "2026-11-21")
EXPECTED = {"roc_auc": 0.95, "precision": 0.8}
N = 400
MONITORING = MonitoringSettings(min_labels=100)


@pytest.fixture
def spec() -> DatasetSpec:
    return load_spec("transactions")


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(f"file://{tmp_path}/lake")


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _log(
    spec: DatasetSpec, hour: int, keys: list[str], scores: np.ndarray, **cols: Any
) -> pa.Table:
    """Serving-log rows of one hour: one request per key, a minute apart, feature columns null."""
    n = len(keys)
    start = dt.datetime.fromisoformat(f"{DAY}T{hour:02d}:00:00+00:00")
    values: dict[str, Any] = {
        "request_id": [f"r-{hour}-{i}" for i in range(n)],
        "instance": [0] * n,
        "time": [start + dt.timedelta(seconds=i) for i in range(n)],
        "key": keys,
        "label": ["stable"] * n,
        "version": [3 + i % 2 for i in range(n)],
        "status": [200] * n,
        "latency_ms": [5.0] * n,
        "score": scores,
    }
    values.update(cols)
    full = schema(spec)
    arrays = [pa.array(values.get(f.name, [None] * n), f.type) for f in full]
    return pa.Table.from_arrays(arrays, schema=full)


def _write_hour(store: ObjectStore, hour: int, table: pa.Table, publish: bool = True) -> None:
    prefix = layout.serving_logs(MODEL, DAY, hour)
    store.write_bytes(f"{prefix}/part-00000.parquet", _parquet(table))
    if publish:
        manifest = {"parts": ["part-00000.parquet"], "rows": table.num_rows}
        store.write_text(f"{prefix}/_manifest.json", json.dumps(manifest))


def _write_outcomes(
    store: ObjectStore, spec: DatasetSpec, date: str, name: str, columns: dict[str, Any]
) -> str:
    key = f"{layout.outcomes(spec.name, date)}/{name}.parquet"
    return store.write_bytes(key, _parquet(pa.table(columns)))


def _keys(n: int = N, offset: int = 0) -> list[str]:
    return [f"t-{i:05d}" for i in range(offset, offset + n)]


def _labels(n: int = N) -> np.ndarray:
    return (np.arange(n) % 4 == 0).astype(np.int64)  # a quarter are fraud


def _lake(
    store: ObjectStore, spec: DatasetSpec, scores: np.ndarray, resend: np.ndarray | None = None
) -> None:
    """Hours 01 and 02 published (half the keys each), hour 00 left unpublished with the
    opposite scores an hour earlier, a stray part in hour 01 the manifest does not list, and the
    labels landing on two days."""
    half = N // 2
    keys, y = _keys(), _labels()
    _write_hour(store, 0, _log(spec, 0, keys, 1 - scores), publish=False)
    _write_hour(store, 1, _log(spec, 1, keys[:half], scores[:half]))
    _write_hour(store, 2, _log(spec, 2, keys[half:], scores[half:]))
    stray = f"{layout.serving_logs(MODEL, DAY, 1)}/part-99999.parquet"
    store.write_bytes(stray, _parquet(_log(spec, 1, keys, 1 - scores)))
    if resend is not None:  # every key answered again an hour later, differently
        _write_hour(store, 3, _log(spec, 3, keys, resend))
    _write_outcomes(store, spec, LANDED[0], "a", {spec.key: keys[:half], spec.label: y[:half]})
    _write_outcomes(store, spec, LANDED[1], "b", {spec.key: keys[half:], spec.label: y[half:]})


def _judge(store: ObjectStore, spec: DatasetSpec, **cfg: Any) -> dict[str, Any]:
    logged = served_scores(store, MODEL, [DAY])
    outcomes = read_outcomes(store, spec, LANDED)
    settings = MONITORING.model_copy(update=cfg)
    return realised_performance(logged, outcomes, 0.5, spec, EXPECTED, settings)


def _separating(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(0.2 + 0.6 * _labels() + rng.normal(0, 0.05, N), 0, 1)


# -- realised performance -------------------------------------------------------------------
def test_separating_scores_are_not_decayed_and_unpublished_hours_are_ignored(
    store: ObjectStore, spec: DatasetSpec
) -> None:
    _lake(store, spec, _separating())
    assert served_scores(store, MODEL, [DAY]).num_rows == N  # hour 00 and the stray part unread
    report = _judge(store, spec)
    overall = report["overall"]
    assert overall["n"] == N and overall["positives"] == N // 4
    assert overall["roc_auc"] > 0.99 and overall["precision"] > 0.95 and overall["recall"] > 0.95
    assert overall["status"] == "ok" and not overall["decayed"] and not report["decayed"]
    assert "realised ROC-AUC 1.000 over 400 matured labels >= evaluation 0.950" in overall["detail"]
    assert set(report["versions"]) == {"3", "4"}
    assert [g["n"] for g in report["versions"].values()] == [N // 2, N // 2]
    assert report["resent"] == 0 and report["labelled"] == N


def test_served_rows_can_be_kept_for_given_keys_only(store: ObjectStore, spec: DatasetSpec) -> None:
    _lake(store, spec, _separating())
    keys = pa.array(_keys(10))
    kept = served_scores(store, MODEL, [DAY], keys=keys)
    assert sorted(kept["key"].to_pylist()) == sorted(_keys(10))


def test_random_scores_are_decayed_with_the_reason(store: ObjectStore, spec: DatasetSpec) -> None:
    _lake(store, spec, np.random.default_rng(1).random(N))
    report = _judge(store, spec)
    overall = report["overall"]
    assert overall["status"] == "decayed" and overall["decayed"] and report["decayed"]
    assert overall["roc_auc"] < 0.7
    auc = next(j for j in overall["judgements"] if j["metric"] == "roc_auc")
    assert auc["decayed"] and auc["detail"].startswith("realised ROC-AUC 0.")
    assert auc["detail"].endswith("over 400 matured labels < evaluation 0.950 - 0.050")
    precision = next(j for j in overall["judgements"] if j["metric"] == "precision")
    assert precision["decayed"] and "realised precision 0." in overall["detail"]
    assert any(r.startswith("overall: realised ROC-AUC") for r in report["reasons"])
    assert any(r.startswith("version 3: ") for r in report["reasons"])


def test_too_few_labels_are_insufficient_not_decayed(store: ObjectStore, spec: DatasetSpec) -> None:
    _lake(store, spec, np.random.default_rng(1).random(N))
    report = _judge(store, spec, min_labels=N + 1)
    for group in [report["overall"], *report["versions"].values()]:
        assert group["status"] == "insufficient" and not group["decayed"]
        assert group["judgements"] == []
    assert report["overall"]["detail"] == "400 matured labels < min_labels 401: not judged"
    assert not report["decayed"]


def test_a_resent_key_keeps_its_first_answer(store: ObjectStore, spec: DatasetSpec) -> None:
    _lake(store, spec, _separating(), resend=1 - _separating())
    report = _judge(store, spec)
    assert report["resent"] == N and report["labelled"] == N
    assert report["overall"]["roc_auc"] > 0.99 and not report["decayed"]


def test_first_answers_orders_by_time_and_skips_errors() -> None:
    t = pa.timestamp("ms", tz="UTC")
    logged = pa.table(
        {
            "key": ["k", "k", "k", None, "j"],
            "version": [1, 1, 1, 1, 1],
            "score": [0.9, None, 0.1, 0.5, 0.4],
            "status": pa.array([200, 503, 200, 200, 200], pa.int32()),
            "time": pa.array([3000, 1000, 2000, 500, 4000], t),
        }
    )
    first = first_answers(logged)
    answers = dict(
        zip(first.column("key").to_pylist(), first.column("score").to_pylist(), strict=True)
    )
    assert answers == {"k": 0.1, "j": 0.4}


def test_a_manifest_that_disagrees_with_its_parts_fails(
    store: ObjectStore, spec: DatasetSpec
) -> None:
    _write_hour(store, 5, _log(spec, 5, _keys(10), np.zeros(10)))
    prefix = layout.serving_logs(MODEL, DAY, 5)
    store.write_text(
        f"{prefix}/_manifest.json", json.dumps({"parts": ["part-00000.parquet"], "rows": 11})
    )
    with pytest.raises(
        ServingLogError, match=r"hour=05: the parts hold 10 rows, the manifest says 11"
    ):
        served_scores(store, MODEL, [DAY])


# -- outcome feed defects -----------------------------------------------------------------
@pytest.mark.parametrize("drop", ["transaction_id", "is_fraud"])
def test_a_missing_outcome_column_names_file_and_column(
    store: ObjectStore, spec: DatasetSpec, drop: str
) -> None:
    columns = {spec.key: _keys(3), spec.label: [0, 1, 0]}
    del columns[drop]
    uri = _write_outcomes(store, spec, LANDED[0], "a", columns)
    with pytest.raises(OutcomeError, match=rf"^{re.escape(uri)}: column '{drop}' is missing"):
        read_outcomes(store, spec, LANDED)


@pytest.mark.parametrize(
    ("labels", "shown"), [([0, 2, 1], r"outside \{0, 1\}, e\.g\. 2"), ([0, None, 1], r"null")]
)
def test_a_label_that_is_not_0_or_1_names_file_column_and_value(
    store: ObjectStore, spec: DatasetSpec, labels: list[int | None], shown: str
) -> None:
    uri = _write_outcomes(store, spec, LANDED[0], "a", {spec.key: _keys(3), spec.label: labels})
    with pytest.raises(
        OutcomeError, match=rf"^{re.escape(uri)}: label column 'is_fraud' .*{shown}"
    ):
        read_outcomes(store, spec, LANDED)


def test_a_key_labelled_twice_in_one_file_names_file_column_and_key(
    store: ObjectStore, spec: DatasetSpec
) -> None:
    keys = ["t-1", "t-2", "t-1"]
    uri = _write_outcomes(store, spec, LANDED[0], "a", {spec.key: keys, spec.label: [0, 1, 1]})
    with pytest.raises(
        OutcomeError, match=rf"key column 'transaction_id' .*'t-1' 2 times in {re.escape(uri)}"
    ):
        read_outcomes(store, spec, LANDED)


def test_a_key_labelled_on_two_days_names_both_files(store: ObjectStore, spec: DatasetSpec) -> None:
    a = _write_outcomes(store, spec, LANDED[0], "a", {spec.key: ["t-1", "t-2"], spec.label: [0, 1]})
    b = _write_outcomes(store, spec, LANDED[1], "b", {spec.key: ["t-3", "t-2"], spec.label: [0, 1]})
    with pytest.raises(
        OutcomeError,
        match=rf"key column 'transaction_id' .*'t-2' in {re.escape(a)}, {re.escape(b)}",
    ):
        read_outcomes(store, spec, LANDED)
    assert read_outcomes(store, spec, LANDED[:1]).num_rows == 2  # each day alone is fine


def test_a_label_for_an_unknown_key_is_refused(store: ObjectStore, spec: DatasetSpec) -> None:
    _lake(store, spec, _separating())
    uri = _write_outcomes(store, spec, LANDED[1], "c", {spec.key: ["t-99999"], spec.label: [1]})
    with pytest.raises(
        OutcomeError,
        match=rf"^{re.escape(uri)}: labels for unknown keys: 1 .*'transaction_id'.*'t-99999'",
    ):
        _judge(store, spec)
    logged = served_scores(store, MODEL, [DAY])
    outcomes = read_outcomes(store, spec, LANDED)
    report = realised_performance(
        logged, outcomes, 0.5, spec, EXPECTED, MONITORING, allow_unknown_keys=True
    )
    assert report["unknown_keys"] == 1 and report["labelled"] == N


def test_a_drop_within_the_tolerance_is_not_decay(store: ObjectStore, spec: DatasetSpec) -> None:
    _lake(store, spec, np.random.default_rng(2).random(N))
    logged = served_scores(store, MODEL, [DAY])
    outcomes = read_outcomes(store, spec, LANDED)
    auc = realised_performance(logged, outcomes, 0.5, spec, {}, MONITORING)["overall"]["roc_auc"]

    def judged(expected: float) -> dict[str, Any]:
        report = realised_performance(
            logged, outcomes, 0.5, spec, {"roc_auc": expected}, MONITORING
        )
        return report["overall"]

    assert judged(auc + 0.04)["status"] == "ok"  # max_auc_drop is 0.05
    assert judged(auc + 0.06)["status"] == "decayed"
    assert judged(auc + 0.06)["detail"].endswith(f"< evaluation {auc + 0.06:.3f} - 0.050")
