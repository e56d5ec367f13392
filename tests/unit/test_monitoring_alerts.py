"""Monitoring alerts: an ERROR line each, and a JSON POST to the configured webhook (a real
HTTP receiver on 127.0.0.1 here); a webhook that fails fails the task without showing its URL."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from pipelines.monitoring.alerts import AlertError, WebhookNotifier, send_alerts

DECISION = {
    "hour": "2026-11-03T14",
    "champion": "3",
    "actions": [
        {"kind": "retrain", "reason": "sustained drift", "evidence": {}},
        {"kind": "alert", "reason": "SLO breach of champion v3: p99 900 ms", "evidence": {"x": 1}},
    ],
}


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]], list[int]]]:
    got: list[dict[str, Any]] = []
    status = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(status[0])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks/T0K3N", got, status
    finally:
        server.shutdown()
        server.server_close()


def test_each_alert_is_logged_and_posted(receiver, caplog) -> None:  # type: ignore[no-untyped-def]
    url, got, _ = receiver
    with caplog.at_level(logging.ERROR, logger="pipelines.monitoring.alerts"):
        lines = send_alerts(DECISION, [WebhookNotifier(url)])
    assert lines == [
        "MONITORING ALERT 2026-11-03T14 (champion v3): SLO breach of champion v3: p99 900 ms"
    ]
    assert [r.getMessage() for r in caplog.records] == lines
    assert got == [
        {
            "text": lines[0],
            "alert": {
                "hour": "2026-11-03T14",
                "champion": "3",
                "reason": "SLO breach of champion v3: p99 900 ms",
                "evidence": {"x": 1},
            },
        }
    ]


def test_no_alert_posts_nothing(receiver) -> None:  # type: ignore[no-untyped-def]
    url, got, _ = receiver
    assert (
        send_alerts({**DECISION, "actions": DECISION["actions"][:1]}, [WebhookNotifier(url)]) == []
    )
    assert got == []


def test_a_failing_webhook_fails_without_showing_its_url(receiver) -> None:  # type: ignore[no-untyped-def]
    url, _, status = receiver
    status[0] = 500
    with pytest.raises(AlertError, match="answered 500") as err:
        send_alerts(DECISION, [WebhookNotifier(url)])
    assert "T0K3N" not in str(err.value)
    with pytest.raises(AlertError, match="did not answer") as err:
        send_alerts(DECISION, [WebhookNotifier("http://127.0.0.1:9/hooks/T0K3N", timeout=2)])
    assert "T0K3N" not in str(err.value)
