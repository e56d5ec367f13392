"""Secrets never reach logs, XCom, run reports, the audit trail or MLflow: a real DAG run on S3
(moto) with known credentials, then every place a run leaves text is scanned for them."""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pendulum
import pytest

from pipelines.config import Settings
from pipelines.data import layout
from pipelines.registry import Registry
from pipelines.store import open_store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DAG_ID = "mlops_training_pipeline"
DATE, DATE_2 = "2026-11-01", "2026-11-02"
MODEL = "secrets_test_model"

# Distinctive values: any hit is a leak, not a coincidence. moto accepts any key pair.
SECRETS = {
    "store.key": "AKIAMLOPSTESTKEY0001",
    "store.secret": "mlopsTestSecret/0123456789+abcdefghijKLMN",
    "mlflow.token": "mlflow-bearer-3e8b5a1d9c7f2460bb2d",
}
MLFLOW_ENV = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)


def encodings(secret: str) -> set[str]:
    """The secret as written, URL-quoted, and base64 (std and URL-safe) at each of the three
    byte alignments it can have inside a longer encoded blob (edge characters dropped)."""
    raw = secret.encode()
    out = {secret, quote(secret, safe="")}
    for pad in range(3):
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            text = enc(b"\0" * pad + raw).decode()
            out.add(text[(4 * pad + 2) // 3 : -4])
    return out


def leaks(text: str) -> list[str]:
    """Names of the secrets found in ``text`` in any of their encodings."""
    return [name for name, value in SECRETS.items() if any(e in text for e in encodings(value))]


def files_text(root: Path) -> dict[str, str]:
    """Every file under ``root``, bytes decoded leniently (SQLite files and logs alike)."""
    return {
        str(p): p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file()
    }


def xcom_values(run_id: str) -> list[str]:
    """Every XCom of the run, as stored in the metadata DB."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(XComModel.task_id, XComModel.key, XComModel.value).where(
                XComModel.dag_id == DAG_ID, XComModel.run_id == run_id
            )
        ).all()
    return [f"{task}/{key}: {json.dumps(value, default=str)}" for task, key, value in rows]


def mlflow_text(settings: Settings) -> str:
    """Params and tags of every run of the experiment, and tags of every model version."""
    reg = Registry(settings.mlflow)
    runs = reg.client.search_runs([reg.experiment_id()])
    versions = reg.client.search_model_versions(f"name = '{settings.mlflow.model_name}'")
    return json.dumps(
        {
            "runs": [{"params": r.data.params, "tags": r.data.tags} for r in runs],
            "versions": [dict(v.tags) for v in versions],
        }
    )


@pytest.fixture
def secret_env(
    mlops_env: Path,
    moto_server: str,
    s3_bucket: str,
    mlflow_server: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Settings]:
    """Settings with the known credentials, from the environment: the lake on the moto bucket,
    MLflow on a real tracking server (which receives the token as a bearer header)."""
    from pipelines.config import settings

    for name in MLFLOW_ENV:  # restore whatever the run exports (Registry sets these)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLOPS__STORE__ROOT", f"s3://{s3_bucket}/lake")
    monkeypatch.setenv("MLOPS__STORE__ENDPOINT_URL", moto_server)
    monkeypatch.setenv("MLOPS__STORE__REGION", "us-east-1")
    monkeypatch.setenv("MLOPS__STORE__SSE", "AES256")
    monkeypatch.setenv("MLOPS__STORE__KEY", SECRETS["store.key"])
    monkeypatch.setenv("MLOPS__STORE__SECRET", SECRETS["store.secret"])
    monkeypatch.setenv("MLOPS__MLFLOW__TOKEN", SECRETS["mlflow.token"])
    monkeypatch.setenv("MLOPS__MLFLOW__TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLOPS__MLFLOW__ARTIFACT_ROOT", "")  # the server's proxied artifacts
    monkeypatch.setenv("MLOPS__MLFLOW__EXPERIMENT", "secrets_test")  # the server is shared
    monkeypatch.setenv("MLOPS__MLFLOW__MODEL_NAME", MODEL)
    # botocore would fall back to these; the run must use the configured pair instead.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unused-env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unused-env-secret")
    settings.cache_clear()
    s = settings()
    assert s.store.key is not None and s.store.key.get_secret_value() == SECRETS["store.key"]
    yield s
    settings.cache_clear()


def test_the_encodings_catch_a_secret_inside_a_longer_blob() -> None:
    secret = SECRETS["store.secret"]
    for prefix in ("", "a", "ab"):
        blob = base64.b64encode(f"{prefix}key:{secret}:tail".encode()).decode()
        assert leaks(f"Authorization: Basic {blob}") == ["store.secret"]
    assert leaks(f"s3://x?secret={quote(secret, safe='')}") == ["store.secret"]
    assert leaks("nothing to see") == []


def run_day(date: str, **conf: object):  # type: ignore[no-untyped-def]
    from airflow.models import DagBag

    dag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags")).dags[DAG_ID]
    return dag.test(
        logical_date=pendulum.parse(f"{date}T00:00:00+00:00"),
        run_conf={
            "date": date,
            "nodes": 1,
            "epochs": 1,
            # The model's quality is not under test; bless it so the run reaches the canary.
            "force": "bless",
            "force_reason": "secrets test",
            **conf,
        },
    )


def test_dag_runs_on_s3_leak_no_secret(
    airflow_db: None,
    secret_env: Settings,
    s3_bucket: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Day 1 deploys a first model; day 2 runs a canary through Envoy, judged from its access
    log, with the lake on S3 and MLflow behind a bearer token."""
    from airflow.utils.state import DagRunState

    from pipelines import stages

    s = secret_env
    root = f"s3://{s3_bucket}/lake"
    caplog.set_level(logging.DEBUG)  # the root logger: boto, MLflow, Airflow, the stages
    runs, capfd_text = [], ""
    for date, drift in ((DATE, 0.0), (DATE_2, 0.3)):
        stages.generate_data(s, date, rows=4000, drift=drift)
        dr = run_day(date, canary_steps=[50])
        captured = capfd.readouterr()
        assert dr.state == DagRunState.SUCCESS, captured.out[-4000:]
        runs.append((date, dr.run_id))
        capfd_text += captured.out + captured.err

    store = open_store(s.store)
    reports = {
        k: store.read_text(k)
        for date, run_id in runs
        for k in store.list(f"{layout.run_report(DAG_ID, date)}/{run_id}")
    }
    audit = {k: store.read_text(k) for k in store.list("audit/entries")}
    lake = {k: store.read_bytes(k).decode("utf-8", "replace") for k in store.list("", True)}
    logs = "\n".join([caplog.text] + [f"{r.msg} {r.args!r}" for r in caplog.records])
    sources: dict[str, str] = {
        "task logs (logging, DEBUG)": logs,
        "stdout/stderr (torchrun nodes, prints)": capfd_text,
        "AIRFLOW_HOME (logs, metadata DB)": "\n".join(
            files_text(Path(os.environ["AIRFLOW_HOME"])).values()
        ),
        "XCom": "\n".join(v for _, run_id in runs for v in xcom_values(run_id)),
        "run reports": "\n".join(reports.values()),
        "audit entries": "\n".join(audit.values()),
        "lake objects": "\n".join(lake.values()),
        "MLflow params and tags": mlflow_text(s),
        "MLOPS_HOME (serving and Envoy logs, model config)": "\n".join(
            files_text(Path(s.home)).values()
        ),
    }

    found = {name: leaks(text) for name, text in sources.items()}
    assert not any(found.values()), {k: v for k, v in found.items() if v}

    # Positive controls: every source holds text of these runs, so a clean scan means something.
    controls = dict.fromkeys(sources, root)
    controls["stdout/stderr (torchrun nodes, prints)"] = "[node 0]"
    controls["MLOPS_HOME (serving and Envoy logs, model config)"] = MODEL
    # The MLflow client really had the token to send (Registry exported it).
    assert os.environ.get("MLFLOW_TRACKING_TOKEN") == SECRETS["mlflow.token"]
    for name, text in sources.items():
        assert controls[name] in text, f"{name}: the scan saw nothing of the runs"
    # Botocore logged each signed request at DEBUG; the access key id in it was masked.
    assert "Credential=***/" in logs
    tasks = {k.rsplit("/", 1)[-1].removesuffix(".json") for k in reports}
    assert {"train_model", "register_model", "stage_canary"} <= tasks, tasks
    events = {json.loads(e)["event"] for e in audit.values()}
    assert {"data.accepted", "model.registered", "rollout.canary_staged"} <= events, events
    # Day 2's controller judged a window with samples from both labels: the secrets did not
    # stand between it and the data plane's evidence. Whether the judge then promotes is the
    # canary tests' business, not this one's.
    monitor = [json.loads(v) for k, v in reports.items() if k.endswith("/monitor_canary.json")]
    judged = [m for m in monitor if m.get("windows", 0) >= 1]
    assert judged and judged[-1]["decision"] in ("promote", "rollback"), monitor
    assert not judged[-1]["reason"].startswith("monitoring failed"), judged[-1]
    assert judged[-1]["last_window"]["canary_n"] > 0, judged[-1]
    assert judged[-1]["last_window"]["stable_n"] > 0, judged[-1]
