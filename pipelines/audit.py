"""Append-only, hash-chained audit trail in the object store: who accepted or quarantined data,
registered, staged, promoted or rolled back a model, or overrode the evaluation gate, and why.

Layout: one object per entry, ``audit/entries/<seq:012d>.json`` (object stores cannot append),
plus ``audit/head.json`` naming the seq and hash of the last entry written. An entry holds
``seq, time, event, actor, subject, details, prev_hash, hash``; ``hash`` is the SHA-256 of the
canonical JSON (sorted keys, no spaces) of every other field, and ``prev_hash`` is the previous
entry's hash (64 zeros for entry 0). Editing, reordering or deleting an entry breaks the chain.

Appends never overwrite. Local files are written under a temporary name and hard-linked into
place, which fails if the entry exists; on S3 the PUT carries ``If-None-Match: *`` (s3fs
``mode="create"``; AWS honours it since 2024-08, as does moto 5.2.5), so S3 refuses a second
writer. Either way the entry is then read back and compared, which also catches an S3-compatible
store that ignores the condition (older MinIO and the like) when the other writer lands first;
on such a store a writer whose PUT lands last can still replace an entry read back moments
before, so use one that honours conditional writes. A writer that loses the race chains onto the
winner's entry and tries the next seq, so two Airflow tasks appending at once never fork the log.

The head is written after the entry, so a crash in between leaves it one behind: entries beyond
the head are fine when they chain, and the next append moves the head on. Entries missing at or
below the head are truncation. The head only guards the log against loss or naive deletion; a
principal who may rewrite every object can rebuild a consistent chain, so in production put the
store under S3 Object Lock or versioning, and note that every append logs its seq and hash (an
anchor in the Airflow task log, outside the store).

A failed audit write fails the stage: an action that cannot be recorded must not pass silently.
Stages record after the action succeeded, so an Airflow retry of the task (actions are
idempotent) records it again: a duplicate entry rather than a missing one. Entries hold ids,
URIs, hashes and reasons only; values under secret-looking keys and passwords in URLs are
redacted before hashing.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import math
import os
import posixpath
import random
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from pipelines.config import StoreSettings
from pipelines.store import ObjectStore, StoreError, open_store

log = logging.getLogger(__name__)

PREFIX = "audit"
ENTRIES = f"{PREFIX}/entries"
HEAD = f"{PREFIX}/head.json"
GENESIS = "0" * 64
MAX_ATTEMPTS = 50

DATA_ACCEPTED = "data.accepted"
DATA_QUARANTINED = "data.quarantined"
MODEL_REGISTERED = "model.registered"
EVALUATION_OVERRIDE = "evaluation.override"
CANARY_STAGED = "rollout.canary_staged"
SHADOWED = "rollout.shadowed"
PROMOTED = "rollout.promoted"
ROLLED_BACK = "rollout.rolled_back"
PREDICTIONS_PUBLISHED = "predictions.published"
CHAMPION_RESTORED = "rollout.champion_restored"
MONITORING_DECIDED = "monitoring.decided"
# A closed vocabulary: a typo in a stage fails its test instead of writing an unsearchable event.
EVENTS = frozenset(
    {
        DATA_ACCEPTED,
        DATA_QUARANTINED,
        MODEL_REGISTERED,
        EVALUATION_OVERRIDE,
        CANARY_STAGED,
        SHADOWED,
        PROMOTED,
        ROLLED_BACK,
        PREDICTIONS_PUBLISHED,
        CHAMPION_RESTORED,
        MONITORING_DECIDED,
    }
)
FIELDS = ("seq", "time", "event", "actor", "subject", "details", "prev_hash", "hash")

_SECRET_KEY = re.compile(r"secret|passw|token|credential|api_?key|access_?key|private", re.I)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^/@:\s]*):[^/@\s]*@", re.I)
_ENTRY_NAME = re.compile(r"^(\d{12})\.json$")


class AuditError(RuntimeError):
    """The audit trail could not be read or written; the action it records must not proceed."""


def entry_key(seq: int) -> str:
    return f"{ENTRIES}/{seq:012d}.json"


def canonical(obj: Any) -> bytes:
    """The bytes that are hashed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(fields: Mapping[str, Any]) -> str:
    """SHA-256 over every field except ``hash`` (unknown fields included, so adding one shows)."""
    return hashlib.sha256(canonical({k: v for k, v in fields.items() if k != "hash"})).hexdigest()


