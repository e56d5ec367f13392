"""Great Expectations results of a partition's batches merged into one result per expectation,
then turned into check results and the partition's verdict: accepted, warned or blocked."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.data.batches import stable_hash
from pipelines.data.pii import mask_pii
from pipelines.data.results import CheckResult

PARTIAL = 20  # offending values kept per expectation (GE's SUMMARY size)
EXAMPLES = 10  # offending values a check result shows
ROW_COUNT = "expect_table_row_count_to_be_between"
DISTINCT = "expect_column_distinct_values_to_contain_set"
UNIQUE = "expect_column_values_to_be_unique"


def clean(v: Any) -> Any:
    """JSON- and renderer-safe values (pd.NA breaks GE's Data Docs renderer)."""
    if v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (pd.Timestamp, dt.datetime, dt.date)):
        return v.isoformat()
    return v


def merge_result(acc: dict[str, Any], new: dict[str, Any], offset: int) -> dict[str, Any]:
    """One expectation's running result with the next batch's (its first row at ``offset``)
    folded in. Counts add up; offending values are kept up to :data:`PARTIAL`. Inputs are left
    as they were."""
    kind = acc["expectation_config"]["type"]
    if new["expectation_config"]["type"] != kind:
        raise ValueError(
            f"Results out of order: {new['expectation_config']['type']} merged into {kind}."
        )
    out = {**acc, "result": dict(acc["result"])}
    a, b = out["result"], new["result"]
    out["success"] = acc["success"] and new["success"]
    # The first exception is the one reported.
    if new["exception_info"].get("raised_exception") and not acc["exception_info"].get(
        "raised_exception"
    ):
        out["exception_info"] = new["exception_info"]
    if kind == ROW_COUNT:
        a["observed_value"] = int(a.get("observed_value") or 0) + int(b.get("observed_value") or 0)
    elif "unexpected_count" in b:
        for k in ("element_count", "unexpected_count", "missing_count"):
            if k in b:
                a[k] = a.get(k, 0) + b[k]
        a["partial_unexpected_list"] = (
            a.get("partial_unexpected_list", []) + b.get("partial_unexpected_list", [])
        )[:PARTIAL]
        a["partial_unexpected_index_list"] = (
            a.get("partial_unexpected_index_list", [])
            + [offset + i for i in b.get("partial_unexpected_index_list", [])]
        )[:PARTIAL]
        counts: dict[Any, int] = {}
        for row in a.get("partial_unexpected_counts", []) + b.get("partial_unexpected_counts", []):
            counts[row["value"]] = counts.get(row["value"], 0) + row["count"]
        top = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))[:PARTIAL]
        a["partial_unexpected_counts"] = [{"value": v, "count": c} for v, c in top]
    elif not new["success"]:
        out["result"] = b  # a column-level result (observed dtype, mismatched columns)
    return out


def finish_result(d: dict[str, Any]) -> dict[str, Any]:
    """A merged result decided on the partition's figures: the row count against its bounds,
    the label's classes against the spec's, percentages recomputed, values made JSON-safe."""
    cfg = d["expectation_config"]
    kind, kwargs = cfg["type"], cfg["kwargs"]
    out = {**d, "result": dict(d["result"])}
    r = out["result"]
    if kind == ROW_COUNT:
        lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
        n = int(r.get("observed_value") or 0)
        out["success"] = (lo is None or n >= lo) and (hi is None or n <= hi)
    elif kind == DISTINCT:
        out["success"] = set(kwargs.get("value_set") or []) <= set(r.get("observed_value") or [])
    if "unexpected_count" in r:
        total, missing = r.get("element_count", 0), r.get("missing_count", 0)
        r["unexpected_percent"] = 100.0 * r["unexpected_count"] / max(total - missing, 1)
        r["unexpected_percent_total"] = 100.0 * r["unexpected_count"] / max(total, 1)
        r["unexpected_percent_nonmissing"] = r["unexpected_percent"]
        if "missing_count" in r:
            r["missing_percent"] = 100.0 * missing / max(total, 1)
    for k in ("partial_unexpected_list", "observed_value"):
        if isinstance(r.get(k), list):
            r[k] = [clean(v) for v in r[k]]
    if "partial_unexpected_counts" in r:
        r["partial_unexpected_counts"] = [
            {**row, "value": clean(row["value"])} for row in r["partial_unexpected_counts"]
        ]
    return out


