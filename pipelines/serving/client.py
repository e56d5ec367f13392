"""Clients for TF Serving (the real one or ours): REST and a gRPC channel factory, both with TLS
and mTLS from ``serving.*``; and one local ``mlops serve`` process as a daemon."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from pipelines.config import ServingSettings, Settings
from pipelines.serving.daemon import DaemonUnavailable, LocalDaemon, check_port_free

if TYPE_CHECKING:
    import grpc


class ServingUnavailable(RuntimeError):
    """The serving endpoint did not answer or a version never became AVAILABLE."""


def rest_tls(cfg: ServingSettings) -> tuple[bool | str, tuple[str, str] | None]:
    """requests' ``verify`` (the CA bundle, else the system store) and ``cert`` (mTLS)."""
    cert = (cfg.client_cert, cfg.client_key) if cfg.client_cert and cfg.client_key else None
    return cfg.ca_bundle or True, cert


def grpc_channel(target: str, cfg: ServingSettings) -> grpc.Channel:
    """A channel to TF Serving's gRPC API: ``secure_channel`` when ``serving.grpc_tls`` (CA bundle
    or the system roots, client certificate for mTLS), else plaintext."""
    import grpc

    if not cfg.grpc_tls:
        return grpc.insecure_channel(target)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(cfg.ca_bundle).read_bytes() if cfg.ca_bundle else None,
        private_key=Path(cfg.client_key).read_bytes() if cfg.client_key else None,
        certificate_chain=Path(cfg.client_cert).read_bytes() if cfg.client_cert else None,
    )
    return grpc.secure_channel(target, creds)


class ServingClient:
    def __init__(
        self,
        base_url: str,
        timeout: float = 10.0,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
    ):
        """``verify``: True (system CAs), a CA bundle path, or False; ``cert``: a client
        certificate (path, or (cert, key) paths) for servers that require mTLS."""
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        # Passed per request: requests lets REQUESTS_CA_BUNDLE override ``session.verify``.
        self.verify, self.cert = verify, cert

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        return self.session.request(method, url, verify=self.verify, cert=self.cert, **kwargs)

    @classmethod
    def from_settings(cls, settings: Settings, url: str, timeout: float = 10.0) -> ServingClient:
        """A client for ``url`` with the TLS options of ``serving.*``."""
        verify, cert = rest_tls(settings.serving)
        return cls(url, timeout, verify=verify, cert=cert)

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
        r = self._send("GET", self._model_path(model, version, label))
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
        r = self._send(
            "POST",
            f"{self._model_path(model, version, label)}:predict",
            json={"instances": instances},
        )
        if r.status_code != 200:
            raise ServingUnavailable(f"predict on {model} returned {r.status_code}: {r.text}")
        return list(r.json()["predictions"])

    def healthy(self) -> bool:
        try:
            r = self._send("GET", f"{self.base_url}/monitoring/prometheus/metrics", timeout=2)
            return r.status_code == 200
        except requests.RequestException:
            return False


class LocalServer:
    """One ``mlops serve`` process as a background daemon named ``name`` in ``base_dir`` (pid,
    port and log files), reading ``config_file`` (default ``<base_dir>/models.config``)."""

    def __init__(
        self,
        base_dir: str | Path,
        host: str = "127.0.0.1",
        port: int = 8501,
        poll_seconds: float = 1.0,
        grpc_port: int = 8500,
        name: str = "server",
        config_file: str | Path | None = None,
        extra_args: list[str] | None = None,
    ):
        self.dir = Path(base_dir)
        self.extra_args = list(extra_args or [])  # more `mlops serve` flags (batching)
        self.host, self.port, self.poll_seconds = host, port, poll_seconds
        self.grpc_port = grpc_port
        self.config_file = Path(config_file) if config_file else self.dir / "models.config"
        self.daemon = LocalDaemon(self.dir, name)

    def pid(self) -> int | None:
        return self.daemon.pid()

    def grpc_target(self) -> str | None:
        """``host:port`` of the gRPC API while the server runs."""
        info = self.daemon.info()
        return f"{info['host']}:{info['grpc_port']}" if info and info.get("grpc_port") else None

    def url(self) -> str | None:
        info = self.daemon.info()
        return f"http://{info['host']}:{info['rest_port']}" if info else None

    def _healthy(self, info: dict[str, Any]) -> bool:
        if self.port and info.get("rest_port") != self.port:
            return False  # an older process on another port: restart on ours
        return ServingClient(f"http://{info['host']}:{info['rest_port']}").healthy()

    def running(self) -> bool:
        info = self.daemon.info()
        return bool(info and self._healthy(info))

    def ensure_running(self, timeout: float = 120.0, setting: str = "serving.rest_port") -> str:
        """Start unless healthy; a fixed port taken by another process fails in one sentence
        naming ``setting``."""
        info = self.daemon.info()
        if info and self._healthy(info):
            return f"http://{info['host']}:{info['rest_port']}"
        self.daemon.stop()
        check_port_free(self.host, self.port, setting)
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        if not self.config_file.exists():
            self.config_file.write_text("model_config_list {\n}\n")
        cmd = [sys.executable, "-m", "pipelines.cli", "serve", "--host", self.host]
        cmd += ["--rest-port", str(self.port), "--grpc-port", str(self.grpc_port)]
        cmd += ["--model-config", str(self.config_file), "--poll-seconds", str(self.poll_seconds)]
        cmd += ["--port-file", str(self.daemon.port_file)]
        # As the TF Serving pods run (infra/k8s/base/tf-serving.yaml): a restarted replica
        # comes back with its labelled config.
        cmd += ["--allow_version_labels_for_unavailable_models", *self.extra_args]
        try:
            info = self.daemon.start(cmd, self._healthy, timeout)
        except DaemonUnavailable as exc:
            raise ServingUnavailable(str(exc)) from exc
        return f"http://{info['host']}:{info['rest_port']}"

    def stop(self) -> None:
        self.daemon.stop()
