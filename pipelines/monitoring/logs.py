"""The serving log in the lake: each hour's routed model calls, as the data plane logged them,
shipped to ``serving_logs/<model>/dt=D/hour=HH/`` and published once.

The source is Envoy's JSON access log (:meth:`ServingControl.access_log_lines`): one line per
request with its id, pool, status, duration, the ``x-request-key`` header, the model version
that answered (the ``x-model-version`` response header of ``mlops serve``), the request's
``instances`` and the answer's ``predictions`` (both copied by the data plane's Lua filter, up
to 16 KiB each). Mirrored copies (the shadow listener) are not users' requests and are left out.

An hour is shipped only once it is over and ``monitoring.ship_delay_s`` has passed (the log's
flush, the longest request, a log collector's upload), so what is published is complete;
``part-*.parquet`` files (named per attempt) go first and ``_manifest.json`` last, with a
create-once write: a published hour never changes, and a rerun returns its manifest as it is.
An hour with no requests is published too (zero rows), so "no traffic" and "not shipped" differ.

Zero rows can also mean that nothing was logged: the data plane was down, or its log (or the
collector shipping it) lost the hour. The data plane's heartbeat tells which: Envoy checks its
own listener every ``dataplane.heartbeat_s`` and logs each check like a request (see
``HEARTBEAT_PATH`` in the data plane), so an observed hour has a line every few seconds even
without traffic; every line carries the start time of the Envoy that wrote it. The manifest's
``coverage`` says how much of the hour the lines cover and names each gap with its cause
(``not_started``: before the log's first data-plane start; ``down``: ended by a restart;
``log_lost``: within one run of the data plane; ``no_heartbeat``: nothing says which); the
monitor alerts on every gap but ``not_started`` and judges nothing from a hour it did not see.

A request with several instances gives one row per instance, all with the request's key.
Where the answering version is not logged (TF Serving sends no such header), it is the label's
version when the hour is shipped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data import layout
from pipelines.data.pii import mask_pii
from pipelines.data.profile import value_counts
from pipelines.data.spec import DatasetSpec
from pipelines.monitoring.schema import schema
from pipelines.serving.dataplane.evidence import (
    is_model_call,
    line_time,
    origin,
    parse_scores,
)
from pipelines.store import ObjectStore

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
PART_ROWS = 1_000_000  # rows per part file
ROW_GROUP = 128 * 1024
_PLANE = re.compile(r'"plane":\s*"?([0-9]+(?:\.[0-9]+)?)')


class ShippingError(RuntimeError):
    """An hour that cannot be shipped (not over yet)."""


def hour_bounds(date: str, hour: int) -> tuple[float, float]:
    """Epoch seconds of the hour's start and end (UTC)."""
    day = dt.date.fromisoformat(layout.partition(date)[3:])
    layout.hour_partition(hour)  # validates
    start = dt.datetime(day.year, day.month, day.day, int(hour), tzinfo=dt.UTC).timestamp()
    return start, start + 3600.0


def _instances(raw: Any) -> list[Any]:
    if not isinstance(raw, str) or not raw.startswith("["):
        return []
    try:
        value = json.loads(raw)
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def _version(raw: Any, label: str, versions: Mapping[str, int]) -> int | None:
    text = str(raw or "")
    if text.isdigit():
        return int(text)
    return versions.get(label)


def _number(v: Any) -> float | None:
    if isinstance(v, list) and len(v) == 1:  # TF Serving also takes [x] per feature
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


class LogCoverage:
    """What shows the log was flowing near one hour: every line the data plane logged there
    (a request, or the heartbeat that fills quiet stretches) with the start of the plane that
    logged it, and where the log begins; gathered while the log is read (:func:`records`)."""

    def __init__(self, start: float, end: float, every: float):
        self.start, self.end, self.every = start, end, every
        self.slack = max_gap(every)
        self.beats: list[tuple[float, float | None]] = []  # (time, the plane's start)
        self.first: tuple[float, float | None] | None = None  # the log's first line

    def see(self, t: float, line: str) -> None:
        near = self.start - self.slack <= t <= self.end + self.slack
        first = self.first is None or t < self.first[0]
        if not (near or first):
            return
        m = _PLANE.search(line)
        beat = (t, _started(m.group(1)) if m else None)
        if near:
            self.beats.append(beat)
        if first:
            self.first = beat

    def log_began(self) -> float | None:
        """When the data plane whose start opens the log started; None when the log does not
        open with a start (it was rotated or truncated, or planes do not say when they start)."""
        if self.first is None:
            return None
        t, began = self.first
        return began if began is not None and t >= began - 1.0 else None

    def coverage(self, until: float) -> dict[str, Any]:
        return coverage(self.beats, self.log_began(), self.start, until, self.every)