def check_result(d: dict[str, Any], pii_columns: Collection[str] = ()) -> CheckResult:
    """One finished GE result as a check result; examples from PII columns are masked."""
    cfg = d["expectation_config"]
    severity = (cfg.get("meta") or {}).get("severity", "block")
    r = d.get("result") or {}
    exc = d.get("exception_info") or {}
    if exc.get("raised_exception"):
        detail = f"could not be evaluated: {exc.get('exception_message')}"
    elif "unexpected_count" in r:
        detail = f"{r['unexpected_count']} unexpected of {r.get('element_count')}"
        if "observed_value" in r:
            detail += f" (observed {r['observed_value']})"
    else:
        detail = f"observed {r.get('observed_value')}"
    mismatched = (r.get("details") or {}).get("mismatched")
    if mismatched:
        detail = f"columns differ from the spec: {mismatched}"
    column = cfg["kwargs"].get("column")
    return CheckResult(
        check=cfg["type"],
        column=column,
        severity=severity,
        success=bool(d["success"]),
        detail=detail if not d["success"] else "",
        examples=[
            mask_pii(clean(v)) if column in pii_columns else clean(v)
            for v in r.get("partial_unexpected_list") or []
        ][:EXAMPLES],
    )


def verdict(checks: Iterable[CheckResult]) -> str:
    """``blocked`` if a blocking check failed (the batch is quarantined), ``warned`` if any
    other failed, else ``accepted``."""
    failed = [c for c in checks if not c.success]
    if any(c.severity == "block" for c in failed):
        return "blocked"
    return "warned" if failed else "accepted"


class PartitionResults:
    """GE's results of each batch folded into the partition's, with what no batch sees alone.

    Row-wise expectations add up; the row count and the label's distinct values are decided on
    the totals; key uniqueness within a batch comes from GE and across batches from 64-bit
    hashes of every key (8 bytes a row, the one state that grows with the partition)."""

    def __init__(self, key: str):
        self.key = key
        self.merged: list[dict[str, Any]] = []
        self._distinct: dict[str, set[Any]] = {}
        self._key_hashes: list[np.ndarray] = []
        self.rows = 0
        self.batches = 0

    def add(self, dicts: list[dict[str, Any]], table: pa.Table) -> None:
        """One batch: GE's results for it (in the suite's order) and its rows."""
        if not self.merged:
            self.merged = dicts
            self._distinct = {
                d["expectation_config"]["kwargs"]["column"]: set()
                for d in dicts
                if d["expectation_config"]["type"] == DISTINCT
            }
        else:
            self.merged = [
                merge_result(acc, new, self.rows)
                for acc, new in zip(self.merged, dicts, strict=True)
            ]
        self._observe(table)

    def _observe(self, table: pa.Table) -> None:
        """What is decided on the whole partition: row count, key hashes, label classes."""
        names = set(table.column_names)
        if self.key in names:
            self._key_hashes.append(stable_hash(table.column(self.key)))
        for col in self._distinct:  # GE 1.24 reports no observed values for this one
            if col in names:
                values = pc.unique(table.column(col).drop_null()).to_pylist()
                self._distinct[col] |= {clean(v) for v in values}
        self.rows += table.num_rows
        self.batches += 1

    def _sorted_key_hashes(self) -> np.ndarray:
        """All key hashes as one array, sorted in place (one copy of 8 bytes a row)."""
        if len(self._key_hashes) != 1:
            h = np.concatenate(self._key_hashes) if self._key_hashes else np.zeros(0, np.uint64)
            self._key_hashes = [h]
            h.sort()
        return self._key_hashes[0]

    def duplicate_key_hashes(self) -> np.ndarray:
        """Hashes of keys seen more than once across batches (empty for a single batch, where
        GE's own count is exact). A 64-bit collision among 10M keys has odds of about 3e-6."""
        if self.batches < 2:
            return np.zeros(0, dtype=np.uint64)
        h = self._sorted_key_hashes()
        return np.unique(h[1:][h[1:] == h[:-1]])

    def _duplicate_rows(self) -> int:
        """Rows whose key occurs more than once (every row of a repeated key, as GE counts)."""
        h = self._sorted_key_hashes()
        same = h[1:] == h[:-1]
        dup = np.zeros(len(h), dtype=bool)
        dup[1:] |= same
        dup[:-1] |= same
        return int(dup.sum())

    def finish(self, duplicate_keys: list[Any] | None = None) -> list[dict[str, Any]]:
        """The partition's result per expectation, in the suite's order (see
        :func:`finish_result`). ``duplicate_keys``: values of the keys behind
        :meth:`duplicate_key_hashes`."""
        out = []
        for d in self.merged:
            cfg = d["expectation_config"]
            kind, column = cfg["type"], cfg["kwargs"].get("column")
            # A key column GE could not evaluate (missing, say) stays failed: the hashes of an
            # absent column say nothing about uniqueness.
            raised = (d.get("exception_info") or {}).get("raised_exception")
            if kind == UNIQUE and column == self.key and self.batches > 1 and not raised:
                n = self._duplicate_rows()
                partial = list(duplicate_keys or [])[:PARTIAL]
                r = {**d["result"], "unexpected_count": n, "partial_unexpected_list": partial}
                d = {**d, "success": n == 0, "result": r}
            if kind == DISTINCT:
                observed = sorted(self._distinct[column], key=str)
                d = {**d, "result": {**d["result"], "observed_value": observed}}
            out.append(finish_result(d))
        return out
