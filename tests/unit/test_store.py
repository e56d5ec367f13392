"""The object-store adapter, run twice: on local files and on a moto S3 server."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from pipelines.config import StoreSettings
from pipelines.store import ObjectStore, StoreError, storage_options


def test_write_read_list_delete(store: ObjectStore) -> None:
    uri = store.write_text("a/b/one.txt", "1")
    store.write_bytes("a/b/two.bin", b"\x00\x01")
    assert uri == store.uri("a/b/one.txt")
    assert store.read_text("a/b/one.txt") == "1"
    assert abs(store.modified("a/b/one.txt") - time.time()) < 300
    assert store.read_bytes("a/b/two.bin") == b"\x00\x01"
    assert store.list("a/b") == ["a/b/one.txt", "a/b/two.bin"]
    assert store.list("a", recursive=True) == ["a/b/one.txt", "a/b/two.bin"]
    store.delete("a", recursive=True)
    assert not store.exists("a/b/one.txt")
    assert store.list("a") == []


def test_overwrite_leaves_no_temporary_objects(store: ObjectStore) -> None:
    for i in range(3):
        store.write_text("m/manifest.json", str(i))
    assert store.read_text("m/manifest.json") == "2"
    assert store.list("m") == ["m/manifest.json"]


def test_move_prefix(store: ObjectStore) -> None:
    store.write_text("landing/d/x.parquet", "x")
    store.write_text("landing/d/_validation/s.json", "{}")
    store.move("landing/d", "quarantine/d/1")
    assert not store.exists("landing/d/x.parquet")
    assert store.list("quarantine/d/1", recursive=True) == [
        "quarantine/d/1/_validation/s.json",
        "quarantine/d/1/x.parquet",
    ]


def test_put_and_get_dir_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"pb")
    (src / "variables" / "v.index").write_bytes(b"idx")
    store.put_dir(src, "exports/m/1")
    out = store.get_dir("exports/m/1", tmp_path / "out")
    assert (out / "saved_model.pb").read_bytes() == b"pb"
    assert (out / "variables" / "v.index").read_bytes() == b"idx"
    assert store.sha256("exports/m/1/saved_model.pb") == hashlib.sha256(b"pb").hexdigest()


def test_missing_key_names_the_uri(store: ObjectStore) -> None:
    with pytest.raises(StoreError, match=r"nope\.json"):
        store.read_text("nope.json")
    with pytest.raises(StoreError, match="does not exist"):
        store.move("nope", "elsewhere")


def test_keys_cannot_escape_the_root(store: ObjectStore) -> None:
    with pytest.raises(StoreError, match=r"'\.\.'"):
        store.write_text("../outside.txt", "x")


def test_uri_round_trip(store: ObjectStore) -> None:
    uri = store.uri("shards/d/v/manifest.json")
    assert store.key_of(uri) == "shards/d/v/manifest.json"
    with pytest.raises(StoreError):
        store.key_of("s3://other-bucket/x")


def test_s3_options_carry_endpoint_credentials_and_sse() -> None:
    cfg = StoreSettings(
        root="s3://b/p",
        endpoint_url="http://127.0.0.1:9",
        region="eu-west-1",
        key="k",
        secret="s",
        sse="aws:kms",
        sse_kms_key_id="alias/mlops",
    )
    opts = storage_options(cfg)
    assert opts["client_kwargs"] == {
        "endpoint_url": "http://127.0.0.1:9",
        "region_name": "eu-west-1",
    }
    assert (opts["key"], opts["secret"]) == ("k", "s")
    assert opts["s3_additional_kwargs"] == {
        "ServerSideEncryption": "aws:kms",
        "SSEKMSKeyId": "alias/mlops",
    }
    assert storage_options(StoreSettings(root="file:///tmp/x")) == {}


def test_server_side_encryption_reaches_every_s3_write(
    s3_bucket: str, moto_server: str, tmp_path: Path
) -> None:
    import boto3

    cfg = StoreSettings(
        root=f"s3://{s3_bucket}/enc",
        endpoint_url=moto_server,
        key="testing",
        secret="testing",
        sse="AES256",
    )
    store = ObjectStore.from_settings(cfg)
    store.write_text("a.json", "{}")
    (tmp_path / "f.bin").write_bytes(b"123")
    store.put_file(tmp_path / "f.bin", "b/f.bin")
    store.write_text("c/x.json", "{}")
    store.move("c", "moved/c")  # server-side copies must be encrypted too
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    for key in ("enc/a.json", "enc/b/f.bin", "enc/moved/c/x.json"):
        assert s3.head_object(Bucket=s3_bucket, Key=key)["ServerSideEncryption"] == "AES256"
