"""Drift maths on plain arrays: PSI, KS, the reference's bins, and the verdict per feature."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.drift import (
    CHECK,
    PSI_BINS,
    bin_counts,
    categorical_drift,
    drift_check,
    ks_pvalue,
    numeric_drift,
    psi,
    quantile_edges,
)
from pipelines.data.spec import DriftSpec

SPEC = DriftSpec(psi_warn=0.1, psi_block=0.5, ks_alpha=0.001, block=True)


def _normal(loc: float = 0.0, n: int = 5000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc, 1.0, n)


def test_psi_of_identical_shares_is_zero_and_grows_with_the_shift() -> None:
    shares = np.array([0.1, 0.2, 0.3, 0.4])
    assert psi(shares, shares) == pytest.approx(0.0, abs=1e-12)
    assert psi(shares, 10 * shares) == pytest.approx(0.0, abs=1e-12)  # counts or shares
    small, large = psi(shares, shares[::-1] * 0.5 + shares * 0.5), psi(shares, shares[::-1])
    assert 0 < small < large
    # PSI is symmetric in its two sides: sum((a - e) * ln(a / e)).
    assert psi(shares, shares[::-1]) == pytest.approx(psi(shares[::-1], shares))


def test_psi_of_a_bin_empty_on_one_side_is_finite() -> None:
    assert np.isfinite(psi(np.array([0.5, 0.5, 0.0]), np.array([0.0, 0.5, 0.5])))


def test_psi_refuses_different_bins() -> None:
    with pytest.raises(ValueError, match=r"same bins.*\(3,\) and \(2,\)"):
        psi(np.array([1, 2, 3]), np.array([1, 2]))


def test_bin_counts_use_open_outer_bins_and_need_two_edges() -> None:
    counts = bin_counts([0.0, 1.0, 2.0, 3.0], np.array([-5.0, 0.5, 1.0, 2.5, 99.0]))
    assert counts.tolist() == [2, 1, 2]  # -5 in the first bin, 99 in the last, 1.0 opens bin 2
    with pytest.raises(ValueError, match="at least 2 edges, got 1"):
        bin_counts([1.0], np.array([1.0]))


def test_quantile_edges_split_the_reference_evenly_and_collapse_for_a_constant() -> None:
    x = _normal()
    edges = quantile_edges(x)
    assert len(edges) == PSI_BINS + 1
    counts = bin_counts(edges, x)
    assert counts.sum() == len(x) and counts.min() >= len(x) // PSI_BINS - 1
    assert quantile_edges(np.full(100, 3.0)).tolist() == [3.0]
    assert len(quantile_edges(np.array([]))) == 0


def test_ks_tells_a_shifted_sample_from_the_same_distribution() -> None:
    assert ks_pvalue(_normal(seed=1), _normal(seed=2)) > 0.01
    assert ks_pvalue(_normal(seed=1), _normal(1.0, seed=2)) < 1e-6


def test_numeric_drift_against_a_reference_profile_entry() -> None:
    ref = _normal(seed=1)
    entry = {"edges": list(quantile_edges(ref)), "sample": list(ref[:2000])}
    same = _normal(seed=2)
    value, p = numeric_drift(entry, bin_counts(entry["edges"], same), same)
    assert value < 0.02 and p > 0.001
    shifted = _normal(2.0, seed=2)
    value, p = numeric_drift(entry, bin_counts(entry["edges"], shifted), shifted)
    assert value > 1.0 and p < 1e-6


def test_numeric_drift_names_a_missing_profile_field() -> None:
    with pytest.raises(ValueError, match="no 'sample'"):
        numeric_drift({"edges": [0.0, 1.0]}, np.array([3]), np.array([0.5]))


def test_categorical_drift_counts_a_category_unseen_in_the_reference() -> None:
    ref = {"pos": 0.7, "online": 0.3}
    assert categorical_drift(ref, {"pos": 70, "online": 30}) == pytest.approx(0.0, abs=1e-12)
    new_value = categorical_drift(ref, {"pos": 70, "online": 20, "atm": 10})
    assert new_value > 0.5  # a near-empty reference bin weighs heavily
    assert categorical_drift(ref, {"pos": 70, "online": 30, "atm": 1}) < new_value
    with pytest.raises(ValueError, match="at least one current value"):
        categorical_drift(ref, {"pos": 0})


def test_no_drift_passes() -> None:
    r = drift_check("amount", 0.05, SPEC, ks_p=0.5)
    assert (r.check, r.column, r.severity, r.success, r.detail) == (
        CHECK,
        "amount",
        "block",
        True,
        "",
    )


def test_moderate_drift_warns_and_severe_significant_drift_blocks() -> None:
    moderate = drift_check("amount", 0.2, SPEC, ks_p=1e-9)
    assert (moderate.severity, moderate.success) == ("warn", False)
    assert moderate.detail == "PSI 0.200 >= 0.1 (moderate drift)"
    severe = drift_check("amount", 0.8, SPEC, ks_p=1e-9)
    assert (severe.severity, severe.success) == ("block", False)
    assert severe.detail == "PSI 0.800 >= 0.5 against the reference batch"


def test_severe_psi_only_warns_when_ks_does_not_confirm_it() -> None:
    r = drift_check("amount", 0.8, SPEC, ks_p=0.2)
    assert (r.severity, r.success) == ("warn", False) and "moderate" in r.detail


def test_without_a_ks_test_psi_alone_decides() -> None:
    r = drift_check("channel", 0.8, SPEC)
    assert (r.severity, r.success) == ("block", False)


def test_a_spec_that_never_blocks_on_drift_warns_instead() -> None:
    r = drift_check("amount", 0.8, DriftSpec(block=False), ks_p=1e-9)
    assert (r.severity, r.success) == ("warn", False)
    assert "against the reference batch" in r.detail
