"""Shared by the data-plane tests: kill the local Envoy and wait until it is gone."""

from __future__ import annotations

import os
import signal
import time

from pipelines.serving.control import LocalServing


def kill_envoy(control: LocalServing, timeout: float = 10.0) -> int:
    """SIGKILL the local Envoy (no graceful drain); its pid once it is gone."""
    pid = control.plane.envoy_pid()
    assert pid is not None, "Envoy is not running"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while control.plane.envoy_pid() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert control.plane.envoy_pid() is None, "Envoy outlived SIGKILL"
    return pid
