"""The hash-chained audit log, run twice (local files, moto S3), and ``mlops audit``."""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from pipelines import audit
from pipelines.audit import GENESIS, AuditError, AuditLog, default_actor, entry_hash, entry_key
from pipelines.cli import main
from pipelines.store import ObjectStore

EVENTS: list[tuple[str, str, dict[str, Any]]] = [
    ("data.accepted", "transactions/2026-11-01", {"rows": 3000, "status": "accepted"}),
    ("model.registered", "fraud_detector/1", {"run_id": "r1", "data_version": "abc"}),
    ("rollout.canary_staged", "fraud_detector/1", {"stable": None, "canary": 1}),
    ("rollout.promoted", "fraud_detector/1", {"previous_stable": None}),
]


def _chain(store: ObjectStore) -> AuditLog:
    log = AuditLog(store)
    for event, subject, details in EVENTS:
        log.append(event, subject, details, actor="tester@ci")
    return log


def _rewrite(store: ObjectStore, seq: int, rehash: bool = False, **changes: object) -> None:
    """Tamper with a stored entry the way someone with write access to the bucket could."""
    fields = json.loads(store.read_text(entry_key(seq)))
    fields.update(changes)
    if rehash:
        fields["hash"] = entry_hash(fields)
    store.write_text(entry_key(seq), json.dumps(fields))


def test_a_chain_of_entries_verifies(store: ObjectStore) -> None:
    log = _chain(store)
    result = log.verify()
    assert result.ok, result.summary()
    assert (result.entries, result.head_seq, result.first_bad_seq) == (4, 3, None)
    entries = log.entries()
    assert [e["seq"] for e in entries] == [0, 1, 2, 3]
    assert [e["event"] for e in entries] == [e for e, _, _ in EVENTS]
    assert entries[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(entries))
    assert entries[1]["details"] == {"run_id": "r1", "data_version": "abc"}
    assert entries[1]["actor"] == "tester@ci"
    assert entries[1]["time"].endswith("Z")
    assert result.last_hash == entries[-1]["hash"]
    assert [e["seq"] for e in log.entries(last=2)] == [2, 3]
    assert "4 entries" in result.summary()


def test_an_empty_log_verifies(store: ObjectStore) -> None:
    result = AuditLog(store).verify()
    assert result.ok and result.entries == 0


def test_appends_never_overwrite_an_entry(store: ObjectStore) -> None:
    log = AuditLog(store)
    assert log._create("audit/entries/000000000000.json", b"first")
    assert not log._create("audit/entries/000000000000.json", b"second")
    assert store.read_bytes("audit/entries/000000000000.json") == b"first"
    assert store.list("audit/entries") == ["audit/entries/000000000000.json"]


def test_an_edited_entry_is_named(store: ObjectStore) -> None:
    _chain(store)
    _rewrite(store, 1, details={"run_id": "someone-else", "data_version": "abc"})
    result = AuditLog(store).verify()
    assert not result.ok
    assert result.first_bad_seq == 1
    assert "does not match its hash" in result.reason
    assert result.summary().startswith("audit log BROKEN at seq 1")


def test_an_edited_entry_with_a_recomputed_hash_breaks_the_next_link(store: ObjectStore) -> None:
    _chain(store)
    _rewrite(store, 1, rehash=True, subject="fraud_detector/9")
    result = AuditLog(store).verify()
    assert (result.ok, result.first_bad_seq) == (False, 2)
    assert "prev_hash" in result.reason


def test_a_rehashed_last_entry_no_longer_matches_the_head(store: ObjectStore) -> None:
    _chain(store)
    _rewrite(store, 3, rehash=True, details={"previous_stable": 7})
    result = AuditLog(store).verify()
    assert (result.ok, result.first_bad_seq) == (False, 3)
    assert "head" in result.reason


