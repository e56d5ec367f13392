"""GE results merged over a partition's batches, turned into check results and a verdict.

The dicts are shaped as GE 1.x's ``to_json_dict()`` of a SUMMARY result."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines.data.merge import (
    DISTINCT,
    PARTIAL,
    ROW_COUNT,
    UNIQUE,
    PartitionResults,
    check_result,
    clean,
    finish_result,
    merge_result,
    verdict,
)
from pipelines.data.results import CheckResult

NOT_NULL = "expect_column_values_to_not_be_null"
IN_SET = "expect_column_values_to_be_in_set"
COLUMNS = "expect_table_columns_to_match_set"


def _ge(
    kind: str,
    success: bool = True,
    column: str | None = None,
    severity: str = "block",
    kwargs: dict[str, Any] | None = None,
    exception: str | None = None,
    **result: Any,
) -> dict[str, Any]:
    kw = dict(kwargs or {}) | ({"column": column} if column else {})
    return {
        "expectation_config": {"type": kind, "kwargs": kw, "meta": {"severity": severity}},
        "success": success,
        "result": result,
        "exception_info": (
            {"raised_exception": True, "exception_message": exception} if exception else {}
        ),
    }


def _rows(bad: list[Any], n: int, start: int = 0) -> dict[str, Any]:
    """A row-wise result: ``bad`` unexpected values among ``n`` rows, at indices from start."""
    counts: dict[Any, int] = {}
    for v in bad:
        counts[v] = counts.get(v, 0) + 1
    return {
        "element_count": n,
        "unexpected_count": len(bad),
        "missing_count": 0,
        "partial_unexpected_list": list(bad),
        "partial_unexpected_index_list": list(range(start, start + len(bad))),
        "partial_unexpected_counts": [{"value": v, "count": c} for v, c in counts.items()],
    }


def test_row_wise_counts_add_up_and_indices_move_by_the_batch_offset() -> None:
    a = _ge(NOT_NULL, False, "amount", **_rows([None], 100, start=5))
    b = _ge(NOT_NULL, False, "amount", **_rows([None, None], 50, start=0))
    before = copy.deepcopy((a, b))
    m = merge_result(a, b, offset=100)
    r = m["result"]
    assert (r["element_count"], r["unexpected_count"], r["missing_count"]) == (150, 3, 0)
    assert r["partial_unexpected_index_list"] == [5, 100, 101]
    assert r["partial_unexpected_counts"] == [{"value": None, "count": 3}]
    assert m["success"] is False
    assert (a, b) == before  # the inputs are left as they were


def test_offending_values_are_capped_and_the_most_frequent_kept() -> None:
    a = _ge(IN_SET, False, "channel", **_rows(["fax"] * 3 + [f"x{i}" for i in range(15)], 100))
    b = _ge(IN_SET, False, "channel", **_rows(["fax"] * 2 + [f"y{i}" for i in range(15)], 100))
    r = merge_result(a, b, 100)["result"]
    assert len(r["partial_unexpected_list"]) == len(r["partial_unexpected_index_list"]) == PARTIAL
    assert r["unexpected_count"] == 35
    assert r["partial_unexpected_counts"][0] == {"value": "fax", "count": 5}
    assert len(r["partial_unexpected_counts"]) == PARTIAL


def test_one_failed_batch_fails_the_merged_result_and_the_first_exception_is_kept() -> None:
    ok = _ge(NOT_NULL, True, "amount", **_rows([], 10))
    failed = _ge(NOT_NULL, False, "amount", **_rows([None], 10))
    assert merge_result(ok, failed, 10)["success"] is False
    assert merge_result(failed, ok, 10)["success"] is False
    first = _ge(NOT_NULL, False, "amount", exception="column 'amount' not found")
    second = _ge(NOT_NULL, False, "amount", exception="something else")
    merged = merge_result(merge_result(ok, first, 10), second, 20)
    assert merged["exception_info"]["exception_message"] == "column 'amount' not found"


def test_a_failed_column_level_result_replaces_a_passing_one() -> None:
    kind = "expect_column_values_to_be_in_type_list"
    ok = _ge(kind, True, "amount", observed_value="float64")
    bad = _ge(kind, False, "amount", observed_value="object")
    merged = merge_result(ok, bad, 10)
    assert (merged["success"], merged["result"]["observed_value"]) == (False, "object")
    assert merge_result(bad, ok, 10)["result"]["observed_value"] == "object"


def test_results_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match=f"{IN_SET} merged into {NOT_NULL}"):
        merge_result(_ge(NOT_NULL, column="amount"), _ge(IN_SET, column="amount"), 0)


def test_the_row_count_is_decided_on_the_partition_total() -> None:
    kw = {"min_value": 200}
    a = _ge(ROW_COUNT, False, kwargs=kw, observed_value=150)
    b = _ge(ROW_COUNT, False, kwargs=kw, observed_value=100)
    total = finish_result(merge_result(a, b, 150))
    assert (total["success"], total["result"]["observed_value"]) == (True, 250)
    short = finish_result(merge_result(a, _ge(ROW_COUNT, False, kwargs=kw, observed_value=10), 0))
    assert short["success"] is False
    (c,) = [check_result(short)]
    assert (c.check, c.success, c.detail) == (ROW_COUNT, False, "observed 160")


def test_finishing_recomputes_percentages_and_makes_values_json_safe() -> None:
    d = _ge(NOT_NULL, False, "amount", **_rows([pd.NA, np.int64(3)], 10))
    d["result"]["missing_count"] = 2
    out = finish_result(d)
    r = out["result"]
    assert r["unexpected_percent"] == pytest.approx(25.0)  # 2 of the 8 non-missing
    assert r["unexpected_percent_total"] == pytest.approx(20.0)
    assert r["missing_percent"] == pytest.approx(20.0)
    assert r["partial_unexpected_list"] == [None, 3]
    assert [row["value"] for row in r["partial_unexpected_counts"]] == [None, 3]
    assert d["result"]["partial_unexpected_list"][0] is pd.NA  # the input is unchanged


def test_clean_values() -> None:
    assert clean(pd.NA) is None and clean(pd.NaT) is None
    assert clean(np.float64(1.5)) == 1.5 and type(clean(np.int64(2))) is int
    assert clean(pd.Timestamp("2026-11-01T10:00:00Z")) == "2026-11-01T10:00:00+00:00"
    assert clean("x") == "x"


def test_a_failed_result_names_its_check_column_and_examples() -> None:
    d = _ge(NOT_NULL, False, "amount", **_rows([None, None], 40))
    c = check_result(finish_result(d))
    assert c == CheckResult(NOT_NULL, "amount", "block", False, "2 unexpected of 40", [None, None])
    passed = check_result(finish_result(_ge(NOT_NULL, True, "amount", **_rows([], 40))))
    assert passed.success and passed.detail == ""


def test_examples_from_pii_columns_are_masked_and_capped() -> None:
    bad = [f"mail u{i}@example.com" for i in range(12)]
    d = _ge("expect_column_values_to_not_match_regex_list", False, "memo", **_rows(bad, 100))
    masked = check_result(d, pii_columns=["memo"])
    assert masked.examples == ["mail <email>"] * 10
    assert check_result(d).examples[0] == "mail u0@example.com"  # not a PII column


def test_an_expectation_that_raised_says_why_and_mismatched_columns_are_named() -> None:
    d = _ge(NOT_NULL, False, "amount", exception='The column "amount" in BatchData does not exist.')
    c = check_result(d)
    assert (c.column, c.success) == ("amount", False)
    assert c.detail == 'could not be evaluated: The column "amount" in BatchData does not exist.'
    cols = _ge(COLUMNS, False, observed_value=["id", "y"])
    cols["result"]["details"] = {"mismatched": {"missing": ["amount"]}}
    assert check_result(cols).detail == "columns differ from the spec: {'missing': ['amount']}"


@pytest.mark.parametrize(
    ("severities", "status"),
    [
        ([("block", True), ("warn", True)], "accepted"),
        ([("block", True), ("warn", False)], "warned"),
        ([("block", False), ("warn", False)], "blocked"),
        ([("block", False)], "blocked"),
        ([], "accepted"),
    ],
)
def test_verdict(severities: list[tuple[str, bool]], status: str) -> None:
    checks = [CheckResult("c", None, sev, ok) for sev, ok in severities]
    assert verdict(checks) == status


def _batch_results(bad_channels: list[str], n: int, severity: str = "block") -> list[dict]:
    return [
        _ge(ROW_COUNT, True, kwargs={"min_value": 2}, observed_value=n),
        _ge(UNIQUE, True, "id", **_rows([], n)),
        _ge(DISTINCT, True, "y", kwargs={"value_set": [0, 1]}, observed_value=None),
        _ge(IN_SET, not bad_channels, "channel", severity, **_rows(bad_channels, n)),
    ]


def _table(ids: list[str], ys: list[int]) -> pa.Table:
    return pa.table({"id": ids, "y": ys})


@pytest.mark.parametrize(("severity", "status"), [("block", "blocked"), ("warn", "warned")])
def test_a_failure_in_a_later_batch_decides_the_partition(severity: str, status: str) -> None:
    results = PartitionResults("id")
    results.add(_batch_results([], 2, severity), _table(["a", "b"], [0, 1]))
    results.add(_batch_results(["fax"], 2, severity), _table(["c", "d"], [1, 0]))
    checks = [check_result(d) for d in results.finish()]
    assert verdict(checks) == status
    (failed,) = [c for c in checks if not c.success]
    assert (failed.check, failed.column, failed.severity) == (IN_SET, "channel", severity)
    assert failed.detail == "1 unexpected of 4" and failed.examples == ["fax"]
    assert (results.rows, results.batches) == (4, 2)
    assert checks[0].success  # 4 rows >= min_rows


def test_a_key_repeated_across_batches_fails_uniqueness_with_its_values() -> None:
    results = PartitionResults("id")
    results.add(_batch_results([], 3), _table(["a", "b", "c"], [0, 1, 0]))
    results.add(_batch_results([], 2), _table(["d", "b"], [1, 0]))
    assert len(results.duplicate_key_hashes()) == 1
    finished = results.finish(duplicate_keys=["b"])
    (unique,) = [check_result(d) for d in finished if d["expectation_config"]["type"] == UNIQUE]
    assert (unique.success, unique.detail, unique.examples) == (False, "2 unexpected of 5", ["b"])
    assert verdict([unique]) == "blocked"


def test_a_single_batch_keeps_ge_s_own_uniqueness_count() -> None:
    results = PartitionResults("id")
    results.add(_batch_results([], 3), _table(["a", "a", "c"], [0, 1, 0]))
    assert len(results.duplicate_key_hashes()) == 0
    (unique,) = [d for d in results.finish() if d["expectation_config"]["type"] == UNIQUE]
    assert unique["success"] is True  # as GE reported it for this batch


def test_label_classes_are_collected_over_batches() -> None:
    both = PartitionResults("id")
    both.add(_batch_results([], 2), _table(["a", "b"], [0, 0]))
    both.add(_batch_results([], 2), _table(["c", "d"], [1, 1]))
    (d,) = [d for d in both.finish() if d["expectation_config"]["type"] == DISTINCT]
    assert (d["success"], d["result"]["observed_value"]) == (True, [0, 1])
    one = PartitionResults("id")
    one.add(_batch_results([], 2), _table(["a", "b"], [0, 0]))
    one.add(_batch_results([], 2), _table(["c", "d"], [0, None]))  # type: ignore[list-item]
    (d,) = [d for d in one.finish() if d["expectation_config"]["type"] == DISTINCT]
    c = check_result(d)
    assert (c.success, c.detail) == (False, "observed [0]")


def test_batches_with_a_different_number_of_results_are_refused() -> None:
    results = PartitionResults("id")
    results.add(_batch_results([], 2), _table(["a", "b"], [0, 1]))
    with pytest.raises(ValueError):
        results.add(_batch_results([], 2)[:3], _table(["c", "d"], [0, 1]))


def test_a_key_column_ge_could_not_evaluate_stays_failed_over_batches() -> None:
    missing = 'The column "id" in BatchData does not exist.'

    def batch(n: int) -> list[dict]:
        out = _batch_results([], n)
        out[1] = _ge(UNIQUE, False, "id", exception=missing)
        return out

    results = PartitionResults("id")
    for ys in ([0, 1], [1, 0]):
        results.add(batch(2), pa.table({"y": ys}))
    (unique,) = [
        check_result(d) for d in results.finish() if d["expectation_config"]["type"] == UNIQUE
    ]
    assert (unique.success, unique.detail) == (False, f"could not be evaluated: {missing}")
    assert verdict([unique]) == "blocked"
