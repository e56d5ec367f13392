"""The judge reads Envoy's access log incrementally: only appended complete lines are parsed, a
window is a time range over samples kept in time order, and a truncated file is read again."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.serving.dataplane.evidence import AccessLog


def _line(t: float, rid: str, cluster: str = "stable") -> str:
    return json.dumps(
        {
            "time": t,
            "cluster": cluster,
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
