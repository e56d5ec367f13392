"""Great Expectations gate, quarantine and deterministic sharding on local files and on S3."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipelines.data import layout
from pipelines.data.generate import generate_partition
from pipelines.data.shard import SPLITS, load_manifest, read_split, shard_dataset
from pipelines.data.spec import load_spec
from pipelines.data.validate import ValidationBlocked, validate_partition
from pipelines.store import ObjectStore

pytestmark = pytest.mark.integration
SPEC = load_spec("transactions")


def test_clean_batch_is_accepted_and_profiled(store: ObjectStore) -> None:
    generate_partition(store, SPEC, "2026-11-01", 3000)
    summary = validate_partition(store, SPEC, "2026-11-01")
    assert summary.status == "accepted", summary.message()
    assert summary.rows == 3000
    report = f"{layout.validation_report('transactions', '2026-11-01')}"
    assert json.loads(store.read_text(f"{report}/summary.json"))["accepted"] is True
    assert "<html" in store.read_text(f"{report}/data_docs.html").lower()
    assert store.exists(f"{layout.reference('transactions', '2026-11-01')}/profile.json")


@pytest.mark.parametrize(
    ("defect", "check", "column"),
    [
        ("missing_column", "expect_table_columns_to_match_set", None),
        ("extra_column", "expect_table_columns_to_match_set", None),
        ("wrong_dtype", "expect_column_values_to_be_in_type_list", "amount"),
        ("nulls", "expect_column_values_to_not_be_null", "amount"),
        ("out_of_range", "expect_column_values_to_be_between", "amount"),
        ("unseen_category", "expect_column_values_to_be_in_set", "merchant_category"),
        ("duplicate_ids", "expect_column_values_to_be_unique", "transaction_id"),
        ("empty", "expect_table_row_count_to_be_between", None),
        ("corrupt", "readable_parquet", None),
        ("label_leakage", "label_leakage", "amount"),
        ("pii", "expect_column_values_to_not_match_regex_list", "memo"),
        ("single_class", "expect_column_distinct_values_to_contain_set", "is_fraud"),
    ],
)
def test_defect_is_blocked_and_quarantined(
    tmp_path: Path, defect: str, check: str, column: str | None
) -> None:
    store = ObjectStore(f"file://{tmp_path}/lake")
    generate_partition(store, SPEC, "2026-11-02", 2000, defect=defect)
    with pytest.raises(ValidationBlocked) as info:
        validate_partition(store, SPEC, "2026-11-02")
    summary = info.value.summary
    blocking = [(c.check, c.column) for c in summary.failures if c.severity == "block"]
    assert (check, column) in blocking, summary.message()
    message = str(info.value)
    assert check in message and (column is None or f"column={column}" in message)
    assert not store.exists(layout.landing("transactions", "2026-11-02"))
    moved = store.list(layout.quarantine("transactions", "2026-11-02"))
    assert len(moved) == 1
    assert store.exists(f"{moved[0]}/_validation/summary.json")
    assert not store.exists(layout.reference("transactions", "2026-11-02"))


def test_pii_values_are_masked_in_reports(tmp_path: Path) -> None:
    store = ObjectStore(f"file://{tmp_path}/lake")
    generate_partition(store, SPEC, "2026-11-02", 2000, defect="pii")
    with pytest.raises(ValidationBlocked) as info:
        validate_partition(store, SPEC, "2026-11-02")
    text = str(info.value) + json.dumps(info.value.summary.to_dict())
    moved = store.list(layout.quarantine("transactions", "2026-11-02"))[0]
    text += store.read_text(f"{moved}/_validation/data_docs.html")
    assert "jane.doe@example.com" not in text and "4111 1111 1111 1111" not in text
    assert "<email>" in text


def test_severe_drift_against_reference_is_blocked(tmp_path: Path) -> None:
    store = ObjectStore(f"file://{tmp_path}/lake")
    generate_partition(store, SPEC, "2026-11-01", 3000)
    validate_partition(store, SPEC, "2026-11-01")
    generate_partition(store, SPEC, "2026-11-02", 3000, defect="severe_drift")
    with pytest.raises(ValidationBlocked) as info:
        validate_partition(store, SPEC, "2026-11-02")
    drifted = {c.column for c in info.value.summary.failures if c.check == "feature_drift"}
    assert "amount" in drifted
    assert info.value.summary.drift["amount"]["psi"] >= SPEC.drift.psi_block


def test_unseen_country_only_warns(tmp_path: Path) -> None:
    """The spec marks country's unseen values as 'warn': reported, batch accepted."""
    store = ObjectStore(f"file://{tmp_path}/lake")
    generate_partition(store, SPEC, "2026-11-01", 2000)
    prefix = layout.landing("transactions", "2026-11-01")
    key = f"{prefix}/part-00000.parquet"
    from pipelines.data.generate import to_parquet_bytes
    from pipelines.data.validate import read_partition

    df, _ = read_partition(store, prefix)
    assert df is not None
    df.loc[:5, "country"] = "XX"
    store.write_bytes(key, to_parquet_bytes(df))
    summary = validate_partition(store, SPEC, "2026-11-01")
    assert summary.status == "warned"
    assert [(c.check, c.column) for c in summary.failures] == [
        ("expect_column_values_to_be_in_set", "country")
    ]


