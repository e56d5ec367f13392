"""The serving log: access-log lines to rows, and an hour published once, complete."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.data import layout
from pipelines.data.spec import load_spec
from pipelines.monitoring.logs import (
    ShippingError,
    hour_bounds,
    part_keys,
    published,
    records,
    ship_hour,
)
from pipelines.monitoring.schema import missing_columns, schema
from pipelines.store import ObjectStore

SPEC = load_spec("transactions")
DATE, HOUR = "2026-11-03", 14
START, END = hour_bounds(DATE, HOUR)
INSTANCE = {
    "amount": 12.5,
    "merchant_category": "grocery",
    "channel": "pos",
    "country": "US",
    "hour": 14,
    "card_age_days": 300,
    "distance_km": 2.0,
    "txn_count_24h": 3,
}


def line(t: float, rid: str, **over: object) -> str:
    rec = {
        "time": f"{t:.3f}",
        "cluster": "stable",
        "replica": "127.0.0.1:9001",
        "code": "200",
        "duration_us": "2500",
        "path": "/v1/models/fraud_detector/labels/stable:predict",
        "request_id": rid,
        "key": f"k-{rid}",
        "scores": "[[0.25]]",
        "instances": json.dumps([INSTANCE]),
        "version": "3",
        "listener": "primary",
    }
    rec.update(over)
    return json.dumps(rec)


def test_hour_bounds_are_utc() -> None:
    assert END - START == 3600
    assert START == 1793714400.0  # 2026-11-03T14:00:00Z
    with pytest.raises(ValueError, match=r"not in 0\.\.23"):
        hour_bounds(DATE, 24)


def test_rows_carry_features_scores_and_version_of_the_hour_only() -> None:
    lines = [
        line(START - 1, "before"),
        line(START + 5, "b"),
        line(START + 1, "a", cluster="canary", version="4", scores="[[0.75]]"),
        line(END, "after"),
        line(START + 9, "mirror", listener="shadow", cluster="canary"),
        line(START + 9, "status", path="/v1/models/fraud_detector"),
        "not json",
    ]
    table = records(lines, START, END, SPEC, {})
    assert table.schema == schema(SPEC) and not missing_columns(SPEC, table.schema)
    rows = table.to_pylist()
    assert [r["request_id"] for r in rows] == ["a", "b"]  # time order, this hour, primary only
    assert rows[0]["label"] == "canary" and rows[0]["version"] == 4 and rows[0]["score"] == 0.75
    assert rows[1]["key"] == "k-b" and rows[1]["latency_ms"] == 2.5
    assert rows[1]["amount"] == 12.5 and rows[1]["merchant_category"] == "grocery"


def test_errors_multi_instance_requests_and_a_missing_version() -> None:
    lines = [
        line(START + 1, "err", code="503", scores="", version=""),
        line(
            START + 2,
            "two",
            instances=json.dumps([INSTANCE, {**INSTANCE, "amount": [99.0]}]),
            scores="[[0.1], [0.9]]",
        ),
    ]
    rows = records(lines, START, END, SPEC, {"stable": 7}).to_pylist()
    assert rows[0]["status"] == 503 and rows[0]["score"] is None and rows[0]["version"] == 7
    assert [(r["instance"], r["amount"], r["score"]) for r in rows[1:]] == [
        (0, 12.5, 0.1),
        (1, 99.0, 0.9),
    ]


def test_an_hour_not_over_is_refused(tmp_path: Path) -> None:
    store = ObjectStore(f"file://{tmp_path}/lake")
    with pytest.raises(ShippingError, match="not over"):
        ship_hour(store, SPEC, "m", DATE, HOUR, [], {}, grace_s=5, now=END + 1)
    assert published(store, "m", DATE, HOUR) is None
    assert not store.list(layout.serving_logs("m"))


def test_an_hour_is_published_once_and_a_rerun_changes_nothing(tmp_path: Path) -> None:
    store = ObjectStore(f"file://{tmp_path}/lake")
    lines = [line(START + i, f"r{i}") for i in range(10)]
    first = ship_hour(store, SPEC, "m", DATE, HOUR, lines, {}, grace_s=5, now=END + 10)
    assert first["rows"] == 10 and first["labels"] == {"stable": 10}
    assert not first["already_published"]
    keys = part_keys(store, "m", DATE, HOUR)
    assert [k.rsplit("/", 1)[0] for k in keys] == [layout.serving_logs("m", DATE, HOUR)]
    assert keys[0].rsplit("/", 1)[1] == first["parts"][0]
    with store.open(keys[0]) as fh:
        assert pq.read_table(fh).num_rows == 10
    assert store.sha256(keys[0]) == first["sha256"][first["parts"][0]]
    # More lines for the hour turn up later (another plane's log): the published hour stands.
    again = ship_hour(store, SPEC, "m", DATE, HOUR, lines * 2, {}, grace_s=5, now=END + 99)
    assert again["already_published"] and again["rows"] == 10
    with store.open(keys[0]) as fh:
        assert pq.read_table(fh).num_rows == 10


def test_an_hour_without_traffic_is_published_empty(tmp_path: Path) -> None:
    store = ObjectStore(f"file://{tmp_path}/lake")
    m = ship_hour(store, SPEC, "m", DATE, HOUR, [], {}, grace_s=0, now=END)
    assert m["rows"] == 0 and m["parts"] == [] and published(store, "m", DATE, HOUR) is not None


def test_an_open_hour_is_shipped_only_when_asked_and_says_so(tmp_path: Path) -> None:
    store = ObjectStore(f"file://{tmp_path}/lake")
    lines = [line(START + 1, "a")]
    m = ship_hour(store, SPEC, "m", DATE, HOUR, lines, {}, grace_s=5, now=START + 2, open_hour=True)
    assert m["rows"] == 1 and m["open_hour"] is True
    closed = ship_hour(store, SPEC, "m", DATE, HOUR + 1, [], {}, grace_s=5, now=END + 3600 + 9)
    assert closed["open_hour"] is False


def test_an_hour_is_ready_to_ship_after_its_end_plus_the_ship_delay(local_settings) -> None:  # type: ignore[no-untyped-def]
    from pipelines import stages

    s = local_settings.model_copy(
        update={"monitoring": local_settings.monitoring.model_copy(update={"ship_delay_s": 600})}
    )
    assert stages.serving_log_ready_at(s, DATE, 14) == END + 600
    # Never before the data plane's own log flush, however small the delay is set.
    quick = s.model_copy(update={"monitoring": s.monitoring.model_copy(update={"ship_delay_s": 0})})
    assert stages.serving_log_ready_at(quick, DATE, 14) == END + s.dataplane.log_flush_ms / 1000
    assert stages.serving_log_ready(s, DATE, 14)  # an hour of 2026-11-03: long over
    now = dt.datetime.now(dt.UTC)
    assert not stages.serving_log_ready(s, now.date().isoformat(), now.hour)  # this hour
    assert stages.serving_log_ready(s, now.date().isoformat(), now.hour, open_hour=True)
