"""TLS and token settings for the MLflow client, exported as the environment variables MLflow reads.

MLflow's REST client takes its CA bundle, client certificate, insecure flag and bearer token only
from ``MLFLOW_TRACKING_*`` variables; :func:`export_mlflow_tls` sets them from ``mlflow.*``.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import MutableMapping
from functools import cache
from pathlib import Path

from pipelines.config import MlflowSettings

log = logging.getLogger(__name__)

SERVER_CERT = "MLFLOW_TRACKING_SERVER_CERT_PATH"
CLIENT_CERT = "MLFLOW_TRACKING_CLIENT_CERT_PATH"
INSECURE = "MLFLOW_TRACKING_INSECURE_TLS"
TOKEN = "MLFLOW_TRACKING_TOKEN"


@cache
def _combined_pem(cert: str, key: str) -> str:
    """MLflow takes one client PEM (requests' ``cert=path``): certificate and key in one file,
    written once per process to a private (0700) directory removed at exit."""
    folder = tempfile.mkdtemp(prefix="mlops-mlflow-tls-")
    atexit.register(shutil.rmtree, folder, True)
    path = Path(folder) / "client.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(Path(cert).read_text().rstrip("\n") + "\n" + Path(key).read_text())
    return str(path)


def mlflow_tls_env(cfg: MlflowSettings) -> dict[str, str]:
    """The ``MLFLOW_TRACKING_*`` variables these settings call for (only the configured ones)."""
    env: dict[str, str] = {}
    if cfg.ca_bundle:
        env[SERVER_CERT] = cfg.ca_bundle
    if cfg.client_cert:
        env[CLIENT_CERT] = (
            _combined_pem(cfg.client_cert, cfg.client_key) if cfg.client_key else cfg.client_cert
        )
    if cfg.insecure_skip_verify:
        env[INSECURE] = "true"
    if cfg.token is not None:
        env[TOKEN] = cfg.token.get_secret_value()
    return env


def export_mlflow_tls(
    cfg: MlflowSettings, environ: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    """Set the variables in the environment (``os.environ`` by default) and return the names set
    with their values, the token masked. Variables the settings leave unset are not touched, so a
    Kubernetes secret may set ``MLFLOW_TRACKING_TOKEN`` directly. Child processes (training
    nodes) inherit them. Skipping certificate verification is logged as a warning every time."""
    target = os.environ if environ is None else environ
    env = mlflow_tls_env(cfg)
    target.update(env)
    if str(target.get(INSECURE, "")).lower() in ("true", "1", "yes"):
        log.warning(
            "TLS CERTIFICATE VERIFICATION IS OFF for the MLflow tracking server %s "
            "(%s=true, mlflow.insecure_skip_verify): anyone on the path can read and change "
            "runs, models and the token. Use mlflow.ca_bundle instead.",
            cfg.tracking_uri,
            INSECURE,
        )
    return {k: ("***" if k == TOKEN else v) for k, v in env.items()}
