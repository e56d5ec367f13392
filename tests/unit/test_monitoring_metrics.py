"""An hour of the serving log's metrics: SLOs per version, feature and prediction drift of the
judged traffic, latency quantiles from the histogram, the same figures however the rows are
split, and a log file without a column of the schema refused by name."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import MonitoringSettings, StoreSettings
from pipelines.data.profile import PartitionStats
from pipelines.data.spec import load_spec
from pipelines.monitoring.metrics import (
    LATENCY_BINS,
    HourStats,
    ServingLogError,
    latency_bins,
    latency_quantiles,
    monitor_files,
    score_reference,
)
from pipelines.monitoring.schema import schema
from pipelines.store import ObjectStore, open_store

SPEC = load_spec("transactions")
CFG = MonitoringSettings()
CATEGORIES = {
    "merchant_category": ["grocery", "restaurants", "gas", "travel", "electronics", "gaming"],
    "channel": ["pos", "online", "atm"],
    "country": ["US", "GB", "DE", "FR", "OTHER"],
}


def _log(
    n: int,
    seed: int,
    version: int | None = 3,
    label: str = "stable",
    amount_scale: float = 1.0,
    score_shift: float = 0.0,
    error_share: float = 0.0,
    latency_ms: float = 20.0,
    error_code: int = 503,
) -> pa.Table:
    """``n`` single-instance requests as the serving log records them."""
    rng = np.random.default_rng(seed)
    status = np.where(rng.random(n) < error_share, error_code, 200).astype(np.int32)
    score = np.clip(rng.beta(1.2, 20.0, n) + score_shift, 0, 1)
    cols: dict[str, Any] = {
        "request_id": [f"{seed}-{i}" for i in range(n)],
        "instance": np.zeros(n, np.int32),
        "time": np.full(n, 1_790_000_000_000, "datetime64[ms]"),
        "key": [None] * n,
        "label": [label] * n,
        "version": [version] * n,
        "status": status,
        "latency_ms": rng.lognormal(np.log(latency_ms), 0.4, n),
        "score": pa.array(score, mask=status != 200),
        "amount": rng.lognormal(3.4, 1.1, n) * amount_scale,
        "hour": rng.integers(0, 24, n).astype(float),
        "card_age_days": np.floor(rng.gamma(1.5, 500.0, n)),
        "distance_km": rng.lognormal(2.0, 1.4, n),
        "txn_count_24h": rng.poisson(2.5, n).astype(float),
    }
    for name, values in CATEGORIES.items():
        cols[name] = rng.choice(values, n)
    return pa.table(cols).select(schema(SPEC).names).cast(schema(SPEC))


@pytest.fixture(scope="module")
def refs() -> tuple[dict[str, Any], dict[str, Any]]:
    """The champion's references: a training-like profile and evaluation-time scores."""
    ref = _log(20_000, seed=100)
    stats = PartitionStats(SPEC, None)
    stats.add(ref)
    scores = ref.column("score").to_numpy(zero_copy_only=False)
    return stats.profile(), score_reference(scores)


def _result(tables: list[pa.Table], refs: Any, **kw: Any) -> dict[str, Any]:
    stats = HourStats(SPEC, refs[0], refs[1], **kw)
    for t in tables:
        stats.add(t)
    return stats.result(CFG)


def test_healthy_traffic_drawn_like_the_reference_passes(refs: Any) -> None:
    out = _result([_log(5000, seed=1)], refs)
    assert out["drift"] is False and out["slo_breaches"] == []
    assert out["features"]["status"] == "judged" and out["features"]["drifted"] == []
    assert set(out["features"]["columns"]) == set(SPEC.features)
    assert all(c["status"] == "ok" for c in out["features"]["columns"].values())
    assert out["prediction"]["status"] == "judged" and not out["prediction"]["drifted"]
    v3 = out["versions"]["3"]
    assert (v3["instances"], v3["requests"], v3["errors"], v3["slo"]) == (5000, 5000, 0, "pass")
    assert [c["slo"] for c in v3["slo_checks"]] == ["error_rate", "p50_ms", "p99_ms"]
    assert all(c["passed"] for c in v3["slo_checks"])