def test_deleting_the_last_entry_is_truncation(store: ObjectStore) -> None:
    log = _chain(store)
    store.delete(entry_key(3))
    result = log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 3)
    assert "truncated" in result.reason
    # A writer refuses to paper over the gap.
    with pytest.raises(AuditError, match="truncated"):
        log.append("rollout.rolled_back", "fraud_detector/2", {"reason": "x"})


def test_deleting_a_middle_entry_is_detected(store: ObjectStore) -> None:
    log = _chain(store)
    store.delete(entry_key(1))
    result = log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 1)
    assert "missing" in result.reason


def test_reordered_entries_are_detected(store: ObjectStore) -> None:
    log = _chain(store)
    one, two = store.read_text(entry_key(1)), store.read_text(entry_key(2))
    store.write_text(entry_key(1), two)
    store.write_text(entry_key(2), one)
    result = log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 1)
    assert "says it is seq 2" in result.reason


def test_a_replaced_hash_is_detected(store: ObjectStore) -> None:
    log = _chain(store)
    _rewrite(store, 2, hash=log.read_entry(1)["hash"])
    result = log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 2)


def test_a_missing_head_with_entries_is_broken(store: ObjectStore) -> None:
    log = _chain(store)
    store.delete(audit.HEAD)
    assert not log.verify().ok


def test_a_head_left_behind_by_a_crash_is_caught_up(store: ObjectStore) -> None:
    log = _chain(store)
    first = log.read_entry(1)
    # A crash between writing entries 2..3 and the head leaves the head at 1: still intact.
    store.write_text(audit.HEAD, json.dumps({"seq": 1, "hash": first["hash"]}))
    assert log.verify().ok
    entry = log.append("rollout.rolled_back", "fraud_detector/2", {"reason": "p99"})
    assert entry.seq == 4
    assert entry.prev_hash == log.read_entry(3)["hash"]
    result = log.verify()
    assert result.ok and result.head_seq == 4


def _atomic_moto_puts(monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS evaluates ``If-None-Match: *`` atomically; moto 5.2.5 checks, then writes, without a
    lock, so two racing PUTs can both succeed. Serialise moto's PutObject (the server runs in
    this process) so the race test exercises our retry logic, not moto's check-then-act race."""
    from moto.s3.responses import S3Response

    lock, put_object = threading.Lock(), S3Response.put_object

    def atomic(self: S3Response) -> object:
        with lock:
            return put_object(self)

    monkeypatch.setattr(S3Response, "put_object", atomic)