def scrub(value: Any, key: str = "") -> Any:
    """A JSON-plain copy with secrets redacted and non-finite floats as null."""
    if key and _SECRET_KEY.search(key):
        return "<redacted>"
    if isinstance(value, Mapping):
        return {str(k): scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int):
        return value
    return _URL_PASSWORD.sub(r"\g<scheme>\g<user>:<redacted>@", str(value))


def default_actor(environ: Mapping[str, str] | None = None) -> str:
    """``airflow:<dag>/<run>/<task>#<try>`` inside an Airflow task, else ``user@host``."""
    env = os.environ if environ is None else environ
    if env.get("AIRFLOW_CTX_DAG_ID"):
        parts = [env.get(f"AIRFLOW_CTX_{k}", "?") for k in ("DAG_ID", "DAG_RUN_ID", "TASK_ID")]
        try_number = env.get("AIRFLOW_CTX_TRY_NUMBER")
        return "airflow:" + "/".join(parts) + (f"#{try_number}" if try_number else "")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    time: str
    event: str
    actor: str
    subject: str
    details: dict[str, Any]
    prev_hash: str
    hash: str

    @classmethod
    def seal(
        cls,
        seq: int,
        event: str,
        subject: str,
        details: Mapping[str, Any],
        actor: str,
        prev_hash: str,
    ) -> AuditEntry:
        """A new entry whose hash covers every other field."""
        fields: dict[str, Any] = {
            "seq": seq,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "event": event,
            "actor": scrub(actor),
            "subject": scrub(subject),
            "details": scrub(dict(details)),
            "prev_hash": prev_hash,
        }
        return cls(**fields, hash=entry_hash(fields))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    head_seq: int | None
    first_bad_seq: int | None = None
    reason: str = ""
    last_hash: str | None = None

    def summary(self) -> str:
        """One line for a terminal or a task log."""
        if self.ok:
            head = "no head" if self.head_seq is None else f"head at seq {self.head_seq}"
            tip = f", last hash {self.last_hash[:12]}" if self.last_hash else ""
            return f"audit log OK: {self.entries} entries chained ({head}{tip})."
        return f"audit log BROKEN at seq {self.first_bad_seq}: {self.reason}"


