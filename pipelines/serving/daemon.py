"""Local background processes owned by MLOPS_HOME (the model server, the router): a pid file, a
port file the process writes once it listens, a log file, idempotent start and stop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class DaemonUnavailable(RuntimeError):
    """The process exited or did not become healthy in time."""


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
    ) -> dict[str, Any]:
        """Start ``cmd`` unless a healthy instance runs; wait until ``healthy(info)``.

        ``env`` adds variables (secrets go here, never on the command line)."""
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
            )
        self.pid_file.write_text(str(proc.pid))
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
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
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


def write_port_file(path: str | Path, **info: Any) -> None:
    """Atomically publish where a freshly started server listens."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **info}))
    tmp.replace(path)
