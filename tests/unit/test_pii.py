"""PII masking: each kind of personal data is masked in text; nothing else is touched."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from pipelines.data.pii import PII_KINDS, PII_PATTERNS, mask_pii


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("write to jane.doe@example.com today", "write to <email> today"),
        ("a.b+tag@mail.example.co.uk", "<email>"),
        ("card 4111 1111 1111 1111, used", "card <card-number>, used"),
        ("card 4111-1111-1111-1111", "card <card-number>"),
        ("4111111111111111", "<card-number>"),
        ("19 digits 4111111111111111111", "19 digits <card-number>"),
    ],
)
def test_each_kind_of_pii_is_masked(text: str, masked: str) -> None:
    assert mask_pii(text) == masked


def test_both_kinds_in_one_text_and_every_occurrence_are_masked() -> None:
    text = "x@y.io paid 5500 0000 0000 0004, then z@y.io"
    assert mask_pii(text) == "<email> paid <card-number>, then <email>"


def test_an_address_made_of_digits_is_masked_whole_not_as_a_card() -> None:
    assert mask_pii("4111111111111111@example.com") == "<email>"


@pytest.mark.parametrize(
    "value",
    ["order 42", "ref 123456789012", "call 555-0100", "user at example dot com", "", None, 42],
)
def test_text_without_pii_and_values_that_are_not_text_pass_unchanged(value: object) -> None:
    assert mask_pii(value) == value


def test_missing_values_pass_unchanged() -> None:
    assert mask_pii(pd.NA) is pd.NA


def test_the_gate_checks_exactly_the_patterns_that_are_masked() -> None:
    """GE's regex expectation uses PII_PATTERNS; a kind masked but not checked (or the reverse)
    would let personal data into the lake or into reports."""
    examples = {"email": "jane.doe@example.com", "card-number": "4111 1111 1111 1111"}
    assert set(examples) == set(PII_KINDS)
    for kind, example in examples.items():
        assert [p for p in PII_PATTERNS if re.search(p, example)] == [PII_KINDS[kind]]
        assert mask_pii(example) == f"<{kind}>"


def test_masking_a_card_number_keeps_the_text_around_it() -> None:
    assert mask_pii("card 4111 1111 1111 1111 used twice") == "card <card-number> used twice"
    assert mask_pii("ref 4111-1111-1111-1111.") == "ref <card-number>."
    assert mask_pii("order 123456789012 shipped") == "order 123456789012 shipped"  # 12 digits
