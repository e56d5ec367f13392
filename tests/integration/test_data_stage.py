"""Great Expectations gate, quarantine and deterministic sharding on local files and on S3."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines.config import Settings
from pipelines.data import layout
from pipelines.data.generate import generate_partition
from pipelines.data.results import ValidationBlocked
from pipelines.data.shard import SPLITS, load_manifest, read_split, shard_dataset
from pipelines.data.spec import load_spec
from pipelines.data.validate import validate_partition
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
        # A partition filed under dt=D whose events happened 3 days before or after D.
        ("stale_events", "event_time_in_partition_interval", "event_time"),
        ("future_events", "event_time_in_partition_interval", "event_time"),
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


def test_late_events_within_the_configured_tolerance_are_accepted(tmp_path: Path) -> None:
    import datetime as dt

    from pipelines.data.generate import transactions

    store = ObjectStore(f"file://{tmp_path}/lake")
    df = transactions(dt.date(2026, 11, 2), 2000)
    df.loc[:9, "event_time"] = df.loc[:9, "event_time"] - pd.Timedelta(hours=30)
    df.loc[10:19, "event_time"] = pd.Timestamp("2026-11-01T23:00:00+00:00")
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    store.write_bytes(
        f"{layout.landing('transactions', '2026-11-02')}/part-0.parquet", buf.getvalue()
    )
    summary = validate_partition(store, SPEC, "2026-11-02", late_tolerance_s=2 * 86400)
    assert summary.accepted, summary.message()
    with pytest.raises(ValidationBlocked) as info:  # no tolerance: the default
        validate_partition(store, SPEC, "2026-11-02")
    (failed,) = [c for c in info.value.summary.failures if c.column == "event_time"]
    assert "20 of 2000 event_time values outside" in failed.detail, failed.detail


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

    df = pq.read_table(io.BytesIO(store.read_bytes(key))).to_pandas()
    df.loc[:5, "country"] = "XX"
    store.write_bytes(key, to_parquet_bytes(df))
    summary = validate_partition(store, SPEC, "2026-11-01")
    assert summary.status == "warned"
    assert [(c.check, c.column) for c in summary.failures] == [
        ("expect_column_values_to_be_in_set", "country")
    ]


def test_sharding_is_deterministic_and_splits_by_entity(store: ObjectStore) -> None:
    generate_partition(store, SPEC, "2026-11-01", 6000)
    first = shard_dataset(store, SPEC, "2026-11-01", target_rows=1000)
    shard_bytes = {
        s["path"]: store.read_bytes(f"{store.key_of(first.base_uri)}/{s['path']}")
        for split in SPLITS
        for s in first.shards(split)
    }
    again = shard_dataset(store, SPEC, "2026-11-01", target_rows=1000)
    assert again.data_version == first.data_version
    for path, data in shard_bytes.items():
        assert store.read_bytes(f"{store.key_of(again.base_uri)}/{path}") == data
    assert sum(first.rows(s) for s in SPLITS) == 6000
    assert len(first.shards("train")) >= 4
    frames = {s: read_split(store, first, s) for s in SPLITS}
    cards = {s: set(f["card_id"]) for s, f in frames.items()}
    assert not (cards["train"] & cards["val"]) and not (cards["train"] & cards["test"])
    assert not (cards["val"] & cards["test"])
    loaded = load_manifest(store, first.uri)
    assert loaded.data["stats"]["amount"]["std"] > 0
    assert loaded.data["features"]["log1p"] == ["amount", "distance_km"]


def test_the_node_count_plays_no_part_in_the_published_data_set(tmp_path: Path) -> None:
    """Content-addressed means immutable: the sharder never sees a node count, so the same rows
    publish the same bytes under the same version however many nodes train on them. Ranks split
    the train rows at training time (train.partition.rank_rows), a single shard included."""
    from pipelines.train.partition import rank_rows

    store = ObjectStore(f"file://{tmp_path}/lake")
    generate_partition(store, SPEC, "2026-11-01", 4000)
    many = shard_dataset(store, SPEC, "2026-11-01", target_rows=500)
    published = store.read_bytes(store.key_of(many.uri))
    one = shard_dataset(store, SPEC, "2026-11-01", target_rows=250_000)
    assert len(many.shards("train")) == 6 and len(one.shards("train")) == 1
    assert one.data_version != many.data_version
    assert store.read_bytes(store.key_of(many.uri)) == published
    for m in (many, one):
        sizes = [s["rows"] for s in m.shards("train")]
        for world in (1, 2, 12):
            got = [sum(p.stop - p.start for p in rank_rows(sizes, r, world)) for r in range(world)]
            assert all(got) and sum(got) == m.rows("train"), (world, got)


def test_different_data_gives_a_different_version(tmp_path: Path) -> None:
    store = ObjectStore(f"file://{tmp_path}/lake")
    generate_partition(store, SPEC, "2026-11-01", 2000)
    a = shard_dataset(store, SPEC, "2026-11-01", 1000)
    generate_partition(store, SPEC, "2026-11-01", 2000, drift=0.5, overwrite=True)
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


def _landing_frame(store: ObjectStore, date: str) -> pd.DataFrame:
    key = f"{layout.landing('transactions', date)}/part-00000.parquet"
    return pq.read_table(io.BytesIO(store.read_bytes(key))).to_pandas()


def _write_landing(store: ObjectStore, date: str, parts: list[pd.DataFrame]) -> None:
    from pipelines.data.generate import to_parquet_bytes

    prefix = layout.landing("transactions", date)
    store.delete(prefix, recursive=True)
    for i, part in enumerate(parts):
        store.write_bytes(f"{prefix}/part-{i:05d}.parquet", to_parquet_bytes(part))


def test_batched_validation_gives_the_one_batch_verdict(tmp_path: Path) -> None:
    """Checks merged over 400-row batches equal one pass over the whole partition, including a
    duplicate key whose two rows sit in different batches (only the hash check can see it), in
    the spec's order of checks."""
    runs = {"one": 1_000_000, "many": 400}
    stores = {n: ObjectStore(f"file://{tmp_path}/{n}") for n in runs}
    generate_partition(stores["one"], SPEC, "2026-11-03", 3000)
    df = _landing_frame(stores["one"], "2026-11-03")
    df.loc[2900, "transaction_id"] = df.loc[10, "transaction_id"]
    df.loc[[5, 1500, 2999], "amount"] = None
    df.loc[[7, 2200], "memo"] = "write to jane.doe@example.com"
    df.loc[2700, "channel"] = "carrier-pigeon"
    for store in stores.values():
        _write_landing(store, "2026-11-03", [df])
    verdicts, orders = [], []
    for name, batch_rows in runs.items():
        with pytest.raises(ValidationBlocked) as info:
            validate_partition(stores[name], SPEC, "2026-11-03", batch_rows)
        summary = info.value.summary
        verdicts.append(
            [(c.check, c.column, c.detail, tuple(c.examples)) for c in summary.failures]
        )
        orders.append([(c.check, c.column) for c in summary.checks])
    assert verdicts[0] == verdicts[1]
    assert orders[0] == orders[1]
    assert orders[0][:4] == [  # the spec's order: table checks, key, label, then by column
        ("expect_table_columns_to_match_set", None),
        ("expect_table_row_count_to_be_between", None),
        ("expect_column_values_to_be_unique", "transaction_id"),
        ("expect_column_distinct_values_to_contain_set", "is_fraud"),
    ]
    failed = {(check, column): detail for check, column, detail, _ in verdicts[1]}
    assert failed[("expect_column_values_to_be_unique", "transaction_id")].startswith(
        "2 unexpected"
    )
    assert failed[("expect_column_values_to_not_be_null", "amount")].startswith("3 unexpected")
    assert failed[("expect_column_values_to_not_match_regex_list", "memo")].startswith(
        "2 unexpected"
    )


