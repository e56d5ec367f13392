"""Dataset specs load, and malformed ones fail with a message naming the field."""

import pytest

from pipelines.data.spec import SpecError, load_spec, parse_spec


def test_transactions_spec() -> None:
    spec = load_spec("transactions")
    assert spec.label == "is_fraud" and spec.key == "transaction_id" and spec.entity == "card_id"
    assert "amount" in spec.numeric_features and "channel" in spec.categorical_features
    assert spec.log_features == ["amount", "distance_km"]
    assert [c.name for c in spec.columns if c.pii] == ["memo"]
    assert spec.fingerprint() == load_spec("transactions").fingerprint()


def test_missing_required_field_is_named() -> None:
    with pytest.raises(SpecError, match="'label'"):
        parse_spec({"name": "x", "key": "id", "columns": {"id": {"type": "string"}}})


def test_reference_to_undeclared_column_is_named() -> None:
    raw = {
        "name": "x",
        "key": "id",
        "label": "y",
        "columns": {"id": {"type": "string"}, "f": {"type": "float", "feature": True}},
    }
    with pytest.raises(SpecError, match="'y' is referenced"):
        parse_spec(raw)


def test_unknown_type_is_named() -> None:
    raw = {"name": "x", "key": "id", "label": "id", "columns": {"id": {"type": "uuid"}}}
    with pytest.raises(SpecError, match="column 'id' has type 'uuid'"):
        parse_spec(raw)


def test_unknown_spec_lists_known_ones() -> None:
    with pytest.raises(SpecError, match="transactions"):
        load_spec("does_not_exist")


def test_repeated_category_is_named() -> None:
    # A repeated value would give one category two vocabulary positions (two embeddings).
    raw = {
        "name": "x",
        "key": "id",
        "label": "y",
        "columns": {
            "id": {"type": "string"},
            "y": {"type": "int", "values": [0, 1]},
            "c": {"type": "category", "feature": True, "values": ["a", "b", "a"]},
        },
    }
    with pytest.raises(SpecError, match=r"column 'c' lists \['a'\] more than once"):
        parse_spec(raw)
