"""Evaluation's expected difference of a candidate against the champion (pure)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.evaluate.expected import (
    describe,
    expected_difference,
    p_superiority,
    rank_correlation,
    summary_tags,
)


def test_one_model_against_itself() -> None:
    s = np.random.default_rng(0).beta(1, 8, 500)
    e = expected_difference(s, s, 0.3, 0.3, "4")
    assert e["agreement"] == 1.0 and e["rank_correlation"] == pytest.approx(1.0)
    assert e["p_superiority"] == 0.5  # every pair of rows counted both ways, ties a half
    assert e["abs_diff"]["max"] == 0.0 and e["champion_version"] == "4"
    assert e["flag_rate"]["candidate"] == e["flag_rate"]["champion"] == np.mean(s >= 0.3)


def test_p_superiority_is_the_share_of_pairs_with_ties_a_half() -> None:
    a, b = np.array([0.1, 0.5, 0.5, 0.9]), np.array([0.5, 0.2, 0.7])
    brute = np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])
    assert p_superiority(a, b) == pytest.approx(brute)
    assert p_superiority(b, a) == pytest.approx(1 - brute)


def test_each_model_decides_at_its_own_threshold() -> None:
    champ = np.linspace(0, 1, 101)
    e = expected_difference(champ / 2, champ, 0.25, 0.5)
    assert e["agreement"] == 1.0 and e["diff"]["p50"] < 0
    assert expected_difference(champ / 2, champ, 0.5, 0.5)["agreement"] < 1.0


def test_a_constant_answer_has_no_ranking() -> None:
    assert math.isnan(rank_correlation(np.full(10, 0.2), np.linspace(0, 1, 10)))
    e = expected_difference(np.full(10, 0.2), np.linspace(0, 1, 10), 0.5, 0.5, "1")
    assert summary_tags(e)["expected_rank_correlation"] is None
    assert "rank correlation none" in describe(e)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="paired scores needed"):
        expected_difference(np.zeros(3), np.zeros(4), 0.5, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        expected_difference(np.array([0.1, np.nan]), np.array([0.1, 0.2]), 0.5, 0.5)