def test_a_shifted_feature_drifts_and_the_others_do_not(refs: Any) -> None:
    out = _result([_log(5000, seed=1, amount_scale=5.0)], refs)
    assert out["features"]["drifted"] == ["amount"] and out["drift"] is True
    amount = out["features"]["columns"]["amount"]
    assert amount["psi"] >= SPEC.drift.psi_block and amount["ks_pvalue"] < SPEC.drift.ks_alpha
    assert not out["prediction"]["drifted"]


def test_shifted_scores_are_prediction_drift(refs: Any) -> None:
    out = _result([_log(5000, seed=1, score_shift=0.02)], refs)
    assert out["prediction"]["drifted"] is True and out["drift"] is True
    assert out["prediction"]["psi"] >= CFG.prediction_psi
    assert out["features"]["drifted"] == []


def test_an_error_rate_breach_is_the_failing_versions_alone(refs: Any) -> None:
    stable = _log(4000, seed=1, version=3)
    canary = _log(4000, seed=2, version=4, label="canary", error_share=0.05)
    out = _result([stable, canary], refs)
    v3, v4 = out["versions"]["3"], out["versions"]["4"]
    assert v3["slo"] == "pass" and v4["slo"] == "breach"
    assert 0.04 < v4["error_rate"] < 0.06
    assert [c["slo"] for c in v4["slo_checks"] if not c["passed"]] == ["error_rate"]
    assert [(b["version"], b["slo"]) for b in out["slo_breaches"]] == [("4", "error_rate")]
    assert out["labels"]["canary"]["versions"] == ["4"] and v4["labels"] == {"canary": 4000}
    assert out["labels"]["stable"]["instances"] == 4000
    assert out["features"]["rows"] == 4000  # drift judges the stable label only


def test_a_request_of_several_instances_is_one_answer(refs: Any) -> None:
    n = 4 * CFG.min_requests
    batch = _log(n, seed=1, error_share=1.0)
    instance = pa.array(np.arange(n, dtype=np.int32) % 4)  # 4 instances each
    out = _result([batch.set_column(1, "instance", instance)], refs)
    v3 = out["versions"]["3"]
    assert (v3["instances"], v3["requests"], v3["errors"]) == (800, 200, 200)
    assert v3["error_rate"] == 1.0 and v3["slo"] == "breach"
    # Too few requests are not judged, however many instances they carry.
    few = batch.slice(0, n - 4).set_column(1, "instance", instance.slice(0, n - 4))
    assert _result([few], refs)["versions"]["3"]["slo"] == "insufficient"


def test_a_client_error_is_not_the_models(refs: Any) -> None:
    out = _result([_log(1000, seed=1, error_share=0.05, error_code=400)], refs)
    v3 = out["versions"]["3"]
    assert v3["errors"] == 0 and v3["slo"] == "pass"


def test_the_served_slo_leaves_out_the_versions_canary_rows(refs: Any) -> None:
    stable = _log(1000, seed=1, version=3)
    canary = _log(1000, seed=2, version=3, label="canary", latency_ms=900.0)
    v3 = _result([stable, canary], refs)["versions"]["3"]
    assert v3["slo"] == "breach" and v3["served_slo"] == "pass"


def test_latency_breaches_and_too_few_instances_are_told_apart(refs: Any) -> None:
    slow = _log(1000, seed=1, latency_ms=300.0)
    few = _log(CFG.min_requests - 1, seed=2, version=None, error_share=1.0)
    out = _result([slow, few], refs)
    assert [c["slo"] for c in out["versions"]["3"]["slo_checks"] if not c["passed"]] == [
        "p50_ms",
        "p99_ms",
    ]
    unknown = out["versions"]["unknown"]
    assert unknown["slo"] == "insufficient" and unknown["slo_checks"] == []
    assert "min_requests 200 requests" in unknown["slo_detail"]
    assert {b["version"] for b in out["slo_breaches"]} == {"3"}
    assert list(out["versions"]) == ["3", "unknown"]


