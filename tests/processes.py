"""Servers the tests start themselves (mlflow server, airflow api-server or standalone): their own
process group and log file, a wait until healthy, and a stop of the whole group, always."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import requests


def http_ok(url: str, accept: Callable[[requests.Response], bool] | None = None) -> bool:
    """Whether ``url`` answers (2xx, and ``accept`` if given); any error is "not yet"."""
    try:
        r = requests.get(url, timeout=5)
        return r.ok and (accept is None or accept(r))
    except (requests.RequestException, ValueError):
        return False


@contextmanager
def running(
    cmd: list[str],
    env: dict[str, str],
    log_path: Path,
    healthy: Callable[[], bool],
    timeout: float,
    what: str,
    stop_timeout: float = 30.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd`` in its own session, logging to ``log_path``; yield once ``healthy()``.
    On exit (and if it exits or never gets healthy) SIGTERM the group, then SIGKILL."""
    log = open(log_path, "ab")  # noqa: SIM115 - closed in the finally
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: its workers go down with it
    )
    try:
        deadline = time.monotonic() + timeout
        while not healthy():
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{what} exited with {proc.returncode}: {tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not healthy within {timeout:.0f} s; see {log_path}")
            time.sleep(0.5)
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=stop_timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
