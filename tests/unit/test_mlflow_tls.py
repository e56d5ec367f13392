"""MLflow TLS and token settings become the MLFLOW_TRACKING_* variables MLflow reads."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from pipelines.config import MlflowSettings
from pipelines.tls import CLIENT_CERT, INSECURE, SERVER_CERT, TOKEN, export_mlflow_tls

URI = "https://mlflow.example.test"


def _cfg(**kw: object) -> MlflowSettings:
    return MlflowSettings(tracking_uri=URI, **kw)  # type: ignore[arg-type]


def test_nothing_configured_sets_nothing_and_keeps_what_is_there() -> None:
    env = {TOKEN: "from-a-kubernetes-secret"}
    assert export_mlflow_tls(_cfg(), env) == {}
    assert env == {TOKEN: "from-a-kubernetes-secret"}


def test_ca_client_certificate_and_token_reach_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.utils.credentials import get_default_host_creds

    for name in (CLIENT_CERT, INSECURE, SERVER_CERT, TOKEN):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    cfg = _cfg(
        ca_bundle="/etc/mlops/ca.pem", client_cert="/etc/mlops/client.pem", token="t0ken-value"
    )
    shown = export_mlflow_tls(cfg)
    assert shown == {
        SERVER_CERT: "/etc/mlops/ca.pem",
        CLIENT_CERT: "/etc/mlops/client.pem",
        TOKEN: "***",
    }
    creds = get_default_host_creds(URI)  # what MLflow's REST client is built from
    assert creds.server_cert_path == "/etc/mlops/ca.pem"
    assert creds.client_cert_path == "/etc/mlops/client.pem"
    assert creds.token == "t0ken-value"
    assert creds.ignore_tls_verification is False


def test_separate_key_is_combined_into_one_private_pem(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\nBBB\n-----END PRIVATE KEY-----\n")
    env: dict[str, str] = {}
    export_mlflow_tls(_cfg(client_cert=str(cert), client_key=str(key)), env)
    combined = Path(env[CLIENT_CERT])
    assert combined.read_text() == cert.read_text() + key.read_text()
    assert stat.S_IMODE(combined.stat().st_mode) == 0o600
    assert stat.S_IMODE(combined.parent.stat().st_mode) == 0o700


def test_skipping_verification_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    env: dict[str, str] = {}
    with caplog.at_level(logging.WARNING, logger="pipelines.tls"):
        export_mlflow_tls(_cfg(insecure_skip_verify=True), env)
    assert env == {INSECURE: "true"}
    assert "VERIFICATION IS OFF" in caplog.text and URI in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines.tls"):
        export_mlflow_tls(_cfg(), {INSECURE: "true"})  # set outside the settings: still loud
    assert "VERIFICATION IS OFF" in caplog.text
