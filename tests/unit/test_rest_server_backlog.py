"""The replica's REST listener accepts bursts of new connections it has not yet accept()ed:
Envoy opens one per concurrent request when its pooled ones are busy (mirrored shadow traffic
comes in bursts), and a refused connection reads as a failed upstream (503 "UF")."""

from __future__ import annotations

import socket

from pipelines.serving.server import ModelManager, make_server


def test_a_burst_of_connections_is_queued_not_refused() -> None:
    manager = ModelManager()
    server = make_server(manager, "127.0.0.1", 0)  # listening, and accepting nothing yet
    port = server.server_address[1]
    clients: list[socket.socket] = []
    try:
        for _ in range(64):  # socketserver's default backlog of 5 drops SYNs after a handful
            c = socket.socket()
            c.settimeout(2.0)
            c.connect(("127.0.0.1", port))
            clients.append(c)
        assert len(clients) == 64
    finally:
        for c in clients:
            c.close()
        server.server_close()
        manager.stop()
