"""Secrets in settings: hidden in repr and config errors, masked in every log record."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_settings, secret_values, with_overrides
from pipelines.redaction import protect, redact

KEY, SECRET = "AKIAREDACTIONTEST001", "redaction/secret+value0123456789abcdefgh"
TOKEN = "mlflow-token-redaction-test"


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {
        "MLOPS_HOME": str(home),
        "MLOPS__STORE__KEY": KEY,
        "MLOPS__STORE__SECRET": SECRET,
        "MLOPS__MLFLOW__TOKEN": TOKEN,
        **extra,
    }


def test_secrets_load_from_the_environment_and_never_show_in_repr(tmp_path: Path) -> None:
    s = load_settings(_env(tmp_path))
    assert s.store.key is not None and s.store.key.get_secret_value() == KEY
    assert s.mlflow.token is not None and s.mlflow.token.get_secret_value() == TOKEN
    assert sorted(secret_values(s)) == sorted([KEY, SECRET, TOKEN])
    shown = f"{s!r} {s} {s.store} {s.canary} {s.mlflow}"
    assert not [v for v in (KEY, SECRET, TOKEN) if v in shown]
    # Per-run overrides keep them.
    again = with_overrides(s, train={"epochs": 2})
    assert again.store.secret is not None and again.store.secret.get_secret_value() == SECRET


def test_config_errors_name_the_field_but_not_the_value(tmp_path: Path) -> None:
    # A missing field reports its section; pydantic would print the section's input with it.
    with pytest.raises(ConfigError) as info:
        load_settings(_env(tmp_path, MLOPS__STORE__ROOT="", MLOPS__CANARY__STEPS="x"))
    message = str(info.value)
    assert "store.root" in message and "canary.steps" in message
    assert not [v for v in (KEY, SECRET, TOKEN) if v in message]
    assert info.value.__cause__ is None and info.value.__suppress_context__
    s = load_settings(_env(tmp_path))
    with pytest.raises(ConfigError) as info:
        with_overrides(s, canary={"steps": "x"}, store={"key": 1})
    assert KEY not in str(info.value) and "canary.steps" in str(info.value)


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exclude each other"):
        load_settings(
            _env(
                tmp_path,
                MLOPS__MLFLOW__INSECURE_SKIP_VERIFY="true",
                MLOPS__MLFLOW__CA_BUNDLE="/ca.pem",
            )
        )
    with pytest.raises(ConfigError, match="client_key needs"):
        load_settings(_env(tmp_path, MLOPS__MLFLOW__CLIENT_KEY="/k.pem"))
    with pytest.raises(ConfigError, match="go together"):
        load_settings(_env(tmp_path, MLOPS__SERVING__CLIENT_CERT="/c.pem"))


def test_log_records_are_redacted_when_created(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    load_settings(_env(tmp_path))  # loading registers the secrets
    log = logging.getLogger("botocore.endpoint")  # a third-party logger, at DEBUG
    with caplog.at_level(logging.DEBUG):
        log.debug("headers: %s", {"Authorization": f"Credential={KEY}/20261101/s3"})
        log.debug("url: %s", f"https://x/?t={SECRET.replace('/', '%2F').replace('+', '%2B')}")
        try:
            raise RuntimeError(f"token {TOKEN} refused")
        except RuntimeError:
            log.exception("call failed for %s", KEY)
        log.info("nothing secret: %d%%", 5)
    text = caplog.text + " ".join(r.getMessage() for r in caplog.records)
    assert not [v for v in (KEY, SECRET, TOKEN, "redaction%2Fsecret") if v in text]
    assert "Credential=***/20261101" in text and "token *** refused" in text
    assert "nothing secret: 5%" in text  # untouched records format as before


def test_short_values_are_not_registered() -> None:
    protect("abc", None, "")
    assert redact("abc and more") == "abc and more"
