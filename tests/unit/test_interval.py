"""The partition's interval check on Arrow batches: what dt=D claims about event_time."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa

from pipelines.data.interval import CHECK, IntervalCheck

UTC = dt.UTC
DAY = dt.datetime(2026, 3, 1, tzinfo=UTC)


def _batch(*times: dt.datetime | None, tz: str | None = "UTC") -> pa.Table:
    typ = pa.timestamp("us", tz=tz)
    vals = [t if t is None or tz else t.replace(tzinfo=None) for t in times]
    return pa.table({"event_time": pa.array(vals, type=typ)})


def test_events_inside_the_day_pass() -> None:
    check = IntervalCheck("event_time", "2026-03-01")
    check.add(_batch(DAY, DAY + dt.timedelta(hours=23, minutes=59, seconds=59), None))
    r = check.result()
    assert (r.check, r.success, r.severity, check.rows) == (CHECK, True, "block", 2)


def test_events_days_away_block_and_name_column_interval_and_examples() -> None:
    for shift in (dt.timedelta(days=-3), dt.timedelta(days=3)):
        check = IntervalCheck("event_time", "2026-03-01")
        check.add(_batch(*(DAY + shift + dt.timedelta(minutes=i) for i in range(10))))
        r = check.result()
        assert not r.success and r.column == "event_time"
        assert "10 of 10 event_time values outside" in r.detail
        assert "[2026-03-01T00:00:00+00:00, 2026-03-02T00:00:00+00:00)" in r.detail
        assert len(r.examples) == 5 and r.examples[0] == (DAY + shift).isoformat()


def test_the_next_midnight_is_outside_and_late_events_within_tolerance_pass() -> None:
    check = IntervalCheck("event_time", "2026-03-01")
    check.add(_batch(DAY + dt.timedelta(days=1)))
    assert not check.result().success
    late = IntervalCheck("event_time", "2026-03-01", late_tolerance_s=7200)
    late.add(_batch(DAY - dt.timedelta(hours=1), DAY + dt.timedelta(hours=1)))
    assert late.result().success
    late.add(_batch(DAY - dt.timedelta(hours=3)))
    assert late.outside == 1 and "late_event_tolerance_s=7200" in late.result().detail


def test_naive_timestamps_are_read_as_utc_and_batches_accumulate() -> None:
    check = IntervalCheck("event_time", "2026-03-01")
    check.add(_batch(DAY, tz=None))
    check.add(_batch(DAY - dt.timedelta(seconds=1), tz=None))
    assert (check.rows, check.outside) == (2, 1)


def test_a_missing_or_mistyped_column_is_left_to_the_schema_checks() -> None:
    check = IntervalCheck("event_time", "2026-03-01")
    check.add(pa.table({"other": [1]}))
    check.add(pa.table({"event_time": ["2026-03-01"]}))
    assert check.result().success and check.rows == 0