def test_sharding_is_deterministic_and_splits_by_entity(store: ObjectStore) -> None:
    generate_partition(store, SPEC, "2026-11-01", 6000)
    first = shard_dataset(store, SPEC, "2026-11-01", target_rows=1000, nodes=2)
    shard_bytes = {
        s["path"]: store.read_bytes(f"{store.key_of(first.base_uri)}/{s['path']}")
        for split in SPLITS
        for s in first.shards(split)
    }
    again = shard_dataset(store, SPEC, "2026-11-01", target_rows=1000, nodes=2)
    assert again.data_version == first.data_version
    for path, data in shard_bytes.items():
        assert store.read_bytes(f"{store.key_of(again.base_uri)}/{path}") == data
    assert sum(first.rows(s) for s in SPLITS) == 6000
    assert len(first.shards("train")) >= 4
    assert {s["node"] for s in first.shards("train")} == {0, 1}
    frames = {s: read_split(store, first, s) for s in SPLITS}
    cards = {s: set(f["card_id"]) for s, f in frames.items()}
    assert not (cards["train"] & cards["val"]) and not (cards["train"] & cards["test"])
    assert not (cards["val"] & cards["test"])
    loaded = load_manifest(store, first.uri)
    assert loaded.data["stats"]["amount"]["std"] > 0
    assert loaded.data["features"]["log1p"] == ["amount", "distance_km"]


def test_different_data_gives_a_different_version(tmp_path: Path) -> None:
    store = ObjectStore(f"file://{tmp_path}/lake")
    generate_partition(store, SPEC, "2026-11-01", 2000)
    a = shard_dataset(store, SPEC, "2026-11-01", 1000)
    generate_partition(store, SPEC, "2026-11-01", 2000, drift=0.5)
    b = shard_dataset(store, SPEC, "2026-11-01", 1000)
    assert a.data_version != b.data_version
    assert store.exists(store.key_of(a.uri)) and store.exists(store.key_of(b.uri))


def test_tampered_shard_fails_its_checksum(tmp_path: Path) -> None:
    from pipelines.data.shard import ManifestError

    store = ObjectStore(f"file://{tmp_path}/lake")
    generate_partition(store, SPEC, "2026-11-01", 2000)
    m = shard_dataset(store, SPEC, "2026-11-01", 1000)
    key = f"{store.key_of(m.base_uri)}/{m.shards('test')[0]['path']}"
    df = read_split(store, m, "test")
    from pipelines.data.generate import to_parquet_bytes

    store.write_bytes(key, to_parquet_bytes(pd.concat([df, df.head(1)])))
    with pytest.raises(ManifestError, match="sha256"):
        read_split(store, m, "test")