def test_drift_needs_min_requests_judged_rows_and_a_reference(refs: Any) -> None:
    out = _result([_log(CFG.min_requests - 1, seed=1, amount_scale=5.0)], refs)
    assert out["features"]["status"] == "insufficient" and out["drift"] is False
    assert out["prediction"]["status"] == "insufficient"
    stats = HourStats(SPEC, None, None)
    stats.add(_log(1000, seed=1))
    bare = stats.result(CFG)
    assert bare["features"]["status"] == bare["prediction"]["status"] == "no_reference"
    everyone = _result([_log(1000, seed=2, label="canary")], refs, labels=None)
    assert everyone["features"]["rows"] == 1000 and everyone["features"]["status"] == "judged"


def test_latency_quantiles_are_within_one_percent_of_exact() -> None:
    x = np.random.default_rng(0).lognormal(np.log(30.0), 1.0, 200_000)
    got = latency_quantiles(np.bincount(latency_bins(x), minlength=LATENCY_BINS))
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        exact = float(np.quantile(x, q))
        assert abs((got[name] or 0.0) - exact) / exact < 0.011, (name, got[name], exact)
    edges = latency_bins(np.array([0.0, -1.0, np.nan, 0.02, 5e6]))
    assert edges.tolist()[:3] == [0, 0, 0] and edges[3] > 0 and edges[4] == LATENCY_BINS - 1


def test_the_hours_latency_is_per_request_and_near_exact(refs: Any) -> None:
    hour = _log(20_000, seed=3, latency_ms=40.0)
    exact = np.quantile(hour.column("latency_ms").to_numpy(), [0.5, 0.9, 0.99])
    got = _result([hour], refs)["versions"]["3"]["latency_ms"]
    assert np.allclose([got["p50"], got["p90"], got["p99"]], exact, rtol=0.011, atol=0)


def test_one_table_or_ten_give_the_same_result(refs: Any) -> None:
    hour = pa.concat_tables(
        [_log(3000, seed=1), _log(1500, seed=2, version=4, label="canary", error_share=0.1)]
    )
    whole = _result([hour], refs)
    split = _result([hour.slice(i * 450, 450) for i in range(10)], refs)
    assert split == whole
    assert whole["rows"] == 4500 and whole["versions"]["4"]["errors"] > 0


def _write(store: ObjectStore, key: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=1000)
    store.write_bytes(key, buf.getvalue())


def test_files_are_read_in_batches_and_a_missing_column_is_named(tmp_path: Path, refs: Any) -> None:
    store = open_store(StoreSettings(root=f"file://{tmp_path}/lake"))
    hour = _log(3000, seed=1)
    _write(store, "serving_logs/m/a.parquet", hour.slice(0, 2000))
    _write(store, "serving_logs/m/b.parquet", hour.slice(2000))
    keys = ["serving_logs/m/a.parquet", "serving_logs/m/b.parquet"]
    out = monitor_files(store, keys, SPEC, refs[0], refs[1], CFG, batch_rows=700)
    assert out == {**_result([hour], refs), "files": 2}

    _write(store, "serving_logs/m/c.parquet", hour.drop_columns(["latency_ms", "country"]))
    with pytest.raises(ServingLogError) as err:
        monitor_files(store, [*keys, "serving_logs/m/c.parquet"], SPEC, refs[0], refs[1], CFG)
    message = str(err.value)
    assert store.uri("serving_logs/m/c.parquet") in message
    assert "latency_ms" in message and "country" in message and "a.parquet" not in message


def test_a_column_of_the_wrong_type_is_named(tmp_path: Path, refs: Any) -> None:
    store = open_store(StoreSettings(root=f"file://{tmp_path}/lake"))
    hour = _log(500, seed=1)
    text = pa.array(["fast"] * 500)
    _write(store, "h/x.parquet", hour.set_column(7, "latency_ms", text))
    with pytest.raises(ServingLogError, match=r"x\.parquet.*latency_ms \(string"):
        monitor_files(store, ["h/x.parquet"], SPEC, refs[0], refs[1], CFG)
