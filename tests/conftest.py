"""Shared fixtures: isolated MLOPS_HOME and settings, a moto S3 server, an Airflow metadata DB.

Airflow reads its configuration at import, so its environment is set here, before any test
module imports it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.ports import free_port
from tests.ports import FREE_PORTS

ROOT = Path(__file__).resolve().parents[1]
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="mlops-airflow-test-")


def pytest_configure(config: pytest.Config) -> None:
    os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
    os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.pop("AWS_PROFILE", None)
    if str(ROOT / "plugins") not in sys.path:
        sys.path.insert(0, str(ROOT / "plugins"))


def pytest_unconfigure(config: pytest.Config) -> None:
    """This process's Airflow home (each pytest-xdist worker has its own) goes with it."""
    shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)


@pytest.fixture
def mlops_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh MLOPS_HOME, serving on a free port; the process-wide settings see it."""
    from pipelines.config import settings

    home = tmp_path / "mlops"
    monkeypatch.setenv("MLOPS_HOME", str(home))
    for name, value in FREE_PORTS.items():
        monkeypatch.setenv(name, value)
    # One replica per label where a test is not about the data plane: real processes, half
    # the start-up CPU on a 2-core machine (tests/e2e/test_dataplane.py runs two).
    monkeypatch.setenv("MLOPS__DATAPLANE__REPLICAS", "1")
    monkeypatch.delenv("MLOPS_PROFILE", raising=False)
    monkeypatch.delenv("MLOPS_CONFIG", raising=False)
    settings.cache_clear()
    yield home
    from pipelines.serving.daemon import stop_all

    stop_all(home / "serving")
    settings.cache_clear()


@pytest.fixture
def local_settings(mlops_env: Path):  # type: ignore[no-untyped-def]
    from pipelines.config import settings

    return settings()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A real S3 endpoint (moto's server mode) on 127.0.0.1, stopped after the session."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_server: str) -> Iterator[str]:
    """An empty bucket on the moto server; state is reset after the test."""
    import boto3
    import requests
    import s3fs

    name = "mlops-test"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=name)
    yield name
    requests.post(f"{moto_server}/moto-api/reset", timeout=10)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The object store twice: on local files, and on the moto S3 server with SSE on."""
    from pipelines.config import StoreSettings
    from pipelines.store import ObjectStore

    if request.param == "file":
        return ObjectStore(f"file://{tmp_path}/lake")
    cfg = StoreSettings(
        root=f"s3://{request.getfixturevalue('s3_bucket')}/lake",
        endpoint_url=request.getfixturevalue("moto_server"),
        key="testing",
        secret="testing",
        sse="AES256",
    )
    return ObjectStore.from_settings(cfg)


def _run_python(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter (as Airflow's parser would); its last stdout line
    is JSON."""
    import json
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "plugins"), **env},
        timeout=300,
        check=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.fixture
def run_python():  # type: ignore[no-untyped-def]
    """``run_python(code, **env) -> dict``: code in a fresh interpreter, JSON on its last line."""
    return _run_python


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """A migrated SQLite metadata DB in a temporary AIRFLOW_HOME (once per session)."""
    from airflow.utils import db

    db.resetdb()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, artifacts proxied through the
    server as ``mlflow-artifacts:``); its URL. Shared by the session: use your own experiment
    and model names. The process group is terminated at the end."""
    from tests.processes import http_ok, running

    base = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{base / 'mlflow.db'}",
        "--artifacts-destination",
        str(base / "artifacts"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # No job runner: it keeps a huey store in a /dev/shm directory that outlives the server.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    health = lambda: http_ok(f"{url}/health")  # noqa: E731
    with running(cmd, env, base / "server.log", health, 120, f"mlflow server on {url}"):
        yield url


# The heaviest modules first, longest first (seconds alone on this 2-core machine, from
# docs/testing.md): under `-n 2 --dist loadfile --no-loadscope-reorder` each worker takes the
# next module in this order when it runs low, so the long ones start at once, in different
# workers, and the short ones fill in after. Order only: which tests run and what they assert
# does not change.
HEAVY_FIRST = (
    "tests/e2e/test_demo.py",
    "tests/e2e/test_scheduler.py",
    "tests/e2e/test_canary_rollout.py",
    "tests/e2e/test_pipeline_dag.py",
    "tests/e2e/test_monitoring_dag.py",
    "tests/integration/test_evaluation.py",
    "tests/integration/test_training.py",
    "tests/e2e/test_secrets.py",
    "tests/e2e/test_dataplane.py",
    "tests/integration/test_tuning_study.py",
    "tests/integration/test_batch_scoring.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules of ``HEAVY_FIRST`` first, in its order; the rest as collected."""
    rank = {m: i for i, m in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda it: rank.get(it.nodeid.split("::", 1)[0], len(rank)))


_TIER_SECONDS: dict[str, float] = {}
_MODULE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Sum each tier's and module's time (setup, call and teardown of its tests)."""
    parts = Path(report.fspath).parts
    tier = parts[parts.index("tests") + 1] if "tests" in parts else "other"
    _TIER_SECONDS[tier] = _TIER_SECONDS.get(tier, 0.0) + report.duration
    module = report.nodeid.split("::", 1)[0]
    _MODULE_SECONDS[module] = _MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if not _TIER_SECONDS:
        return
    terminalreporter.section("time per tier (setup + call + teardown)")
    for tier, seconds in sorted(_TIER_SECONDS.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{tier:<12} {seconds:8.1f} s")
    terminalreporter.section("the 15 slowest modules")
    for module, seconds in sorted(_MODULE_SECONDS.items(), key=lambda kv: -kv[1])[:15]:
        terminalreporter.write_line(f"{seconds:8.1f} s  {module}")
