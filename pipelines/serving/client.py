"""REST client for TF Serving (the real one or ours) and the local server process manager."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from pipelines.config import Settings


class ServingUnavailable(RuntimeError):
    """The serving endpoint did not answer or a version never became AVAILABLE."""


class ServingClient:
    def __init__(self, base_url: str, timeout: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    def _model_path(
        self, model: str, version: int | str | None = None, label: str | None = None
    ) -> str:
        path = f"{self.base_url}/v1/models/{model}"
        if version is not None:
            path += f"/versions/{version}"
        elif label is not None:
            path += f"/labels/{label}"
        return path

    def status(
        self, model: str, version: int | str | None = None, label: str | None = None
    ) -> dict[str, Any]:
        r = self.session.get(self._model_path(model, version, label), timeout=self.timeout)
        r.raise_for_status()
        return dict(r.json())

    def version_state(self, model: str, version: int | str) -> tuple[str, str]:
        try:
            st = self.status(model, version)["model_version_status"][0]
        except requests.HTTPError:
            return "UNKNOWN", ""
        return st["state"], st.get("status", {}).get("error_message", "")

    def label_version(self, model: str, label: str) -> int | None:
        try:
            return int(self.status(model, label=label)["model_version_status"][0]["version"])
        except (requests.HTTPError, KeyError, IndexError):
            return None

    def wait_available(
        self, model: str, version: int | str, timeout: float = 300.0, interval: float = 0.5
    ) -> None:
        """Poll ``/versions/<v>`` until AVAILABLE; fail fast on END (a failed load)."""
        deadline = time.monotonic() + timeout
        state, err = "UNKNOWN", ""
        while time.monotonic() < deadline:
            try:
                state, err = self.version_state(model, version)
            except requests.RequestException as exc:
                state, err = "UNREACHABLE", str(exc)
            if state == "AVAILABLE":
                return
            if state == "END":
                raise ServingUnavailable(f"Version {version} of {model} failed to load: {err}")
            time.sleep(interval)
        raise ServingUnavailable(
            f"Version {version} of {model} not AVAILABLE after {timeout:.0f} s (last: {state})"
        )

    def predict(
        self,
        model: str,
        instances: list[dict[str, Any]],
        version: int | str | None = None,
        label: str | None = None,
    ) -> list[Any]:
        r = self.session.post(
            f"{self._model_path(model, version, label)}:predict",
            json={"instances": instances},
            timeout=self.timeout,
        )
        if r.status_code != 200:
            raise ServingUnavailable(f"predict on {model} returned {r.status_code}: {r.text}")
        return list(r.json()["predictions"])

    def healthy(self) -> bool:
        try:
            r = self.session.get(f"{self.base_url}/monitoring/prometheus/metrics", timeout=2)
            return r.status_code == 200
        except requests.RequestException:
            return False


def _alive(pid: int) -> bool:
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


class LocalServer:
    """``mlops serve`` as a background process owned by MLOPS_HOME (pid and port files)."""

    def __init__(
        self,
        base_dir: str | Path,
        host: str = "127.0.0.1",
        port: int = 8501,
        poll_seconds: float = 1.0,
        grpc_port: int = 8500,
    ):
        self.dir = Path(base_dir)
        self.host, self.port, self.poll_seconds = host, port, poll_seconds
        self.grpc_port = grpc_port
        self.config_file = self.dir / "models.config"
        self.pid_file = self.dir / "server.pid"
        self.port_file = self.dir / "server.json"
        self.log_file = self.dir / "server.log"

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalServer:
        s = settings.serving
        return cls(s.base_dir, s.host, s.rest_port, s.poll_seconds, s.grpc_port)

    def _pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def grpc_target(self) -> str | None:
        """``host:port`` of the gRPC API while the server runs."""
        if self.url() is None:
            return None
        info = json.loads(self.port_file.read_text())
        return f"{info['host']}:{info['grpc_port']}" if info.get("grpc_port") else None

    def url(self) -> str | None:
        if self._pid() is None or not self.port_file.exists():
            return None
        info = json.loads(self.port_file.read_text())
        return f"http://{info['host']}:{info['rest_port']}"

    def ensure_running(self, timeout: float = 120.0) -> str:
        url = self.url()
        if url and ServingClient(url).healthy():
            return url
        self.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.config_file.exists():
            self.config_file.write_text("model_config_list {\n}\n")
        self.port_file.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pipelines.cli",
            "serve",
            "--host",
            self.host,
            "--rest-port",
            str(self.port),
            "--grpc-port",
            str(self.grpc_port),
            "--model-config",
            str(self.config_file),
            "--poll-seconds",
            str(self.poll_seconds),
            "--port-file",
            str(self.port_file),
        ]
        with open(self.log_file, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServingUnavailable(
                    f"Local model server exited with code {proc.returncode}; see {self.log_file}."
                )
            url = self.url()
            if url and ServingClient(url).healthy():
                return url
            time.sleep(0.3)
        self.stop()
        raise ServingUnavailable(
            f"Local model server did not start in {timeout:.0f} s; see {self.log_file}."
        )

    def stop(self) -> None:
        pid = self._pid()
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if not _alive(pid):
                    break
                time.sleep(0.1)
            else:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
                _alive(pid)
        self.pid_file.unlink(missing_ok=True)
        self.port_file.unlink(missing_ok=True)


def serving_url(settings: Settings) -> str:
    """The REST endpoint for this profile, starting the local server when needed."""
    if settings.serving.mode == "remote":
        if not settings.serving.url:
            raise ServingUnavailable("serving.mode is 'remote' but serving.url is not set.")
        return settings.serving.url
    return LocalServer.from_settings(settings).ensure_running()
