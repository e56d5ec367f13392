"""TLS for real: a throwaway CA signs a server and a client certificate; the serving REST client,
the gRPC channel and the MLflow client talk to servers on 127.0.0.1 that require them."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pipelines.config import MlflowSettings, ServingSettings, Settings
from pipelines.serving.client import ServingClient, grpc_channel

pytestmark = pytest.mark.integration
MODEL = "fraud_detector"


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), False
        )
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
    signer = issuer[1] if issuer else key
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM."""
    d = tmp_path_factory.mktemp("pki")

    def write(name: str, data: bytes) -> str:
        (d / name).write_bytes(data)
        return str(d / name)

    def key_pem(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("mlops test CA", ca_key, None, None)
    pem = serialization.Encoding.PEM
    out = {"ca": write("ca.pem", ca.public_bytes(pem))}
    for role, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(f"mlops test {role}", key, (ca, ca_key), usage)
        out[f"{role}_cert"] = write(f"{role}.pem", cert.public_bytes(pem))
        out[f"{role}_key"] = write(f"{role}.key", key_pem(key))
    return Pki(**out)


class _Handler(BaseHTTPRequestHandler):
    """Answers like TF Serving's model status, or like MLflow's get-experiment-by-name."""

    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        type(self).seen.append(dict(self.headers))
        if self.path.startswith("/api/2.0/mlflow/experiments/get-by-name"):
            body = {
                "experiment": {
                    "experiment_id": "7",
                    "name": "tls-test",
                    "artifact_location": "/tmp/none",
                    "lifecycle_stage": "active",
                }
            }
        else:
            body = {"model_version_status": [{"version": "1", "state": "AVAILABLE"}]}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(params=[False, True], ids=["tls", "mtls"])
def https_server(request: pytest.FixtureRequest, pki: Pki) -> Iterator[tuple[str, bool]]:
    """An HTTPS server on 127.0.0.1 (the mtls variant requires a client certificate)."""
    mtls = bool(request.param)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    if mtls:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki.ca)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    _Handler.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", mtls
    finally:
        server.shutdown()
        server.server_close()


def _serving(**tls: object) -> ServingSettings:
    return ServingSettings(base_dir="/nonexistent", **tls)  # type: ignore[arg-type]


def test_rest_client_verifies_the_server_against_the_configured_ca(
    https_server: tuple[str, bool], pki: Pki, local_settings: Settings
) -> None:
    url, mtls = https_server
    client_tls = {"client_cert": pki.client_cert, "client_key": pki.client_key}
    s = local_settings.model_copy(update={"serving": _serving(ca_bundle=pki.ca, **client_tls)})
    assert ServingClient.from_settings(s, url).version_state(MODEL, 1) == ("AVAILABLE", "")

    # Without the CA the system store does not know the server: refused before any request.
    no_ca = local_settings.model_copy(update={"serving": _serving(**client_tls)})
    with pytest.raises(requests.exceptions.SSLError):
        ServingClient.from_settings(no_ca, url).status(MODEL)
    assert not ServingClient.from_settings(no_ca, url).healthy()

    # Without a client certificate: fine for plain TLS, refused where the server requires mTLS.
    ca_only = ServingClient(url, verify=pki.ca)
    if mtls:
        with pytest.raises(requests.ConnectionError):
            ca_only.status(MODEL)
    else:
        assert ca_only.status(MODEL)["model_version_status"][0]["state"] == "AVAILABLE"


@pytest.fixture(params=[False, True], ids=["tls", "mtls"])
def grpc_server(request: pytest.FixtureRequest, pki: Pki) -> Iterator[tuple[str, bool]]:
    """The project's gRPC API (an empty ModelManager) behind TLS on 127.0.0.1."""
    from pipelines.serving.grpc_api import make_grpc_server
    from pipelines.serving.server import ModelManager

    mtls = bool(request.param)
    creds = grpc.ssl_server_credentials(
        [(Path(pki.server_key).read_bytes(), Path(pki.server_cert).read_bytes())],
        root_certificates=Path(pki.ca).read_bytes() if mtls else None,
        require_client_auth=mtls,
    )
    server, port = make_grpc_server(ModelManager(), "127.0.0.1", 0, credentials=creds)
    try:
        yield f"127.0.0.1:{port}", mtls
    finally:
        server.stop(grace=None)


def _status_code(target: str, cfg: ServingSettings) -> grpc.StatusCode:
    """The code of a GetModelStatus for a model the server does not have: NOT_FOUND means the
    call crossed TLS and reached the servicer."""
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "no_such_model"
    with grpc_channel(target, cfg) as channel:
        try:
            model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(req, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_grpc_channel_uses_tls_with_the_configured_ca(
    grpc_server: tuple[str, bool], pki: Pki
) -> None:
    target, mtls = grpc_server
    client = {"client_cert": pki.client_cert, "client_key": pki.client_key}
    ok = _serving(grpc_tls=True, ca_bundle=pki.ca, **client)
    assert _status_code(target, ok) == grpc.StatusCode.NOT_FOUND
    # Unknown CA (system roots), or plaintext against a TLS port: no call gets through.
    assert _status_code(target, _serving(grpc_tls=True, **client)) == (grpc.StatusCode.UNAVAILABLE)
    assert _status_code(target, _serving(**client)) == grpc.StatusCode.UNAVAILABLE
    ca_only = _serving(grpc_tls=True, ca_bundle=pki.ca)
    expected = grpc.StatusCode.UNAVAILABLE if mtls else grpc.StatusCode.NOT_FOUND
    assert _status_code(target, ca_only) == expected


def test_mlflow_client_uses_ca_client_certificate_and_token(
    https_server: tuple[str, bool], pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings -> MLFLOW_TRACKING_* -> MLflow's REST client, against an HTTPS stub of the
    tracking server (mTLS with the certificate and key as separate files)."""
    from mlflow.exceptions import MlflowException

    from pipelines.registry import Registry
    from pipelines.tls import CLIENT_CERT, INSECURE, SERVER_CERT, TOKEN

    url, _ = https_server
    for name in (CLIENT_CERT, INSECURE, SERVER_CERT, TOKEN):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    cfg = MlflowSettings(
        tracking_uri=url,
        experiment="tls-test",
        token="tls-test-token",  # type: ignore[arg-type]
        ca_bundle=pki.ca,
        client_cert=pki.client_cert,
        client_key=pki.client_key,
    )
    assert Registry(cfg).experiment_id() == "7"
    assert _Handler.seen[-1]["Authorization"] == "Bearer tls-test-token"

    # The same client without the CA is refused by its own verification.
    monkeypatch.delenv(SERVER_CERT)
    with pytest.raises(MlflowException, match=r"(?i)ssl|certificate"):
        Registry(cfg.model_copy(update={"ca_bundle": None})).experiment_id()
