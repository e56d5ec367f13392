"""The judge reads Envoy's access log incrementally: only appended complete lines are parsed, a
window is a time range over samples kept in time order, and a truncated file is read again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.serving.dataplane import evidence
from pipelines.serving.dataplane.evidence import AccessLog


def _line(t: float, rid: str, cluster: str = "stable") -> str:
    return json.dumps(
        {
            "time": t,
            "cluster": cluster,
            "replica": "127.0.0.1:8501",
            "path": "/v1/models/m:predict",
            "code": 200,
            "duration_us": 1500,
            "request_id": rid,
            "scores": "[[0.25]]",
        }
    )


def test_reads_appended_lines_once_and_in_time_order(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path)
    assert log.samples() == []  # no file yet
    path.write_text(_line(10.0, "a") + "\n" + _line(12.0, "c") + "\n")
    assert [s.request_id for s in log.samples()] == ["a", "c"]
    # A later-completing request that started earlier, a non-request line, and a line still
    # being written (no newline yet).
    with open(path, "a") as fh:
        fh.write(_line(11.0, "b") + "\n" + '{"cluster": "envoy_admin"}\n' + _line(13.0, "d")[:20])
    assert [s.request_id for s in log.samples()] == ["a", "b", "c"]
    assert [s.request_id for s in log.samples(since=11.0, until=12.0)] == ["b"]
    assert log.samples()[1].latency_ms == 1.5 and log.samples()[1].scores == (0.25,)
    with open(path, "a") as fh:
        fh.write(_line(13.0, "d")[20:] + "\n")
    assert [s.request_id for s in log.samples(since=12.5)] == ["d"]
    assert [s.request_id for s in log.samples(since=0, until=10.0)] == []


def test_a_truncated_log_is_read_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path)
    path.write_text("".join(_line(float(t), f"r{t}") + "\n" for t in range(5)))
    assert len(log.samples()) == 5
    path.write_text(_line(100.0, "new") + "\n")
    assert [s.request_id for s in log.samples()] == ["new"]


def test_wait_for_returns_once_every_id_is_written(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_text(_line(1.0, "x") + "\n" + _line(2.0, "y") + "\n")
    got = AccessLog(path).wait_for({"x", "y"}, since=0.0, timeout=1.0)
    assert {s.request_id for s in got} == {"x", "y"}


def test_a_new_reader_starts_near_its_time_and_misses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader asked for a recent window parses from a binary search of the file (less a
    slack for lines written out of start-time order), not the whole history, and returns
    exactly what a reader of the whole file returns; asked for an earlier time, it reads again."""
    path = tmp_path / "access.log"
    rows = []
    for i in range(20000):  # 0.1 s apart; every 7th request completed 20 s after later ones
        t = 1000.0 + i * 0.1 - (20.0 if i % 7 == 0 else 0.0)
        rows.append(_line(t, f"r{i}"))
    path.write_text("\n".join(rows) + "\n")
    full = AccessLog(path).samples()
    parsed: list[int] = []
    real = evidence.parse_record

    def counting(line: str):  # type: ignore[no-untyped-def]
        parsed.append(1)
        return real(line)

    monkeypatch.setattr(evidence, "parse_record", counting)
    for since in (2900.0, 2500.0, 1200.0, 1000.0, 0.0):
        log = AccessLog(path)
        assert log.samples(since) == [s for s in full if s.t >= since], since
        if since == 2900.0:  # the first reader parsed under a tenth of the file
            assert 0 < len(parsed) < 20000 / 10
    log = AccessLog(path)
    log.samples(2900.0)
    assert log.samples(1500.0) == [s for s in full if s.t >= 1500.0]  # earlier: read again
