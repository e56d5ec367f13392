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
    coverage,
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


def beat(t: float, started: float | None = START - 600) -> str:
    """A heartbeat line as the data plane logs it (Envoy's check of its own listener)."""
    return json.dumps(
        {
            "time": f"{t:.3f}",
            "cluster": None,
            "code": 200,
            "path": "/_mlops/heartbeat",
            "listener": "primary",
            "plane": "-" if started is None else f"{started:.3f}",
        }
    )


def beats(frm: float, to: float, every: float = 10.0, **kw: float | None) -> list[str]:
    return [beat(frm + i * every, **kw) for i in range(int((to - frm) / every) + 1)]


def test_an_hour_without_traffic_is_published_empty(tmp_path: Path) -> None:
    store = ObjectStore(f"file://{tmp_path}/lake")
    m = ship_hour(store, SPEC, "m", DATE, HOUR, [], {}, grace_s=0, now=END)
    assert m["rows"] == 0 and m["parts"] == [] and published(store, "m", DATE, HOUR) is not None
    assert m["coverage"]["status"] == "unknown"  # heartbeats off: nothing says which it was


def test_heartbeats_tell_an_hour_without_traffic_from_one_nobody_saw(tmp_path: Path) -> None:
    store = ObjectStore(f"file://{tmp_path}/lake")
    quiet = beats(START - 30, END + 30)  # the data plane ran all hour; nobody called it
    m = ship_hour(store, SPEC, "m", DATE, HOUR, quiet, {}, grace_s=0, now=END + 60, heartbeat_s=10)
    assert m["rows"] == 0 and m["coverage"]["status"] == "complete"
    assert m["coverage"]["lines"] == 359 and m["coverage"]["gaps"] == []
    # The next hour's log never arrived: its lines are not there, nor are its heartbeats.
    nxt = ship_hour(
        store, SPEC, "m", DATE, HOUR + 1, quiet, {}, grace_s=0, now=END + 7200, heartbeat_s=10
    )
    assert nxt["rows"] == 0 and nxt["coverage"]["status"] == "missing"
    assert nxt["coverage"]["gaps"][0]["cause"] == "no_heartbeat"
    assert "did not arrive" in nxt["coverage"]["gaps"][0]["detail"]


def test_each_gap_in_the_heartbeats_is_named_with_its_cause() -> None:
    first = START - 600.0  # the data plane's first start, where the log begins
    down = [(t, first) for t in range(int(START), int(START) + 600, 10)]
    restarted = START + 900.0
    after = [(t, restarted) for t in range(int(restarted) + 1, int(START) + 1800, 10)]
    lost = [(t, restarted) for t in range(int(START) + 2400, int(END) + 30, 10)]
    cov = coverage(down + after + lost, first, START, END, 10)
    assert cov["status"] == "partial"
    causes = [(g["cause"], round(g["from"] - START), round(g["to"] - START)) for g in cov["gaps"]]
    assert causes == [("down", 590, 901), ("log_lost", 1791, 2400)]
    assert "started again at 14:15:00" in cov["gaps"][0]["detail"]
    # Before the data plane's first start is not a fault; a plane that stopped and never came
    # back is (the tail of the hour had no heartbeat).
    began = START + 1200.0
    cov = coverage(
        [(t, began) for t in range(int(began) + 1, int(START) + 3000, 10)], began, START, END, 10
    )
    assert [g["cause"] for g in cov["gaps"]] == ["not_started", "no_heartbeat"]
    assert cov["status"] == "partial" and 1780 < cov["observed_s"] < 1800
    # A log that does not open with a start (rotated, truncated) cannot excuse its silence.
    cov = coverage(
        [(t, START - 9e4) for t in range(int(began), int(END) + 30, 10)], None, START, END, 10
    )
    assert [g["cause"] for g in cov["gaps"]] == ["no_heartbeat"] and cov["status"] == "partial"
    # An open hour is covered up to now; short restarts (a config change) are no gap.
    blip = [(t, first) for t in range(int(START), int(START) + 300, 10)]
    blip += [(t, START + 302.0) for t in range(int(START) + 303, int(START) + 600, 10)]
    assert coverage(blip, first, START, START + 600, 10)["status"] == "complete"
    assert coverage([], None, START, END, 0)["status"] == "unknown"


def test_requests_show_the_log_flowing_too(tmp_path: Path) -> None:
    """A data plane started moments ago has logged requests but no heartbeat yet (the first
    comes an interval after the start): its requests cover the time they were logged."""
    store = ObjectStore(f"file://{tmp_path}/lake")
    began = START + 1200.0
    lines = [line(began + 3 + i / 10, f"r{i}", plane=f"{began:.3f}") for i in range(30)]
    m = ship_hour(
        store,
        SPEC,
        "m",
        DATE,
        HOUR,
        lines,
        {},
        grace_s=5,
        now=began + 8,
        open_hour=True,
        heartbeat_s=10,
    )
    assert m["rows"] == 30 and m["coverage"]["status"] == "complete", m["coverage"]
    assert [g["cause"] for g in m["coverage"]["gaps"]] == ["not_started"]


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