def _started(raw: Any) -> float | None:
    try:
        return float(raw)
    except (TypeError, ValueError):
        return None  # a plane started without the variable (an older bootstrap, a pod)


def max_gap(every: float) -> float:
    """The longest stretch without a heartbeat that is not a gap: three missed checks, plus
    the log's flush."""
    return 3 * every + 2.0


def _clock(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%H:%M:%S")


def coverage(
    beats: Iterable[tuple[float, float | None]],
    log_began: float | None,
    start: float,
    until: float,
    every: float,
) -> dict[str, Any]:
    """How much of ``[start, until)`` the heartbeats ``(time, the plane's start)`` cover, each
    gap with its cause, and the hour's status: ``complete`` (no gap to alert on), ``partial``,
    ``missing`` (nothing observed), or ``unknown`` (heartbeats off: ``every`` 0).
    ``log_began``: the first start of the data plane the log holds (a gap before it is the
    time before the data plane existed, not a fault). Pure."""
    if every <= 0:
        return {"status": "unknown", "heartbeat_s": every, "gaps": []}
    limit = max_gap(every)
    ts = sorted(beats, key=lambda b: b[0])
    before = [b for b in ts if b[0] <= start]
    cursor, plane = before[-1] if before else (start, None)
    gaps: list[dict[str, Any]] = []
    n = 0
    for t, started in ts:
        if t <= start:
            continue
        if t > until + limit:
            break
        n += t < until
        if t - cursor > limit:
            gaps.append(_gap(max(cursor, start), min(t, until), plane, started, log_began, limit))
        cursor, plane = t, started
    if until - cursor > limit:
        gaps.append(_gap(max(cursor, start), until, plane, None, log_began, limit))
    length = max(until - start, 0.0)
    alerting = [g for g in gaps if g["cause"] != "not_started"]
    unobserved = sum(g["to"] - g["from"] for g in gaps)
    lost = sum(g["to"] - g["from"] for g in alerting)
    status = "complete" if not alerting else "missing" if lost >= length - limit else "partial"
    return {
        "status": status,
        "heartbeat_s": every,
        "lines": n,  # logged in the hour: requests and heartbeats
        "observed_s": round(max(length - unobserved, 0.0), 3),
        "unobserved_s": round(unobserved, 3),
        "gaps": gaps,
    }


def _gap(
    frm: float,
    to: float,
    plane_before: float | None,
    plane_after: float | None,
    log_began: float | None,
    limit: float,
) -> dict[str, Any]:
    """One stretch without heartbeats, and why (``plane_after``: the start of the data plane
    whose heartbeat ends it, None when none does)."""
    span = f"{_clock(frm)} to {_clock(to)}"
    if log_began is not None and to <= log_began + limit:
        cause, detail = "not_started", f"{span}: before the data plane's first start"
    elif plane_after is not None and plane_after > frm - 1.0:
        cause = "down"
        detail = f"{span}: the data plane was down (started again at {_clock(plane_after)})"
    elif plane_after is not None and plane_after == plane_before:
        cause = "log_lost"
        detail = f"{span}: no heartbeat while the data plane ran: its log lost lines"
    else:
        cause = "no_heartbeat"
        detail = f"{span}: no heartbeat: the data plane was down or its log did not arrive"
    return {"from": frm, "to": to, "cause": cause, "detail": detail}


def records(
    lines: Iterable[str],
    start: float,
    end: float,
    spec: DatasetSpec,
    versions: Mapping[str, int],
    heartbeats: LogCoverage | None = None,
) -> pa.Table:
    """The serving-log rows of the model calls that started in ``[start, end)`` and whose
    outcome is the model's (:func:`~pipelines.serving.dataplane.evidence.origin`), in time
    order. ``versions``: each label's version, for lines that do not name one;
    ``heartbeats`` collects what shows the log was flowing on the way."""
    numeric, categorical = spec.numeric_features, spec.categorical_features
    pii = set(spec.pii_columns)
    cols: dict[str, list[Any]] = {f.name: [] for f in schema(spec)}
    for line in lines:
        t = line_time(line)
        if t is not None and heartbeats is not None:
            heartbeats.see(t, line)
        if t is None or not start <= t < end:
            continue  # cheap pre-filter: most lines of a long log are other hours
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or not is_model_call(rec):
            continue
        if str(rec.get("listener") or "primary") != "primary":
            continue  # a mirrored copy, not a user's request
        if origin(rec) != "model":
            continue  # the client's mistake or Envoy's own answer: not what the model served
        label = str(rec["cluster"])
        status = int(rec.get("code") or 0)
        insts = _instances(rec.get("instances"))
        scores = parse_scores(rec.get("scores")) if status == 200 else ()
        n = max(len(insts), len(scores), 1)
        rid = str(rec.get("request_id") or "")
        key = str(rec.get("key") or "") or None
        version = _version(rec.get("version"), label, versions)
        latency = float(rec.get("duration_us") or 0) / 1000.0
        for i in range(n):
            inst = insts[i] if i < len(insts) and isinstance(insts[i], dict) else {}
            score = scores[i] if i < len(scores) else None
            cols["request_id"].append(rid)
            cols["instance"].append(i)
            cols["time"].append(int(t * 1000))
            cols["key"].append(key)
            cols["label"].append(label)
            cols["version"].append(version)
            cols["status"].append(status)
            cols["latency_ms"].append(latency)
            cols["score"].append(None if score is None or math.isnan(score) else score)
            for name in numeric:
                cols[name].append(_number(inst.get(name)))
            for name in categorical:
                v = inst.get(name)
                v = None if v is None else str(v[0] if isinstance(v, list) and v else v)
                cols[name].append(mask_pii(v) if name in pii else v)
    table = pa.Table.from_pydict(cols, schema=schema(spec))
    return table.sort_by([("time", "ascending"), ("request_id", "ascending")])


def _part_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP, compression="zstd")
    return buf.getvalue()


