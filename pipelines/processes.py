"""Child sessions that are always stopped: a command that forks (Airflow's executor workers
and task processes, ``airflow standalone``'s components) runs in a session of its own, and
everything in that session is stopped when the command ends, times out, fails or is
interrupted.

A process group is not enough: Airflow's task supervisor puts each task process in a group of
its own (``setpgid``), so a task outlives a signal to the command's group, and once its
supervisor is killed it runs on as an orphan (seen: an interrupted demo's canary task restarted
serving after the demo had stopped it). It stays in the command's session, where this finds it.
Daemons meant to outlive a command (the serving replicas, Envoy) start sessions of their own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import psutil


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


def session_members(sid: int) -> list[int]:
    """Live processes (zombies aside) of session ``sid``, this one excepted."""
    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getsid(p.pid) == sid:
                out.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return out


def reap_session(sid: int, timeout: float = 10.0) -> list[int]:
    """SIGTERM to every process left in session ``sid``, SIGKILL to what is still there after
    ``timeout``; returns the pids it found."""
    found = session_members(sid)
    for pid in found:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    left = found
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = session_members(sid)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return found


def run_group(
    cmd: list[str],
    env: dict[str, str],
    log_file: Path | None,
    timeout: float | None = 600.0,
    stop_timeout: float = 30.0,
    finished: Callable[[], int | None] | None = None,
    exit_grace: float = 60.0,
) -> int:
    """Run ``cmd`` in its own session, its output appended to ``log_file`` (None: this
    process's stdout and stderr); on a timeout, an error or Ctrl-C its process group, then
    whatever else is left in its session, is stopped before this returns or raises. A timeout
    returns 124, as ``timeout(1)`` does.

    ``finished``, polled every second, says when the command's work is done (with the exit
    code that outcome stands for) though the command may not have exited: a command still
    running ``exit_grace`` seconds after that is stopped, and the code is returned."""
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
            if finished is None:
                return proc.wait(timeout=timeout)
            return _wait_or_finished(proc, timeout, finished, exit_grace, fh)
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
            left = reap_session(proc.pid)  # task processes in groups of their own
            if left and fh is not None:
                fh.write(
                    f"\n[mlops] stopped {len(left)} process(es) of the command's session "
                    f"in other groups: {left}\n".encode()
                )


def _wait_or_finished(
    proc: subprocess.Popen[bytes],
    timeout: float | None,
    finished: Callable[[], int | None],
    exit_grace: float,
    fh: IO[bytes] | None,
) -> int:
    """``proc``'s exit code, or ``finished()``'s once it has one and ``proc`` has not exited
    ``exit_grace`` seconds later; TimeoutExpired after ``timeout``."""
    began = time.monotonic()
    done_at: float | None = None
    code: int | None = None
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if timeout is not None and now - began > timeout:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        if done_at is None:
            code = finished()
            if code is not None:
                done_at = now
        elif now - done_at > exit_grace and code is not None:
            if fh is not None:
                fh.write(
                    f"\n[mlops] the work was done but the command had not exited "
                    f"{exit_grace:.0f} s later: stopped (exit code {code} stands for its "
                    f"outcome)\n".encode()
                )
            return code