def test_sharding_depends_on_rows_only_not_on_batches_or_files(tmp_path: Path) -> None:
    """The same rows in one file or in two reversed files, read in any batch size, give the
    same shards and data version (rows are placed by hash and sorted by key within a shard)."""
    store = ObjectStore(f"file://{tmp_path}/lake")
    generate_partition(store, SPEC, "2026-11-01", 5000)
    whole = shard_dataset(store, SPEC, "2026-11-01", target_rows=800)
    small = shard_dataset(store, SPEC, "2026-11-01", 800, batch_rows=333)
    df = _landing_frame(store, "2026-11-01")
    _write_landing(store, "2026-11-01", [df.iloc[2500:].iloc[::-1], df.iloc[:2500]])
    split_files = shard_dataset(store, SPEC, "2026-11-01", 800, batch_rows=1000)
    one_thread = shard_dataset(store, SPEC, "2026-11-01", 800, batch_rows=700, workers=1)
    assert whole.data_version == small.data_version == split_files.data_version
    assert one_thread.data_version == whole.data_version
    sizes = [s["rows"] for s in whole.shards("train")]
    assert len(sizes) == 5 and min(sizes) > 0.5 * 800 and max(sizes) < 1.5 * 800
    assert sum(whole.rows(s) for s in SPLITS) == 5000
    train = read_split(store, whole, "train")
    assert whole.data["splits"]["train"]["positives"] == int(train["is_fraud"].sum())
    expected = np.log1p(train["amount"].clip(lower=0))
    assert whole.data["stats"]["amount"]["mean"] == pytest.approx(expected.mean(), rel=1e-9)
    assert whole.data["stats"]["amount"]["std"] == pytest.approx(expected.std(ddof=0), rel=1e-9)


def test_every_object_the_data_stage_writes_on_s3_is_encrypted(
    local_settings: Settings, moto_server: str, s3_bucket: str
) -> None:
    """SSE settings reach every write: landing, reports, Data Docs, reference profile, shards,
    manifest, quarantine (a copy) and the audit trail, read back from the S3 server's metadata."""
    import boto3

    from pipelines import stages
    from pipelines.config import with_overrides

    store = {"root": f"s3://{s3_bucket}/lake", "endpoint_url": moto_server, "key": "testing"}
    store |= {"secret": "testing", "sse": "aws:kms", "sse_kms_key_id": "alias/mlops-lake"}
    # Three record batches, read through s3fs.
    settings = with_overrides(local_settings, store=store, data={"batch_rows": 1000})
    stages.generate_data(settings, "2026-11-01", rows=3000)
    assert stages.validate_data(settings, "2026-11-01")["batches"] == 3
    stages.shard_data(settings, "2026-11-01")
    stages.generate_data(settings, "2026-11-02", rows=3000, defect="nulls")
    with pytest.raises(ValidationBlocked):
        stages.validate_data(settings, "2026-11-02")
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
        for o in page.get("Contents", [])
    ]
    kinds = {k.split("/")[1] for k in keys}
    assert {"landing", "reference", "shards", "quarantine", "audit"} <= kinds, kinds
    for key in keys:
        head = s3.head_object(Bucket=s3_bucket, Key=key)
        assert head.get("ServerSideEncryption") == "aws:kms", key
        assert "alias/mlops-lake" in head.get("SSEKMSKeyId", ""), key
