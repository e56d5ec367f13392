"""Whose outcome an access-log line is (``evidence.origin``): only the model's answers are
evidence about a pool, for the canary's judge and for monitoring alike. A client that sends
garbage, gives up, or gets a local reply from Envoy cannot count as a model's error."""

from __future__ import annotations

import json

import pytest

from pipelines.data.spec import load_spec
from pipelines.monitoring.logs import hour_bounds, records
from pipelines.serving.dataplane.evidence import by_label, origin, parse_line

START, END = hour_bounds("2026-11-03", 14)


def _line(t: float = START + 1, **over: object) -> str:
    """A line in the shape of the local Envoy's JSON access log (``envoy.ACCESS_LOG_FORMAT``;
    fields Envoy has no value for are null, flags ``-`` when none)."""
    rec = {
        "time": f"{t:.3f}",
        "listener": "primary",
        "cluster": "canary",
        "replica": "127.0.0.1:8503",
        "code": 200,
        "flags": "-",
        "duration_us": 2100,
        "upstream_us": 1800,
        "attempts": 1,
        "method": "POST",
        "path": "/v1/models/fraud_detector:predict",
        "request_id": "r1",
        "key": "k1",
        "scores": "[[0.25]]",
        "instances": json.dumps([{"amount": 12.5}]),
        "version": None,
    }
    rec.update(over)
    return json.dumps(rec)


# The kinds of line the plane writes, and whose outcome each is.
KINDS = {
    "a replica's answer": ({}, "model"),
    "a replica's 500": ({"code": 500, "scores": None}, "model"),
    "no healthy replica (Envoy's 503)": (
        {"code": 503, "flags": "UH", "replica": None, "upstream_us": None, "attempts": 0},
        "model",
    ),
    "a replica refused the connection": ({"code": 503, "flags": "UF,URX"}, "model"),
    "a replica too slow (Envoy's 504)": ({"code": 504, "flags": "UT"}, "model"),
    "a replica's 400 for a bad instance": ({"code": 400, "scores": None}, "client"),
    "the client went away (code 0)": ({"code": 0, "flags": "DC", "scores": None}, "client"),
    "the JSON gate's 400": ({"code": 400, "replica": None, "attempts": 0}, "plane"),
    "a body over the limit (413)": ({"code": 413, "replica": None, "attempts": 0}, "plane"),
    "a request timeout (408)": ({"code": 408, "replica": None, "attempts": 0}, "plane"),
    "a wrong method (405)": ({"code": 405, "method": "PUT", "replica": None}, "plane"),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_of_line_has_its_origin(kind: str) -> None:
    over, want = KINDS[kind]
    assert origin(json.loads(_line(**over))) == want


def test_a_label_path_is_served_traffic_but_no_evidence() -> None:
    """Whoever calls ``/labels/canary`` chose the pool: the judge does not count it (monitoring
    of what was served still does)."""
    line = _line(path="/v1/models/fraud_detector/labels/canary:predict")
    assert origin(json.loads(line)) == "model" and parse_line(line) is None
    rows = records([line], START, END, load_spec("transactions"), {"canary": 4}).to_pylist()
    assert [r["request_id"] for r in rows] == ["r1"]


def test_only_the_model_s_outcomes_reach_the_judge_and_monitoring() -> None:
    lines = [
        _line(START + 1 + i / 100, request_id=f"k{i}", **over)
        for i, (over, _) in enumerate(KINDS.values())
    ]
    models = [f"k{i}" for i, (_, want) in enumerate(KINDS.values()) if want == "model"]
    # The judge: a window of canary samples, errors only where the pool failed.
    window = by_label([s for s in map(parse_line, lines) if s is not None])
    assert [s.request_id for s in window["canary"]] == models
    assert sum(s.code != 200 for s in window["canary"]) == len(models) - 1
    # Monitoring: the served rows of the hour are the same requests.
    rows = records(lines, START, END, load_spec("transactions"), {"canary": 4}).to_pylist()
    assert [r["request_id"] for r in rows] == models
