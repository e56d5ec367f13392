"""The interval a partition claims: every event of ``dt=D`` happened in ``[D, D+1)`` (UTC),
or at most ``late_tolerance_s`` before D (late arrivals). Streamed over record batches."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.data.results import CheckResult

CHECK = "event_time_in_partition_interval"
MAX_EXAMPLES = 5


class IntervalCheck:
    """Counts events of ``column`` outside the partition's interval, with a few examples."""

    def __init__(self, column: str, date: str, late_tolerance_s: float = 0.0):
        day = dt.datetime.fromisoformat(date[:10]).replace(tzinfo=dt.UTC)
        self.column = column
        self.start = day - dt.timedelta(seconds=late_tolerance_s)
        self.end = day + dt.timedelta(days=1)
        self.tolerance_s = late_tolerance_s
        self.rows = self.outside = 0
        self.examples: list[str] = []

    def add(self, table: pa.Table) -> None:
        if self.column not in table.column_names or table.num_rows == 0:
            return  # a missing column is the schema check's finding
        col = table.column(self.column)
        if not pa.types.is_timestamp(col.type):
            return  # a wrong type is the type check's finding
        micros = pc.cast(col, pa.timestamp("us")).cast(pa.int64())  # naive means UTC
        values = micros.to_numpy(zero_copy_only=False).astype("float64")
        known = ~np.isnan(values) if values.dtype.kind == "f" else np.ones(len(values), bool)
        start_us = self.start.timestamp() * 1e6
        end_us = self.end.timestamp() * 1e6
        bad = known & ((values < start_us) | (values >= end_us))
        self.rows += int(known.sum())
        self.outside += int(bad.sum())
        for v in values[bad][: MAX_EXAMPLES - len(self.examples)]:
            when = dt.datetime.fromtimestamp(v / 1e6, tz=dt.UTC)
            self.examples.append(when.isoformat())

    def result(self) -> CheckResult:
        interval = f"[{self.start.isoformat()}, {self.end.isoformat()})"
        detail = (
            f"{self.outside} of {self.rows} {self.column} values outside the partition's "
            f"interval {interval} (data.late_event_tolerance_s={self.tolerance_s:g})"
        )
        return CheckResult(
            check=CHECK,
            column=self.column,
            severity="block",
            success=self.outside == 0,
            detail=detail if self.outside else "",
            examples=list(self.examples),
        )
