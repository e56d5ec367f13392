"""Where studies live: PostgreSQL through Optuna's RDB storage, never SQLite (it locks under
parallel workers). Production gives the URL (``tuning.storage`` from a secret or an Airflow
connection); locally it is a database on the home's own PostgreSQL, started here when needed
and stopped only by whoever started it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines.config import Settings, TuningSettings
from pipelines.postgres import masked

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# The variable a worker process (a subprocess of `mlops tune`, a pod) reads the URL from:
# the name load_settings reads `tuning.storage` from, so a Kubernetes secret serves both.
STORAGE_ENV = "MLOPS__TUNING__STORAGE"


class StorageUnavailable(RuntimeError):
    """The study's database cannot be reached; the message names it, credentials masked."""


@dataclass(frozen=True)
class Storage:
    """A resolved study storage: its URL (holds a password) and whether this process started
    the local server behind it (then it stops it, and nobody else does)."""

    url: str
    owned: bool = False

    @property
    def masked(self) -> str:
        return masked(self.url)


def configured_url(settings: Settings) -> str | None:
    """The deployment's storage URL (a secret), None for the local PostgreSQL."""
    t = settings.tuning
    return t.storage.get_secret_value() if t.storage is not None else None


def local_server(settings: Settings) -> Any:
    """The home's PostgreSQL (shared with Airflow's metadata DB locally)."""
    from pipelines.airflow_local import postgres

    return postgres(settings.home, settings.postgres.port)


def acquire(settings: Settings) -> Storage:
    """The storage, the local server started if none runs (``owned`` then). A configured URL
    starts nothing. Pair with :func:`release`, or use :func:`study_storage`."""
    given = configured_url(settings)
    if given:
        return Storage(given)
    if settings.profile != "local":
        raise StorageUnavailable(
            f"Profile {settings.profile!r} has no study storage: set tuning.storage "
            "(MLOPS__TUNING__STORAGE, from a secret) or tuning.storage_conn_id."
        )
    pg = local_server(settings).start()
    return Storage(pg.create_database(settings.tuning.database), owned=pg.started)


def release(settings: Settings, storage: Storage) -> None:
    """Stop the local server if ``storage`` started it; a server someone else runs stays up."""
    if storage.owned:
        local_server(settings).stop()


@contextlib.contextmanager
def study_storage(settings: Settings) -> Iterator[Storage]:
    """:func:`acquire` for the duration: stopped after (success, failure, Ctrl-C) if started."""
    storage = acquire(settings)
    try:
        yield storage
    finally:
        release(settings, storage)


def local_url(settings: Settings) -> str:
    """The URL of the local studies database on a server that already runs (a DAG task after
    the setup task started it): the password comes from the server's own directory."""
    given = configured_url(settings)
    if given:
        return given
    pg = local_server(settings)
    info = pg.daemon.info()
    if info is None:
        raise StorageUnavailable(
            f"The local study storage (PostgreSQL in {pg.dir}) is not running; the tuning "
            "DAG's start_storage task or `mlops tune` starts it."
        )
    pg.port = int(info["port"])
    return str(pg.url(settings.tuning.database))


def open_storage(t: TuningSettings, url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with heartbeats: a trial whose worker stops beating for
    ``tuning.grace_s`` is failed and re-queued (RetryHeartbeatStaleTrialCallback). A database that
    cannot be reached fails with one sentence naming it (password masked)."""
    import warnings

    import optuna
    import sqlalchemy.exc

    # Heartbeats and the retry callback are "experimental" in Optuna: one warning per worker
    # about it is noise in every task log.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Workers use ask/tell with their own heartbeat thread (study.Heartbeat), knowingly.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    try:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs={"pool_pre_ping": True, "connect_args": _connect_args(url)},
            heartbeat_interval=t.heartbeat_s,
            grace_period=t.grace_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=t.max_retry, inherit_intermediate_values=False
            ),
        )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StorageUnavailable(
            f"The study storage {masked(url)} cannot be reached: {masked(reason)}"
        ) from None


def _connect_args(url: str) -> dict[str, Any]:
    # A dead host fails in seconds instead of the driver's default minutes.
    return {"connect_timeout": 10} if url.startswith("postgresql") else {}


@contextlib.contextmanager
def budget_lock(storage: optuna.storages.RDBStorage, study_id: int) -> Iterator[None]:
    """A PostgreSQL advisory lock per study: "count the trials, then create one" is atomic
    across workers, so the budget is never overshot (MaxTrialsCallback counts after the
    fact). On other databases (unit tests on SQLite, one worker) it is a no-op."""
    import sqlalchemy as sa

    engine = storage.engine
    if engine.dialect.name != "postgresql":
        yield
        return
    key = 0x6D6C6F7073 * 1000 + study_id  # "mlops" + study: clear of other users' locks
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()