class AuditLog:
    """The audit trail under ``audit/`` of one object store."""

    def __init__(self, store: ObjectStore):
        self.store = store

    # -- writing --------------------------------------------------------------------------
    def append(
        self,
        event: str,
        subject: str,
        details: Mapping[str, Any] | None = None,
        actor: str | None = None,
    ) -> AuditEntry:
        """Add one entry after the current last one; raises :class:`AuditError` on failure."""
        if event not in EVENTS:
            raise ValueError(f"Unknown audit event {event!r}; known: {', '.join(sorted(EVENTS))}.")
        actor = actor or default_actor()
        try:
            seq, prev = self._tip()
            for attempt in range(MAX_ATTEMPTS):
                entry = AuditEntry.seal(seq, event, subject, details or {}, actor, prev)
                if self._create(entry_key(seq), entry.to_json().encode()):
                    self._advance_head(entry)
                    log.info(
                        "audit seq=%d event=%s subject=%s hash=%s",
                        seq,
                        event,
                        entry.subject,
                        entry.hash,
                    )
                    return entry
                # Another writer holds this seq: chain onto the tip it reached, back off a little.
                seq, prev = self._walk(seq - 1, prev)
                time.sleep(random.uniform(0, 0.02 * (attempt + 1)))
        except (StoreError, OSError) as exc:
            raise AuditError(
                f"Could not append {event} to {self.store.uri(PREFIX)}: {exc}"
            ) from exc
        raise AuditError(
            f"Could not append {event} to {self.store.uri(PREFIX)}: "
            f"{MAX_ATTEMPTS} attempts lost to concurrent writers."
        )

    def _create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if absent; False if another writer won (the entry is read back, for
        S3-compatible stores that ignore the condition)."""
        if not self.store.create_bytes(key, data):
            return False
        try:
            return self.store.read_bytes(key) == data
        except StoreError:
            return False

    def _advance_head(self, entry: AuditEntry) -> None:
        head = self._read_head()
        if head is None or head[0] < entry.seq:  # never move the head back
            self.store.write_text(HEAD, json.dumps({"seq": entry.seq, "hash": entry.hash}) + "\n")

    # -- reading --------------------------------------------------------------------------
    def _read_head(self) -> tuple[int, str] | None:
        if not self.store.exists(HEAD):
            return None
        try:
            head = json.loads(self.store.read_text(HEAD))
            return int(head["seq"]), str(head["hash"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError(f"{self.store.uri(HEAD)} is not a valid audit head: {exc}") from exc

    def read_entry(self, seq: int) -> dict[str, Any]:
        """The raw fields of an entry (not verified)."""
        text = self.store.read_text(entry_key(seq))
        try:
            fields = json.loads(text)
        except ValueError as exc:
            raise AuditError(f"{self.store.uri(entry_key(seq))} is not valid JSON.") from exc
        if not isinstance(fields, dict):
            raise AuditError(f"{self.store.uri(entry_key(seq))} is not a JSON object.")
        return fields

    def _seqs(self) -> list[int]:
        self.store.fs.invalidate_cache()  # s3fs caches listings; another process may have added
        names = (posixpath.basename(k) for k in self.store.list(ENTRIES))
        return sorted(int(m.group(1)) for n in names if (m := _ENTRY_NAME.match(n)))

    def _walk(self, seq: int, prev: str) -> tuple[int, str]:
        """From a known entry (``seq`` with hash ``prev``; -1 = genesis), step past later ones."""
        while True:
            try:
                fields = self.read_entry(seq + 1)
            except StoreError:
                return seq + 1, prev
            seq, prev = seq + 1, str(fields.get("hash"))

    def _tip(self) -> tuple[int, str]:
        """The next free seq and the hash to chain onto, starting from the head."""
        head = self._read_head()
        if head is None:
            seqs = self._seqs()
            if not seqs:
                return self._walk(-1, GENESIS)
            start = seqs[-1]
        else:
            start = head[0]
        try:
            fields = self.read_entry(start)
        except StoreError as exc:
            raise AuditError(
                f"The audit head names seq {start} but that entry is missing: the log was "
                "truncated. Run `mlops audit verify`."
            ) from exc
        return self._walk(start, str(fields.get("hash")))

    def entries(self, last: int | None = None) -> list[dict[str, Any]]:
        """Stored entries in seq order (the last ``last`` only), as read, not verified."""
        seqs = self._seqs()
        return [self.read_entry(s) for s in (seqs[-last:] if last else seqs)]

    def verify(self) -> VerifyResult:
        """Check contiguity from 0, each hash, each link, and the head; stop at the first fault."""
        seqs = self._seqs()
        try:
            head = self._read_head()
        except AuditError as exc:
            return VerifyResult(False, 0, None, seqs[-1] if seqs else 0, str(exc))
        head_seq = head[0] if head else None

        def broken(seq: int, checked: int, reason: str) -> VerifyResult:
            return VerifyResult(False, checked, head_seq, seq, reason)

        hashes: list[str] = []
        for expected, seq in enumerate(seqs):
            if seq != expected:
                return broken(expected, expected, f"entry {expected} is missing (deleted).")
            try:
                fields = self.read_entry(seq)
            except (AuditError, StoreError) as exc:
                return broken(seq, seq, str(exc))
            missing = [f for f in FIELDS if f not in fields]
            if missing:
                return broken(seq, seq, f"entry {seq} lacks {', '.join(missing)}.")
            if fields["seq"] != seq:
                return broken(
                    seq, seq, f"entry {seq} says it is seq {fields['seq']} (moved or reordered)."
                )
            if fields["hash"] != entry_hash(fields):
                return broken(seq, seq, f"entry {seq} does not match its hash (edited).")
            if fields["prev_hash"] != (hashes[-1] if hashes else GENESIS):
                what = "genesis" if seq == 0 else f"entry {seq - 1}'s hash"
                return broken(
                    seq, seq, f"entry {seq}'s prev_hash is not {what} (an entry was replaced)."
                )
            hashes.append(fields["hash"])
        n = len(seqs)
        if head is None:
            if n:
                return broken(n - 1, n, f"{HEAD} is missing although {n} entries exist.")
            return VerifyResult(True, 0, None)
        if head[0] >= n:
            return broken(
                n, n, f"the head names seq {head[0]} but the log ends at {n - 1} (truncated)."
            )
        if hashes[head[0]] != head[1]:
            return broken(head[0], n, f"entry {head[0]} does not match the hash in the head.")
        return VerifyResult(True, n, head[0], last_hash=hashes[-1])


def record(
    cfg: StoreSettings,
    event: str,
    subject: str,
    details: Mapping[str, Any] | None = None,
    actor: str | None = None,
) -> AuditEntry:
    """Append one entry to the audit log of the configured store (what stages call)."""
    return AuditLog(open_store(cfg)).append(event, subject, details, actor)
