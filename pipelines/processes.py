"""Child process groups that are always stopped: a command that forks (Airflow's executor
workers and task processes, ``airflow standalone``'s components) runs in its own process group,
and the whole group is stopped when the command ends, times out, fails or is interrupted."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def reap_group(pgid: int, timeout: float = 5.0) -> None:
    """Wait until no process of group ``pgid`` is left (they were sent SIGTERM); SIGKILL what
    is still there after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.2)
            return
        time.sleep(0.1)


def run_group(
    cmd: list[str],
    env: dict[str, str],
    log_file: Path | None,
    timeout: float | None = 600.0,
    stop_timeout: float = 30.0,
) -> int:
    """Run ``cmd`` in its own process group, its output appended to ``log_file`` (None: this
    process's stdout and stderr); on a timeout, an error or Ctrl-C the whole group is stopped
    before this returns or raises. A timeout returns 124, as ``timeout(1)`` does."""
    with contextlib.ExitStack() as stack:
        fh = stack.enter_context(open(log_file, "ab")) if log_file is not None else None
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT if fh else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if fh:
                fh.write(f"\n[mlops] stopped after {timeout:.0f} s\n".encode())
            return 124
        finally:
            # The whole group, even after a normal exit: `dags test --use-executor` can leave
            # an idle LocalExecutor worker behind (seen: one per demo, reparented to init).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            reap_group(proc.pid)
