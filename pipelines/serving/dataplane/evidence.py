"""The judge's evidence, read from the data plane: Envoy's JSON access log (one line per
request: cluster, replica, status, duration, request id, key, scores).

Nothing here sits in the request path; a window is a filter over lines Envoy already wrote.
"""

from __future__ import annotations

import bisect
import json
import math
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POOLS = ("stable", "baseline", "canary")


@dataclass(frozen=True)
class Sample:
    """One request as the data plane saw it."""

    t: float
    label: str
    code: int
    latency_ms: float
    scores: tuple[float, ...]
    request_id: str = ""
    replica: str = ""
    listener: str = "primary"
    key: str = ""


def parse_scores(raw: Any) -> tuple[float, ...]:
    """The scores of an access-log line's ``predictions`` text (NaN for a non-number)."""
    if not isinstance(raw, str) or not raw.startswith("["):
        return ()
    try:
        preds = json.loads(raw)
    except ValueError:
        return ()
    out = []
    for p in preds if isinstance(preds, list) else []:
        if isinstance(p, list) and len(p) == 1:
            p = p[0]
        out.append(float(p) if isinstance(p, (int, float)) else math.nan)
    return tuple(out)


# Envoy's response flags (%RESPONSE_FLAGS%) that say the pool failed to answer: no healthy
# replica, a connection failure or reset, an upstream timeout, the pool's circuit breaker, a
# protocol error on the replica's side. Such a request is the pool's error even where Envoy
# wrote the response itself.
POOL_FAILURE_FLAGS = frozenset({"UH", "UF", "UO", "URX", "UT", "UC", "UR", "UPE", "LH", "UMSDR"})
# ...and those that say the client went away or sent what HTTP does not allow.
CLIENT_FLAGS = frozenset({"DC", "DPE", "IH"})


def origin(rec: dict[str, Any]) -> str:
    """Whose outcome one access-log line of a model call is: the one definition the canary's
    judge and monitoring both use.

    - ``"model"``: a replica answered (its 5xx included), or the pool failed to answer
      (``POOL_FAILURE_FLAGS``);
    - ``"client"``: a client error (4xx from a replica), or the client was gone or spoke broken
      HTTP before its answer (``CLIENT_FLAGS``; a disconnect is logged as code 0);
    - ``"plane"``: Envoy answered without asking any replica (its JSON gate's 400, the
      body-size limit's 413, a request timeout's 408, a wrong method or path).

    Only ``"model"`` lines are evidence about a pool: a client sending garbage can neither roll a
    canary back nor breach the champion's SLO."""
    flags = set(str(rec.get("flags") or "-").split(","))
    if flags & CLIENT_FLAGS:
        return "client"
    if flags & POOL_FAILURE_FLAGS:
        return "model"
    if rec.get("replica") in (None, "", "-"):
        return "plane"
    try:
        code = int(rec.get("code") or 0)
    except (TypeError, ValueError):
        code = 0
    return "client" if 400 <= code < 500 else "model"


def is_model_call(rec: dict[str, Any]) -> bool:
    """A routed prediction request (not a status or metadata request, not the heartbeat)."""
    if rec.get("cluster") not in POOLS:
        return False
    path = str(rec.get("path") or "")
    return path.split("?", 1)[0].endswith((":predict", ":classify", ":regress"))


_WEIGHTED = re.compile(r"^/v1/models/[^/]+:(predict|classify|regress)$")


def is_evidence(rec: dict[str, Any]) -> bool:
    """A model call that is evidence about its pool: the model's own outcome (:func:`origin`)
    of a request the weighted route sent there. A label or version path picks its pool itself:
    whoever calls it chose the pool, so it says nothing about how the split's users fare."""
    path = str(rec.get("path") or "").split("?", 1)[0]
    return origin(rec) == "model" and _WEIGHTED.match(path) is not None


