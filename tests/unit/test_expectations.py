"""The GE suite built from a spec (a checklist with a severity per item) and run on one batch;
a missing column or a malformed spec fails with a message naming the column."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

from pipelines.data.expectations import (
    PANDAS_TYPES,
    SuiteRunner,
    build_expectations,
    column_expectations,
    data_docs,
    ge_frame,
)
from pipelines.data.merge import PartitionResults, check_result, verdict
from pipelines.data.pii import PII_PATTERNS
from pipelines.data.results import CheckResult
from pipelines.data.spec import ColumnSpec, SpecError
from tests.data_helpers import tiny_spec

SPEC = tiny_spec()


def _checklist() -> list[tuple[str, str | None, str]]:
    return [
        (exp.expectation_type, getattr(exp, "column", None), severity)
        for exp, severity in build_expectations(SPEC)
    ]


def test_the_checklist_starts_with_the_table_key_and_label_checks() -> None:
    assert _checklist()[:4] == [
        ("expect_table_columns_to_match_set", None, "block"),
        ("expect_table_row_count_to_be_between", None, "block"),
        ("expect_column_values_to_be_unique", "id", "block"),
        ("expect_column_distinct_values_to_contain_set", "y", "block"),
    ]
    exp = build_expectations(SPEC)
    assert sorted(exp[0][0].column_set) == sorted(SPEC.column_names)
    assert exp[1][0].min_value == 2 and exp[3][0].value_set == [0, 1]


def test_each_column_gets_the_checks_its_spec_asks_for() -> None:
    by_column: dict[str | None, list[tuple[str, str]]] = {}
    for kind, column, severity in _checklist()[4:]:
        by_column.setdefault(column, []).append((kind, severity))
    assert by_column["amount"] == [
        ("expect_column_values_to_be_in_type_list", "block"),
        ("expect_column_values_to_not_be_null", "block"),
        ("expect_column_values_to_be_between", "block"),
    ]
    # An unseen channel only warns, as the spec says; the label's values always block.
    assert ("expect_column_values_to_be_in_set", "warn") in by_column["channel"]
    assert ("expect_column_values_to_be_in_set", "block") in by_column["y"]
    # memo is nullable PII text: no null check, a regex check against e-mails and cards.
    assert by_column["memo"] == [
        ("expect_column_values_to_be_in_type_list", "block"),
        ("expect_column_values_to_not_match_regex_list", "block"),
    ]
    (regex,) = [e for e, _ in column_expectations(SPEC.column("memo")) if hasattr(e, "regex_list")]
    assert regex.regex_list == PII_PATTERNS


def test_the_type_check_accepts_the_dtypes_of_the_spec_type() -> None:
    (type_check, _) = column_expectations(ColumnSpec("n", "int", nullable=True))[0]
    assert type_check.type_list == PANDAS_TYPES["int"]


@pytest.mark.parametrize("field", ["label", "key"])
def test_a_key_or_label_missing_from_the_columns_is_named(field: str) -> None:
    change: dict[str, Any] = {field: "target"}
    broken = replace(SPEC, **change)  # parse_spec would refuse it; code building one may not
    with pytest.raises(SpecError, match="no column 'target'"):
        build_expectations(broken)


def test_an_unknown_column_type_is_named() -> None:
    col = ColumnSpec("when", "date")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="Column 'when' has type 'date'"):
        column_expectations(col)


def test_ge_frame_shows_strings_as_arrow_strings_and_times_as_naive_utc() -> None:
    df = pd.DataFrame(
        {
            "s": pd.Series(["a", None], dtype="str"),
            "t": pd.to_datetime(["2026-11-01T01:00:00+01:00", None], utc=True),
            "n": [1.0, 2.0],
        }
    )
    out = ge_frame(df)
    assert out["s"].dtype == pd.StringDtype("pyarrow") and out["s"].isna().tolist() == [
        False,
        True,
    ]
    assert out["t"].dt.tz is None and out["t"][0] == pd.Timestamp("2026-11-01T00:00:00")
    assert out["n"].dtype == "float64"
    assert df["t"].dt.tz is not None  # the batch itself is left as it was


# -- the suite run by Great Expectations (one context for the module: about 2 s) ----------
@pytest.fixture(scope="module")
def runner() -> Iterator[SuiteRunner]:
    yield SuiteRunner(SPEC)


def _frame(**changes: list[object]) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "id": ["a", "b", "c", "d"],
            "amount": [1.0, 20.5, 99.0, 0.0],
            "channel": ["pos", "online", "pos", "pos"],
            "memo": [None, "gift", None, "order 42"],
            "y": [0, 1, 0, 0],
        }
    )
    for name, values in changes.items():
        df[name] = values
    return df


def _run(runner: SuiteRunner, df: pd.DataFrame) -> tuple[list[CheckResult], str]:
    dicts, result = runner.validate_frame(df)
    results = PartitionResults(SPEC.key)
    results.add(dicts, pa.Table.from_pandas(df, preserve_index=False))
    finished = results.finish()
    return [check_result(d, SPEC.pii_columns) for d in finished], data_docs(result, finished)


def test_a_clean_batch_passes_every_check_in_the_spec_order(runner: SuiteRunner) -> None:
    checks, html = _run(runner, _frame())
    assert [c for c in checks if not c.success] == []
    assert [(c.check, c.column) for c in checks] == [(k, col) for k, col, _ in _checklist()]
    assert verdict(checks) == "accepted" and "<html" in html.lower()


def test_a_column_missing_from_the_batch_is_named(runner: SuiteRunner) -> None:
    checks, _ = _run(runner, _frame().drop(columns=["amount"]))
    failed = [c for c in checks if not c.success]
    assert failed[0].check == "expect_table_columns_to_match_set"
    assert failed[0].detail == "columns differ from the spec: {'missing': ['amount']}"
    assert {c.column for c in failed[1:]} == {"amount"}
    assert verdict(checks) == "blocked"


def test_offending_values_are_reported_and_pii_masked_everywhere(runner: SuiteRunner) -> None:
    df = _frame(amount=[1.0, 250.0, 3.0, 4.0], memo=[None, "mail jane.doe@example.com", None, "ok"])
    checks, html = _run(runner, df)
    failed = {(c.check, c.column): c for c in checks if not c.success}
    assert set(failed) == {
        ("expect_column_values_to_be_between", "amount"),
        ("expect_column_values_to_not_match_regex_list", "memo"),
    }
    assert failed[("expect_column_values_to_be_between", "amount")].examples == [250.0]
    pii = failed[("expect_column_values_to_not_match_regex_list", "memo")]
    assert (pii.detail, pii.examples) == ("1 unexpected of 4", ["mail <email>"])
    assert "jane.doe@example.com" not in html and "<email>" in html


def test_an_unseen_category_only_warns(runner: SuiteRunner) -> None:
    checks, _ = _run(runner, _frame(channel=["pos", "fax", "pos", "pos"]))
    (failed,) = [c for c in checks if not c.success]
    assert (failed.column, failed.severity, failed.examples) == ("channel", "warn", ["fax"])
    assert verdict(checks) == "warned"
