"""Streaming statistics of a partition: leakage, drift against a reference, the profile; the
same figures however the rows are split into batches."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipelines.data.profile import (
    LabelCorrelation,
    PartitionStats,
    floats,
    value_counts,
)
from tests.data_helpers import tiny_spec

SPEC = tiny_spec()


def _table(n: int, seed: int = 0, shift: float = 0.0, leak: bool = False) -> pa.Table:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    amount = np.clip(rng.normal(40 + shift, 10, n), 0, 100)
    if leak:
        amount = 10.0 + 50.0 * y + rng.normal(0, 0.01, n)
    channel = rng.choice(["pos", "online"], n, p=[0.7, 0.3])
    return pa.table(
        {
            "id": [f"{seed}-{i}" for i in range(n)],
            "amount": amount,
            "channel": channel,
            "memo": [None] * n,
            "y": y,
        }
    )


def _stats(tables: list[pa.Table], ref: dict | None = None) -> PartitionStats:
    stats = PartitionStats(SPEC, ref)
    for t in tables:
        stats.add(t)
    return stats


def test_a_feature_that_is_the_label_is_leakage_and_noise_is_not() -> None:
    (leak,) = _stats([_table(2000, leak=True)]).leakage_checks()
    assert (leak.check, leak.column, leak.severity, leak.success) == (
        "label_leakage",
        "amount",
        "block",
        False,
    )
    assert leak.detail == "correlation with y is 1.000"
    (fine,) = _stats([_table(2000)]).leakage_checks()
    assert fine.success and fine.detail == ""


def test_no_leakage_verdict_without_two_label_classes_or_without_the_label() -> None:
    one_class = _table(500).set_column(4, "y", pa.array(np.zeros(500, dtype=int)))
    assert _stats([one_class]).leakage_checks() == []
    assert _stats([_table(500).drop_columns(["y"])]).leakage_checks() == []


def test_batches_give_the_figures_of_one_pass() -> None:
    whole = _table(3000, seed=4)
    ref = _stats([_table(3000, seed=5)]).profile()
    one = _stats([whole], ref)
    many = _stats([whole.slice(0, 1000), whole.slice(1000, 1500), whole.slice(2500)], ref)
    assert one.rows == many.rows == 3000
    assert one.bins["amount"].tolist() == many.bins["amount"].tolist()
    assert one.counts == many.counts
    assert one.corr["amount"].value() == pytest.approx(many.corr["amount"].value(), abs=1e-12)
    assert one.drift_checks()[1]["channel"] == many.drift_checks()[1]["channel"]


def test_drift_against_a_similar_reference_passes_and_a_shifted_batch_blocks() -> None:
    ref = _stats([_table(4000, seed=1)]).profile()
    checks, report = _stats([_table(4000, seed=2)], ref).drift_checks()
    assert {c.column for c in checks} == {"amount", "channel"} == set(report)
    assert all(c.success for c in checks), checks
    assert set(report["amount"]) == {"psi", "ks_pvalue"} and set(report["channel"]) == {"psi"}
    checks, report = _stats([_table(4000, seed=2, shift=30.0)], ref).drift_checks()
    (amount,) = [c for c in checks if c.column == "amount"]
    assert (amount.check, amount.severity, amount.success) == ("feature_drift", "block", False)
    assert report["amount"]["psi"] >= SPEC.drift.psi_block
    assert report["amount"]["ks_pvalue"] < SPEC.drift.ks_alpha


def test_no_reference_or_no_rows_means_no_drift_checks() -> None:
    assert _stats([_table(100)]).drift_checks() == ([], {})
    ref = _stats([_table(100)]).profile()
    assert _stats([], ref).drift_checks() == ([], {})


def test_a_column_missing_from_a_batch_is_left_to_the_schema_check() -> None:
    ref = _stats([_table(1000, seed=1)]).profile()
    stats = _stats([_table(1000, seed=2).drop_columns(["amount"])], ref)
    checks, report = stats.drift_checks()
    assert [c.column for c in checks] == ["channel"] and "amount" not in report
    assert stats.profile()["numeric"]["amount"] == {"edges": [], "sample": []}


def test_the_profile_holds_bins_shares_and_a_bounded_sample() -> None:
    prof = _stats([_table(5000)]).profile()
    assert prof["rows"] == 5000
    amount = prof["numeric"]["amount"]
    assert len(amount["edges"]) == 11 and amount["edges"] == sorted(amount["edges"])
    assert len(amount["sample"]) == 2000
    shares = prof["categorical"]["channel"]
    assert list(shares) == ["pos", "online"]  # the most common first
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["pos"] == pytest.approx(0.7, abs=0.03)


def test_label_correlation_matches_numpy_and_is_undefined_for_a_constant() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(1e6, 1, 1000), rng.normal(0, 1, 1000)
    y = y + 0.5 * (x - 1e6)
    acc = LabelCorrelation()
    for part in range(4):
        acc.add(x[part::4], y[part::4])
    assert acc.value() == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-9)
    const = LabelCorrelation()
    const.add(np.full(10, 2.0), y[:10])
    assert const.value() is None
    empty = LabelCorrelation()
    empty.add(np.array([np.nan]), np.array([1.0]))
    assert empty.value() is None


def test_floats_turn_nulls_and_text_that_is_not_a_number_into_nan() -> None:
    got = floats(pa.chunked_array([pa.array([1, None, 3])]))
    assert got[0] == 1.0 and np.isnan(got[1]) and got[2] == 3.0
    text = floats(pa.chunked_array([pa.array(["1.5", "abc", None])]))
    assert text[0] == 1.5 and np.isnan(text[1]) and np.isnan(text[2])


def test_value_counts_are_keyed_by_text_and_skip_nulls() -> None:
    assert value_counts(pa.chunked_array([["pos", None, "pos"], ["atm"]])) == {
        "pos": 2,
        "atm": 1,
    }
    assert value_counts(pa.chunked_array([pa.array([1, 1, 2])])) == {"1": 2, "2": 1}