def parse_record(line: str) -> dict[str, Any] | None:
    """One access-log line as a record, if it is a model call (:func:`is_model_call`)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and is_model_call(rec) else None


def sample_of(rec: dict[str, Any]) -> Sample | None:
    try:
        return Sample(
            t=float(rec["time"]),
            label=str(rec["cluster"]),
            code=int(rec.get("code") or 0),
            latency_ms=float(rec.get("duration_us") or 0) / 1000.0,
            scores=parse_scores(rec.get("scores")),
            request_id=str(rec.get("request_id") or ""),
            replica=str(rec.get("replica") or ""),
            listener=str(rec.get("listener") or "primary"),
            key=str(rec.get("key") or ""),
        )
    except (KeyError, TypeError, ValueError):
        return None


def parse_line(line: str) -> Sample | None:
    """The evidence sample of one access-log line; None for lines that are not a model call
    (malformed, a status request, the heartbeat) or not evidence (:func:`is_evidence`)."""
    rec = parse_record(line)
    return sample_of(rec) if rec is not None and is_evidence(rec) else None


def parse_lines(lines: Iterable[str]) -> Iterator[Sample]:
    for line in lines:
        s = parse_line(line)
        if s is not None:
            yield s


def by_label(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    """The judge's window: primary-listener samples per pool (mirrored copies excluded)."""
    out: dict[str, list[Sample]] = {pool: [] for pool in POOLS}
    for s in samples:
        if s.listener == "primary":
            out[s.label].append(s)
    return out


# Envoy writes a line when its request completes, so lines are in start-time order only up to
# the longest request: a read that starts from a time starts this much earlier in the file.
SEEK_SLACK_S = 60.0


_TIME = re.compile(r'"time":\s*"?([0-9]+(?:\.[0-9]+)?)')


def line_time(line: str) -> float | None:
    """An access-log line's ``time`` without parsing the whole line (None: it has none)."""
    m = _TIME.search(line)
    return float(m.group(1)) if m else None


class AccessLog:
    """The local Envoy's access-log file, read incrementally.

    Each read parses only the complete lines appended since the last one, and keeps the samples
    ordered by time, so a window is a binary search, not a rescan of the whole log (a canary
    analysis asks for thousands of windows over a log of hundreds of thousands of lines). The
    first read for a time starts from a binary search of the file for it (less
    ``SEEK_SLACK_S``), not from its first line: a new reader (each canary tick of a
    rescheduled sensor, each analysis) would otherwise parse the whole history. A file that
    shrank (rotated or truncated) is read again from its start."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offset = 0
        self._floor = 0.0  # the samples held are complete from this time on
        self._samples: list[Sample] = []  # the evidence, in time order
        self._times: list[float] = []
        self._logged: set[str] = set()  # request ids of every model call read, evidence or not

    def _seek(self, t: float, size: int) -> int:
        """The offset of a line start at or before the first line whose time is >= ``t``."""
        lo, hi = 0, size
        with open(self.path, "rb") as fh:
            while hi - lo > 65536:
                mid = (lo + hi) // 2
                fh.seek(mid)
                fh.readline()  # the rest of the line mid falls in
                start = fh.tell()
                at = None
                while at is None and fh.tell() < hi:
                    line = fh.readline()
                    if not line.endswith(b"\n"):
                        break
                    at = line_time(line.decode("utf-8", errors="replace"))
                if at is None or at >= t:
                    hi = mid
                else:
                    lo = start
        return lo

    def _refresh(self, since: float = 0.0) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < self._offset or since < self._floor:
            self._offset, self._floor, self._samples, self._times = 0, 0.0, [], []
            self._logged = set()
        if self._offset == 0 and since > SEEK_SLACK_S and size:
            self._floor = since - SEEK_SLACK_S
            self._offset = self._seek(self._floor, size)
        if size == self._offset:
            return
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read(size - self._offset)
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next read
        self._offset += end
        text = chunk[:end].decode("utf-8", errors="replace")
        for line in text.splitlines():
            rec = parse_record(line)
            if rec is None:
                continue
            if rec.get("request_id"):
                self._logged.add(str(rec["request_id"]))
            sample = sample_of(rec) if is_evidence(rec) else None
            if sample is None:
                continue
            # Envoy writes a line when a request completes: nearly, not exactly, time-ordered.
            i = bisect.bisect_right(self._times, sample.t)
            self._times.insert(i, sample.t)
            self._samples.insert(i, sample)

    def samples(self, since: float = 0.0, until: float | None = None) -> list[Sample]:
        self._refresh(since)
        lo = bisect.bisect_left(self._times, since)
        hi = len(self._times) if until is None else bisect.bisect_left(self._times, until)
        return self._samples[lo:hi]

    def wait_for(self, request_ids: set[str], since: float, timeout: float = 10.0) -> list[Sample]:
        """The samples since ``since`` once every id in ``request_ids`` has been written
        (Envoy flushes its log every ``dataplane.log_flush_ms``); at most ``timeout`` s. A
        request whose line is not evidence (a client error, say) counts as written."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.samples(since)
            if request_ids <= self._logged or time.monotonic() > deadline:
                return got
            time.sleep(0.05)