def published(store: ObjectStore, model: str, date: str, hour: int) -> dict[str, Any] | None:
    """The hour's manifest, or None when it is not published."""
    key = f"{layout.serving_logs(model, date, hour)}/{MANIFEST}"
    return json.loads(store.read_text(key)) if store.exists(key) else None


def ship_hour(
    store: ObjectStore,
    spec: DatasetSpec,
    model: str,
    date: str,
    hour: int,
    lines: Iterable[str],
    versions: Mapping[str, int],
    grace_s: float,
    now: float | None = None,
    open_hour: bool = False,
    heartbeat_s: float = 0.0,
) -> dict[str, Any]:
    """Publish the hour's serving log (parts first, the manifest last, once); the manifest.

    ``open_hour`` ships an hour that is not over yet (demos and tests, whose traffic has
    stopped): what is logged so far is published, and the manifest says so; requests later in
    that hour are never added. ``heartbeat_s``: the data plane's heartbeat interval (0: none),
    what the manifest's ``coverage`` is judged with."""
    prefix = layout.serving_logs(model, date, hour)
    existing = published(store, model, date, hour)
    if existing is not None:
        log.info("serving log %s is already published (%d rows)", prefix, existing["rows"])
        return {**existing, "already_published": True}
    start, end = hour_bounds(date, hour)
    now = time.time() if now is None else now
    early = now < end + grace_s
    if early and not open_hour:
        raise ShippingError(
            f"Hour {date} {int(hour):02d}:00 UTC is not over (plus {grace_s:g} s for the data "
            "plane's log flush): shipping it now would publish it incomplete (the "
            "ship_open_hour param does that on purpose)."
        )
    beats = LogCoverage(start, end, heartbeat_s)
    table = records(lines, start, end, spec, versions, beats)
    parts, part_rows, hashes = [], {}, {}
    # Each attempt writes parts of its own: another shipper of the same hour (a zombie attempt
    # and its retry) never overwrites the parts a published manifest names.
    attempt = uuid.uuid4().hex[:12]
    for i, offset in enumerate(range(0, table.num_rows, PART_ROWS)):
        name = f"part-{i:05d}-{attempt}.parquet"
        data = _part_bytes(table.slice(offset, PART_ROWS))
        store.write_bytes(f"{prefix}/{name}", data)  # invisible until the manifest names it
        parts.append(name)
        part_rows[name] = min(PART_ROWS, table.num_rows - offset)
        hashes[name] = hashlib.sha256(data).hexdigest()
    manifest = {
        "model": model,
        "dataset": spec.name,
        "date": layout.partition(date)[3:],
        "hour": int(hour),
        "rows": table.num_rows,
        "parts": parts,
        "part_rows": part_rows,
        "sha256": hashes,
        "labels": value_counts(table.column("label")),
        "open_hour": early,  # shipped before the hour (and the log flush) was over
        "coverage": beats.coverage(min(end, now)),
    }
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    if not store.create_bytes(f"{prefix}/{MANIFEST}", body):
        # Another shipper published it meanwhile: its manifest stands.
        return {**json.loads(store.read_text(f"{prefix}/{MANIFEST}")), "already_published": True}
    log.info("published serving log %s: %d rows in %d part(s)", prefix, table.num_rows, len(parts))
    return {**manifest, "already_published": False}


def part_keys(store: ObjectStore, model: str, date: str, hour: int) -> list[str]:
    """The published parts of an hour (empty when not published or without rows)."""
    manifest = published(store, model, date, hour)
    if manifest is None:
        return []
    prefix = layout.serving_logs(model, date, hour)
    return [f"{prefix}/{name}" for name in manifest["parts"]]