def test_racing_appenders_neither_fork_nor_overwrite(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not store.is_local:
        _atomic_moto_puts(monkeypatch)
    threads, per_thread = 4, 5
    barrier = threading.Barrier(threads)
    written: list[str] = []
    errors: list[BaseException] = []

    def appender(n: int) -> None:
        log = AuditLog(store)
        barrier.wait()
        try:
            for i in range(per_thread):
                written.append(log.append("data.accepted", f"t{n}/{i}", {"i": i}).hash)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    workers = [threading.Thread(target=appender, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    log = AuditLog(store)
    result = log.verify()
    assert result.ok, result.summary()
    assert result.entries == threads * per_thread
    # Every acknowledged append is in the log: nothing was overwritten.
    assert sorted(e["hash"] for e in log.entries()) == sorted(written)


def test_secrets_never_reach_an_entry(store: ObjectStore) -> None:
    entry = AuditLog(store).append(
        "model.registered",
        "fraud_detector/1",
        {
            "tracking_uri": "https://alice:s3cr3t@mlflow.example/",
            # Values that cannot occur by chance in the entry's hex hashes or timestamps.
            "lineage": {
                "aws_secret_access_key": "KEY-qwxz-SECRET",
                "api_token": "TOKEN-vvyy",
                "run_id": "r1",
            },
            "auc": float("nan"),
        },
    )
    text = store.read_text(entry_key(entry.seq))
    assert "s3cr3t" not in text and "KEY-qwxz-SECRET" not in text and "TOKEN-vvyy" not in text
    assert entry.details["tracking_uri"] == "https://alice:<redacted>@mlflow.example/"
    assert entry.details["lineage"]["run_id"] == "r1"
    assert entry.details["auc"] is None
    assert AuditLog(store).verify().ok


def test_s3_entries_are_encrypted(s3_bucket: str, moto_server: str) -> None:
    import boto3

    from pipelines.config import StoreSettings

    cfg = StoreSettings(
        root=f"s3://{s3_bucket}/enc",
        endpoint_url=moto_server,
        key="testing",
        secret="testing",
        sse="AES256",
    )
    audit.record(cfg, "data.accepted", "transactions/2026-11-01", {"rows": 1})
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    for key in ("enc/audit/entries/000000000000.json", "enc/audit/head.json"):
        assert s3.head_object(Bucket=s3_bucket, Key=key)["ServerSideEncryption"] == "AES256"


def test_unknown_events_are_refused(store: ObjectStore) -> None:
    with pytest.raises(ValueError, match=r"Unknown audit event 'model\.registerd'"):
        AuditLog(store).append("model.registerd", "fraud_detector/1")


def test_a_failed_write_raises_audit_error(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: AuditLog, key: str, data: bytes) -> bool:
        raise PermissionError(f"Access Denied writing {key}")

    monkeypatch.setattr(AuditLog, "_create", refuse)
    with pytest.raises(AuditError, match=r"Could not append data\.accepted .*Access Denied"):
        AuditLog(store).append("data.accepted", "transactions/2026-11-01")


def test_the_actor_names_the_airflow_task_or_the_user() -> None:
    env = {
        "AIRFLOW_CTX_DAG_ID": "mlops_training_pipeline",
        "AIRFLOW_CTX_DAG_RUN_ID": "scheduled__2026-11-01",
        "AIRFLOW_CTX_TASK_ID": "promote",
        "AIRFLOW_CTX_TRY_NUMBER": "2",
    }
    assert default_actor(env) == "airflow:mlops_training_pipeline/scheduled__2026-11-01/promote#2"
    assert "@" in default_actor({})


# -- mlops audit ---------------------------------------------------------------------------
def test_cli_verify_exit_codes(mlops_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.config import settings
    from pipelines.store import open_store

    store = open_store(settings().store)
    assert main(["audit", "verify"]) == 0
    _chain(store)
    assert main(["audit", "verify"]) == 0
    assert "audit log OK: 4 entries" in capsys.readouterr().out
    assert main(["audit", "show", "--last", "1"]) == 0
    shown = capsys.readouterr().out.strip().splitlines()
    assert len(shown) == 1 and shown[0].startswith("3 ") and "rollout.promoted" in shown[0]
    assert main(["audit", "show", "--json"]) == 0
    assert [json.loads(x)["seq"] for x in capsys.readouterr().out.splitlines()] == [0, 1, 2, 3]
    _rewrite(store, 2, details={"canary": 2})
    assert main(["audit", "verify"]) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith("audit log BROKEN at seq 2") and len(out.splitlines()) == 1
    assert main(["audit", "show", "--last", "0"]) == 2
    assert "--last" in capsys.readouterr().err


def test_cli_verify_on_s3(
    mlops_env: Path, s3_bucket: str, moto_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.config import settings

    for name, value in {
        "ROOT": f"s3://{s3_bucket}/lake",
        "ENDPOINT_URL": moto_server,
        "KEY": "testing",
        "SECRET": "testing",
    }.items():
        monkeypatch.setenv(f"MLOPS__STORE__{name}", value)
    settings.cache_clear()
    audit.record(settings().store, "data.accepted", "transactions/2026-11-01")
    assert main(["audit", "verify"]) == 0
    ObjectStore.from_settings(settings().store).delete(entry_key(0))
    assert main(["audit", "verify"]) == 1
