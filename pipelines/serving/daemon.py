"""Local background processes owned by MLOPS_HOME (model-server replicas, Envoy): a pid file, a
port file the process (or its launcher) writes, a log file, idempotent start and stop.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class DaemonUnavailable(RuntimeError):
    """The process exited or did not become healthy in time."""


class PortInUse(DaemonUnavailable):
    """A fixed port that a local server needs is taken by another process."""


def check_port_free(host: str, port: int, setting: str, hint: str | None = None) -> None:
    """Fail with one sentence naming the port and the setting that changes it. ``setting`` is
    a dotted settings name; ``hint`` replaces the advice after it (for a setting of another
    program, such as ``AIRFLOW__API__PORT``)."""
    if port == 0:
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            env = "MLOPS__" + setting.upper().replace(".", "__")
            advice = hint or f"set {setting} ({env}) to a free port, or 0 for any free port"
            raise PortInUse(
                f"Port {port} on {host} is already in use by another process; {advice}."
            ) from None


def alive(pid: int) -> bool:
    """True while the process runs; reaps it when it is our exited child (no zombie)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child: its own parent reaps it
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


class LocalDaemon:
    """One named background process under ``directory``; its command writes ``port_file``."""

    def __init__(self, directory: str | Path, name: str):
        self.dir = Path(directory)
        self.name = name
        self.pid_file = self.dir / f"{name}.pid"
        self.port_file = self.dir / f"{name}.json"
        self.log_file = self.dir / f"{name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None

    def info(self) -> dict[str, Any] | None:
        """What the process wrote to its port file, while it runs."""
        if self.pid() is None or not self.port_file.exists():
            return None
        try:
            return dict(json.loads(self.port_file.read_text()))
        except (OSError, ValueError):
            return None

    def start(
        self,
        cmd: list[str],
        healthy: Callable[[dict[str, Any]], bool],
        timeout: float = 120.0,
        env: dict[str, str] | None = None,
        port_info: dict[str, Any] | None = None,
        user: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        """Start ``cmd`` unless a healthy instance runs; wait until ``healthy(info)``.

        ``env`` adds variables (secrets go here, never on the command line); ``port_info`` is
        written as the port file at once, for programs that do not write one themselves (its
        ``stop_signal``, a signal name, replaces SIGTERM in :meth:`stop`); ``user`` is a
        (uid, gid) to run ``cmd`` as."""
        info = self.info()
        if info and healthy(info):
            return info
        self.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)
        with open(self.log_file, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {})},
                user=user[0] if user else None,
                group=user[1] if user else None,
                extra_groups=[] if user else None,
            )
        self.pid_file.write_text(str(proc.pid))
        if port_info is not None:
            write_port_file(self.port_file, **{**port_info, "pid": proc.pid})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DaemonUnavailable(
                    f"Local {self.name} exited with code {proc.returncode}; see {self.log_file}."
                )
            info = self.info()
            if info and healthy(info):
                return info
            time.sleep(0.3)
        self.stop()
        raise DaemonUnavailable(
            f"Local {self.name} did not start in {timeout:.0f} s; see {self.log_file}."
        )

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            sig = signal.Signals[(self.info() or {}).get("stop_signal", "SIGTERM")]
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                os.kill(pid, sig)
            for _ in range(50):
                if not alive(pid):
                    break
                time.sleep(0.1)
            else:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
                alive(pid)
        self.pid_file.unlink(missing_ok=True)
        self.port_file.unlink(missing_ok=True)


def stop_all(directory: str | Path) -> list[str]:
    """Stop every daemon with a pid file in ``directory`` (what an earlier run left running,
    whatever its names); returns their names."""
    d = Path(directory)
    names = sorted(p.stem for p in d.glob("*.pid")) if d.is_dir() else []
    for name in names:
        LocalDaemon(d, name).stop()
    return names


def write_port_file(path: str | Path, **info: Any) -> None:
    """Atomically publish where a freshly started server listens."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **info}))
    tmp.replace(path)
